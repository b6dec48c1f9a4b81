"""Input pipeline: samples/s of MNISTAdd's batched tensor path against a seed-style dataset
(a PIL image per item, ToTensor + Normalize, DataLoader collation), in the same run.

    python bench/input_pipeline.py [--data-root DIR]
"""

import argparse
import os
import random
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import MNIST

from mnist_add.data import MEAN, STD, Augment, MNISTAdd

BATCH = 128


class SeedStyleMNISTAdd(Dataset):
    """The classroom dataset: PIL per item, Python's random addend (0..9 here), four-tuple items."""

    def __init__(self, root):
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
        self.mnist = MNIST(root, train=True, download=False, transform=to_tensor)

    def __len__(self):
        return len(self.mnist)

    def __getitem__(self, index):
        image, digit = self.mnist[index]
        addend = random.randrange(0, 10)
        return image, digit, addend, digit + addend


def samples_per_s(batches, limit: int) -> float:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[1])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # both pipelines on one core, as a DataLoader without workers would be

    seed_loader = DataLoader(SeedStyleMNISTAdd(args.data_root), batch_size=BATCH, shuffle=True)
    seed = samples_per_s(iter(seed_loader), 20_000)
    order = torch.randperm(60_000).split(BATCH)
    plain = MNISTAdd(args.data_root, train=True)
    ours = samples_per_s((plain.batch(i) for i in order), 60_000)
    augmented = MNISTAdd(args.data_root, train=True, augment=Augment(10, 2, 0.1))
    ours_aug = samples_per_s((augmented.batch(i) for i in order), 60_000)

    print(f"seed-style PIL pipeline   : {seed:12,.0f} samples/s")
    print(f"MNISTAdd.batch            : {ours:12,.0f} samples/s  ({ours / seed:.0f}x)")
    print(f"MNISTAdd.batch + augment  : {ours_aug:12,.0f} samples/s  ({ours_aug / seed:.0f}x)")


if __name__ == "__main__":
    main()
