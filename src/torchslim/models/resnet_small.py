"""A small residual CNN for 28x28 grey images: the structured-pruning workhorse.

Three stages of basic blocks (16, 32, 64 channels), batch norm, a 1x1-conv shortcut where the
shape changes: it has every coupling structured pruning must handle (residual adds, BN, a
flatten into a linear head) and trains to >91% on Fashion-MNIST in a few CPU minutes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNetSmall"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem + 3 stages x `blocks_per_stage` basic blocks + global pool + linear head."""

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64), blocks_per_stage: int = 2) -> None:
        super().__init__()
        in_channels = input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 64, 7, 7) on 28x28
        return self.fc(self.flatten(self.pool(x)))  # (B, num_classes)
