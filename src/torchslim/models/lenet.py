"""LeNet-300-100 and LeNet-5, the two MNIST models of the Deep Compression paper (Han et al. 2016)."""

from __future__ import annotations

import math

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = ["LeNet5", "LeNet300"]


class LeNet300(nn.Module):
    """Fully connected 784-300-100-10 (266,610 parameters on MNIST)."""

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, C*H*W)
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as pruned in Deep Compression: conv 20 and 50 filters 5x5, fc 500 (431K params)."""

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"lenet5 needs (channels, height, width) inputs, got {input_shape}")
        channels, height, width = input_shape
        # Two (5x5 valid conv, 2x2 pool) stages: 28 -> 24 -> 12 -> 8 -> 4.
        out_height, out_width = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if min(out_height, out_width) < 1:
            raise ConfigError(
                f"lenet5 needs inputs of at least 16x16 pixels, got {height}x{width}; "
                "use lenet300 for small images such as the 8x8 digits dataset")
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * out_height * out_width, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))  # (B, 20, 12, 12) on 28x28
        x = self.pool(self.conv2(x))  # (B, 50, 4, 4)
        x = self.flatten(x)  # (B, 800)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)
