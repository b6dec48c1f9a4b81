"""Mixed precision: which autocast dtype a run computes in, and the fp16 gradient scaler."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from mnist_add.config import Precision

log = logging.getLogger(__name__)

_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


@dataclass(frozen=True)
class Autocast:
    device_type: str
    dtype: torch.dtype | None  # None: plain fp32

    def __call__(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()


def configure_kernels(deterministic: bool) -> None:
    """Deterministic kernels for bitwise-reproducible runs, else the fastest: cuDNN's autotuner, and TF32
    for float32 matmuls on CUDA (the CPU keeps full float32). cuBLAS is deterministic only with
    CUBLAS_WORKSPACE_CONFIG set before its first use, so it is set here, before any CUDA work."""
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def resolve(precision: Precision, device: torch.device) -> Precision:
    """`auto` is bf16 on a CUDA device that supports it, fp32 elsewhere (CPU autocast rarely pays)."""
    if precision != Precision.auto:
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision.bf16
    return Precision.fp32


def build_precision(precision: Precision, device: torch.device) -> tuple[Autocast, torch.amp.GradScaler]:
    """The autocast context for forward passes and a GradScaler, enabled only for fp16."""
    precision = resolve(precision, device)
    if precision != Precision.fp32 and device.type == "cpu":
        log.warning("trainer.precision=%s on CPU: supported, but usually slower than fp32", precision.value)
    autocast = Autocast(device.type, _DTYPES.get(precision))
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == Precision.fp16)
