"""Training time of the fast and the default recipe, each one's time to 99%, 99.6% and 99.7% test sum accuracy (the
test set is scored after every epoch, trainer.test_every_epoch: a measurement that chooses nothing), and the ratio of
the default's training time to the fast one's.

    python bench/time_to_accuracy.py [--data-root DIR] [--configs fast,default] [key=value ...]

The configs train one after the other in this one process, so that their ratio compares like with like.
"""

import argparse
import os
import tempfile
import time

from mnist_add.config import load_config
from mnist_add.tracking import read_metrics
from mnist_add.train import train

TARGETS = (0.99, 0.996, 0.997)


def timed_run(config: str, data_root: str, overrides: list[str]) -> tuple[float, list[dict]]:
    """(seconds train() took, the run's test evaluations)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([config], [f"data.root={data_root}", f"run.dir={run_dir}", "wandb.mode=disabled",
                                     "trainer.test_every_epoch=true", *overrides])
        started = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - started
        return seconds, [r for r in read_metrics(run_dir) if "test/acc_sum" in r and "epoch" in r]


def report(config: str, seconds: float, evaluations: list[dict]) -> None:
    for r in evaluations:
        print(f"{config} epoch {r['epoch']}: {r['time_s']:7.1f} s  test sum accuracy {r['test/acc_sum']:.4f}")
    print(f"{config}: trained in {seconds:.1f} s")
    for target in TARGETS:
        reached = next((r for r in evaluations if r["test/acc_sum"] >= target), None)
        print(f"{config}: time to {target:.1%} test sum accuracy: " +
              (f"{reached['time_s']:.1f} s (epoch {reached['epoch']})" if reached else "not reached"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    parser.add_argument("--configs", default="fast,default", metavar="NAME,NAME",
                        help="configs to train, in order; the ratio is the last one's time over the first one's")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every config")
    args = parser.parse_args()
    configs, times = args.configs.split(","), {}
    for config in configs:
        times[config], evaluations = timed_run(config, args.data_root, args.overrides)
        report(config, times[config], evaluations)
    if len(configs) > 1:
        first, last = configs[0], configs[-1]
        print(f"training time {last} / {first}: {times[last] / times[first]:.2f}")


if __name__ == "__main__":
    main()
