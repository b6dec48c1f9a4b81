"""Imported at start-up by every Python process that the tests launch (conftest puts this folder on
PYTHONPATH). With MNIST_ADD_TEST_HOLD_AT=N, a training job that saves a checkpoint at step N holds
right after that save, all ranks together, until some rank is asked to stop (a signal, or the death
of its torchrun agent) or the file MNIST_ADD_TEST_RELEASE names exists. A test can then act on a job
that is certainly in the middle of its run, however fast or slow the machine. A job resumed past
step N never saves it again, so it never holds.
"""

import os

if os.environ.get("MNIST_ADD_TEST_HOLD_AT"):
    import sys
    import time

    import torch

    from mnist_add import distributed
    from mnist_add.checkpoint import Checkpointer

    _HOLD_AT = int(os.environ["MNIST_ADD_TEST_HOLD_AT"])
    _RELEASE = os.environ.get("MNIST_ADD_TEST_RELEASE", "")
    _live_signals = []
    _enter, _save = distributed.StopSignals.__enter__, Checkpointer.save

    def _remember(self):
        _live_signals.append(self)
        return _enter(self)

    def _save_then_hold(self, state, step, **verdicts):
        path = _save(self, state, step, **verdicts)
        if step == _HOLD_AT:
            print(f"test hook: holding after the checkpoint of step {step}", file=sys.stderr, flush=True)
            # A collective per round, so that every rank leaves in the same round.
            while not distributed.any_rank(_live_signals[-1].reason() is not None or
                                           bool(_RELEASE and os.path.exists(_RELEASE)), torch.device("cpu")):
                time.sleep(0.02)
        return path

    distributed.StopSignals.__enter__ = _remember
    Checkpointer.save = _save_then_hold
