"""What the ranks agree on between steps, without waiting for the device every step.

Each step only adds to tallies on the device: this rank's share of the data fingerprint, and the
first step whose loss was not finite. At an agreement step (every `trainer.agree_every_steps`, and
every step that logs, evaluates or saves, which read the device anyway) one all-reduce folds them
and tells every rank whether any rank must stop, and why, or diverged. Between agreements no step
reads a device value, so the CPU keeps queueing kernels ahead of the GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mnist_add import distributed
from mnist_add.distributed import StopSignals

NEVER = 1 << 62  # the first non-finite step of a rank whose losses were all finite
FINGERPRINT_MODULUS = 1 << 61


class Verdict(NamedTuple):
    stop_reasons: list[str]  # why ranks were asked to stop (empty: go on)
    diverged_at: int | None  # the first step whose loss was not finite on some rank


def fingerprint_share(step: int, indices: torch.Tensor, addends: torch.Tensor) -> torch.Tensor:
    """This rank's part of an order-sensitive checksum of the (index, addend) pairs trained on: summed over
    ranks and steps, equal runs on any world size have equal fingerprints."""
    return (step * (indices * 10 + addends)).sum()


class Agreement:
    def __init__(self, device: torch.device):
        self.fingerprint_share = torch.zeros((), dtype=torch.int64, device=device)  # wraps mod 2^64, a multiple
        self.first_bad_step = torch.full((), NEVER, dtype=torch.int64, device=device)  # of the modulus

    def add(self, step: int | torch.Tensor, indices: torch.Tensor, addends: torch.Tensor, loss: torch.Tensor) -> None:
        """Tally step `step` (counted from 1; a device tensor in a captured step) on the device, in place; reads
        nothing back."""
        self.fingerprint_share += fingerprint_share(step, indices, addends)
        self.first_bad_step.copy_(torch.where(loss.isfinite(), self.first_bad_step,
                                              self.first_bad_step.clamp(max=step)))

    def agree(self, progress, signals: StopSignals) -> Verdict:
        """One all-reduce (two after a divergence): folds the fingerprint into `progress`, and the verdict."""
        votes = torch.tensor(signals.vote(), dtype=torch.int64, device=self.fingerprint_share.device)
        diverged = (self.first_bad_step != NEVER).long()
        total, diverged_ranks, *counts = distributed.all_reduce_sum(
            torch.cat([self.fingerprint_share.view(1), diverged.view(1), votes])).tolist()
        progress.fingerprint = (progress.fingerprint + total) % FINGERPRINT_MODULUS
        self.fingerprint_share.zero_()
        diverged_at = int(distributed.all_reduce_min(self.first_bad_step)) if diverged_ranks else None
        return Verdict([reason for reason, count in zip(signals.reasons, counts) if count], diverged_at)
