"""Two SLURM nodes against one: the same 2-rank job (1 thread each, same global batch) as 1 rank on each of
2 nodes and as 2 ranks on 1 node, both through slurm/train.sbatch; prints samples/s of each and the ratio.

    python bench/multinode_scaling.py [--data-root DIR] [--steps 300] [key=value ...]

Needs a cluster of 2 nodes (`MNIST_ADD_SLURM_NODES=2 bash slurm/local/start.sh; . slurm/local/env.sh`). On
the local cluster both nodes are this machine, so both runs share its cores and talk over loopback: the ratio
measures what the multi-node path costs in itself (rendezvous on the first node by name, a step across two
slurmd), not a network.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import bench_args, logged_samples_per_s

SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


def samples_per_s(nodes: int, tasks_per_node: int, run_dir: str, overrides: list[str]) -> float:
    env = {**os.environ, "RUN_DIR": run_dir, "PYTHON": sys.executable}
    subprocess.run(["sbatch", "--wait", "--quiet", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                    "--cpus-per-task=1", "--output=/dev/null", str(SBATCH), "trainer.num_threads=1",
                    "wandb.mode=disabled", "trainer.log_every_steps=25", *overrides], check=True, env=env)
    return logged_samples_per_s(run_dir)


def main() -> None:
    args = bench_args(__doc__)
    overrides = [f"data.root={os.path.abspath(args.data_root)}", f"trainer.max_steps={args.steps}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        one_node = samples_per_s(1, 2, f"{tmp}/one-node", overrides)
        two_nodes = samples_per_s(2, 1, f"{tmp}/two-nodes", overrides)
    print(f"1 node x 2 ranks : {one_node:8,.0f} samples/s")
    print(f"2 nodes x 1 rank : {two_nodes:8,.0f} samples/s")
    print(f"ratio            : {two_nodes / one_node:8.3f}   (2 nodes / 1 node)")


if __name__ == "__main__":
    main()
