"""Plain multilayer perceptrons: the MNIST nets of Hinton et al.'s distillation paper (2015).

The teacher is 784-1200-1200-10 with dropout (Srivastava et al.'s MNIST net: 20% of the inputs,
50% of the hidden units), the student 784-800-800-10 with none. Registered as `mlp-1200-1200`
and `mlp-800-800`; other widths are `MLP(hidden=(...))` in Python.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = ["MLP", "InputDropout"]


class InputDropout(nn.Dropout):
    """Dropout on the input pixels. Its own type so that `TrainConfig.dropout`, which sets every
    `nn.Dropout` alike, leaves it at its own rate (`keeps_rate`)."""

    keeps_rate = True


class MLP(nn.Module):
    """Flatten, then `Linear -> ReLU -> Dropout` per hidden width, then a `Linear` classifier.

    Layers are named `fc1`, `fc2`, ... (the classifier is the last), as in `lenet300`, so
    recipes select them the same way.

    Args:
        input_shape: per-sample input shape; the first layer takes its product.
        num_classes: outputs.
        hidden: hidden widths, at least one.
        dropout: rate after every hidden layer.
        input_dropout: rate on the flattened input.
    """

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 hidden: tuple[int, ...] = (800, 800), dropout: float = 0.0,
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden or any(type(w) is not int or w < 1 for w in hidden):
            raise ConfigError(f"MLP hidden widths must be positive integers, got {hidden!r}")
        self.flatten = nn.Flatten()
        self.input_dropout = InputDropout(input_dropout)
        widths = (math.prod(input_shape), *hidden, num_classes)
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
            self.add_module(f"fc{index}", nn.Linear(fan_in, fan_out))
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.depth = len(widths) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(self.flatten(x))  # (B, C*H*W)
        for index in range(1, self.depth):
            x = self.dropout(self.relu(getattr(self, f"fc{index}")(x)))
        output: torch.Tensor = getattr(self, f"fc{self.depth}")(x)
        return output
