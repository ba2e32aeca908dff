"""In-memory datasets with a seeded validation split, and a batch loader that slices tensors.

All three datasets fit in memory as tensors, so batching is one `index_select` per batch: no
Python call per sample, which keeps both cores on the model instead of on the loader.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from torchslim.data import sources
from torchslim.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "Split", "TensorLoader", "dataset_names", "load_dataset"]

DATASETS = {
    "mnist": sources.read_mnist,
    "fashion-mnist": sources.read_fashion_mnist,
    "digits": sources.read_digits,
}


def dataset_names() -> list[str]:
    """Names accepted by `load_dataset`."""
    return sorted(DATASETS)


@dataclass(frozen=True)
class Split:
    """Normalised images (N, C, H, W) float32 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits of one dataset and what was used to build them.

    `mean` and `std` are measured on the training split (after the validation split is carved
    out) and applied to all three splits.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float
    std: float
    val_seed: int

    def split(self, name: str) -> Split:
        """The split called `name` ("train", "val" or "test")."""
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {name!r}; valid splits: train, val, test")
        split: Split = getattr(self, name)
        return split


def load_dataset(name: str, *, val_fraction: float = 1 / 12, seed: int = 0) -> Dataset:
    """Load a dataset with a validation split carved from its training set.

    Args:
        name: one of `dataset_names()`.
        val_fraction: share of the training set held out for validation (5,000 of MNIST's 60,000).
        seed: seed of the permutation that picks the validation images.

    Raises:
        ConfigError: unknown name or a fraction outside (0, 1).
        DataError: the dataset's package is not installed (the message gives the command).

    Example:
        >>> data = load_dataset("digits")
        >>> len(data.train) + len(data.val), len(data.test), data.input_shape
        (1497, 300, (1, 8, 8))
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_x, train_y, test_x, test_y = DATASETS[name]()
    order = np.random.default_rng(seed).permutation(len(train_y))
    n_val = max(1, round(len(train_y) * val_fraction))
    val_idx, train_idx = order[:n_val], np.sort(order[n_val:])
    fit = train_x[train_idx].astype(np.float64) / 255.0
    mean, std = float(fit.mean()), float(fit.std())

    def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
        scaled = (torch.from_numpy(images.astype(np.float32)) / 255.0 - mean) / std
        return Split(scaled.unsqueeze(1).contiguous(), torch.from_numpy(labels))  # (N, 1, H, W)

    return Dataset(
        name=name,
        train=to_split(train_x[train_idx], train_y[train_idx]),
        val=to_split(train_x[val_idx], train_y[val_idx]),
        test=to_split(test_x, test_y),
        num_classes=int(max(train_y.max(), test_y.max())) + 1,
        input_shape=(1, *train_x.shape[1:]),
        mean=mean, std=std, val_seed=seed,
    )


class TensorLoader:
    """Batches of (images, labels) sliced from a `Split`.

    The shuffle order of epoch `e` depends only on `(seed, e)`, so a run resumed at epoch `e`
    sees exactly the batches an uninterrupted run would. Call `set_epoch(e)` before iterating.
    """

    def __init__(self, split: Split, *, batch_size: int = 128, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def take(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `count` batches of the current epoch (e.g. calibration data), fewer if short."""
        return list(itertools.islice(self, count))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield self.split.images.index_select(0, index), self.split.labels.index_select(0, index)
