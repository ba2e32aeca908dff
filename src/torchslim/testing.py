"""Tiny purpose-named models and helpers shared by the tests (and useful to users' tests)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyMLP", "assert_same_outputs"]


class TinyMLP(nn.Module):
    """8x8 images -> 16 hidden (with dropout) -> classes: trains in a second on `digits`."""

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10) -> None:
        super().__init__()
        features = 1
        for dim in input_shape:
            features *= dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(),
                                 nn.Dropout(0.1), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def assert_same_outputs(first: nn.Module, second: nn.Module, inputs: torch.Tensor,
                        *, atol: float = 0.0) -> None:
    """Raise AssertionError unless both models give the same outputs (within `atol`)."""
    first.eval()
    second.eval()
    with torch.inference_mode():
        a, b = first(inputs), second(inputs)
    diff = float((a - b).abs().max())
    if diff > atol:
        raise AssertionError(f"outputs differ by {diff:.3g} (allowed {atol})")
