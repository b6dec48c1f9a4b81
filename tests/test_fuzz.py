"""Every input either works or is one line of the project's own error: property tests (hypothesis) over the
config schema, config files, run directories, the command lines and the checkpoint reader.

Seeded (derandomize), so CI runs the same cases every time. MNIST_ADD_FUZZ_EXAMPLES sets the number of cases per
property and draws fresh ones (docs/development.md, Fuzzing: a long fuzz). Every input that ever failed stays
below as an @example.
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import tempfile
import typing
from enum import Enum
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from job import submit
from job.cluster import SweepIndexError
from conftest import run_module
from mnist_add import checkpoint, compare, evaluate, predict, report
from mnist_add.checkpoint import Checkpointer, CheckpointError
from mnist_add.config import (ConfigError, flatten, load_config, parse_args, refuse, to_dict, training_config,
                              upgraded)
from mnist_add.distributed import Runtime, launcher_ranks, local_world_size, rendezvous_env
from mnist_add.learner import build_learner
from mnist_add.rundir import RunDirError, RunDirLock, explain_os_error
from mnist_add.train import Progress, maybe_resume, train
from mnist_add.train import main as train_main

# A long fuzz (MNIST_ADD_FUZZ_EXAMPLES set) draws fresh cases; hypothesis prints how to reproduce a failure.
EXAMPLES = int(os.environ.get("MNIST_ADD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize="MNIST_ADD_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


# --- the schema, walked -------------------------------------------------------------------------------


def schema_fields(schema: type = submit.SubmitConfig, prefix: str = "") -> dict[str, tuple[type, dict]]:
    """{"section.key": (its type, its bounds)} for every leaf of the schema."""
    hints, fields = typing.get_type_hints(schema), {}
    for spec in dataclasses.fields(schema):
        kind = hints[spec.name]
        if dataclasses.is_dataclass(kind):
            fields.update(schema_fields(kind, f"{prefix}{spec.name}."))
        else:
            fields[f"{prefix}{spec.name}"] = (kind, spec.metadata.get("bounds", {}))
    return fields


FIELDS = schema_fields()
TRAINING_KEYS = [key for key in FIELDS if not key.startswith("job.")]

ADVERSARIAL = st.sampled_from([
    "", " ", "null", "~", "nan", "-nan", "inf", "-inf", "1e999", "-1e999", "0x10", "1_000", "1e3", "true", "yes",
    "[1, 2", "[1,2]", "{a: 1}", "{", "}", "- a", ": b", "a: b: c", "'", '"', "!!python/object:os.system",
    "${oc.env:NO_SUCH_VAR}", "${oc.env:HOME}", "${nope}", "${trainer.seed}", "${}", "$", "${oc.decode:'1'}",
    "???", "\x00", "\u202e", "ünïcødé", "🙂", "a" * 5000, "-1", "0", "1", "2", "999999999999999999999999", "-0",
    "1.5", "0.5", "1e-400", "/proc/x", "../..", "relu", "silu", "auto", "fp16", "bf16", "gloo", "nccl",
])


def typed_value(kind, bounds) -> st.SearchStrategy:
    """Values of the field's own type, in and just out of its bounds."""
    base = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)  # str | None -> str
    edges = [b + d for b in bounds.values() for d in (-1, 0, 1)]
    if base is bool:
        return st.sampled_from(["true", "false", "True", "1", "0"])
    if base is int:
        return st.one_of(st.integers(-3, 100_000), st.sampled_from(edges or [0]), st.integers()).map(str)
    if base is float:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(edges or [0.0])).map(repr)
    if isinstance(base, type) and issubclass(base, Enum):
        return st.sampled_from([member.value for member in base])
    return st.text(max_size=30)


@st.composite
def an_override(draw) -> str:
    key = draw(st.sampled_from(list(FIELDS)))
    kind, bounds = FIELDS[key]
    value = draw(st.one_of(typed_value(kind, bounds), ADVERSARIAL, st.text(max_size=20)))
    mangled = draw(st.sampled_from(["as is"] * 6 + ["misspelt", "unknown", "section", "too deep", "no equals",
                                                    "no key", "two dots"]))
    if mangled == "misspelt":
        at = draw(st.integers(0, len(key) - 1))
        key = key[:at] + draw(st.sampled_from(["", "x", key[at] * 2, "_"])) + key[at + 1:]
    return {"as is": f"{key}={value}", "misspelt": f"{key}={value}", "unknown": f"nosuch.{key}={value}",
            "section": f"{key.split('.')[0]}={value}", "too deep": f"{key}.more={value}", "no equals": key,
            "no key": f"={value}", "two dots": f"{key.replace('.', '..')}={value}"}[mangled]


def one_line(err: BaseException) -> bool:
    return bool(str(err)) and "\n" not in str(err)


def usable(cfg) -> None:
    """What a launch does with a config before it trains: resolve it, write it, read it back, seed from it."""
    plain = to_dict(cfg)
    json.dumps(plain, allow_nan=False)
    assert to_dict(upgraded(to_dict(training_config(cfg)))) == to_dict(training_config(cfg))
    torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + cfg.trainer.epochs)
    torch.manual_seed(cfg.trainer.seed)


# --- overrides and config files -----------------------------------------------------------------------


@FUZZ
@given(st.lists(an_override(), max_size=4))
@example(["data.root=${oc.env:NO_SUCH_VAR}"])
@example(["trainer.seed=99999999999999999999"])
@example(["trainer.num_threads=99999999999"])
@example(["data.train_samples=60000"])
@example(["run.dir=\x1f"])  # found by the fuzzer: YAML refuses control characters
@example(["trainer.seed=1e999", "wandb.dir=\x00"])
@example(["run.dir=-", "run.dir.more="])  # found by the long fuzz: a key under the list that '-' reads as
@example(["wandb.tags=${oc.env:HOME}"])  # found by the long fuzz: a string where a list belongs
@example(["trainer.epochs=18446744073709551616"])  # found by the long fuzz: past every 64-bit seed
def test_any_overrides_validate_or_are_one_config_error_line(overrides):
    try:
        cfg = load_config([], overrides, submit.SubmitConfig)
        submit.validate(cfg.job)
    except ConfigError as err:
        assert one_line(err), repr(str(err))
        return
    usable(cfg)


@st.composite
def a_yaml_file(draw) -> bytes:
    kind = draw(st.sampled_from(["tree", "tree", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    lines = []
    for override in draw(st.lists(an_override(), max_size=5)):
        key, _, value = override.partition("=")
        *sections, leaf = key.split(".") or [""]
        nesting = "".join(f"{'  ' * depth}{section}:\n" for depth, section in enumerate(sections))
        lines.append(f"{nesting}{'  ' * len(sections)}{leaf}: {value}")
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(a_yaml_file())
@example(b"\x00\xff\xfe binary")
@example(b"trainer:\n  epochs: [1, 2")
@example(b"- a list\n")
def test_any_config_file_validates_or_is_one_config_error_line(tmp_path, text):
    path = tmp_path / "fuzzed.yaml"
    path.write_bytes(text)
    try:
        cfg = load_config([str(path)])
    except ConfigError as err:
        assert one_line(err), repr(str(err))
        return
    usable(cfg)


# --- run directories ----------------------------------------------------------------------------------


RUN_DIRS = ["missing/deeper/run", "a-file", "/proc/x", "/proc/self/status/run", "x" * 300, "/" + "d/" * 2100,
            "ünïcødé 🙂", "dir with spaces", ".", "read-only/run", "/dev/null/run", ""]


@FUZZ
@given(st.one_of(st.sampled_from(RUN_DIRS), st.text(max_size=40)))
@example("/proc/x")
@example("\x00")  # found by the fuzzer: a NUL in a path
@example("z" * 300)
def test_any_run_dir_is_taken_or_refused_in_one_line(tmp_path, run_dir):
    space = tmp_path / "space"
    shutil.rmtree(space, ignore_errors=True)
    space.mkdir()
    (space / "a-file").write_text("not a folder")
    (space / "read-only").mkdir()
    (space / "read-only").chmod(0o500)
    try:
        cfg = load_config([], [f"run.dir={space / run_dir}"])
    except ConfigError as err:
        assert one_line(err)
        return
    lock = RunDirLock(Path(cfg.run.dir))
    try:
        lock.acquire()
    except RunDirError as err:
        assert one_line(err)
    except OSError as err:
        assert explain_os_error(err) is not None, repr(err)
    finally:
        lock.release()
        (space / "read-only").chmod(0o700)


# --- command lines ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory) -> Path:
    """Where the command lines run: things an argument may name, a folder, files that are no checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    (root / "digit.png").write_text("not a PNG")
    (root / "folder").mkdir()
    torch.save({"not": "ours"}, root / "foreign.pt")
    return root


PATHS = ["missing.pt", "empty.pt", "garbage.pt", "foreign.pt", "digit.png", "folder", "/proc/x", "y" * 5000,
         "ünï 🙂.pt"]
TOKENS = {
    "mnist_add.evaluate": ["--checkpoint", "--split", "val", "test", "--exhaustive", "--json", "--data-root",
                           "--batch-size", "0", "-1", "10"],
    "mnist_add.predict": ["--checkpoint", "--index", "--data-root", "--json", "3", "10", "-1", "0"],
    "mnist_add.report": ["--out", "--data-root"],
    "mnist_add.compare": ["--out", "--json", "--score", "val", "best-test", "test"],
}
MAINS = {"mnist_add.evaluate": evaluate.main, "mnist_add.predict": predict.main, "mnist_add.report": report.main,
         "mnist_add.compare": compare.main}


@st.composite
def a_command_line(draw) -> tuple[str, list[str]]:
    module = draw(st.sampled_from(list(TOKENS)))
    token = st.one_of(st.sampled_from(TOKENS[module]), st.sampled_from(PATHS), st.text(max_size=8),
                      st.sampled_from(["--help", "--nope", "-x", "--", "=", "key=value"]))
    return module, draw(st.lists(token, max_size=7))


def run_cli(main, argv: list[str], cwd: Path) -> tuple[int, str]:
    """main(argv) in `cwd`: its exit code and stderr."""
    err, old = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), within(HANG_S):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(old)
    return code, err.getvalue()


HANG_S = 120  # far above what any call here needs, on a machine several times slower


@contextlib.contextmanager
def within(seconds: float):
    """A tool called in this process that blocks (opens a FIFO, reads /dev/zero) fails the test instead of hanging
    it: the alarm's exception interrupts the blocking call."""
    def give_up(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")
    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@FUZZ
@given(a_command_line())
@example(("mnist_add.evaluate", ["--checkpoint", "missing.pt", "--batch-size", "0"]))
@example(("mnist_add.predict", ["--checkpoint", "missing.pt", "digit.png"]))
@example(("mnist_add.predict", ["--checkpoint", "missing.pt", "--index", "3", "digit.png", "4"]))
@example(("mnist_add.report", ["y" * 5000]))  # found by the fuzzer: a name too long
def test_any_command_line_works_or_is_one_error_line(cli_dir, command_line):
    module, argv = command_line
    code, err = run_cli(MAINS[module], argv, cli_dir)
    assert code in (0, 2), (module, argv, code)
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1, (module, argv, err)


@FUZZ
@given(st.lists(st.one_of(an_override(), st.sampled_from(["--config", "debug", "default", "nosuch", "/proc/x",
                                                          "--sweep", "trainer.seed=0,1", "--wait", "--nope"])),
                max_size=6))
def test_any_train_or_submit_command_line_validates_or_is_one_error_line(tmp_path, argv):
    argv = [*argv, f"run.dir={tmp_path / 'run'}"]  # a sweep plan reads run.dir; keep it here
    for read in (lambda: parse_args(argv, "mnist_add.train", "train"), lambda: submit.read_command_line(argv)):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                read()
        except (ConfigError, RunDirError) as refused:
            assert one_line(refused), repr(str(refused))
        except SystemExit as exit_:
            assert exit_.code in (0, 2) and (exit_.code == 0 or err.getvalue().count("\n") == 1), err.getvalue()


# --- the checkpoint reader ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_root) -> dict:
    """A real run's checkpoints (steps 4 and 8) and what the newer one holds."""
    run = tmp_path_factory.mktemp("saved")
    cfg = load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "trainer.max_steps=8",
                                  "trainer.save_every_steps=4", "trainer.num_threads=1"])
    train(cfg)
    newest = run / "checkpoints" / "step-00000008.pt"
    return {"cfg": cfg, "dir": run / "checkpoints", "bytes": newest.read_bytes(), "state": checkpoint.load(newest)}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load_or_refuse(path: Path, original: dict | None) -> None:
    """The reader's property: one CheckpointError line, or exactly what was saved."""
    try:
        state = checkpoint.load(path, keys=checkpoint.TRAINING_KEYS)
    except CheckpointError as err:
        assert one_line(err), repr(str(err))
        return
    assert original is not None and same(state, original), "a damaged checkpoint loaded as something else"


@FUZZ
@given(st.data())
def test_a_flipped_bit_anywhere_is_refused_or_changes_nothing(saved, tmp_path, data):
    damaged = bytearray(saved["bytes"])
    position = data.draw(st.integers(0, len(damaged) - 1))
    damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    (tmp_path / "flipped.pt").write_bytes(damaged)
    load_or_refuse(tmp_path / "flipped.pt", saved["state"])


@pytest.mark.parametrize("sixty_fourth", range(64))
def test_a_checkpoint_cut_at_any_sixty_fourth_is_refused_and_auto_resume_takes_the_older_one(
        saved, tmp_path, sixty_fourth):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved["dir"], folder)
    newest = folder / "step-00000008.pt"
    newest.write_bytes(saved["bytes"][:len(saved["bytes"]) * sixty_fourth // 64])
    load_or_refuse(newest, None)
    cfg = saved["cfg"]
    learner, progress = build_learner(cfg, Runtime(), total_steps=16), Progress()
    used = maybe_resume(cfg, Checkpointer(folder, 2, write=False), learner, progress).path
    assert used.name == "step-00000004.pt" and progress.step == 4


TENSORS = st.builds(lambda n, kind: torch.zeros(n, dtype=kind), st.integers(0, 4),
                    st.sampled_from([torch.float32, torch.int64, torch.bool]))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), TENSORS)
OBJECTS = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=8)


@FUZZ
@given(st.one_of(OBJECTS, st.fixed_dictionaries({key: OBJECTS for key in checkpoint.TRAINING_KEYS})))
@example({**{key: None for key in checkpoint.TRAINING_KEYS}, checkpoint.CONFIG: {"model": {"width": 16}}})
def test_any_torch_saved_object_is_refused_in_one_line_or_resumes(saved, tmp_path, thing):
    folder = tmp_path / "checkpoints"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    torch.save(thing, folder / "step-00000008.pt")
    cfg = saved["cfg"]
    learner, progress = build_learner(cfg, Runtime(), total_steps=16), Progress()
    try:
        maybe_resume(cfg, Checkpointer(folder, 2, write=False), learner, progress)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(err).startswith(f"no usable checkpoint in {folder}")
        return
    pytest.fail(f"resumed from {thing!r}")


def test_the_fuzzer_walks_every_key_of_the_schema():
    assert set(TRAINING_KEYS) == set(flatten(to_dict(load_config([], []))))


# --- files: every file a tool reads, with any content and of any kind --------------------------------


@pytest.fixture(scope="module")
def good_files(saved) -> dict[str, bytes]:
    """A good file of each name a tool reads, from the real run of `saved`: the fuzzer keeps, cuts or damages it."""
    run = saved["dir"].parent
    index = {"name": "sweep", "members": {"seed-0": {"job_id": "7_0"}, "seed-1": {"job_id": "7_1"}}}
    return GoodFiles({"fuzzed.yaml": b"trainer:\n  epochs: 2\n", "fuzzed.pt": saved["bytes"],
            **{name: (run / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")},
            "sweep.json": json.dumps(index).encode()})


class GoodFiles(dict):
    def __repr__(self) -> str:  # a failing case's report shows the case, not a megabyte of checkpoint
        return f"GoodFiles({', '.join(self)})"


FIELD_NAMES = st.sampled_from(["status", "completed", "test", "val", "best", "acc_digit", "acc_sum", "acc_both",
                               "segment_wall_time_s", "members", "job_id", "step", "trainer", "epochs", "model"])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), FIELD_NAMES, st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(FIELD_NAMES, inner, max_size=4)),
    max_leaves=10)
HUGE = [b"9" * 100_000, b"[" * 5_000 + b"]" * 5_000, b"trainer:\n  epochs: " + b"9" * 5_000 + b"\n",
        b'{"status": "completed", "test": {"acc_digit": 1e999, "acc_sum": 1, "acc_both": 1}}', b"a" * 200_000 + b"\n",
        b'{"step": 1, "train/loss": 1e308}\n' * 1_000]


DAMAGES = st.one_of(st.just(("good",)), st.tuples(st.just("cut"), st.floats(0, 1)),
                    st.tuples(st.just("flipped"), st.floats(0, 1), st.integers(0, 7)),
                    st.tuples(st.just("binary"), st.binary(max_size=300)), st.just(("empty",)),
                    st.tuples(st.just("wrong types"), JSON_VALUES), st.tuples(st.just("huge"), st.integers(0, len(HUGE) - 1)))


def damaged(good: bytes, damage: tuple) -> bytes:
    """The good file kept, cut, with a bit flipped, or binary, empty, of the wrong types (JSON is YAML too) or huge."""
    how, *args = damage
    at = int(args[0] * (len(good) - 1)) if how in ("cut", "flipped") else 0
    if how == "flipped":
        return good[:at] + bytes([good[at] ^ 1 << args[1]]) + good[at + 1:]
    return {"good": lambda: good, "cut": lambda: good[:at], "binary": lambda: args[0], "empty": lambda: b"",
            "wrong types": lambda: json.dumps(args[0]).encode(), "huge": lambda: HUGE[args[0]]}[how]()


KINDS = ["file"] * 4 + ["directory", "FIFO", "/dev/zero", "/dev/null", "link to a file", "dangling link"]


def place(path: Path, kind: str, content: bytes) -> None:
    """Put at `path` a thing of `kind`: a file holding `content` (or a link to one), a folder, a FIFO, a device."""
    if kind in ("/dev/zero", "/dev/null"):
        path.symlink_to(kind)
    elif kind == "link to a file":
        (path.parent / f"target-{path.name}").write_bytes(content)
        path.symlink_to(path.parent / f"target-{path.name}")
    else:
        {"file": lambda: path.write_bytes(content), "directory": path.mkdir, "FIFO": lambda: os.mkfifo(path),
         "dangling link": lambda: path.symlink_to(path.parent / "gone")}[kind]()


def train_reading_only(argv: list[str]) -> int:
    """train's reading of its command line, without the training a good config would start."""
    try:
        parse_args(argv, "mnist_add.train", "train")
    except ConfigError as err:
        return refuse(err)
    return 0


def submit_planning_only(argv: list[str]) -> int:
    """job.submit's reading and sweep planning, without the submission."""
    try:
        submit.read_command_line(argv)
    except (ConfigError, RunDirError, SweepIndexError) as err:
        return refuse(err)
    return 0


def file_readers(space: Path, data_root: str) -> dict[str, dict[str, tuple]]:
    """For each file a tool reads, where it lies in `space`: {tool: (its main, its argv)} of the tools that read it."""
    train_args = ["--config", "debug", f"data.root={data_root}", f"run.dir={space / 'new-run'}", "trainer.num_threads=1"]
    sweep = ["--config", "debug", f"run.dir={space / 'sweep'}", "job.cluster=local", "--sweep", "trainer.seed=0,1"]
    in_run = {"report": (report.main, [str(space / "run")])}
    in_sweep = {"compare": (compare.main, [str(space / "sweep")]), "job.submit": (submit_planning_only, sweep)}
    return {
        "fuzzed.yaml": {"train": (train_reading_only, ["--config", "fuzzed.yaml"]),
                        "job.submit": (submit_planning_only, ["--config", "fuzzed.yaml", "job.cluster=local"])},
        "fuzzed.pt": {"evaluate": (evaluate.main, ["--checkpoint", "fuzzed.pt", "--data-root", data_root]),
                      "predict": (predict.main, ["--checkpoint", "fuzzed.pt", "--index", "0", "3", "--data-root",
                                                 data_root]),
                      "train": (train_main, [*train_args, "trainer.resume=fuzzed.pt"])},
        "run/config.yaml": in_run, "run/metrics.jsonl": in_run,
        "sweep/seed-1/config.yaml": in_sweep, "sweep/seed-1/summary.json": in_sweep, "sweep/sweep.json": in_sweep}


READERS = {where: sorted(tools) for where, tools in file_readers(Path(), "").items()}


@st.composite
def a_file_case(draw) -> tuple[str, str, str, tuple]:
    """(where the file lies, the tool that reads it, what it is, how its content is damaged)."""
    where = draw(st.sampled_from(sorted(READERS)))
    return where, draw(st.sampled_from(READERS[where])), draw(st.sampled_from(KINDS)), draw(DAMAGES)


def lay_out(space: Path, good: dict[str, bytes]) -> None:
    """Good files everywhere a tool looks (a run directory, a sweep of two members), and a checkpoint to keep."""
    for folder in ("run", "sweep/seed-0", "sweep/seed-1"):
        (space / folder).mkdir(parents=True)
        for name in ("config.yaml", "summary.json", "metrics.jsonl"):
            (space / folder / name).write_bytes(good[name])
    (space / "sweep" / "sweep.json").write_bytes(good["sweep.json"])
    (space / "keep").mkdir()
    (space / "keep" / "best.pt").write_bytes(good["fuzzed.pt"])


def checkpoints_in(space: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in space.rglob("*.pt") if path.is_file() and not path.is_symlink()}


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(a_file_case())
@example(("sweep/seed-1/config.yaml", "compare", "directory", ("empty",)))  # found by the fuzzer: open() of a folder
@example(("run/metrics.jsonl", "report", "file", ("huge", 0)))  # found by the long fuzz: 100,000 digits
@example(("fuzzed.pt", "train", "file", ("good",)))
@example(("fuzzed.pt", "evaluate", "link to a file", ("good",)))
@example(("sweep/seed-1/summary.json", "job.submit", "FIFO", ("good",)))
def test_any_file_a_tool_reads_is_used_or_refused_in_one_line_and_no_checkpoint_is_lost(good_files, data_root,
                                                                                         tmp_path, case):
    where, tool, kind, damage = case
    space = Path(tempfile.mkdtemp(dir=tmp_path))
    lay_out(space, good_files)
    fuzzed = space / where
    fuzzed.unlink(missing_ok=True)
    place(fuzzed, kind, damaged(good_files[fuzzed.name], damage))
    kept = checkpoints_in(space)
    code, err = run_cli(*file_readers(space, data_root)[where][tool], space)
    assert code in (0, 2) and "Traceback" not in err, (case, code, err[-3000:])
    if code == 2:
        said = [line for line in err.splitlines() if line.startswith("error: ") or " ERROR " in line]
        assert len(said) == 1 and err.endswith(said[0] + "\n"), (case, err[-3000:])
        assert fuzzed.name in said[0] or (where.endswith(".yaml") and re.search(r"\b[a-z_]+\.[a-z_]+\b", said[0])), \
            (case, said[0])  # a config file's value out of range names its key
    assert {path: checkpoints_in(space).get(path) for path in kept} == kept, case


# --- the launcher's environment -----------------------------------------------------------------------


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                      "SLURM_JOB_ID")
MALFORMED = st.one_of(st.integers(-3, 12).map(str), st.integers().map(str), st.text(max_size=6), st.sampled_from([
    "", " ", "abc", "1.5", "+1", "-0", "0x10", "1e3", "\u0663", " 2", "2\n", "9" * 30, "9" * 5000, "2147483648",
    "65536", "node[1-2]", "localhost", "a b", "\x00"]))


@st.composite
def a_launch(draw) -> tuple[dict[str, str], tuple[int, int, int]]:
    """An environment as torchrun (or submitit) or srun makes it, or none, and its (rank, local rank, world size)."""
    nodes, per_node = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    local = draw(st.integers(0, per_node - 1))
    rank, world_size = draw(st.integers(0, nodes - 1)) * per_node + local, nodes * per_node
    launcher = draw(st.sampled_from(["torchrun", "srun", "none"]))
    if launcher == "none":
        return {}, (0, 0, 1)
    if launcher == "srun":
        return ({"SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local),
                 "SLURM_STEP_NUM_TASKS": str(world_size), "SLURM_STEP_NODELIST": f"node[0-{nodes - 1}]",
                 "SLURM_JOB_ID": str(draw(st.integers(1, 10**7))), "MASTER_ADDR": "node0"},
                (rank, local, world_size) if world_size > 1 else (0, 0, 1))
    return ({"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world_size),
             "LOCAL_WORLD_SIZE": str(per_node), "MASTER_ADDR": "node0", "MASTER_PORT": str(draw(st.integers(1, 65535)))},
            (rank, local, world_size))


@st.composite
def a_mangled_launch(draw) -> dict[str, str]:
    """A launcher's environment with some variables removed, set malformed, or set to another's value."""
    env, _ = draw(a_launch())
    for name in draw(st.lists(st.sampled_from(LAUNCHER_VARIABLES), min_size=1, max_size=3, unique=True)):
        how = draw(st.sampled_from(["remove", "malformed", "malformed", "another's"]))
        if how == "remove":
            env.pop(name, None)
        else:
            env[name] = draw(MALFORMED) if how == "malformed" or not env else draw(st.sampled_from(list(env.values())))
    return env


def launch_plan(env: dict[str, str]) -> tuple:
    """What a launch reads from its environment before any rendezvous."""
    rank, local_rank, world_size = launcher_ranks(env)
    return rank, local_rank, world_size, local_world_size(env), rendezvous_env(env) if world_size > 1 else None


@FUZZ
@given(a_launch())
def test_an_environment_a_launcher_makes_is_never_refused(launch):
    env, ranks = launch
    rank, local_rank, world_size, ranks_here, meeting = launch_plan(env)
    assert (rank, local_rank, world_size) == ranks and local_rank < ranks_here <= world_size
    assert meeting is None or meeting["MASTER_ADDR"] == "node0" and 1 <= int(meeting["MASTER_PORT"]) <= 65_535


@FUZZ
@given(a_mangled_launch())
@example({"RANK": "5", "WORLD_SIZE": "2"})  # the table: a 28-line traceback
@example({"RANK": "abc", "WORLD_SIZE": "2"})
@example({"WORLD_SIZE": "2"})  # trained as one process
@example({"RANK": "0", "WORLD_SIZE": "9" * 5000})
def test_any_launcher_environment_is_taken_or_refused_in_one_line_naming_a_variable(env):
    try:
        rank, local_rank, world_size, ranks_here, meeting = launch_plan(env)
    except ConfigError as err:
        assert one_line(err) and any(name in str(err) for name in LAUNCHER_VARIABLES), repr(str(err))
        return
    assert 0 <= local_rank <= rank < world_size < 2**31 and local_rank < ranks_here <= world_size, env
    assert meeting is None or meeting["MASTER_ADDR"].strip() and 1 <= int(meeting["MASTER_PORT"]) <= 65_535, env


# --- end to end: the table, through the real command lines -----------------------------------


@pytest.fixture(scope="module")
def width_16_checkpoint(tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("w16")
    train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "model.width=16",
                                  "trainer.max_steps=2", "trainer.num_threads=1"]))
    return run / "checkpoints" / "best.pt"


# "Billion laughs": nine levels of nine aliases, 9**9 strings once expanded, in 342 bytes (issue #32's hung).
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{level}: &{level} [{','.join([f'*{previous}'] * 9)}]\n" for previous, level in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("case", ["another network", "binary config", "unset variable", "huge seed", "/proc",
                                  "batch size 0", "addend forgotten", "alias bomb"])
def test_each_mistake_of_the_table_is_one_line_and_exit_2(case, width_16_checkpoint, data_root, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe\x80")
    (tmp_path / "laughs.yaml").write_text(ALIAS_BOMB)
    (tmp_path / "digit.png").write_text("not read: the addend is missing first")
    train_args = ["--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path / 'run'}"]
    module, args = {
        "another network": ("mnist_add.train", [*train_args, "model.width=8", f"trainer.resume={width_16_checkpoint}"]),
        "binary config": ("mnist_add.train", [*train_args, "--config", str(tmp_path / "binary.yaml")]),
        "unset variable": ("mnist_add.train", [*train_args, "data.root=${oc.env:NO_SUCH_VAR}"]),
        "huge seed": ("mnist_add.train", [*train_args, "trainer.seed=99999999999999999999"]),
        "/proc": ("mnist_add.train", ["--config", "debug", f"data.root={data_root}", "run.dir=/proc/x"]),
        "batch size 0": ("mnist_add.evaluate", ["--checkpoint", str(width_16_checkpoint), "--batch-size", "0"]),
        "addend forgotten": ("mnist_add.predict", ["--checkpoint", str(width_16_checkpoint),
                                                   str(tmp_path / "digit.png")]),
        "alias bomb": ("mnist_add.train", [*train_args, "--config", str(tmp_path / "laughs.yaml")]),
    }[case]
    code, stderr = run_cli({**MAINS, "mnist_add.train": train_main}[module], args, tmp_path)  # in process: seconds
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists()  # a refused launch leaves nothing behind
