"""Time to 99% and 99.6% test sum accuracy of the default config (the test set is scored after every epoch).

    python bench/time_to_accuracy.py [--data-root ../shared/data] [--run-dir DIR] [key=value ...]

With --run-dir of a finished run it reads that run's metrics.jsonl instead of training.
"""

import argparse
import tempfile

from mnist_add.config import load_config
from mnist_add.tracking import read_metrics
from mnist_add.train import train

TARGETS = (0.99, 0.996)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--run-dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or tmp
        if not args.run_dir:
            train(load_config([], [f"data.root={args.data_root}", f"run.dir={run_dir}", "wandb.mode=disabled",
                                   *args.overrides]))
        evaluations = [r for r in read_metrics(run_dir) if "test/acc_sum" in r]
    for r in evaluations:
        print(f"epoch {r['epoch']}: {r['time_s']:7.1f} s  test sum accuracy {r['test/acc_sum']:.4f}")
    for target in TARGETS:
        reached = next((r for r in evaluations if r["test/acc_sum"] >= target), None)
        print(f"time to {target:.1%} test sum accuracy: " +
              (f"{reached['time_s']:.1f} s (epoch {reached['epoch']})" if reached else "not reached"))


if __name__ == "__main__":
    main()
