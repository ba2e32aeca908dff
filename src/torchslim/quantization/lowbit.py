"""Binary and ternary weights (BWN / TWN), optionally binary activations (XNOR-Net).

While training, a parametrization replaces each selected weight by
- binary (Rastegari et al. 2016): `α_c · sign(W)` with `α_c = mean|W_c|` per output channel;
- ternary (Li & Liu 2016): `α_c · sign(W) · [|W| > Δ_c]`, `Δ_c = 0.7 · mean|W_c|`,
  `α_c` = mean |W| over the kept weights,
with the straight-through estimator (BinaryConnect's clipped identity: no gradient where
|W| > 1 for binary), so the float "latent" weights keep learning. With `activations=True` the
layer inputs are binarized too (sign, STE with hardtanh's gradient); those inputs must be
signed (sign of a ReLU output is always +1: use hardtanh before binarized layers, as BinaryNet).

`finalize_lowbit_` turns each layer into `LowBitLinear` / `LowBitConv2d`: a codes tensor in
{-1, +1} or {-1, 0, +1} and one scale per output channel. Saved with `Encoding()` the codes
are entropy coded to about 1 (binary) or 1.5-2 (ternary) bits per weight. The change of layer
type is a recorded structural edit, so the file loads without pickle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from torch import nn
from torch.nn.utils import parametrize

from torchslim.config import TechniqueConfig, validated
from torchslim.parametrized import original_weight, weight_parametrizations
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, register_edit, replace_layers_, replace_module_

__all__ = ["LowBit", "LowBitConv2d", "LowBitLinear", "LowBitMode", "finalize_lowbit_",
           "lowbit_codes", "lowbit_weights_"]

TERNARY_THRESHOLD = 0.7


class LowBitMode(StrEnum):
    BINARY = "binary"
    TERNARY = "ternary"


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class LowBit(TechniqueConfig):
    """Train the selected layers with binary or ternary weights (and optionally binary inputs).

    Attributes:
        mode: binary | ternary.
        activations: also binarize each selected layer's input (XNOR-Net style).
    """

    kind = "lowbit"
    selects_layers = True

    mode: LowBitMode = LowBitMode.BINARY
    activations: bool = False


def lowbit_codes(weight: torch.Tensor, mode: LowBitMode | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, +1} shaped like `weight`, per-output-channel scale (C,)).

    Example:
        >>> codes, scale = lowbit_codes(torch.tensor([[0.5, -1.5], [0.1, -0.1]]), "binary")
        >>> codes.tolist(), scale.tolist()
        ([[1.0, -1.0], [1.0, -1.0]], [1.0, 0.10000000149011612])
    """
    flat = weight.reshape(weight.shape[0], -1)  # (C, fan_in)
    magnitude = flat.abs()
    signs = torch.where(flat >= 0, 1.0, -1.0)
    if LowBitMode(mode) == LowBitMode.BINARY:
        return signs.reshape(weight.shape), magnitude.mean(dim=1)
    delta = TERNARY_THRESHOLD * magnitude.mean(dim=1, keepdim=True)  # (C, 1)
    kept = magnitude > delta
    scale = (magnitude * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return (signs * kept).reshape(weight.shape), scale


class LowBitWeight(nn.Module):
    """Parametrization: the low-bit weight in the forward, straight-through in the backward."""

    torchslim_parametrization = True  # ours: finalize_ bakes it in

    def __init__(self, mode: LowBitMode) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes, scale = lowbit_codes(weight.detach(), self.mode)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        target = codes * scale.reshape(shape)
        latent = weight.clamp(-1, 1) if self.mode == LowBitMode.BINARY else weight
        return latent + (target - latent).detach()  # STE (clipped identity for binary)


def _binary_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    clipped = x.clamp(-1, 1)
    return (clipped + (torch.where(x >= 0, 1.0, -1.0) - clipped).detach(), *args[1:])


def lowbit_weights_(model: nn.Module, config: LowBit, *, targets: Select,
                    calibration: Any = None) -> dict[str, Any]:
    """Handler of `LowBit`: attach the low-bit parametrization (and input binarization)."""
    layers = [(n, m) for n, m in targets.resolve(model) if isinstance(m, nn.Linear | nn.Conv2d)]
    for _, layer in layers:
        parametrize.register_parametrization(layer, "weight", LowBitWeight(config.mode))
        if config.activations:
            layer.register_forward_pre_hook(_binary_input)
    return {"layers": [n for n, _ in layers], "mode": config.mode.value,
            "activations": config.activations}


class LowBitLinear(nn.Module):
    """`F.linear(x, codes * scale)`: a Linear stored as low-bit codes and per-row scales."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool,
                 binary_inputs: bool = False) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.binary_inputs = binary_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_inputs:
            x = torch.where(x >= 0, 1.0, -1.0)
        return F.linear(x, self.codes * self.scale[:, None], self.bias)


class LowBitConv2d(nn.Conv2d):
    """A Conv2d whose weight is `codes * scale` (codes stored instead of the float weight)."""

    def __init__(self, conv: nn.Conv2d, *, binary_inputs: bool = False) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                         conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
                         conv.groups, conv.bias is not None, conv.padding_mode)
        del self.weight
        self.codes = nn.Parameter(torch.zeros(conv.weight.shape), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(conv.out_channels), requires_grad=False)
        self.binary_inputs = binary_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_inputs:
            x = torch.where(x >= 0, 1.0, -1.0)
        return self._conv_forward(x, self.codes * self.scale[:, None, None, None], self.bias)


def _build(layer: nn.Module, binary_inputs: bool) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return LowBitConv2d(layer, binary_inputs=binary_inputs)
    assert isinstance(layer, nn.Linear)
    return LowBitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        binary_inputs=binary_inputs)


def finalize_lowbit_(model: nn.Module) -> dict[str, Any]:
    """Replace every low-bit-trained layer by its codes + scales form (a structural edit)."""
    names = [n for n, m in model.named_modules()
             if any(isinstance(p, LowBitWeight) for p in weight_parametrizations(m))]

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        (lowbit,) = [p for p in weight_parametrizations(layer) if isinstance(p, LowBitWeight)]
        binary_inputs = any(h is _binary_input for h in layer._forward_pre_hooks.values())
        codes, scale = lowbit_codes(original_weight(layer).detach(), lowbit.mode)
        new: Any = _build(layer, binary_inputs)
        bias: Any = layer.bias
        with torch.no_grad():
            new.codes.copy_(codes)
            new.scale.copy_(scale)
            if bias is not None:
                new.bias.copy_(bias)
        return new, {"kind": "lowbit", "layer": name, "binary_inputs": binary_inputs}

    return replace_layers_(model, names, build)


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise TypeError(f"{edit['layer']} is a {type(layer).__name__}, not a Linear or Conv2d")
    replace_module_(model, edit["layer"], _build(layer, bool(edit.get("binary_inputs"))))


register_technique(LowBit, lowbit_weights_)
register_edit("lowbit", _replay)
