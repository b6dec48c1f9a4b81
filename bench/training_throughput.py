"""Training: end-to-end samples/s of `train()` against the same model stepping on synthetic tensors
already in memory (no dataset, no sampler, no augmentation, no logging).

    python bench/training_throughput.py [--data-root DIR] [--steps 300] [key=value ...]
"""

import tempfile
import time

import torch
from common import bench_args, logged_samples_per_s, synthetic_step

from mnist_add.config import load_config
from mnist_add.data import Batch
from mnist_add.distributed import Runtime
from mnist_add.learner import build_learner
from mnist_add.train import train


def end_to_end(cfg) -> float:
    train(cfg)
    return logged_samples_per_s(cfg.run.dir)


def synthetic(cfg, steps: int) -> float:
    learner = build_learner(cfg, Runtime(), total_steps=steps + 10)
    n = cfg.trainer.batch_size
    digits, addends = torch.randint(0, 10, (n,)), torch.randint(0, 10, (n,))
    batch = Batch(torch.randn(n, 1, 28, 28), digits, addends, digits + addends)
    for _ in range(10):
        synthetic_step(learner, batch)
    start = time.perf_counter()
    for _ in range(steps):
        synthetic_step(learner, batch)
    return steps * n / (time.perf_counter() - start)


def main() -> None:
    args = bench_args(__doc__)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([], [f"data.root={args.data_root}", f"run.dir={run_dir}", "wandb.mode=disabled",
                               f"trainer.max_steps={args.steps}", "trainer.log_every_steps=50", *args.overrides])
        before = synthetic(cfg, args.steps)  # before and after: this machine's speed drifts
        real = end_to_end(cfg)
        fake = (before + synthetic(cfg, args.steps)) / 2
    print(f"synthetic tensors in memory: {fake:8,.0f} samples/s")
    print(f"end-to-end train()         : {real:8,.0f} samples/s")
    print(f"ratio                      : {real / fake:8.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
