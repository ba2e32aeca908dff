"""Tiny purpose-named models and helpers shared by the tests (and useful to users' tests)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionBlock", "ConcatBranches", "DepthwiseBlock", "FlattenLinear", "HardcodedView",
           "RankOneConv", "ResidualAdd", "SharedLayer", "SplitGate", "TinyConvNet", "TinyMLP",
           "assert_same_outputs"]


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


# ------------------------------------------------------------- structured pruning edge cases
class ResidualAdd(nn.Module):
    """stem conv -> [conv-bn-relu-conv-bn] + identity: the stem's and the block's outputs couple."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C, H, W)
        x = x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out: torch.Tensor = self.head(x.mean(dim=(2, 3)))  # (B, C) -> (B, 4)
        return out


class ConcatBranches(nn.Module):
    """Two convs concatenated on channels, then a 1x1 conv reads both halves."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 6, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 1)
        self.merge = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.merge(torch.cat([torch.relu(self.left(x)), self.right(x)], dim=1))
        return out.flatten(1)


class SplitGate(nn.Module):
    """A conv's output split in halves, one gating the other (GLU): channel i couples with i + C/2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)  # (B, 6, H, W) each
        out: torch.Tensor = self.out(value * torch.sigmoid(gate))
        return out


class DepthwiseBlock(nn.Module):
    """MobileNet-style: 1x1 expand -> depthwise 3x3 -> BN -> 1x1 project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.project(torch.relu(self.bn(self.depthwise(self.expand(x)))))
        return out


class FlattenLinear(nn.Module):
    """conv (C channels, 4x4 maps) -> flatten -> Linear(C*16): each channel owns 16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))
        return out


class HardcodedView(FlattenLinear):
    """Like FlattenLinear, but reshapes with a literal size: its conv must not be pruned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.pool(torch.relu(self.conv(x))).view(-1, 96))
        return out


class SharedLayer(nn.Module):
    """One Linear applied twice: its input and output features are the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        out: torch.Tensor = self.out(x)
        return out


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: nn.MultiheadAttention (4 heads) + residual, then an FFN."""

    def __init__(self, width: int = 16, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, T, E)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        out: torch.Tensor = x + self.down(torch.relu(self.up(x)))
        return out
