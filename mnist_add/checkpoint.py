"""Checkpoints that count only when complete: atomic saves, keep-latest-k, newest-good loading.

The checkpointer sees only a dict of things with `state_dict`/`load_state_dict` plus plain
values; it knows nothing of training. torch is imported where a file is written or read, so that a
command line can `check_file` a path before torch's imports (seconds; half a minute on a busy machine).
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mnist_add.files import kind_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"
FINAL_NAME = "final.pt"  # the weights the tools serve, written when the run completes

# Keys of a training checkpoint (see mnist_add.train); tools that read checkpoints use these.
MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "scheduler", "scaler"
PROGRESS, RNG, CONFIG, TRACKING_RUN_ID = "progress", "rng", "config", "tracking_run_id"
AVERAGE = "average"  # the running average of the weights (optim.swa_epochs), or None; absent before it existed
TRAINING_KEYS = (MODEL, OPTIMIZER, SCHEDULER, SCALER, PROGRESS, RNG, CONFIG, TRACKING_RUN_ID)
MODEL_KEYS = (MODEL, CONFIG)  # what tools that only run a model need (see `served_weights`)
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
TMP_MARK = ".tmp-"  # a save in progress, or one killed half way: `.step-00000016.pt.tmp-PID`
_USE_ANOTHER = "delete it to resume from an older one (with none left, the run starts afresh)"


def served_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's network answers with: their running average once averaging has begun
    (an `AveragedModel` state: `module.`-prefixed, with `n_averaged`), else the trained weights."""
    average = state.get(AVERAGE)
    if average is None:
        return state[MODEL]
    return {key.removeprefix("module."): value for key, value in average.items() if key != "n_averaged"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` so that `path` is either the old file or the complete new one, never half.

    The state is serialised in memory first, so that a full disk surfaces as an OSError naming
    the file (torch's own writer reports it as an opaque position mismatch).
    """
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_file(path: str | Path) -> Path:
    """What can be said of a checkpoint without reading it (or importing torch): a folder, a FIFO or a device, a
    missing file and an empty one raise CheckpointError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory; pass a .pt file "
                                  f"(for example {path}/{BEST_NAME})")
        if (kind := kind_of(path)) is not None:  # a FIFO, a device, a link to nothing: never opened (it could block)
            raise CheckpointError(f"checkpoint {path} is {kind}, not a regular file; pass a .pt file")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist{_instead(path)}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (a save that never finished?); {_USE_ANOTHER}")
    except OSError as err:  # a name too long, a folder that cannot be searched
        raise _unreadable(path, err) from None
    return path


def load(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint on the CPU, requiring `keys`; any file that is not one raises CheckpointError."""
    path = check_file(path)
    try:
        return _load(path, keys)
    except OSError as err:  # no permission to read
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: OSError) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read: {err.strerror}")


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    import torch

    _verify_checksums(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the same thing here
        # torch's messages may suggest weights_only=False: never for a file that failed to load safely.
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch file that loads: "
                              f"{type(err).__name__}); {_USE_ANOTHER}") from err
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path} is a torch file but not an mnist-add checkpoint (no {', '.join(missing)}); "
                              f"pass a step-*.pt or {BEST_NAME} written by mnist_add.train")
    return state


def _verify_checksums(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 for every record, which torch.load never checks: a flipped
    bit in a tensor would load as a silently wrong weight. zipfile's testzip checks them all."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch file that loads: "
                              f"{type(err).__name__}); {_USE_ANOTHER}") from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (its record {damaged} fails its checksum); {_USE_ANOTHER}")


def _instead(missing: Path) -> str:
    """What a missing checkpoint's folder says: none (a typo?), a best.pt or final.pt still to come, the newest step
    checkpoint there now."""
    if not missing.parent.is_dir():
        return f" (nor does its folder {missing.parent}: a typo in the path?)"
    steps = Checkpointer(missing.parent, keep=0, write=False).step_paths()
    now = f"; the newest checkpoint there is {steps[0]}" if steps else ""
    if (missing.parent.parent / "summary.json").exists():  # a completed run: nothing more will be written
        return now
    coming = {BEST_NAME: " yet: it is written at the first epoch's end, with the first validation",
              FINAL_NAME: " yet: it is written when the run completes"}
    return coming.get(missing.name, "") + now


class Checkpointer:
    """Step checkpoints `step-NNNNNNNN.pt` in one folder, the newest `keep` kept, plus `best.pt` and, once the run
    completes, `final.pt`.

    Every rank can load; only a writer (rank 0) touches files.
    """

    def __init__(self, directory: str | Path, keep: int, write: bool):
        self.directory, self.keep, self.write = Path(directory), keep, write

    def prepare(self) -> None:
        """Before the writer's first save: the folder, cleared of what a job killed while saving left behind
        (temporary files, step files past keep-k)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(f".*{TMP_MARK}*"):
            leftover.unlink()
        self._prune()

    def _prune(self) -> None:
        for old in self.step_paths()[self.keep:]:
            old.unlink()

    def step_paths(self) -> list[Path]:
        """Complete step checkpoints, newest first (temporary files of a killed save are not listed)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], step: int, best: bool = False, final: bool = False) -> Path:
        """Save step `step` (and `best.pt`, `final.pt` first: a step file means its verdicts are on disk too)."""
        path = self.directory / f"step-{step:08d}.pt"
        if self.write:
            for name, wanted in ((BEST_NAME, best), (FINAL_NAME, final)):
                if wanted:
                    save_atomic(state, self.directory / name)
            save_atomic(state, path)
            self._prune()
        return path

    def best_usable(self) -> bool:
        """Whether best.pt is there and loads; a damaged one is said in a warning (the next best replaces it)."""
        path = self.directory / BEST_NAME
        if not path.exists():
            return False
        try:
            load(path, keys=(*MODEL_KEYS, PROGRESS))
            return True
        except CheckpointError as err:
            log.warning("%s; the next validation writes %s anew", err, BEST_NAME)
            return False

    def restore_newest(self, restore: Callable[[dict[str, Any], Path], None],
                       keys: tuple[str, ...] = ()) -> Path | None:
        """Apply the newest step checkpoint that loads (with `keys`) and fits; warn about and skip bad ones.

        Returns the path used, or None when the folder has no checkpoint. When checkpoints exist
        but none can be used, raises: starting afresh would silently overwrite the run.
        """
        failures = []
        for path in self.step_paths():
            try:
                restore(load(path, keys), path)
                return path
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                failures.append(str(err))
        if failures:  # the newest's reason and fix; the older ones' are in the warnings above
            older = f"; the {len(failures) - 1} older one(s) fail too (the warnings above say why)" \
                if len(failures) > 1 else ""
            raise CheckpointError(f"no usable checkpoint in {self.directory}: {failures[0]}{older}")
        return None
