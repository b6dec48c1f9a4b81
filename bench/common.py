"""What the training benchmarks share: their command line and how they read a run's throughput."""

import argparse
import os
import statistics

from mnist_add.tracking import read_metrics


def bench_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args()


def logged_samples_per_s(run_dir: str) -> float:
    """Median of a run's logged windows, the first (start-up included) left out."""
    rates = [r["samples_per_s"] for r in read_metrics(run_dir) if "samples_per_s" in r]
    return statistics.median(rates[1:])


def synthetic_step(learner, batch) -> None:
    """One training step on a batch already in memory: no gather, no augmentation, no tallies."""
    learner.forward_backward(batch)
    learner.update()
    learner.advance(average=False)
