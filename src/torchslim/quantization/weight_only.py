"""Weight-only quantization for size: int8 or int4 codes per group of weights, float compute.

Each selected Linear keeps `codes` (integers in [-2^(b-1), 2^(b-1)-1], one per weight) and one
symmetric scale per `group_size` consecutive input weights of a row (GPTQ/AWQ-style storage,
round-to-nearest codes); asymmetric grids (`symmetric=False`) keep codes in [0, 2^b - 1] and a
zero point per group too. GPTQ (`torchslim.quantization.gptq`) writes the same layer with codes
chosen to correct each other's error. The forward dequantizes and runs the float matmul: the point is the
file (and memory) size, not speed. The codes are held as one byte each (int8, or uint8 for
asymmetric grids), so a quantized model takes about a quarter of the float model's memory;
saved with `Encoding()`, they take about `bits` bits each (a codebook of at most 2^bits
values); the replacement is a recorded structural edit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.parametrized import weight_of
from torchslim.quantization.primitives import QuantSpec, qparams_from_range, quantize, tensor_range
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, register_edit, replace_layers_, replace_module_

__all__ = ["GroupedWeightLinear", "WeightOnly", "weight_only_"]


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class WeightOnly(TechniqueConfig):
    """Store Linear weights as `bits`-bit codes with one scale per `group_size` weights.

    Attributes:
        bits: 2..8 (4 and 8 are the usual choices).
        group_size: weights per scale along a row; must divide each layer's in_features.
    """

    kind = "weight_only"
    structural = True
    selects_layers = True

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int = Field(default=32, ge=1)
    symmetric: bool = True


def grid(bits: int, group_size: int | None, symmetric: bool) -> QuantSpec:
    """The integer grid of weight-only codes: signed symmetric on all 2^b codes (`full_range`),
    or unsigned with a zero point; `group_size=None` for callers that pass one group's values."""
    return QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, signed=symmetric,
                     full_range=symmetric)


def code_dtype(asymmetric: bool) -> torch.dtype:
    """One byte per code: signed symmetric codes fit int8 ([-128, 127] at 8 bits), unsigned
    asymmetric ones uint8 ([0, 255])."""
    return torch.uint8 if asymmetric else torch.int8


class GroupedWeightLinear(nn.Module):
    """`F.linear(x, (codes - zeros) * scales)` with per-group scales (and zero points when
    asymmetric); a Linear stored compactly.

    `codes` is a frozen integer parameter (counted among the model's parameters, one byte per
    weight in memory); the float weight exists only during a forward call.
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int, bias: bool,
                 asymmetric: bool = False) -> None:
        super().__init__()
        self.group_size = group_size
        self.codes = nn.Parameter(torch.zeros(out_features, in_features, dtype=code_dtype(asymmetric)),
                                  requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, in_features // group_size),
                                   requires_grad=False)
        self.zeros = nn.Parameter(torch.zeros(out_features, in_features // group_size),
                                  requires_grad=False) if asymmetric else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        groups = self.codes.reshape(out_features, -1, self.group_size).to(self.scales.dtype)  # (out, G, g)
        if self.zeros is not None:
            groups = groups - self.zeros[:, :, None]
        return (groups * self.scales[:, :, None]).reshape(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def grouped_linear(layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None) -> GroupedWeightLinear:
    """A `GroupedWeightLinear` holding `codes` (out, in), `scales` and `zeros` (out, groups)."""
    new = GroupedWeightLinear(layer.in_features, layer.out_features,
                              group_size=layer.in_features // scales.shape[1],
                              bias=layer.bias is not None, asymmetric=zeros is not None)
    with torch.no_grad():
        new.codes.copy_(codes.round() if codes.is_floating_point() else codes)
        new.scales.copy_(scales)
        if zeros is not None and new.zeros is not None:
            new.zeros.copy_(zeros.float())
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def _grouped(layer: nn.Linear, config: WeightOnly) -> GroupedWeightLinear:
    spec = grid(config.bits, config.group_size, config.symmetric)
    weight = weight_of(layer).detach().float()
    scale, zero = qparams_from_range(*tensor_range(weight, spec), spec)  # (out, G)
    return grouped_linear(layer, quantize(weight, scale, zero, spec), scale,
                          None if config.symmetric else zero)


def weight_only_(model: nn.Module, config: WeightOnly, *, targets: Select,
                 calibration: Any = None) -> dict[str, Any]:
    """Handler of `WeightOnly`: replace the selected Linears; a group size that does not divide
    a layer's width is an error naming the layers (nothing is changed)."""
    layers = [(n, m) for n, m in targets.resolve(model) if isinstance(m, nn.Linear)]
    bad = [f"{n} (in_features {m.in_features})" for n, m in layers if m.in_features % config.group_size]
    if bad:
        raise ConfigError(f"weight_only: group_size={config.group_size} does not divide {', '.join(bad)}; "
                          "pick a divisor or exclude those layers")

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)
        return _grouped(layer, config), {"kind": "weight_only", "layer": name,
                                         "group_size": config.group_size,
                                         "asymmetric": not config.symmetric}

    return {"bits": config.bits, **replace_layers_(model, [n for n, _ in layers], build)}


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{edit['layer']} is a {type(layer).__name__}, not a Linear")
    replace_module_(model, edit["layer"], GroupedWeightLinear(
        layer.in_features, layer.out_features, group_size=int(edit["group_size"]),
        bias=layer.bias is not None, asymmetric=bool(edit.get("asymmetric", False))))


register_technique(WeightOnly, weight_only_)
register_edit("weight_only", _replay)
