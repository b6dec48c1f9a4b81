"""Exact evaluation of a split, sharded over ranks, and `load_model`: what train, report, predict and the
evaluation CLI (mnist_add.evaluate) score with."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm
from omegaconf.errors import OmegaConfBaseException

from mnist_add import checkpoint
from mnist_add.config import SumLoss, upgraded
from mnist_add.data import DatasetError, MNISTAdd
from mnist_add.distributed import Runtime, all_reduce_sum
from mnist_add.model import NUM_DIGITS, AddNet, build_model, task_losses
from mnist_add.task import NUM_ADDENDS, NUM_SUMS


@dataclass
class Evaluation:
    """Sums over the evaluated pairs (exact integers for counts), identical on every world size."""

    num_pairs: int
    loss_digit: float  # summed over pairs
    loss_sum: float
    digit_confusion: torch.Tensor  # [10, 10] int64: true digit x predicted digit
    sum_confusion: torch.Tensor  # [19, 19] int64: true sum x predicted sum
    both_correct: int

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        digits_right = int(self.digit_confusion.trace())
        sums_right = int(self.sum_confusion.trace())
        return {
            f"{prefix}loss_digit": self.loss_digit / self.num_pairs,
            f"{prefix}loss_sum": self.loss_sum / self.num_pairs,
            f"{prefix}acc_digit": digits_right / self.num_pairs,
            f"{prefix}acc_sum": sums_right / self.num_pairs,
            f"{prefix}acc_both": self.both_correct / self.num_pairs,
            f"{prefix}acc_sum_given_digit": self.both_correct / max(1, digits_right),
        }

    def per_class(self) -> dict[str, list[float]]:
        """Accuracy of each true class: digits 0..9 and sums 0..18."""
        return {task: (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
                for task, confusion in (("digit", self.digit_confusion), ("sum", self.sum_confusion))}


def evaluate(model: torch.nn.Module, dataset: MNISTAdd, runtime: Runtime, batch_size: int,
             sum_loss: SumLoss, autocast=nullcontext, exhaustive: bool = False, progress: bool = False) -> Evaluation:
    """Score every test image once (with its fixed addend), or with all ten addends if `exhaustive`; with
    `progress`, a bar on stderr.

    The images are split into batches of `batch_size` the same way on any world size, and rank r
    scores batches r, r + W, ... whole (a kernel can round a sample differently in a batch of
    another size). Counts and loss sums are summed exactly over batches and ranks, so the result
    does not depend on the world size.
    """
    was_training = model.training
    model.eval()
    device = runtime.device
    batches = torch.arange(len(dataset)).split(batch_size)
    # Each batch's loss sums (float32) in a slot of their own, zero on the ranks that do not score
    # it: the all-reduce copies them unchanged, and math.fsum adds them exactly, in any order.
    losses = torch.zeros(2, len(batches), device=device)  # [digit, sum] x batch
    digit_confusion = torch.zeros(NUM_DIGITS * NUM_DIGITS, dtype=torch.int64, device=device)
    sum_confusion = torch.zeros(NUM_SUMS * NUM_SUMS, dtype=torch.int64, device=device)
    both = torch.zeros(1, dtype=torch.int64, device=device)
    with torch.no_grad():  # not a decorator: mutmut leaves decorated functions alone
        for batch in tqdm(range(runtime.rank, len(batches), runtime.world_size), disable=not progress,
                          unit="batch", desc="evaluating", leave=False):
            images, digits, addends, sums = _pairs(dataset, batches[batch], exhaustive, device)
            with autocast():
                outputs = _outputs(model, images, addends, exhaustive)
            losses[:, batch] = torch.stack(task_losses(outputs, digits, sums, sum_loss, reduction="sum"))
            digit_pred, sum_pred = (o.argmax(1) for o in outputs)
            digit_confusion += torch.bincount(digits * NUM_DIGITS + digit_pred, minlength=NUM_DIGITS ** 2)
            sum_confusion += torch.bincount(sums * NUM_SUMS + sum_pred, minlength=NUM_SUMS ** 2)
            both += ((digit_pred == digits) & (sum_pred == sums)).sum()
    model.train(was_training)
    for t in (losses, digit_confusion, sum_confusion, both):
        all_reduce_sum(t)
    loss_digit, loss_sum = (math.fsum(row.tolist()) for row in losses)
    return Evaluation(int(digit_confusion.sum()), loss_digit, loss_sum,
                      digit_confusion.view(NUM_DIGITS, NUM_DIGITS).cpu(),
                      sum_confusion.view(NUM_SUMS, NUM_SUMS).cpu(), int(both))


def _outputs(model: torch.nn.Module, images: torch.Tensor, addends: torch.Tensor, exhaustive: bool):
    """The model's outputs for the pairs; exhaustively, a network whose digits ignore the addend reads each image
    once (its ten copies are consecutive) and its structured head turns the digits into every addend's sum."""
    if not (exhaustive and getattr(model, "digits_ignore_the_addend", False)):
        return model(images, addends)
    digit_logits, _ = model(images[::NUM_ADDENDS], addends[::NUM_ADDENDS])
    digit_logits = digit_logits.repeat_interleave(NUM_ADDENDS, 0)
    return digit_logits, model.sum_output(digit_logits, None, addends)


def _pairs(dataset: MNISTAdd, indices: torch.Tensor, exhaustive: bool, device: torch.device):
    """The batch at `indices`, on `device`; with `exhaustive`, each image repeated with addends 0..9."""
    images, digits, addends, sums = dataset.batch(indices).to(device)
    if not exhaustive:
        return images, digits, addends, sums
    addends = torch.arange(NUM_ADDENDS, device=digits.device).repeat(len(digits))
    digits = digits.repeat_interleave(NUM_ADDENDS)
    return images.repeat_interleave(NUM_ADDENDS, 0), digits, addends, digits + addends


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[AddNet, DictConfig]:
    """The network a checkpoint serves (its weight average, where training averaged), in eval mode, and the config
    it was trained with."""
    return model_from(checkpoint.load(path, keys=checkpoint.MODEL_KEYS), path, device)


def model_from(state: dict, path: str | Path, device: str | torch.device = "cpu") -> tuple[AddNet, DictConfig]:
    """`load_model` of a checkpoint already read (`path` names it in errors)."""
    try:
        cfg = upgraded(state[checkpoint.CONFIG])
        model = build_model(cfg.model)
        model.load_state_dict(checkpoint.served_weights(state))
    except (RuntimeError, ValueError, TypeError, AttributeError, OmegaConfBaseException) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise checkpoint.CheckpointError(f"checkpoint {path} does not hold a model this version can build: "
                                         f"{first_line}") from None
    return model.to(device).eval(), cfg


def load_split(split: str, root: str, val_samples: int) -> MNISTAdd:
    """The whole test set, or the run's validation split."""
    if split == "test":
        return MNISTAdd(root, train=False)
    if not val_samples:
        raise DatasetError("this checkpoint's run held out no validation images (data.val_samples=0); "
                           "evaluate --split test")
    return MNISTAdd(root, train=True, holdout=val_samples, validation=True)
