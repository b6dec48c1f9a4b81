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
import shutil
import typing
from enum import Enum
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from job import submit
from conftest import run_module
from mnist_add import checkpoint, compare, evaluate, predict, report
from mnist_add.checkpoint import Checkpointer, CheckpointError
from mnist_add.config import ConfigError, flatten, load_config, parse_args, to_dict, training_config, upgraded
from mnist_add.distributed import Runtime
from mnist_add.learner import build_learner
from mnist_add.rundir import RunDirError, RunDirLock, explain_os_error
from mnist_add.train import Progress, maybe_resume, train

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
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(old)
    return code, err.getvalue()


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


# --- end to end: the table, through the real command lines -----------------------------------


@pytest.fixture(scope="module")
def width_16_checkpoint(tmp_path_factory, data_root) -> Path:
    run = tmp_path_factory.mktemp("w16")
    train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "model.width=16",
                                  "trainer.max_steps=2", "trainer.num_threads=1"]))
    return run / "checkpoints" / "best.pt"


@pytest.mark.parametrize("case", ["another network", "binary config", "unset variable", "huge seed", "/proc",
                                  "batch size 0", "addend forgotten"])
def test_each_mistake_of_the_table_is_one_line_and_exit_2(case, width_16_checkpoint, data_root, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe\x80")
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
    }[case]
    result = run_module(module, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()  # a refused launch leaves nothing behind
