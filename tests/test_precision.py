"""Mixed precision: the forward really computes in the low-precision dtype, and fp16 scales its loss."""

import logging

import pytest
import torch

from mnist_add import checkpoint
from mnist_add.config import Precision, load_config
from mnist_add.model import build_model
from mnist_add.precision import build_precision, resolve
from mnist_add.train import train

CPU = torch.device("cpu")
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ConvOutputs:
    """Records (training?, dtype) of every Conv2d output, in any model, while entered."""

    def __enter__(self) -> "ConvOutputs":
        self.seen: list[tuple[bool, torch.dtype]] = []
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._record)
        return self

    def _record(self, module, inputs, output) -> None:
        if isinstance(module, torch.nn.Conv2d):
            self.seen.append((module.training, output.dtype))

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def forward_once(autocast) -> tuple[set[torch.dtype], torch.dtype]:
    """(dtypes of the conv outputs, dtype of the digit logits) of one forward of the default network."""
    model = build_model(load_config([], []).model)
    with ConvOutputs() as convs, autocast():
        digit_logits, _ = model(torch.randn(2, 1, 28, 28), torch.tensor([3, 9]))
    return {dtype for _, dtype in convs.seen}, digit_logits.dtype


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_forwards_compute_in_that_dtype(precision):
    autocast, _ = build_precision(Precision(precision), CPU)
    assert forward_once(autocast) == ({LOW[precision]}, LOW[precision])


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fp32_and_auto_on_cpu_compute_in_fp32(precision):
    assert resolve(Precision(precision), CPU) == Precision.fp32
    autocast, _ = build_precision(Precision(precision), CPU)
    assert forward_once(autocast) == ({torch.float32}, torch.float32)


@pytest.mark.parametrize("precision,scaled", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_only_fp16_scales_the_loss(precision, scaled):
    _, scaler = build_precision(Precision(precision), CPU)
    assert scaler.is_enabled() == scaled
    assert scaler.scale(torch.tensor(1.0)).item() == (2.0 ** 16 if scaled else 1.0)  # GradScaler's initial scale


def test_low_precision_on_cpu_warns_that_it_is_usually_slower(caplog):
    with caplog.at_level(logging.WARNING):
        build_precision(Precision.bf16, CPU)
        build_precision(Precision.fp32, CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.precision=bf16 on CPU: supported, but usually slower than fp32"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_and_evaluation_run_in_the_low_precision_dtype(make_cfg, tmp_path, precision):
    with ConvOutputs() as convs:
        train(make_cfg(f"trainer.precision={precision}", "trainer.max_steps=2"))
    assert {training for training, _ in convs.seen} == {True, False}  # trained, then evaluated
    assert {dtype for _, dtype in convs.seen} == {LOW[precision]}
    scaler = checkpoint.load(tmp_path / "run/checkpoints/step-00000002.pt")[checkpoint.SCALER]
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}  # a disabled scaler saves nothing
