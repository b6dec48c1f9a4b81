"""Shared test fixtures: the real MNIST files from MNIST_ADD_DATA_ROOT, small configs, run helpers."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_add.config import load_config

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MNIST_ADD_DATA_ROOT", REPO / "data"))  # the job's own default


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No credentials, no mode from the environment, every W&B folder inside the test's tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    for name, sub in (("HOME", ""), ("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                      ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


@pytest.fixture(autouse=True)
def restored_logging():
    """An entry point called in-process (`main([...])`) points logging at the captured stderr of its test."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


@pytest.fixture(scope="session")
def data_root() -> str:
    if not (DATA_ROOT / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found under {DATA_ROOT}; set MNIST_ADD_DATA_ROOT to a folder holding MNIST/raw/")
    return str(DATA_ROOT)


@pytest.fixture
def make_cfg(data_root, tmp_path):
    """The debug config, run in tmp_path/run, with extra `key=value` overrides."""
    def make(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        return load_config(["debug"], [f"data.root={data_root}", f"run.dir={run_dir}",
                                       "trainer.deterministic=true", "trainer.num_threads=1", *overrides])
    return make


HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: the hold of MNIST_ADD_TEST_HOLD_AT


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process the tests start: one thread, the test hooks importable, and this checkout's
    code the one imported. The hooks import mnist_add at start-up, before Python puts the working folder on its
    path, where an editable install would otherwise hand them the code of the clone it was installed from."""
    path = os.pathsep.join(filter(None, [str(HOOKS), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None,
               launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m module args` (optionally under a launcher such as torchrun) and capture output."""
    command = [*launcher, "-m", module, *args] if launcher else [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=subprocess_env(**(env or {})))


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in run_dir, or -1: it only ever grows while a job runs."""
    steps = [int(p.name[5:13]) for p in (Path(run_dir) / "checkpoints").glob("step-*.pt")]
    return max(steps, default=-1)


def wait_until(condition, what: str, timeout: float = 300, process: subprocess.Popen | None = None):
    """Poll a condition that, once true, stays true (bounded; no assumed durations)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}:\n{process.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def start_and_wait_for_checkpoint(train_args: list[str], run_dir: Path, step: int, launcher: tuple[str, ...] = (),
                                  release: Path | None = None) -> subprocess.Popen:
    """Start a training job that holds after its checkpoint at `step` (tests/hooks/sitecustomize.py) until
    a rank is asked to stop or `release` exists; return it, still running, once that checkpoint is on disk."""
    command = [*launcher, "-m", "mnist_add.train", *train_args] if launcher \
        else [sys.executable, "-m", "mnist_add.train", *train_args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env(MNIST_ADD_TEST_HOLD_AT=str(step),
                                                  MNIST_ADD_TEST_RELEASE=str(release or "")))
    wait_until(lambda: newest_step(run_dir) >= step, f"the checkpoint of step {step}", process=process)
    return process


TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"  # forwarded to the workers, as the README says


def torchrun(nproc: int, max_restarts: int = 0) -> tuple[str, ...]:
    """A torchrun launcher on a free local port, for `run_module(..., launcher=...)`, as the README launches
    it: a store per restart (see mnist_add.distributed.warn_about_shared_torchrun_store), and every stop
    signal forwarded to the workers."""
    return ("env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            f"--signals-to-handle={TORCHRUN_SIGNALS}")


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the process with RANK=rank among the launcher's descendants, if it runs now."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if pid != launcher_pid and f"RANK={rank}".encode() in environ:
            return pid
        pending += [int(c) for c in children]
    return None
