"""DDP on one machine: 2 processes x 1 thread against 1 process x 2 threads on the same cores,
same global batch; prints samples/s of each and the ratio.

    python bench/ddp_scaling.py [--data-root DIR] [--steps 300] [key=value ...]
"""

import os
import subprocess
import sys
import tempfile

from common import bench_args, logged_samples_per_s


def samples_per_s(launcher: list[str], threads: int, run_dir: str, overrides: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launcher, "-m", "mnist_add.train", f"run.dir={run_dir}", f"trainer.num_threads={threads}",
                    "wandb.mode=disabled", "trainer.log_every_steps=25", *overrides], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return logged_samples_per_s(run_dir)


def main() -> None:
    args = bench_args(__doc__)
    overrides = [f"data.root={args.data_root}", f"trainer.max_steps={args.steps}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        single = samples_per_s([sys.executable], 2, f"{tmp}/single", overrides)
        ddp = samples_per_s([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                            1, f"{tmp}/ddp", overrides)
    print(f"1 process x 2 threads : {single:8,.0f} samples/s")
    print(f"2 processes x 1 thread: {ddp:8,.0f} samples/s")
    print(f"ratio                 : {ddp / single:8.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
