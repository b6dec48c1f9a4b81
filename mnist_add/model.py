"""Networks that read a digit image and an addend, and the losses that train them.

Every variant has the same interface:
    model(images [B, 1, 28, 28] float, addends [B] int64) -> (digit_logits [B, 10], sum_logits [B, 19])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_add.config import Activation, Arch, Heads, LossConfig, ModelConfig, SumHead, SumLoss
from mnist_add.task import NUM_ADDENDS, NUM_SUMS

NUM_DIGITS = 10
ACTIVATIONS = {Activation.relu: nn.ReLU, Activation.silu: nn.SiLU}


class OneHot(nn.Module):
    """[B] int64 class ids -> [B, num_classes] float one-hot rows, usable as a layer."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids, self.num_classes).float()


class SumOutput(nn.Module):
    """Turns the sum part of the head outputs into [B, 19] sum scores, by the kind of sum head."""

    def __init__(self, kind: SumHead):
        super().__init__()
        self.kind = kind
        self.register_buffer("sums", torch.arange(NUM_SUMS, dtype=torch.float32), persistent=False)

    def forward(self, digit_logits: torch.Tensor, extra: torch.Tensor, addends: torch.Tensor) -> torch.Tensor:
        if self.kind == SumHead.free:
            return extra
        if self.kind == SumHead.regression:
            # Scores -(s_hat - k)^2: their argmax is round(s_hat), and -score[target] is the squared error.
            return -(extra.float() - self.sums).square()
        # Structured: P(sum = a + d) = P(digit = d), so the sum is consistent with the digit by construction.
        log_p = F.log_softmax(digit_logits.float(), dim=1)
        positions = addends[:, None] + torch.arange(NUM_DIGITS, device=addends.device)
        return torch.full((len(log_p), NUM_SUMS), float("-inf"), device=log_p.device).scatter(1, positions, log_p)


class AddNet(nn.Module):
    """image features ++ embedded one-hot addend -> MLP -> digit head and sum head."""

    def __init__(self, features: nn.Module, num_features: int, mlp_dims: list[int], cfg: ModelConfig,
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.features = features
        # addend_dim=0: the trunk never sees the addend; only a structured sum head uses it.
        self.addend = nn.Sequential(OneHot(NUM_ADDENDS), nn.Linear(NUM_ADDENDS, cfg.addend_dim)) \
            if cfg.addend_dim else None
        self.dropout = nn.Dropout(cfg.dropout)
        layers, width = [], num_features + cfg.addend_dim
        for dim in mlp_dims:
            layers += [nn.Linear(width, dim), activation(inplace=True)]
            width = dim
        self.mlp = nn.Sequential(*layers)
        extra = {SumHead.free: NUM_SUMS, SumHead.regression: 1, SumHead.structured: 0}[cfg.sum_head]
        if cfg.heads == Heads.joint or not extra:
            self.head = nn.Linear(width, NUM_DIGITS + extra)
        else:
            self.digit_head, self.sum_head = nn.Linear(width, NUM_DIGITS), nn.Linear(width, extra)
        self.sum_output = SumOutput(cfg.sum_head)
        self.channels_last = cfg.channels_last

    @property
    def digits_ignore_the_addend(self) -> bool:
        """Whether only a structured sum head reads the addend: one pass over an image then scores every addend."""
        return self.addend is None and self.sum_output.kind == SumHead.structured

    def forward(self, images: torch.Tensor, addends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.dropout(self.features(images))
        if self.addend is not None:
            features = torch.cat([features, self.addend(addends)], dim=1)
        hidden = self.mlp(features)
        if hasattr(self, "head"):
            digit_logits, extra = self.head(hidden).split([NUM_DIGITS, self.head.out_features - NUM_DIGITS], 1)
        else:
            digit_logits, extra = self.digit_head(hidden), self.sum_head(hidden)
        return digit_logits, self.sum_output(digit_logits, extra, addends)


def seed_features() -> tuple[nn.Module, int]:
    """The classroom network's convolutions: 1x28x28 -> 12x4x4 = 192 features."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    ), 192


def convnet_features(width: int, pool_first: bool, overlap_last_pool: bool = False,
                     activation: type[nn.Module] = nn.ReLU) -> tuple[nn.Module, int]:
    """Three conv blocks (28 -> 14 -> 7 -> 3), widths w, 2w, 4w, flattened: 36w features.

    Each block is conv, BatchNorm, activation, max-pool; pool_first moves the pool to right after the conv.
    Max-pooling commutes with a BatchNorm of positive scale and with ReLU (with SiLU nearly: it is monotonic
    above -1.28), so the network is nearly the same one, and normalising a quarter of the activations raises
    CPU training throughput by a quarter.
    The last block's 2x2 windows leave the 7x7 map's last row and column out; overlap_last_pool pools
    3x3 windows at stride 2 instead, which cover all of it and still give 3x3.
    """
    def block(cin: int, cout: int, kernel: int, pool_kernel: int = 2) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        pool, norm = nn.MaxPool2d(pool_kernel, stride=2), [nn.BatchNorm2d(cout), activation(inplace=True)]
        return [conv, pool, *norm] if pool_first else [conv, *norm, pool]
    return nn.Sequential(
        *block(1, width, 5), *block(width, 2 * width, 3),
        *block(2 * width, 4 * width, 3, pool_kernel=3 if overlap_last_pool else 2), nn.Flatten(),
    ), 4 * width * 3 * 3


def build_model(cfg: ModelConfig) -> AddNet:
    if cfg.arch == Arch.seed:
        features, num_features = seed_features()
        model = AddNet(features, num_features, [212, 100], cfg)
    else:
        activation = ACTIVATIONS[cfg.activation]
        features, num_features = convnet_features(cfg.width, cfg.pool_first, cfg.overlap_last_pool, activation)
        model = AddNet(features, num_features, [cfg.hidden], cfg, activation)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


class Criterion:
    """Weighted per-task training loss: returns (total, digit loss, sum loss), each a scalar."""

    def __init__(self, cfg: LossConfig, sum_head: SumHead):
        self.cfg = cfg
        # A structured sum has -inf scores for impossible sums: smoothing onto them would be infinite.
        self.sum_smoothing = cfg.label_smoothing if sum_head == SumHead.free else 0.0

    def __call__(self, outputs, digits: torch.Tensor, sums: torch.Tensor):
        loss_digit, loss_sum = task_losses(outputs, digits, sums, self.cfg.sum,
                                           (self.cfg.label_smoothing, self.sum_smoothing))
        w = self.cfg.weights
        return w.digit * loss_digit + w.sum * loss_sum, loss_digit, loss_sum


def task_losses(outputs, digits: torch.Tensor, sums: torch.Tensor, sum_loss: SumLoss,
                label_smoothing: tuple[float, float] = (0.0, 0.0), reduction: str = "mean"):
    """(digit loss, sum loss): cross-entropy, or for `mse` the squared error of the regressed sum."""
    digit_logits, sum_logits = (o.float() for o in outputs)
    loss_digit = F.cross_entropy(digit_logits, digits, label_smoothing=label_smoothing[0], reduction=reduction)
    if sum_loss == SumLoss.mse:
        squared_error = -sum_logits.gather(1, sums[:, None]).squeeze(1)
        loss_sum = squared_error.sum() if reduction == "sum" else squared_error.mean()
    else:
        loss_sum = F.cross_entropy(sum_logits, sums, label_smoothing=label_smoothing[1], reduction=reduction)
    return loss_digit, loss_sum
