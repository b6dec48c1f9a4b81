"""The run directory's life: one job at a time, what a launch may find there, and its last word.

A run directory holds one run: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `summary.json`.
Rank 0 holds an exclusive lock on it for the whole job, so that a double launch is refused
before it writes anything; the operating system drops the lock when the process dies, however
it dies, so a killed job never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_add.config import ConfigError, flatten, read_yaml, to_dict, upgraded
from mnist_add.files import UnreadableFile, present, read_json

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
# Keys that change how a run is carried out or watched, not what it computes: a finished run
# launched again with other values of these is still the same finished run.
OPERATIONAL_KEYS = ("run.", "wandb.", "dist.", "data.root", "data.download", "trainer.num_threads",
                    "trainer.resume", "trainer.log_every_steps", "trainer.save_every_steps",
                    "trainer.keep_checkpoints", "trainer.eval_batch_size", "trainer.test_every_epoch")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message names it and what to do."""


class RunDirLock:
    """An exclusive `flock` on `run.dir/.lock`, held from `acquire` until `release` or process death.

    `flock` is local to one machine on some network filesystems (Lustre without `-o flock`, NFS
    before v4 without lockd); there a launch on another node is not refused, so keep one run.dir
    per job by other means.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None
        self.made: list[Path] = []  # what acquire created: the lock file, then the folders, deepest first

    def acquire(self) -> None:
        self.made = [p for p in (self.path, self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a job that is starting"
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another job ({holder}); wait for it to end "
                              f"or stop it, or use another run.dir") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            log.warning("cannot lock %s (%s): nothing stops a second job from using it", self.path, err.strerror)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        if self.path in self.made and os.listdir(self.path.parent) == [LOCK_NAME]:
            # A launch refused before it wrote anything leaves the file system as it found it. Otherwise the lock
            # file stays: unlinking it would race with the next job's open (here only a launch into the same new
            # run.dir in the same instant could race, and it was refused while this one held the lock).
            self.path.unlink()
            try:
                for folder in self.made[1:]:
                    folder.rmdir()
            except OSError:  # something else came to live there meanwhile: it stays
                pass
        os.close(self.fd)
        self.fd = None


def is_running(path: Path) -> bool:
    """Whether a job holds the run directory's lock now (mnist_add.rundir.RunDirLock)."""
    lock = path / LOCK_NAME
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: nothing to tell
        return False
    finally:
        os.close(fd)


def has_results(run_dir: Path) -> bool:
    """Whether an earlier launch left anything a fresh start would overwrite or append to."""
    checkpoints = run_dir / "checkpoints"
    return (run_dir / SUMMARY_NAME).exists() or (run_dir / METRICS_NAME).exists() or \
        (checkpoints.is_dir() and any(checkpoints.glob("*.pt")))


def completed_run(cfg: DictConfig) -> dict | None:
    """The summary of the completed run in run.dir that this config would train again, else None.

    Refuses `trainer.resume=never` where a run already is. A config that computes something else
    (more steps, another model) is not this run: resuming decides whether it may continue.
    """
    run_dir = Path(cfg.run.dir)
    if cfg.trainer.resume == "never" and has_results(run_dir):
        raise RunDirError(f"trainer.resume=never but {run_dir} already holds a run; use a new run.dir, "
                          f"or trainer.resume=auto to continue it")
    config_path = run_dir / CONFIG_NAME
    if (summary := completed_summary(run_dir / SUMMARY_NAME)) is None:
        return None
    try:
        saved = flatten(to_dict(upgraded(read_yaml(config_path)))) if present(config_path) else {}
    except OmegaConfBaseException:  # written with a key this version no longer has: another run
        return None
    except ConfigError as err:  # damaged: the checkpoints say what the run is, and config.yaml is written again
        log.warning("%s; resuming from the checkpoints as for an unfinished run", err)
        return None
    ours = flatten(to_dict(cfg))
    same = all(saved.get(key) == ours.get(key) for key in set(saved) | set(ours)
               if not key.startswith(OPERATIONAL_KEYS))
    return summary if same else None


def completed_summary(path: Path) -> dict | None:
    """The summary at `path` when it says its run completed, else None. A damaged one is said in a warning and taken
    as unfinished: the run then resumes from its last checkpoint, and completing writes the summary again."""
    if not present(path):
        return None
    try:
        summary = read_json(path)
        if not isinstance(summary, dict):
            raise TypeError(f"a {type(summary).__name__}, not a JSON object")
        if summary.get("status") != "completed":
            return None
        summary_line(summary)  # the scores every tool reads, of the types they have
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:  # ValueError: UnreadableFile too
        log.warning("%s; taking the run as unfinished", err if isinstance(err, UnreadableFile)
                    else f"{path} holds no complete scores ({type(err).__name__}: {err})")
        return None
    return summary


def write_config(cfg: DictConfig) -> None:
    OmegaConf.save(cfg, Path(cfg.run.dir) / CONFIG_NAME, resolve=True)


def summary_line(summary: dict) -> str:
    """A completed run's test scores in one line, in percent, each named by the weights it scores (a summary from
    before best.pt was scored holds the final weights' alone)."""
    test = summary["test"]
    line = (f"final weights: test sum {test['acc_sum']:.2%} (digit {test['acc_digit']:.2%}, both "
            f"{test['acc_both']:.2%})")
    if best := summary.get("best"):
        line += f"; best.pt (step {best['step']}): test sum {best['test']['acc_sum']:.2%}"
    return line


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / SUMMARY_NAME).write_text(strict_json(summary, indent=2) + "\n")


def strict_json(value: Any, **kwargs) -> str:
    """JSON that every parser accepts: a NaN or infinity becomes null (plain json.dumps writes NaN)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# What the user can do about an OS error on the run directory, by errno.
_FIXES = {
    errno.ENOSPC: "free some space, or set run.dir on a roomier disk; the last complete checkpoint is intact, "
                  "so the same command then resumes from it",
    errno.EDQUOT: "free some of your quota, or set run.dir elsewhere; the last complete checkpoint is intact, "
                  "so the same command then resumes from it",
    errno.EROFS: "set run.dir to a folder on a writable filesystem",
    errno.EACCES: "set run.dir to a folder you may write to",
    errno.EPERM: "set run.dir to a folder you may write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder: set run.dir to a folder path",
    errno.EEXIST: "a file stands where a folder should: set run.dir to a folder path",
    errno.ENOENT: "no folder can be made there (a missing mount, or a virtual filesystem such as /proc): set run.dir "
                  "to a folder on a writable disk",
    errno.ENAMETOOLONG: "set run.dir to a shorter path",
    errno.EISDIR: "a folder stands where the job keeps a file: move it out of the way",
}


def explain_os_error(err: OSError) -> str | None:
    """One line for an OS error a user can fix (a full disk, a read-only or wrong path), else None."""
    fix = _FIXES.get(err.errno)
    if fix is None:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or os.strerror(err.errno)}; {fix}"
