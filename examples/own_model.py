"""A model and data torchslim has never seen, written the way you would write your own.

`build_model()` returns the network, `trained_model()` the same trained for a few seconds, and
`loaders()` the `{"train", "val", "test"}` DataLoaders of
scikit-learn's 8x8 digits (shipped with scikit-learn: nothing is downloaded). The other examples
import them, and the command line takes them as `--model examples/own_model.py:build_model`
and `--dataset examples/own_model.py:loaders`.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallNet(nn.Module):
    """Two conv blocks, global average pooling and a linear head: (B, 1, 8, 8) -> (B, 10)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))  # (B, C, 8, 8) -> (B, C) -> (B, 10)


def build_model() -> nn.Module:
    """The untrained network, with fixed initial weights."""
    torch.manual_seed(0)
    return SmallNet()


def loaders(batch_size: int = 64) -> dict[str, DataLoader]:
    """Train / val / test DataLoaders of (image, label) pairs: 1,200 / 300 / 297 digits, split
    at random with a fixed seed."""
    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(digits.images, dtype=torch.float32)[order].unsqueeze(1) / 16  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)[order]
    splits = {"train": slice(0, 1200), "val": slice(1200, 1500), "test": slice(1500, None)}
    generator = torch.Generator().manual_seed(0)
    return {name: DataLoader(TensorDataset(x[part], y[part]), batch_size=batch_size,
                             shuffle=name == "train", generator=generator)
            for name, part in splits.items()}


def trained_model(epochs: int = 3) -> nn.Module:
    """`build_model()` trained on `loaders()["train"]` (Adam, a few seconds): your trained model."""
    from torchslim.training import Trainer, make_train_config

    model, data = build_model(), loaders()
    Trainer(model, data["train"], val_loader=data["val"], progress=False,
            config=make_train_config(epochs=epochs, optimizer="adam", lr=0.01)).fit()
    return model
