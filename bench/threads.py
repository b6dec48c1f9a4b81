"""CPU threads: training samples/s with torch's own thread count and with trainer.num_threads=1, each on an
idle machine and with a second, identical job training alongside (a shared machine).

    python bench/threads.py [--data-root DIR] [--steps 300] [key=value ...]

Each job is its own process (a thread count is set once per process), training the default recipe for
--steps steps; the figure is the median of its logged windows, the first (start-up) left out.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import bench_args, logged_samples_per_s

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"torch's default": [], "trainer.num_threads=1": ["trainer.num_threads=1"]}


def command(args, run_dir: str, extra: list[str], steps: int) -> list[str]:
    return [sys.executable, "-m", "mnist_add.train", f"data.root={args.data_root}", f"run.dir={run_dir}",
            "wandb.mode=disabled", f"trainer.max_steps={steps}", "trainer.log_every_steps=25", *extra,
            *args.overrides]


def samples_per_s(args, extra: list[str], alongside: bool) -> float:
    """The measured job's samples/s; with `alongside`, a second job of the same settings trains meanwhile."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as measured, tempfile.TemporaryDirectory() as other:
        neighbour = subprocess.Popen(command(args, other, extra, 100 * args.steps), cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if alongside else None
        try:
            subprocess.run(command(args, measured, extra, args.steps), cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            if neighbour is not None:
                neighbour.kill()  # SIGTERM would checkpoint and go on to the end of its step
                neighbour.wait()
        return logged_samples_per_s(measured)


def main() -> None:
    args = bench_args(__doc__)
    print(f"{os.cpu_count()} CPUs; samples/s of one job, {args.steps} steps of the default recipe")
    print(f"{'threads':24} {'idle machine':>14} {'a second job alongside':>24}")
    for name, extra in SETTINGS.items():
        idle, shared = samples_per_s(args, extra, False), samples_per_s(args, extra, True)
        print(f"{name:24} {idle:14,.0f} {shared:24,.0f}")


if __name__ == "__main__":
    main()
