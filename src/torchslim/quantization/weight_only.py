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

import fnmatch
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
from torchslim.structure import (
    Edit,
    own_forward,
    record_edit_,
    register_edit,
    replace_layers_,
    replace_module_,
)

__all__ = ["GroupedWeightEmbedding", "GroupedWeightLinear", "WeightOnly", "rtn_codes", "weight_only_"]


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class WeightOnly(TechniqueConfig):
    """Store Linear weights as `bits`-bit codes with one scale per `group_size` weights.

    Attributes:
        bits: 2..8 (4 and 8 are the usual choices).
        group_size: weights per scale along a row; must divide each layer's in_features.
        symmetric: signed codes and no zero point (else unsigned codes with a zero point).
        embeddings: also the model's `nn.Embedding` tables (rows grouped along the embedding
            width), unless `targets.exclude` names them. A language model's output head tied to
            its input embedding is then quantized once, the two sharing one set of codes; without
            it, a tied head is left in float (replacing it alone would untie the pair).
        embedding_bits: the tables' code width (None: `bits`). A language model's tied table is
            its most sensitive matrix: on SmolLM2-135M, 4-bit codes on it took round-to-nearest
            int4 from 1.275x to 1.53x dense perplexity; 8 bits keep it near 1x at a quarter of
            the float bytes.
    """

    kind = "weight_only"
    structural = True
    selects_layers = True

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int = Field(default=32, ge=1)
    symmetric: bool = True
    embeddings: bool = False
    embedding_bits: int | None = Field(default=None, ge=2, le=8)


def grid(bits: int, group_size: int | None, symmetric: bool) -> QuantSpec:
    """The integer grid of weight-only codes: signed symmetric on all 2^b codes (`full_range`),
    or unsigned with a zero point; `group_size=None` for callers that pass one group's values."""
    return QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, signed=symmetric,
                     full_range=symmetric)


def code_dtype(asymmetric: bool) -> torch.dtype:
    """One byte per code: signed symmetric codes fit int8 ([-128, 127] at 8 bits), unsigned
    asymmetric ones uint8 ([0, 255])."""
    return torch.uint8 if asymmetric else torch.int8


class GroupedCodes(nn.Module):
    """A matrix held as `codes` (rows, width), one scale per `group_size` codes of a row, and a
    zero point per group when asymmetric: the storage every grouped weight-only layer shares.

    The tensors are frozen parameters (counted among the model's parameters; the codes one byte
    each in memory); float values exist only while a forward call dequantizes them.
    """

    def __init__(self, rows: int, width: int, *, group_size: int, asymmetric: bool) -> None:
        super().__init__()
        self.group_size = group_size
        self.codes = nn.Parameter(torch.zeros(rows, width, dtype=code_dtype(asymmetric)), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(rows, width // group_size), requires_grad=False)
        self.zeros = nn.Parameter(torch.zeros(rows, width // group_size),
                                  requires_grad=False) if asymmetric else None

    def load_codes_(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> None:
        """Copy in codes (rounded if float), scales and zero points of the same shapes."""
        with torch.no_grad():
            self.codes.copy_(codes.round() if codes.is_floating_point() else codes)
            self.scales.copy_(scales)
            if zeros is not None and self.zeros is not None:
                self.zeros.copy_(zeros.float())

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                   ) -> torch.Tensor:
        """Float values of `codes` (..., width) with their groups' `scales` / `zeros` (..., G):
        all rows, or the rows an embedding looks up."""
        groups = codes.reshape(*codes.shape[:-1], -1, self.group_size).to(scales.dtype)  # (..., G, g)
        if zeros is not None:
            groups = groups - zeros[..., None]
        return (groups * scales[..., None]).reshape(codes.shape)


class GroupedWeightLinear(GroupedCodes):
    """`F.linear(x, (codes - zeros) * scales)` with per-group scales (and zero points when
    asymmetric); a Linear stored compactly."""

    def __init__(self, in_features: int, out_features: int, *, group_size: int, bias: bool,
                 asymmetric: bool = False) -> None:
        super().__init__(out_features, in_features, group_size=group_size, asymmetric=asymmetric)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        return self.dequantize(self.codes, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class GroupedWeightEmbedding(GroupedCodes):
    """An embedding table of grouped codes: each looked-up row is dequantized on the fly, so
    the table stays one byte per weight in memory. A table tied to an output head shares the
    head's `codes`, `scales` and `zeros` parameters (`share_`): stored once, as the float pair was."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group_size: int,
                 asymmetric: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, group_size=group_size, asymmetric=asymmetric)

    def share_(self, head: GroupedWeightLinear) -> None:
        """Use the tied output head's codes as this table (the same parameters, not a copy)."""
        if head.codes.shape != self.codes.shape or head.group_size != self.group_size or \
                (head.zeros is None) != (self.zeros is None):
            raise TypeError(f"an embedding of {tuple(self.codes.shape)} (group {self.group_size}) "
                            f"cannot share the codes of a head of {tuple(head.codes.shape)} "
                            f"(group {head.group_size})")
        self.codes, self.scales, self.zeros = head.codes, head.scales, head.zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zeros = self.zeros[ids] if self.zeros is not None else None
        return self.dequantize(self.codes[ids], self.scales[ids], zeros)


def grouped_linear(layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None) -> GroupedWeightLinear:
    """A `GroupedWeightLinear` holding `codes` (out, in), `scales` and `zeros` (out, groups)."""
    new = GroupedWeightLinear(layer.in_features, layer.out_features,
                              group_size=layer.in_features // scales.shape[1],
                              bias=layer.bias is not None, asymmetric=zeros is not None)
    new.load_codes_(codes, scales, zeros)
    if layer.bias is not None and new.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    return new


def rtn_codes(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest (codes, scales, zero points) of a (rows, width) matrix on the grouped
    grid (the zero points are 0 on a symmetric grid)."""
    spec = grid(bits, group_size, symmetric)
    weight = weight.detach().float()
    scale, zero = qparams_from_range(*tensor_range(weight, spec), spec)  # (rows, G)
    return quantize(weight, scale, zero, spec), scale, zero


def _rtn_codes(weight: torch.Tensor, config: WeightOnly, bits: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest (codes, scales, zero points or None) of a (rows, width) matrix, with
    `bits` (None: the config's) per code."""
    codes, scale, zero = rtn_codes(weight, bits or config.bits, config.group_size, config.symmetric)
    return codes, scale, None if config.symmetric else zero


def _grouped(layer: nn.Linear, config: WeightOnly) -> GroupedWeightLinear:
    return grouped_linear(layer, *_rtn_codes(weight_of(layer), config))


def _edit(kind: str, name: str, config: WeightOnly, **extra: Any) -> Edit:
    return {"kind": kind, "layer": name, "group_size": config.group_size,
            "asymmetric": not config.symmetric, **extra}


def _tied_head(model: nn.Module, table: nn.Embedding) -> str | None:
    """The Linear whose weight is `table`'s (a language model's tied output head), if any."""
    return next((name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and module.weight is table.weight), None)


def _quantize_embeddings_(model: nn.Module, config: WeightOnly, targets: Select,
                          heads: set[str]) -> tuple[list[str], dict[str, str]]:
    """Each `nn.Embedding` not excluded becomes a `GroupedWeightEmbedding`; a tied head among
    the selected `heads` is replaced with it, sharing its codes. Returns (replaced, skipped)."""
    done: list[str] = []
    skipped: dict[str, str] = {}
    tables = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)
              and not any(n == e or fnmatch.fnmatch(n, e) for e in targets.exclude)]
    for name, table in tables:
        head = _tied_head(model, table)
        if own := own_forward(table):
            skipped[name] = own
            continue
        if table.embedding_dim % config.group_size:
            skipped[name] = (f"its width {table.embedding_dim} is not a multiple of group_size="
                             f"{config.group_size}; left in float")
            continue
        if head is not None and head not in heads:
            skipped[name] = f"it is tied to {head}, which the selection leaves out; left in float"
            continue
        codes, scales, zeros = _rtn_codes(table.weight, config, config.embedding_bits)
        new = GroupedWeightEmbedding(table.num_embeddings, table.embedding_dim,
                                     group_size=config.group_size, asymmetric=zeros is not None)
        if head is not None:
            linear = model.get_submodule(head)
            assert isinstance(linear, nn.Linear)
            replace_module_(model, head, grouped_linear(linear, codes, scales, zeros))
            record_edit_(model, _edit("weight_only", head, config))
            shared = model.get_submodule(head)
            assert isinstance(shared, GroupedWeightLinear)
            new.share_(shared)
            done.append(head)
        else:
            new.load_codes_(codes, scales, zeros)
        replace_module_(model, name, new)
        record_edit_(model, _edit("weight_only_embedding", name, config, shares=head))
        done.append(name)
    return done, skipped


def weight_only_(model: nn.Module, config: WeightOnly, *, targets: Select,
                 calibration: Any = None) -> dict[str, Any]:
    """Handler of `WeightOnly`: replace the selected Linears (and, with `embeddings`, the
    embedding tables); a group size that does not divide a selected Linear's width is an error
    naming the layers (nothing is changed)."""
    layers = [(n, m) for n, m in targets.resolve(model) if isinstance(m, nn.Linear)]
    bad = [f"{n} (in_features {m.in_features})" for n, m in layers if m.in_features % config.group_size]
    if bad:
        raise ConfigError(f"weight_only: group_size={config.group_size} does not divide {', '.join(bad)}; "
                          "pick a divisor or exclude those layers")

    before = sum(p.numel() for p in model.parameters())
    tables: list[str] = []
    table_skips: dict[str, str] = {}
    if config.embeddings:
        tables, table_skips = _quantize_embeddings_(model, config, targets, {n for n, _ in layers})

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)
        return _grouped(layer, config), _edit("weight_only", name, config)

    result = replace_layers_(model, [n for n, _ in layers if n not in tables], build)
    if not config.embeddings:  # a tied head: say how to quantize it
        result["skipped"] = {name: reason + ("; embeddings=True quantizes the pair as one table"
                                             if "is tied to" in reason else "")
                             for name, reason in result["skipped"].items()}
    return {"bits": config.bits, **result, "replaced": tables + result["replaced"],
            "skipped": {**table_skips, **result["skipped"]}, "params_before": before}


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{edit['layer']} is a {type(layer).__name__}, not a Linear")
    replace_module_(model, edit["layer"], GroupedWeightLinear(
        layer.in_features, layer.out_features, group_size=int(edit["group_size"]),
        bias=layer.bias is not None, asymmetric=bool(edit.get("asymmetric", False))))


def _replay_embedding(model: nn.Module, edit: Edit) -> None:
    table = model.get_submodule(edit["layer"])
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"{edit['layer']} is a {type(table).__name__}, not an Embedding")
    new = GroupedWeightEmbedding(table.num_embeddings, table.embedding_dim,
                                 group_size=int(edit["group_size"]), asymmetric=bool(edit.get("asymmetric")))
    if edit.get("shares") is not None:
        head = model.get_submodule(str(edit["shares"]))
        if not isinstance(head, GroupedWeightLinear):
            raise TypeError(f"{edit['layer']} shares the codes of {edit['shares']}, a "
                            f"{type(head).__name__}, not a GroupedWeightLinear")
        new.share_(head)
    replace_module_(model, edit["layer"], new)


register_technique(WeightOnly, weight_only_)
register_edit("weight_only", _replay)
register_edit("weight_only_embedding", _replay_embedding)
