"""Tiny purpose-named models and helpers shared by the tests (and useful to users' tests)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RankOneConv", "TinyConvNet", "TinyMLP", "assert_same_outputs"]


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


class TinyConvNet(nn.Module):
    """8x8 images -> two 3x3 convs (one strided), a 1x1 conv and a grouped conv -> classes.

    Has every case conv decomposition must handle: plain, strided/padded, 1x1 (skipped) and
    grouped (skipped) convolutions.
    """

    def __init__(self, *, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.point = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.grouped = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2)
        self.fc = nn.Linear(2 * channels * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))  # (B, C, 8, 8)
        x = torch.relu(self.conv2(x))  # (B, 2C, 4, 4)
        x = torch.relu(self.grouped(self.point(x)))
        out: torch.Tensor = self.fc(x.flatten(1))  # (B, 2C·16) -> (B, classes)
        return out


def RankOneConv(in_channels: int = 3, out_channels: int = 5, kernel: int = 3) -> nn.Conv2d:
    """A conv whose every input channel's kernel is rank one over (out, k·k): exactly
    depthwise-separable, so the depthwise replacement must reproduce it."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    pointwise = torch.randn(out_channels, in_channels)
    spatial = torch.randn(in_channels, kernel, kernel)
    with torch.no_grad():
        conv.weight.copy_(pointwise[:, :, None, None] * spatial[None])  # (N, C, k, k)
    return conv


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
