"""Nothing wedges a run (issue #32): a state machine over a run directory's life, in process.

Rules launch the job (trainer.resume=auto, never, or a PATH from this run or another), stopped at a random step
by a signal, a crash at one of tests/crash_at.py's points or at a training step, or trainer.max_steps; and damage
the newest checkpoint, best.pt, final.pt, metrics.jsonl or summary.json (truncate, corrupt, delete). After every rule:

- the run directory is valid: every file in it is whole (checkpoints load, every metrics line is a record, a
  summary is a summary), or is a damage this machine made that no launch has had reason to touch yet, or the
  temporary file of a save that a crash cut short; at most keep_checkpoints step files (one more after a
  crash between a save and its pruning);
- no launch loses the newest good checkpoint, and a refused launch changes nothing;
- the same command, without its stop, run on a copy, either finishes with a summary.json whose final weights
  (final.pt and the last step file) equal an uninterrupted run's bitwise (deterministic mode), or refuses in one line that names the file and the
  fix; that fix, applied, then finishes.

A damaged final.pt or last step file of a completed run is not written again: its weights are not compared.
Seeded (derandomize) like tests/test_fuzz.py; MNIST_ADD_FUZZ_EXAMPLES runs more examples with fresh draws
(docs/development.md, Fuzzing).
"""

import hashlib
import os
import shutil
import signal
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import DATA_ROOT
from crash_at import POINTS, crashing
from mnist_add import checkpoint
from mnist_add.agreement import Agreement
from mnist_add.checkpoint import Checkpointer, CheckpointError
from mnist_add.config import load_config
from mnist_add.rundir import METRICS_NAME, SUMMARY_NAME, RunDirError, completed_summary
from mnist_add.tracking import DAMAGED_SUFFIX, _record
from mnist_add.train import train

EPOCHS, STEPS_PER_EPOCH, KEEP = 2, 16, 2
TOTAL = EPOCHS * STEPS_PER_EPOCH
EXAMPLES = int(os.environ.get("MNIST_ADD_FUZZ_EXAMPLES", "12"))


class Crash(BaseException):
    """The process died here (in process: a SIGKILL would end the test run too)."""


def die():
    raise Crash


def config(run_dir: Path, resume: str = "auto", max_steps: int = 0, **extra: str):
    overrides = [f"data.root={DATA_ROOT}", "data.download=false", f"run.dir={run_dir}", f"trainer.resume={resume}",
                 f"trainer.epochs={EPOCHS}", "trainer.deterministic=true", "trainer.num_threads=1",
                 f"trainer.keep_checkpoints={KEEP}", f"trainer.max_steps={max_steps}",
                 *(f"{key}={value}" for key, value in extra.items())]
    return load_config(["debug"], overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, with a checkpoint every 4 steps kept: the other run that PATHs come from."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(config(run_dir, **{"trainer.save_every_steps": "4", "trainer.keep_checkpoints": "100"}))
    return run_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / f"checkpoints/step-{TOTAL:08d}.pt")[checkpoint.MODEL]


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def snapshot(run_dir: Path) -> dict[str, str | None]:
    return {str(p.relative_to(run_dir)): digest(p) for p in sorted(run_dir.rglob("*")) if p.name != ".lock"}


@contextmanager
def stopping(kind: str, step: int, point: str):
    """The job stops at (about) `step`: a SIGTERM it notices at its next agreement, or a crash."""
    agree = Agreement.agree

    def agree_then_stop(self, progress, signals):
        if progress.step >= step:
            if kind == "signal":
                signal.raise_signal(signal.SIGTERM)
            elif kind == "crash-at-step":
                raise Crash
        return agree(self, progress, signals)
    with ExitStack() as stack:
        if kind == "crash":
            stack.enter_context(crashing(point, step, die))
        elif kind in ("signal", "crash-at-step"):
            Agreement.agree = agree_then_stop
            stack.callback(setattr, Agreement, "agree", agree)
        yield


def one_line_with_file_and_fix(err: Exception, *paths: Path) -> bool:
    text = str(err)
    return "\n" not in text and any(str(p) in text for p in paths) and any(
        fix in text for fix in ("delete it", "use a new run.dir", "trainer.resume=auto"))


class RunDirLife(RuleBasedStateMachine):
    """One run.dir, launched, stopped and damaged at random; `reference` is an uninterrupted run of the same
    config (set by the test below)."""

    reference: Path = None

    @initialize()
    def start(self):
        self.root = Path(tempfile.mkdtemp(prefix="lifecycle-"))
        self.run_dir = self.root / "run"
        self.damaged: dict[str, str | None] = {}  # files this machine damaged: their digest then (None: deleted)
        self.command = {"resume": "auto"}
        self.crashed = False  # since the last launch that cleared what a crash leaves
        self.expected_weights = final_weights(self.reference)

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    # --- rules ------------------------------------------------------------------------------------------------

    @rule(resume=st.sampled_from(["auto", "never", "this run", "another run"]), data=st.data(),
          stop=st.sampled_from(["none", "signal", "crash", "crash-at-step", "max_steps"]),
          step=st.integers(1, TOTAL), point=st.sampled_from(POINTS))
    def launch(self, resume, data, stop, step, point):
        self.command = {"resume": self.path_for(resume, data), "max_steps": step if stop == "max_steps" else 0}
        before, newest = snapshot(self.run_dir) if self.run_dir.exists() else {}, self.newest_good_step()
        try:
            with stopping(stop, step, point):
                train(config(self.run_dir, **self.command))
            self.crashed = False
        except Crash:
            self.crashed = True
        except (CheckpointError, RunDirError) as err:
            assert one_line_with_file_and_fix(err, self.run_dir, Path(self.command["resume"])), err
            after = snapshot(self.run_dir) if self.run_dir.exists() else {}
            assert after == before, "a refused launch changed the run directory"
        assert self.newest_good_step() >= newest, "a launch lost the newest good checkpoint"

    def path_for(self, resume: str, data) -> str:
        if resume == "another run":
            return str(data.draw(st.sampled_from(sorted((self.reference / "checkpoints").glob("*.pt")))))
        if resume == "this run":
            own = sorted((self.run_dir / "checkpoints").glob("*.pt")) if self.run_dir.exists() else []
            return str(data.draw(st.sampled_from(own))) if own else "auto"
        return resume

    @precondition(lambda self: self.run_dir.exists())
    @rule(what=st.sampled_from(["newest", "best", "final", "metrics", "summary"]),
          how=st.sampled_from(["truncate", "corrupt", "delete"]))
    def damage(self, what, how):
        steps = Checkpointer(self.run_dir / "checkpoints", KEEP, write=False).step_paths()
        path = {"newest": steps[0] if steps else None, "best": self.run_dir / "checkpoints" / checkpoint.BEST_NAME,
                "final": self.run_dir / "checkpoints" / checkpoint.FINAL_NAME,
                "metrics": self.run_dir / METRICS_NAME, "summary": self.run_dir / SUMMARY_NAME}[what]
        if path is None or not path.is_file():
            return
        content = path.read_bytes()
        if how == "delete":
            path.unlink()
            self.damaged[str(path)] = None
            return
        middle = len(content) // 2
        flipped = bytes(b ^ 0xFF for b in content[middle:middle + 64])
        path.write_bytes(content[:middle] if how == "truncate" else content[:middle] + flipped + content[middle + 64:])
        self.damaged[str(path)] = digest(path)

    # --- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def the_run_directory_is_valid(self):
        if not self.run_dir.exists():
            return
        for path in self.run_dir.rglob("*"):
            if path.is_dir() or path.name == ".lock" or self.damaged.get(str(path), "") == digest(path):
                continue
            if checkpoint.TMP_MARK in path.name:
                assert self.crashed, f"{path} left by a launch that did not crash"
            elif path.suffix == ".pt":
                checkpoint.load(path, keys=checkpoint.TRAINING_KEYS)
            elif path.name == METRICS_NAME:
                assert all(_record(line) for line in path.read_bytes().splitlines(keepends=True)), path
            elif path.name == SUMMARY_NAME:
                assert completed_summary(path) is not None, path
            else:
                assert path.name in ("config.yaml", METRICS_NAME + DAMAGED_SUFFIX), path
        steps = Checkpointer(self.run_dir / "checkpoints", KEEP, write=False).step_paths()
        assert len(steps) <= KEEP + self.crashed, steps

    @invariant()
    def the_same_command_finishes_or_says_the_fix(self):
        copy = self.root / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        if self.run_dir.exists():
            shutil.copytree(self.run_dir, copy)
        command = {**self.command, "max_steps": 0}
        summary = self.finish_by_the_fixes(copy, command)
        assert summary["status"] == "completed", summary
        for final in (copy / "checkpoints" / checkpoint.FINAL_NAME, copy / f"checkpoints/step-{TOTAL:08d}.pt"):
            original = str(self.run_dir / final.relative_to(copy))
            destroyed = original in self.damaged and self.damaged[original] == digest(final)
            if summary["step"] == TOTAL and not destroyed:
                weights = checkpoint.load(final)[checkpoint.MODEL]
                assert all(torch.equal(weights[k], self.expected_weights[k]) for k in weights), f"{final} differs"

    def finish_by_the_fixes(self, copy: Path, command: dict) -> dict:
        """The command; while it refuses, what its one line says to do, then the command that fix names."""
        for _ in range(3):  # resume=never, then a damaged PATH, then damaged step files: each says its fix
            try:
                return train(config(copy, **command))
            except (CheckpointError, RunDirError) as err:
                assert one_line_with_file_and_fix(err, copy, Path(command["resume"])), err
                text = str(err)
            if text.startswith("no usable checkpoint"):  # "delete it": each unusable step file
                for path in Checkpointer(copy / "checkpoints", KEEP, write=False).step_paths():
                    path.unlink()
            else:  # trainer.resume=never ("... or trainer.resume=auto to continue it"), or a damaged PATH
                assert "trainer.resume=auto" in text or "delete it" in text, text
                command = {**command, "resume": "auto"}
        raise AssertionError(f"still refused after three fixes: {text}")

    def newest_good_step(self) -> int:
        for path in Checkpointer(self.run_dir / "checkpoints", KEEP, write=False).step_paths():
            try:
                return checkpoint.load(path, keys=checkpoint.TRAINING_KEYS)[checkpoint.PROGRESS]["step"]
            except CheckpointError:
                continue
        return -1


def test_no_sequence_of_launches_stops_and_damage_wedges_a_run(reference):
    RunDirLife.reference = reference
    RunDirLife.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=6, derandomize="MNIST_ADD_FUZZ_EXAMPLES" not in os.environ,
        deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    RunDirLife.TestCase("runTest").runTest()


def replay(reference, *rules):
    """A sequence of rules as hypothesis ran it, every invariant checked after each: the failures found, kept."""
    RunDirLife.reference = reference
    machine = RunDirLife()
    machine.start()
    try:
        for name, kwargs in rules:
            getattr(machine, name)(**kwargs)
            machine.the_run_directory_is_valid()
            machine.the_same_command_finishes_or_says_the_fix()
    finally:
        machine.teardown()


def test_a_fix_that_meets_a_second_refusal_leads_on_to_its_fix(reference):
    # The long run on 1be74c9: resume=never refused ("... or trainer.resume=auto"), and auto then refused the only
    # step file, truncated ("delete it"): two fixes, one after the other, and the run finishes.
    replay(reference, ("launch", dict(resume="auto", data=None, stop="signal", step=1, point="mid-best")),
           ("damage", dict(what="metrics", how="truncate")), ("damage", dict(what="newest", how="truncate")),
           ("launch", dict(resume="never", data=None, stop="none", step=1, point="mid-best")))
