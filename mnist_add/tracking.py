"""Where metrics go: `metrics.jsonl` in the run directory, mirrored to Weights & Biases.

Only global rank 0 tracks; every other rank gets a `NullTracker`, so the training loop calls
`tracker.log(...)` without asking which rank it is.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


class MetricsFile:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint's step.

    Steps after the checkpoint are trained again after a restart, so their old lines would be
    logged twice; cutting them keeps the file monotonic in `step`.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        self.file = open(path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if _complete(line) and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _complete(line: str) -> bool:
    """False for a line cut short by a crash."""
    try:
        json.loads(line)
        return line.endswith("\n")
    except json.JSONDecodeError:
        return False


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, skipping a last line a crash cut short."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if _complete(line)]


class Tracker:
    """Rank 0's tracker: every record goes to metrics.jsonl, and to W&B when a run is open."""

    def __init__(self, run_dir: Path, resume_step: int | None, wandb_run=None):
        self.metrics = MetricsFile(run_dir / METRICS_NAME, resume_step)
        self.wandb_run = wandb_run

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.write({"step": step, **metrics})
        if self.wandb_run:
            self.wandb_run.log(metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.metrics.close()
        if self.wandb_run:
            self.wandb_run.finish(exit_code=exit_code)


class NullTracker:
    """What ranks other than 0 track: nothing."""

    run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_tracker(cfg: DictConfig, is_main: bool, run_id: str | None, resume_step: int | None):
    """A Tracker on rank 0, a NullTracker elsewhere."""
    if not is_main:
        return NullTracker()
    return Tracker(Path(cfg.run.dir), resume_step)
