"""The ranks agree on stops and divergence without reading the device every step."""

import torch
from torch.overrides import TorchFunctionMode

from mnist_add.agreement import Agreement, fingerprint_share
from mnist_add.distributed import StopSignals
from mnist_add.step import TrainStep
from mnist_add.train import Progress, train

# Every way a Python value is read out of a tensor; on a GPU each waits for the queued work.
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in READS
        return func(*args, **(kwargs or {}))


def test_only_agreement_steps_read_values_from_the_device(make_cfg, monkeypatch):
    cfg = make_cfg("trainer.epochs=2", "trainer.log_every_steps=10", "trainer.save_every_steps=0",
                   "trainer.agree_every_steps=6")
    reads, at_step_start = CountReads(), []
    real_step = TrainStep.__call__

    def step(self, *args):
        at_step_start.append(reads.count)
        real_step(self, *args)

    monkeypatch.setattr(TrainStep, "__call__", step)
    with reads:
        train(cfg)
    at_step_start.append(reads.count)  # the end of the last step
    per_step = [b - a for a, b in zip(at_step_start, at_step_start[1:])]  # reads during and after step k
    # Every agree_every_steps (6), every log step (10), and the ends of the two epochs of 16 steps.
    agreeing = [k in {6, 10, 12, 16, 18, 20, 24, 30, 32} for k in range(1, 33)]
    assert len(per_step) == 32
    assert [n for n, agree in zip(per_step, agreeing) if not agree] == [0] * 23
    assert all(n > 0 for n, agree in zip(per_step, agreeing) if agree)


def test_the_fingerprint_folded_at_agreements_equals_the_per_step_sum():
    indices, addends = torch.arange(8), torch.arange(8) % 10
    agreement, progress, expected = Agreement(torch.device("cpu")), Progress(), 0
    for step in range(1, 6):
        agreement.add(step, indices + step, addends, loss=torch.tensor(1.0))
        expected += int(fingerprint_share(step, indices + step, addends))
        if step in (2, 5):
            assert agreement.agree(progress, StopSignals()) == ([], None)
    assert progress.fingerprint == expected


def test_divergence_names_the_first_non_finite_step_and_a_stop_names_its_signal():
    agreement, signals = Agreement(torch.device("cpu")), StopSignals()
    for step, loss in ((1, 1.0), (2, float("nan")), (3, float("inf"))):
        agreement.add(step, torch.arange(4), torch.arange(4), loss=torch.tensor(loss))
    signals.received = signals.signals[0]
    assert agreement.agree(Progress(), signals) == ([signals.signals[0].name], 2)
