"""Shared test fixtures: the real MNIST files from ../shared/data, small configs, run helpers."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_add.config import load_config

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("MNIST_ADD_DATA_ROOT", REPO.parent / "shared" / "data"))


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


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None,
               launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m module args` (optionally under a launcher such as torchrun) and capture output."""
    command = [*launcher, "-m", module, *args] if launcher else [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def start_and_wait_for_checkpoint(train_args: list[str], run_dir: Path, step: int,
                                  launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a training job; return it, still running, once its checkpoint at `step` is on disk."""
    command = [*launcher, "-m", "mnist_add.train", *train_args] if launcher \
        else [sys.executable, "-m", "mnist_add.train", *train_args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    target = Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"
    deadline = time.monotonic() + 120
    while not target.exists():  # poll a condition: the job's own progress, not a guess at timing
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.01)
    return process


def torchrun(nproc: int, max_restarts: int = 0) -> tuple[str, ...]:
    """A torchrun launcher on a free local port, for `run_module(..., launcher=...)`; a store per restart
    (see mnist_add.distributed.warn_about_shared_torchrun_store)."""
    return ("env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}")


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
