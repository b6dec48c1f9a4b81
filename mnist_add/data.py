"""MNIST paired with addends: the dataset, its batched fast path, and resumable distributed sampling.

Everything random here (addends, augmentation, order) is a pure function of (seed, epoch, index)
or (seed, epoch, step), so every rank, restart and world size sees the same thing without saving
any RNG state.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from mnist_add.config import ConfigError, DataConfig
from mnist_add.task import NUM_ADDENDS

MEAN, STD = 0.1307, 0.3081  # of the MNIST training images, as the seed normalised
TEST_ADDEND_SEED = 20_240_601  # test pairs never change, whatever the training seed
VAL_SPLIT_SEED = 20_261_204  # which training images are held out for validation: the same for every run
VAL_ADDEND_SEED = 20_261_205  # validation pairs never change either
IMAGE_SHAPE = (28, 28)
# MNIST's files in ROOT/MNIST/raw/, torchvision's layout: (images, labels) of each split
RAW_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetError(RuntimeError):
    """The MNIST files are missing or unreadable; the message says how to fix it."""


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 1, 28, 28] float, normalised
    digits: torch.Tensor  # [B] int64, 0..9
    addends: torch.Tensor  # [B] int64, 0..9
    sums: torch.Tensor  # [B] int64, 0..18

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(to_device(t, device) for t in self))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the host through pinned memory, so that the copy does not wait for the GPU."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class MNISTAdd(Dataset):
    """MNIST images with a deterministic addend: item `i` is `(image, digit, addend, sum)`.

    The training split draws addend `i` uniformly from 0..9 as a function of (seed, epoch, i);
    `set_epoch` moves to another draw. `holdout` training images (a fixed random choice, the same for
    every run and world size) are held out of it: `validation=True` gives those instead, unaugmented.
    The validation and test splits have one fixed addend per image.
    `batch(indices)` is the fast path: it indexes the uint8 tensor and normalises (and, with
    `augment`, randomly warps) the whole batch at once, on whatever device the data is on.
    """

    def __init__(self, root: str, train: bool = True, download: bool = False, seed: int = 0,
                 num_samples: int = 0, augment: "Augment | None" = None, holdout: int = 0,
                 validation: bool = False):
        self.root, self.train = os.path.expanduser(root), train
        self.data, self.targets = load_mnist(self.root, train, download)
        self._check_loaded()
        self.num_total = len(self.targets)
        self.varies = train and not validation  # addends and warps change with the epoch
        # Original indices of the images kept: addends and warps are drawn for all images and looked up by
        # them, so that a subset sees the same pairs as the whole set.
        self.source = split_indices(self.num_total, holdout, validation) if train else torch.arange(self.num_total)
        if num_samples:
            self.source = self.source[:num_samples]
        self.data, self.targets = self.data[self.source], self.targets[self.source]
        self.seed, self.augment = seed, augment if self.varies else None
        # This epoch's addend and warp of every sample, refilled in place each epoch: a captured training step
        # (mnist_add.step) gathers from them at fixed addresses.
        self.addend_table = torch.empty(len(self.source), dtype=torch.int64)
        self.warp_table = torch.empty(len(self.source), augment.width) if self.augment else None
        self.set_epoch(0)

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "raw")

    def _check_loaded(self) -> None:
        expected = 60_000 if self.train else 10_000
        if self.data.shape != (expected, *IMAGE_SHAPE) or len(self.targets) != expected or self.targets.max() > 9:
            raise DatasetError(_corrupt(self.raw_folder, f"images {tuple(self.data.shape)}, {len(self.targets)} "
                                                         f"labels; expected {expected}"))

    def set_epoch(self, epoch: int, warp: bool = True) -> None:
        """Training addends and augmentation change with the epoch; `warp=False` leaves this epoch's images
        unwarped (its addends stay what they are). The validation and test splits ignore both."""
        self.epoch, self.warp = epoch, warp
        if not self.varies and epoch:
            return
        seed = self.seed * 1_000_003 + epoch if self.varies else VAL_ADDEND_SEED if self.train else TEST_ADDEND_SEED
        gen = torch.Generator().manual_seed(seed)
        self.addend_table.copy_(torch.randint(0, NUM_ADDENDS, (self.num_total,), generator=gen)[self.source])
        if self.augment and warp:
            self.warp_table.copy_(self.augment.draw(self.num_total, gen)[self.source])

    def to(self, device: torch.device) -> "MNISTAdd":
        self.data, self.targets = self.data.to(device), self.targets.to(device)
        self.addend_table = self.addend_table.to(device)
        self.warp_table = self.warp_table.to(device) if self.warp_table is not None else None
        return self

    def addends(self) -> torch.Tensor:
        """[N] int64: the addend of every sample in the current epoch."""
        return self.addend_table

    def batch(self, indices: torch.Tensor) -> Batch:
        """The samples at `indices` ([B] int64), batched, on the data's device. Reads nothing back to the host and
        only tensors that keep their addresses, so that a CUDA graph can capture it."""
        if indices.device != self.data.device:
            indices = indices.to(self.data.device)
        images = self.data[indices].unsqueeze(1).float()  # 0..255: warping pads with 0, black
        if self.augment and self.warp:
            images = self.augment.apply(images, self.warp_table[indices])
        images = images.mul_(1 / (255 * STD)).sub_(MEAN / STD)  # (x / 255 - MEAN) / STD in two passes
        digits, addends = self.targets[indices], self.addend_table[indices]
        return Batch(images, digits, addends, digits + addends)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        images, digits, addends, sums = self.batch(torch.tensor([index]))
        return images[0], int(digits[0]), int(addends[0]), int(sums[0])

    def __len__(self) -> int:
        return len(self.data)


def load_mnist(root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images ([N, 28, 28] uint8) and digits ([N] int64) from ROOT/MNIST/raw/; missing files are downloaded
    there through torchvision when asked. torchvision is imported only then: it takes seconds, on every process
    start."""
    raw = os.path.join(root, "MNIST", "raw")
    made = [folder for folder in (raw, os.path.dirname(raw), root) if not os.path.exists(folder)]
    try:
        if download and not _all_files(raw):
            from torchvision.datasets import MNIST
            MNIST(root, train=train, download=True)
        images, labels = (os.path.join(raw, name) for name in RAW_FILES[train])
        return read_idx(images), read_idx(labels).long()
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
        _remove_empty(made)  # a failed download leaves no empty data/MNIST/raw/ behind
        raise DatasetError(_explain_load_failure(raw, download, err)) from err


def read_idx(path: str) -> torch.Tensor:
    """An idx file of unsigned bytes (MNIST's format): a big-endian header of the type and the size of each
    dimension, then the values."""
    with open(path, "rb") as f:
        content = f.read()
    header = 4 + 4 * (content[3] if len(content) >= 4 else 0)
    if len(content) < header or content[:3] != b"\x00\x00\x08":
        raise ValueError(f"{os.path.basename(path)} has no idx header of unsigned bytes")
    shape = struct.unpack_from(f">{content[3]}I", content, 4)
    if len(content) != header + math.prod(shape):
        raise ValueError(f"{os.path.basename(path)} holds {len(content) - header} values, its header says "
                         f"{math.prod(shape)}")
    return torch.frombuffer(bytearray(content), dtype=torch.uint8, offset=header).view(shape)


def split_indices(num_total: int, holdout: int, validation: bool) -> torch.Tensor:
    """[N] int64, ascending: the `holdout` images held out for validation (`validation`), or the others."""
    held_out = torch.zeros(num_total, dtype=torch.bool)
    held_out[torch.randperm(num_total, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))[:holdout]] = True
    return torch.nonzero(held_out == validation).flatten()


ELASTIC_GRID = 4  # control points per side of an elastic displacement field: bends about 9 px across


class Augment:
    """Random warps drawn per sample and applied to whole batches: an affine map (rotation, shift,
    scale), and optionally an elastic displacement of every pixel.

    Simard et al. (2003) make the elastic field by smoothing per-pixel noise with a Gaussian; here it
    is the bicubic interpolation of random offsets at ELASTIC_GRID x ELASTIC_GRID control points,
    an equally smooth field from 32 numbers per sample, small enough to draw for every sample.
    """

    def __init__(self, max_rotation_deg: float, max_shift_px: float, max_scale_delta: float,
                 max_elastic_px: float = 0.0):
        self.max_rotation = math.radians(max_rotation_deg)
        self.max_shift = 2 * max_shift_px / IMAGE_SHAPE[0]  # affine_grid works in [-1, 1] coordinates
        self.max_scale_delta = max_scale_delta
        self.max_elastic = 2 * max_elastic_px / IMAGE_SHAPE[0]
        self.width = 4 + (2 * ELASTIC_GRID ** 2 if max_elastic_px else 0)  # numbers drawn per sample

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """[n, 4] or, with elastic warps, [n, 4 + 2 * ELASTIC_GRID**2]: rotation (rad), shift x, shift y,
        scale, then the control points' x and y offsets. The affine columns are drawn first, so that
        they are the same with and without elastic warps."""
        u = torch.rand(n, 4, generator=gen) * 2 - 1
        affine = u * torch.tensor([self.max_rotation, self.max_shift, self.max_shift, self.max_scale_delta]) \
            + torch.tensor([0.0, 0.0, 0.0, 1.0])
        if not self.max_elastic:
            return affine
        offsets = (torch.rand(n, 2 * ELASTIC_GRID ** 2, generator=gen) * 2 - 1) * self.max_elastic
        return torch.cat([affine, offsets], dim=1)

    @staticmethod
    def apply(images: torch.Tensor, warps: torch.Tensor) -> torch.Tensor:
        angle, tx, ty, scale = warps[:, :4].unbind(1)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        if warps.shape[1] > 4:
            offsets = warps[:, 4:].reshape(-1, 2, ELASTIC_GRID, ELASTIC_GRID)
            displacement = F.interpolate(offsets, size=images.shape[-2:], mode="bicubic", align_corners=True)
            grid = grid + displacement.permute(0, 2, 3, 1)  # [B, H, W, (x, y)], as the grid
        return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _all_files(raw: str) -> bool:
    return all(os.path.isfile(os.path.join(raw, name)) for split in RAW_FILES.values() for name in split)


def _explain_load_failure(raw: str, download: bool, err: Exception) -> str:
    if _all_files(raw):
        return _corrupt(raw, str(err).splitlines()[0] if str(err) else type(err).__name__)
    tried = f"downloading {_download_failure_cause(err)}" if download else "data.download=false"
    return (
        f"MNIST not found in {raw} ({tried}). Fix it either way: run once with data.download=true on a "
        f"machine with internet (files land in {raw}), or point MNIST_ADD_DATA_ROOT (or data.root=) at a "
        f"folder that holds MNIST/raw/ with the four idx files."
    )


def _remove_empty(folders: list[str]) -> None:
    """The folders given, deepest first, each only while it is empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or never made
            return


def _download_failure_cause(err: Exception) -> str:
    """Why torchvision's download failed, on one line: the file and each mirror's reason.

    MNIST.download catches each mirror's URLError or RuntimeError and raises one RuntimeError with
    no __cause__: the reasons are only in the lines after its first, "Error downloading F:", as
    "Tried M, got:" and the reason, per mirror. An OSError while writing (a full disk) escapes unwrapped.
    """
    text = str(err)
    header = re.match(r"Error downloading (\S+?):\n", text)
    if header is None:
        return f"failed: {_one_line(text) or type(err).__name__}"
    tries = re.findall(r"Tried (\S+), got:\n(.*?)\n(?=Tried |$)", text[header.end():], flags=re.DOTALL)
    reasons = "; ".join(f"{mirror} gave {_one_line(reason)}" for mirror, reason in tries)
    return f"{header.group(1)} failed: {reasons or _one_line(text)}"


def _one_line(reason: str) -> str:
    """'<urlopen error [Errno 111] Connection refused>' -> '[Errno 111] Connection refused'."""
    unwrapped = re.fullmatch(r"<urlopen error (.*)>", reason.strip(), flags=re.DOTALL)
    return " ".join((unwrapped.group(1) if unwrapped else reason).split()).rstrip(".")


def _corrupt(raw: str, detail: str) -> str:
    return (
        f"MNIST files in {raw} are truncated or corrupt ({detail}). Delete them and download again "
        f"(data.download=true), or set data.root=DIR to a good copy."
    )


class Splits(NamedTuple):
    train: MNISTAdd
    val: MNISTAdd | None  # the training images held out (data.val_samples); None when none are
    test: MNISTAdd


def build_datasets(cfg: DataConfig, seed: int, device: torch.device) -> Splits:
    """The three splits as configured, on the GPU when training there and cfg.on_device."""
    augment = Augment(cfg.max_rotation_deg, cfg.max_shift_px, cfg.max_scale_delta, cfg.max_elastic_px) \
        if cfg.augment else None
    splits = Splits(
        MNISTAdd(cfg.root, train=True, download=cfg.download, seed=seed, num_samples=cfg.train_samples,
                 augment=augment, holdout=cfg.val_samples),
        MNISTAdd(cfg.root, train=True, holdout=cfg.val_samples, validation=True) if cfg.val_samples else None,
        MNISTAdd(cfg.root, train=False, num_samples=cfg.test_samples))
    if device.type == "cuda" and cfg.on_device:
        for dataset in filter(None, splits):
            dataset.to(device)
    return splits


class GlobalBatchSampler(DistributedSampler):
    """This rank's share of each global batch of an epoch, from a given step on.

    The global batches depend only on (seed, epoch, global batch size): the same samples in the
    same order on any world size, so a checkpoint's step count is a position valid everywhere.
    Rank r takes the r-th contiguous slice of each global batch. The epoch's last, shorter batch is
    trained as it is (every rank takes an equal share of it; the fewer than one per rank left over
    are left out), or with `drop_last` left out whole.
    """

    def __init__(self, dataset: MNISTAdd, global_batch_size: int, num_replicas: int, rank: int, seed: int,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if global_batch_size % num_replicas:
            raise ConfigError(
                f"trainer.batch_size={global_batch_size} is the global batch and must divide evenly over "
                f"{num_replicas} processes; pick a multiple of {num_replicas}"
            )
        if global_batch_size > len(dataset):
            raise ConfigError(f"trainer.batch_size={global_batch_size} exceeds the {len(dataset)} training samples")
        self.global_batch_size = global_batch_size
        self.batch_size_per_rank = global_batch_size // num_replicas
        left = 0 if drop_last else len(dataset) % global_batch_size
        self.last_batch_size = left - left % num_replicas  # global; 0: every batch is full
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size + bool(self.last_batch_size)

    @property
    def left_out(self) -> int:
        """Samples of each epoch that no step trains."""
        return len(self.dataset) % self.global_batch_size - self.last_batch_size

    def set_start_step(self, step: int) -> None:
        """Skip the first `step` global batches of the current epoch (resuming mid-epoch)."""
        self.start_step = step

    def __iter__(self):
        """Index tensors on the dataset's device: moved there once an epoch, not once a step."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.to(self.dataset.data.device)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch_size
            share = min(self.global_batch_size, len(order) - start) // self.num_replicas
            yield order[start + self.rank * share:start + (self.rank + 1) * share]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step
