"""The speed recipe over seeds, through the job's own train(), beside the default recipe in the same run.

    python bench/speedrun.py [--seeds 10] [--config speedrun] [--default-epochs 2] [--data-root DIR] [key=value ...]

Per seed: test digit and sum accuracy, validation sum accuracy, samples seen, and the time from the first step to
the end of the final scoring, with the start-up apart (building the data, and everything train() does before its
first step; the process start, the imports, is measured once). Then the mean ± std and the minimum over the seeds;
then the default recipe, trained for --default-epochs of its ten (the one-cycle schedule is a function of the step,
so these are the first epochs of a full run), its test set scored after each: its time to 99% and its ten epochs
estimated as ten times one, and the ratios to the speed recipe. key=value overrides apply to both recipes.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

import mnist_add.train
from mnist_add.config import load_config
from mnist_add.step import TrainStep
from mnist_add.tracking import read_metrics


@contextmanager
def phases():
    """Times of train()'s phases: building the data, and the end of the first step (device work included); and the
    samples trained (on one process)."""
    marks = {}
    build, step = mnist_add.train.build_datasets, TrainStep.__call__

    def timed_build(*args, **kwargs):
        started = time.perf_counter()
        splits = build(*args, **kwargs)
        marks["data_s"] = time.perf_counter() - started
        return splits

    def timed_step(self, indices, *args, **kwargs):
        if "first_step_start" not in marks:
            marks["first_step_start"] = time.perf_counter()
        marks["samples"] = marks.get("samples", 0) + len(indices)
        step(self, indices, *args, **kwargs)
        if "first_step_end" not in marks:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["first_step_end"] = time.perf_counter()
    mnist_add.train.build_datasets, TrainStep.__call__ = timed_build, timed_step
    try:
        yield marks
    finally:
        mnist_add.train.build_datasets, TrainStep.__call__ = build, step


def run(config: str, data_root: str, overrides: list[str]) -> dict:
    """One train() of `config`: its summary, phases and test evaluations."""
    with tempfile.TemporaryDirectory() as run_dir, phases() as marks:
        cfg = load_config([config], [f"data.root={data_root}", "data.download=false", f"run.dir={run_dir}",
                                     "wandb.mode=disabled", *overrides])
        started = time.perf_counter()
        summary = mnist_add.train.train(cfg)
        ended = time.perf_counter()
        evaluations = [r for r in read_metrics(run_dir) if "test/acc_sum" in r and "epoch" in r]
    return {"summary": summary, "samples": marks["samples"], "evaluations": evaluations,
            "start_up_s": marks["first_step_start"] - started, "data_s": marks["data_s"],
            "first_step_s": marks["first_step_end"] - marks["first_step_start"],
            "training_s": ended - marks["first_step_start"]}


def mean_std_min(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2%} ± {std:.2%} (min {min(values):.2%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--config", default="speedrun")
    parser.add_argument("--default-epochs", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mnist_add.train"], check=True)
    print(f"process start (python and the imports of mnist_add.train): {time.perf_counter() - started:.2f} s; "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)

    runs = []
    for seed in range(args.seeds):
        result = run(args.config, args.data_root, [f"trainer.seed={seed}", *args.overrides])
        summary = result["summary"]
        print(f"{args.config} seed {seed}: test digit {summary['test']['acc_digit']:.2%} sum "
              f"{summary['test']['acc_sum']:.2%}, validation sum {summary['val']['acc_sum']:.2%}, "
              f"{result['samples']} samples; first step to final score {result['training_s']:.2f} s "
              f"(first step {result['first_step_s']:.2f} s); start-up {result['start_up_s']:.2f} s "
              f"(data {result['data_s']:.2f} s)", flush=True)
        runs.append(result)
    test, val = ([r["summary"][split]["acc_sum"] for r in runs] for split in ("test", "val"))
    training = statistics.mean(r["training_s"] for r in runs)
    print(f"{args.config} over {len(runs)} seeds: test sum {mean_std_min(test)}; validation sum "
          f"{mean_std_min(val)}; first step to final score {training:.2f} s on average, "
          f"{torch.get_num_threads()} CPU thread(s)", flush=True)

    default = run("default", args.data_root, [f"trainer.max_steps={args.default_epochs * steps_per_epoch(args)}",
                                              "trainer.test_every_epoch=true", *args.overrides])
    ten_epochs = 10 * default["training_s"] / args.default_epochs
    reached = next((r for r in default["evaluations"] if r["test/acc_sum"] >= 0.99), None)
    to_99 = f"{reached['time_s']:.1f} s (epoch {reached['epoch']})" if reached else \
        f"not within {args.default_epochs} epochs"
    print(f"default: {args.default_epochs} epoch(s) in {default['training_s']:.1f} s, so its 10 epochs about "
          f"{ten_epochs:.0f} s; time to 99% test sum {to_99}", flush=True)
    print(f"ratios: the default's 10 epochs / {args.config} = {ten_epochs / training:.1f}x"
          + (f"; the default's time to 99% / {args.config} = {reached['time_s'] / training:.1f}x" if reached else ""))


def steps_per_epoch(args) -> int:
    cfg = load_config(["default"], [f"data.root={args.data_root}", *args.overrides])
    images = (cfg.data.train_samples or 60_000 - cfg.data.val_samples)
    return -(-images // cfg.trainer.batch_size)  # with the short last batch


if __name__ == "__main__":
    main()
