"""Which weights should the tools serve: the final ones, or best.pt's argmax of validation? Decided on validation.

    python bench/which_weights.py [--seeds 0,1,2,3,4] [--config default] [--data-root DIR] [key=value ...]

Trains the recipe on each seed keeping every checkpoint (one per epoch, unless trainer.save_every_steps), and scores
each one's served weights on every validation image. The validation images are shuffled once into halves A and B: best.pt's rule (the argmax of the
checkpoints' sum accuracy, the first of equals) chooses on one half and is scored on the other, beside the final
weights scored on that same half; then the halves swap. Prints each (seed, half) pair and the mean difference.
The test set plays no part.
"""

import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path

import torch

from mnist_add.checkpoint import Checkpointer
from mnist_add.config import load_config
from mnist_add.data import MNISTAdd
from mnist_add.scoring import load_model
from mnist_add.train import train


def right_per_checkpoint(config: str, seed: int, data_root: str, overrides: list[str]) -> list[list[bool]]:
    """For each checkpoint, oldest first: whether its sum is right on each validation image."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([config], [f"data.root={data_root}", "data.download=false", f"run.dir={run_dir}",
                                     "wandb.mode=disabled", f"trainer.seed={seed}", "trainer.keep_checkpoints=1000",
                                     *overrides])
        train(cfg)
        val = MNISTAdd(data_root, train=True, holdout=cfg.data.val_samples, validation=True)
        batch = val.batch(torch.arange(len(val)))
        right = []
        for path in reversed(Checkpointer(Path(run_dir) / "checkpoints", 0, write=False).step_paths()):
            with torch.no_grad():
                _, sums = load_model(path)[0](batch.images, batch.addends)
            right.append((sums.argmax(1) == batch.sums).tolist())
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--config", default="default")
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    differences = []
    for seed in map(int, args.seeds.split(",")):
        checkpoints = right_per_checkpoint(args.config, seed, args.data_root, args.overrides)
        order = list(range(len(checkpoints[0])))
        random.Random(20261206).shuffle(order)
        halves = (order[:len(order) // 2], order[len(order) // 2:])
        accuracy = [[sum(right[i] for i in half) / len(half) for half in halves] for right in checkpoints]
        for choose, score in ((0, 1), (1, 0)):
            argmax = max(range(len(accuracy)), key=lambda k: accuracy[k][choose])
            final, chosen = accuracy[-1][score], accuracy[argmax][score]
            differences.append(final - chosen)
            print(f"seed {seed}, chosen on half {'AB'[choose]}: best.pt's rule takes checkpoint {argmax + 1} of "
                  f"{len(accuracy)}, which scores "
                  f"{chosen:.2%} on the other half; the final weights {final:.2%}", flush=True)
    print(f"final weights minus best.pt's choice over {len(differences)} (seed, half) pairs: mean "
          f"{statistics.mean(differences):+.3%}; {sum(d > 0 for d in differences)} better, "
          f"{sum(d == 0 for d in differences)} equal, {sum(d < 0 for d in differences)} worse")


if __name__ == "__main__":
    main()
