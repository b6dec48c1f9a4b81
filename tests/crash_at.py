"""Train, and die by SIGKILL at one deterministic point of the run's file writes (used by tests only).

    python tests/crash_at.py POINT STEP [train arguments ...]

POINT is where, at checkpoint STEP, the process dies:
  mid-best      half of best.pt's temporary file written
  before-step   best.pt written, the step file not yet
  before-prune  the step file written, older step files not yet pruned
  before-summary  the last step file written, summary.json not yet

In process, `crashing(point, step, die)` does the same with another way to die (tests/test_lifecycle.py raises).
"""

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from mnist_add import checkpoint, train

POINTS = ("mid-best", "before-step", "before-prune", "before-summary")


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def crashing(point: str, step: int, die=sigkill):
    """While inside, the job calls `die` at `point` of checkpoint `step`."""
    save_atomic, prune, write_summary = checkpoint.save_atomic, checkpoint.Checkpointer._prune, train.write_summary
    step_file = f"step-{step:08d}.pt"

    def crashing_save_atomic(state, path: Path):
        if point == "mid-best" and path.name == checkpoint.BEST_NAME and state["progress"]["step"] == step:
            path.with_name(f".{path.name}{checkpoint.TMP_MARK}{os.getpid()}").write_bytes(b"PK\x03\x04 half")
            die()
        if point == "before-step" and path.name == step_file:
            die()
        save_atomic(state, path)

    def crashing_prune(self):
        if point == "before-prune" and (self.directory / step_file).exists():
            die()
        prune(self)

    def crashing_write_summary(run_dir, summary):
        if point == "before-summary":
            die()
        write_summary(run_dir, summary)

    checkpoint.save_atomic, checkpoint.Checkpointer._prune = crashing_save_atomic, crashing_prune
    train.write_summary = crashing_write_summary
    try:
        yield
    finally:
        checkpoint.save_atomic, checkpoint.Checkpointer._prune, train.write_summary = save_atomic, prune, write_summary


if __name__ == "__main__":
    with crashing(sys.argv[1], int(sys.argv[2])):
        sys.exit(train.main(sys.argv[3:]))
