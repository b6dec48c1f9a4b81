"""Training samples/s by model, precision and torch.compile, on the device there is (GPU if any).

    python bench/compile_and_precision.py [--steps 200] [--precisions fp32,bf16,fp16] [--configs default,seed-joint]

The model steps on one batch already on the device (the input pipeline is measured apart, by
bench/input_pipeline.py), timed after warm-up; compile time (the first steps of a compiled model)
is printed apart, with the compiled / eager ratio and, on CUDA, the peak memory.
"""

import argparse
import time

import torch
from common import synthetic_step

from mnist_add.config import load_config
from mnist_add.data import Batch
from mnist_add.distributed import Runtime
from mnist_add.precision import configure_kernels
from mnist_add.learner import build_learner

WARMUP_STEPS = 10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, device: torch.device, steps: int) -> tuple[float, float, float]:
    """(samples/s, seconds of the warm-up steps (compilation included), peak GiB)."""
    learner = build_learner(cfg, Runtime(device=device), total_steps=steps + WARMUP_STEPS)
    n = cfg.trainer.batch_size
    digits, addends = torch.randint(0, 10, (n,), device=device), torch.randint(0, 10, (n,), device=device)
    batch = Batch(torch.randn(n, 1, 28, 28, device=device), digits, addends, digits + addends)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        synthetic_step(learner, batch)
    synchronize(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        synthetic_step(learner, batch)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return steps * n / (time.perf_counter() - start), warmup, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--configs", default="default,seed-joint")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    configure_kernels(deterministic=False)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| config | precision | eager samples/s | compiled samples/s | ratio | compile s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        for precision in args.precisions.split(","):
            results = [measure(load_config([name], [f"trainer.precision={precision}", f"trainer.compile={compiled}",
                                                    *args.overrides]), device, args.steps)
                       for compiled in (False, True)]
            (eager, eager_warmup, _), (compiled, compiled_warmup, peak) = results
            print(f"| {name} | {precision} | {eager:,.0f} | {compiled:,.0f} | {compiled / eager:.2f} | "
                  f"{compiled_warmup - eager_warmup:.1f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
