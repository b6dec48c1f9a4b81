"""Where metrics go: `metrics.jsonl` in the run directory, mirrored to Weights & Biases.

Only global rank 0 tracks; every other rank gets a `NullTracker`, so the training loop calls
`tracker.log(...)` without asking which rank it is.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mnist_add.config import WandbMode, to_dict
from mnist_add.files import read_bytes
from mnist_add.rundir import METRICS_NAME, strict_json

log = logging.getLogger(__name__)


class MetricsFile:
    """Appends one JSON object per line, and knows which records an earlier segment already wrote.

    After a crash, the steps between the last checkpoint and the crash are trained again, with
    bitwise the same results; their records are already in the file (and in W&B), so they are
    not written twice. A last line cut short by the crash is dropped. Any other line that is not a
    record (a damaged disk, a hand edit) is moved to `metrics.jsonl.damaged`, with a warning: the
    file stays one record per line, and nothing is thrown away.
    """

    def __init__(self, path: Path):
        self.path = path
        records = self._repair() if path.exists() else []
        self.seen = {_record_key(r) for r in records}
        self.file = open(path, "a", buffering=1)

    def _repair(self) -> list[dict[str, Any]]:
        lines = self.path.read_bytes().splitlines(keepends=True)
        records = [_record(line) for line in lines]
        if None not in records:
            return records
        cut_short = records[-1] is None and not lines[-1].endswith(b"\n")
        damaged = [line for line, record in zip(lines[:len(lines) - cut_short], records) if record is None]
        if damaged:
            aside = self.path.with_name(self.path.name + DAMAGED_SUFFIX)
            with open(aside, "ab") as f:
                f.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in damaged))
            log.warning("%s: %d line(s) that are not records moved to %s", self.path, len(damaged), aside)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(line for line, record in zip(lines, records) if record is not None))
        os.replace(tmp, self.path)
        return [record for record in records if record is not None]

    def is_new(self, record: dict[str, Any]) -> bool:
        return _record_key(record) not in self.seen

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(strict_json(record) + "\n")
        except OSError as err:  # a full disk: say which file
            raise OSError(err.errno, err.strerror, str(self.path)) from None

    def close(self) -> None:
        self.file.close()


DAMAGED_SUFFIX = ".damaged"


def _record_key(record: dict[str, Any]) -> tuple:
    """A train and an evaluation record can share a step; their key sets tell them apart."""
    return record["step"], frozenset(record) - {"step"}


def _record(line: bytes) -> dict[str, Any] | None:
    """The record a whole line holds; None for a line cut short by a crash, or anything else that is not one."""
    try:
        record = json.loads(line)
    except ValueError:  # not UTF-8, not JSON
        return None
    is_record = line.endswith(b"\n") and isinstance(record, dict) and type(record.get("step")) is int
    return record if is_record else None


def metrics_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the records of a metrics.jsonl, how many of its lines are not records): damage, for a last line cut short
    by a crash is not counted. UnreadableFile where the path is no regular file."""
    lines = read_bytes(path).splitlines(keepends=True)
    records = [record for record in map(_record, lines) if record is not None]
    return records, len(lines) - len(records) - (bool(lines) and not lines[-1].endswith(b"\n"))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; lines that are not records are skipped, damage with a warning."""
    path = Path(run_dir) / METRICS_NAME
    records, damaged = metrics_records(path)
    if damaged:
        log.warning("%s: skipped %d line(s) that are not records", path, damaged)
    return records


class Tracker:
    """Rank 0's tracker: every record goes to metrics.jsonl, and to W&B when a run is open."""

    def __init__(self, run_dir: Path, wandb_run=None):
        self.metrics = MetricsFile(run_dir / METRICS_NAME)
        self.wandb_run = wandb_run
        self.started = time.perf_counter()

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` at `step`, with `time_s`: wall seconds since this process started tracking."""
        metrics = {**metrics, "time_s": round(time.perf_counter() - self.started, 3)}
        record = {"step": step, **metrics}
        if not self.metrics.is_new(record):
            return
        self.metrics.write(record)
        if self.wandb_run:
            self.wandb_run.log(metrics, step=step)

    def log_per_class(self, per_class: dict[str, list[float]], step: int) -> None:
        """Final per-class test accuracy of each task: a W&B table (metrics.jsonl has the summary)."""
        if self.wandb_run:
            import wandb
            rows = [[task, label, accuracy] for task, accuracies in per_class.items()
                    for label, accuracy in enumerate(accuracies)]
            self.wandb_run.log({"test/per_class": wandb.Table(columns=["task", "class", "accuracy"], data=rows)},
                               step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.metrics.close()
        if self.wandb_run:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


class NullTracker:
    """What ranks other than 0 track: nothing."""

    run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_per_class(self, per_class: dict[str, list[float]], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_tracker(cfg: DictConfig, is_main: bool, run_id: str | None):
    """A Tracker on rank 0 (with a W&B run unless disabled), a NullTracker elsewhere.

    `run_id` comes from the checkpoint a job resumed from, so a requeued job continues its run.
    """
    if not is_main:
        return NullTracker()
    return Tracker(Path(cfg.run.dir), open_wandb_run(cfg, run_id))


def wandb_mode(configured: WandbMode) -> str:
    """WANDB_MODE wins; `auto` is online with credentials, offline without (decided without network)."""
    mode = os.environ.get("WANDB_MODE") or configured.value
    if mode == WandbMode.auto.value:
        mode = "online" if wandb_credentials_available() else "offline"
    return mode


def wandb_credentials_available() -> bool:
    """An API key in the environment, ~/.netrc or W&B's settings file; no network, no prompt."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
        host = wandb_setup.singleton().settings.base_url
        return wbauth.authenticate_session(host=host, source="mnist_add", prompt=False, verify=False,
                                           update_session=False) is not None
    except Exception:  # a malformed key, or this wandb version lacks the helper
        return bool(os.environ.get("WANDB_API_KEY"))


def new_run_id() -> str:
    """Eight lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def open_wandb_run(cfg: DictConfig, run_id: str | None):
    """Start (or continue, with the checkpoint's id) the W&B run; None when disabled.

    Online start-up that fails (no key, no network) warns once and continues offline: training
    never waits on W&B longer than wandb.init_timeout_s, and never on a prompt.
    """
    mode = wandb_mode(cfg.wandb.mode)
    if mode == WandbMode.disabled.value:
        return None
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True))  # silent: a terminal without a key never prompts
    kwargs = dict(
        project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name, group=cfg.wandb.group,
        tags=list(cfg.wandb.tags), dir=cfg.wandb.dir or str(Path(cfg.run.dir)), config=to_dict(cfg),
        id=run_id or new_run_id(), resume="allow",
        settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout_s, console="off", silent=True,
                                x_disable_stats=True, disable_git=True, disable_code=True),
    )
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as err:
        if mode != "online":
            raise
        log.warning("W&B online start failed (%s: %s); continuing offline", type(err).__name__,
                    str(err).splitlines()[0])
        wandb.teardown()  # the failed attempt still holds the run id in this process
        mode, run = "offline", wandb.init(mode="offline", **kwargs)
    for key in ("val/acc_digit", "val/acc_sum", "val/acc_both", "val/acc_sum_given_digit"):
        run.define_metric(key, summary="max")  # the best epoch's; test/* keep the last, the final weights' score
    if mode == "offline":
        log.info("W&B run %s is offline in %s; upload with: wandb sync %s", run.id, run.settings.sync_dir,
                 Path(run.settings.sync_dir).parent / f"offline-run-*-{run.id}")
    return run
