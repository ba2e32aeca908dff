"""Dynamic int8 Linear layers that execute PyTorch's own integer matmul (`torch._int_mm`).

For users who must stay inside PyTorch (no onnxruntime): each selected `nn.Linear` becomes an
`Int8DynamicLinear` holding an int8 weight with one scale per output row. At run time each input
row is quantized symmetrically to int8 (one scale per row), the product is computed by the
int8 x int8 -> int32 kernel, then rescaled. Not `torch.ao` (deprecated): the kernel is
`torch._int_mm` (oneDNN/fbgemm on CPU), the math is ours. The replacement is a recorded
structural edit, so the int8 model saves (int8 tensors: 1 byte per weight) and loads without
pickle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.linear_layers import is_hf_conv1d, linearize_
from torchslim.parametrized import weight_of
from torchslim.select import Select
from torchslim.structure import Edit, register_edit, replace_layers_, replace_module_

__all__ = ["Int8DynamicLinear", "quantize_linears_int8_"]

QMAX = 127


def _rowwise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row of a 2-D tensor and the per-row scale (float32)."""
    scale = x.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # (N,)
    codes = torch.round(x / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


class Int8DynamicLinear(nn.Module):
    """`y = x Wᵀ + b` with int8 W (per-row scales) and int8 x quantized per row at run time."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, *, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8DynamicLinear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        codes, scale = _rowwise_int8(weight_of(layer).detach().float())  # (out, in), (out,)
        new.weight_int8.copy_(codes.t())  # stored (in, out): the kernel's right operand
        new.weight_scale.copy_(scale)
        if layer.bias is not None and new.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def weight(self) -> torch.Tensor:
        """W (out, in) in float: what the int8 codes stand for."""
        return self.weight_int8.t().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)  # (N, in)
        codes, scale = _rowwise_int8(rows.float())
        product = torch._int_mm(codes, self.weight_int8)  # (N, out) int32
        out = product.float() * scale[:, None] * self.weight_scale[None, :]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_linears_int8_(model: nn.Module, *, targets: Select | None = None) -> dict[str, Any]:
    """Replace the selected Linear layers by `Int8DynamicLinear` in place; returns the names."""
    chosen = (targets or Select(types=("Linear",))).resolve(model)
    linearize_(model, [n for n, m in chosen if is_hf_conv1d(m)])  # GPT-2's Conv1D is a Linear
    names = [n for n, _ in chosen if isinstance(model.get_submodule(n), nn.Linear)]

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)
        return Int8DynamicLinear.from_linear(layer), {"kind": "int8_linear", "layer": name}

    return replace_layers_(model, names, build)


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{edit['layer']} is a {type(layer).__name__}, not a Linear")
    replace_module_(model, edit["layer"], Int8DynamicLinear(
        layer.in_features, layer.out_features, bias=layer.bias is not None))


register_edit("int8_linear", _replay)
