"""Models torchslim has never seen, written the way users write them, with their data factories.

Each `build_NAME()` returns a model with fixed weights; `loaders_NAME()` returns
{"train", "val", "test"} torch DataLoaders of real data (scikit-learn's 8x8 digits) shaped for
that model. The conformance suite uses them from Python and through `FILE.py:FUNCTION` on the CLI.
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class SameConv(nn.Conv2d):
    """TF-"SAME" padding: pads in forward, then convolves its own weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel_size[0] - 1
        x = nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride)


class SameConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = SameConv(1, 16, 3), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = SameConv(16, 16, 3), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class ResidualTupleNet(nn.Module):
    """A residual block; returns (logits, embedding) like many research codebases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        embedding = x.mean((2, 3))
        return self.head(embedding), embedding


class LSTMClassifier(nn.Module):
    """Reads an 8x8 digit as 8 rows of 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class DictInputNet(nn.Module):
    """Takes keyword inputs, as Hugging Face models do: `model(**batch)`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels * scale))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention over the 8 rows of a digit."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        h = h + self.ffn(h)
        return self.head(h.mean(1))


MODELS = {"same_conv": SameConvNet, "group_norm": GroupNormNet, "residual_tuple": ResidualTupleNet,
          "lstm": LSTMClassifier, "dict_input": DictInputNet, "attention": AttentionNet}
SHAPES = {"same_conv": (1, 8, 8), "group_norm": (1, 8, 8), "residual_tuple": (1, 8, 8),
          "lstm": (8, 8), "dict_input": (64,), "attention": (8, 8)}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


class _Dicts(Dataset):
    """Samples as dicts: {"pixels", "scale", "labels"} (collated into dict batches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "scale": torch.ones(1), "labels": self.y[i]}


def loaders(name: str) -> dict[str, Any]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16  # (N, 8, 8)
    x = x.reshape(len(x), *SHAPES[name])
    y = torch.tensor(digits.target)
    parts = {"train": slice(0, 1200), "val": slice(1200, 1500), "test": slice(1500, None)}
    generator = torch.Generator().manual_seed(0)
    made = {}
    for split, rows in parts.items():
        data = _Dicts(x[rows], y[rows]) if name == "dict_input" else TensorDataset(x[rows], y[rows])
        made[split] = DataLoader(data, batch_size=64, shuffle=split == "train", generator=generator)
    return made


def example(name: str, batch: int = 4) -> Any:
    """A batch of inputs the model takes: a tensor, or keyword inputs for the dict model."""
    first = next(iter(loaders(name)["val"]))
    if name == "dict_input":
        return {"pixels": first["pixels"][:batch], "scale": first["scale"][:batch]}
    return first[0][:batch]


# factories for the CLI: FILE.py:FUNCTION
def build_same_conv() -> nn.Module:
    return build("same_conv")


def loaders_same_conv() -> dict[str, Any]:
    return loaders("same_conv")


def build_lstm() -> nn.Module:
    return build("lstm")


def loaders_lstm() -> dict[str, Any]:
    return loaders("lstm")


def build_group_norm() -> nn.Module:
    return build("group_norm")


def loaders_group_norm() -> dict[str, Any]:
    return loaders("group_norm")
