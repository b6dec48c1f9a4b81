"""Checkpoints that count only when complete: atomic saves, keep-latest-k, newest-good loading.

The checkpointer sees only a dict of things with `state_dict`/`load_state_dict` plus plain
values; it knows nothing of training.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"

# Keys of a training checkpoint (see mnist_add.train); tools that read checkpoints use these.
MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "scheduler", "scaler"
PROGRESS, RNG, CONFIG, TRACKING_RUN_ID = "progress", "rng", "config", "tracking_run_id"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` so that `path` is either the old file or the complete new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing, truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"delete it to resume from an older one, or pass trainer.resume=PATH of a good one"
        ) from err


class Checkpointer:
    """Step checkpoints `step-NNNNNNNN.pt` in one folder, the newest `keep` kept, plus `best.pt`.

    Every rank can load; only a writer (rank 0) touches files.
    """

    def __init__(self, directory: str | Path, keep: int, write: bool):
        self.directory, self.keep, self.write = Path(directory), keep, write
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)

    def step_paths(self) -> list[Path]:
        """Complete step checkpoints, newest first (temporary files of a killed save are not listed)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        path = self.directory / f"step-{step:08d}.pt"
        if self.write:
            save_atomic(state, path)
            if best:
                save_atomic(state, self.directory / BEST_NAME)
            for old in self.step_paths()[self.keep:]:
                old.unlink()
        return path

    def restore_newest(self, restore: Callable[[dict[str, Any]], None]) -> Path | None:
        """Apply the newest step checkpoint that loads and fits; warn about and skip bad ones.

        Returns the path used, or None when the folder has no checkpoint. When checkpoints exist
        but none can be used, raises: starting afresh would silently overwrite the run.
        """
        failures = []
        for path in self.step_paths():
            try:
                restore(load(path))
                return path
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                failures.append(str(err))
        if failures:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}:\n  " + "\n  ".join(failures)
                + "\nFix or remove them, or start a new run with another run.dir"
            )
        return None
