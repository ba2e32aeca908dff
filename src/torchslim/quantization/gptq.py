"""GPTQ (Frantar et al. 2022): low-bit weight codes that correct each other's rounding error.

Round-to-nearest (`WeightOnly`) rounds every weight on its own. GPTQ quantizes a Linear's columns
(input features) one at a time and pushes each column's rounding error onto the columns not yet
quantized, weighted by the inverse of the Hessian H = 2XXᵀ of the layer's calibration inputs:
the layer's output on those inputs moves as little as the grid allows. Layers are calibrated
block by block on the outputs of the already-quantized blocks (`torchslim.layerwise`).

Options as in the paper and its reference code: group-wise grids (one scale, and a zero point
when asymmetric, per `group_size` inputs of a row), `act_order` (columns with the largest
H_jj first; the groups stay the contiguous input ranges of the stored format, their grids taken
from the weights before any update), dampening of H's diagonal, and blocks of columns whose
error is carried to the rest in one matrix product. One addition, on by default: `clip` narrows
each group's grid to the fraction of its range that changes the group's output least (AWQ's
clipping search, `torchslim.quantization.group_clipping`); on SmolLM2-135M at int4 g64 with
act-order it took perplexity from 1.108x to 1.070x dense.

Weights that are exactly zero (pruned before, by SparseGPT, Wanda or magnitude) keep the zero
point's code and pass their whole value on as error, so GPTQ after pruning keeps every zero
(without this the error feedback revives some, and the sparsity silently erodes).

The result is the `GroupedWeightLinear` of `WeightOnly` (codes, scales, zero points), so it is
stored, entropy-coded and loaded like round-to-nearest codes.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.layerwise import (
    InputStatistics,
    compress_layerwise,
    inverse_hessian_factor,
    layerwise_job,
    rounded_in_float,
    uncalibrated_layers,
)
from torchslim.parametrized import original_weight, weight_of
from torchslim.quantization.group_clipping import best_clip
from torchslim.quantization.primitives import QuantSpec, qparams_from_range
from torchslim.quantization.weight_only import code_dtype, grid, grouped_linear, rtn_codes
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, replace_layers_

__all__ = ["GPTQ", "gptq_", "gptq_codes"]


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class GPTQ(TechniqueConfig):
    """Quantize Linear weights to `bits`-bit group-wise codes with GPTQ's error correction.

    Attributes:
        bits: 2..8.
        group_size: inputs per scale; must divide each layer's in_features (64 for SmolLM2:
            576 is not a multiple of 128).
        symmetric: signed codes and no zero point (else unsigned codes with a zero point).
        act_order: quantize the columns with the largest Hessian diagonal first.
        clip: choose each group's grid range (a fraction of its [min, max]) by the output error
            it causes on the calibration inputs, as AWQ does (false: the full range, as the
            paper's code).
        block_size: columns whose errors are carried to the rest at once (the paper's 128).
        dampening: added to H's diagonal, as a fraction of its mean.
        calibration_batches: calibration batches read.
    """

    kind = "gptq"
    structural = True
    selects_layers = True

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int = Field(default=64, ge=1)
    symmetric: bool = True
    act_order: bool = False
    clip: bool = True
    block_size: int = Field(default=128, ge=1)
    dampening: float = Field(default=0.01, gt=0)
    calibration_batches: int = Field(default=128, ge=1)


def _group_params(weights: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each row of `weights` (out, g): over its whole width, or, given the
    group's block of the Hessian, over the clipped range that changes its output least."""
    ratio = 1.0 if hessian is None else best_clip(weights, hessian, spec, weights.shape[1])[:, 0]
    return qparams_from_range(weights.amin(dim=1).float() * ratio, weights.amax(dim=1).float() * ratio,
                              spec)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQ
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in), scales (out, groups), zeros (out, groups)) of one weight matrix.

    Raises:
        ConfigError: H is not positive definite even after dampening.
    """
    spec = grid(config.bits, None, config.symmetric)
    w = weight.detach().double().clone()
    h = hessian.clone()
    rows, columns = w.shape
    size = config.group_size
    pruned = w == 0  # a pruned weight stays exactly zero: its code is the zero point
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = columns // size
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups, dtype=torch.int32)
    order = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(columns)

    def block_of(first: int) -> torch.Tensor | None:  # the group's Hessian block, to clip by
        return h[first:first + size, first:first + size] if config.clip else None

    if config.act_order:  # static grids: from the weights before any update
        for g in range(groups):
            scales[:, g], zeros[:, g] = _group_params(w[:, g * size:(g + 1) * size], spec,
                                                      block_of(g * size))
        w, h, pruned = w[:, order], h[order][:, order], pruned[:, order]
    h_inv = inverse_hessian_factor(h, config.dampening)
    w = w.float()
    codes = torch.zeros(rows, columns, dtype=code_dtype(not config.symmetric))  # a byte each: all
    for start in range(0, columns, config.block_size):
        end = min(start + config.block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            group = column // size
            if not config.act_order and column % size == 0:  # this group's grid, from the
                width = min(size, end - start - i)  # weights as the earlier errors left them
                current = torch.cat([block[:, i:i + width], w[:, start + i + width:start + i + size]], 1) \
                    if width < size else block[:, i:i + size]
                scales[:, group], zeros[:, group] = _group_params(current, spec, block_of(column))
            scale, zero = scales[:, group], zeros[:, group].float()
            q = torch.clamp(torch.round(block[:, i] / scale) + zero, spec.qmin, spec.qmax)
            q = torch.where(pruned[:, start + i], zero, q)  # the error feedback must not revive it
            codes[:, column] = q.to(codes.dtype)
            error = (block[:, i] - (q - zero) * scale) / h_block[i, i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes, scales, zeros


def gptq_(model: nn.Module, config: GPTQ, *, targets: Select, calibration: Any = None) -> dict[str, Any]:
    """Handler of `GPTQ`: every selected Linear becomes a `GroupedWeightLinear` of GPTQ codes."""
    job = layerwise_job(model, targets, calibration, "gptq", group_size=config.group_size,
                       replaces=True)
    layers, skipped, batches = job.layers, job.skipped, job.batches
    _ = grid(config.bits, config.group_size, config.symmetric)  # validates the grid up front
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def quantize_layer(name: str, layer: nn.Linear, stats: InputStatistics) -> None:
        assert stats.hessian is not None
        if stats.samples:
            results[name] = gptq_codes(weight_of(layer), stats.hessian, config)
        else:  # nothing to correct the rounding against
            codes, scales, zeros = rtn_codes(weight_of(layer), config.bits, config.group_size,
                                             config.symmetric)
            results[name] = codes.to(code_dtype(not config.symmetric)), scales, zeros
        codes, scales, zeros = results[name]
        with torch.no_grad():  # the layer computes with its codes from here on (next blocks)
            dequantized = (codes.reshape(codes.shape[0], -1, config.group_size).float()
                           - zeros[:, :, None].float()) * scales[:, :, None]
            original_weight(layer).copy_(dequantized.reshape(codes.shape))

    run = compress_layerwise(model, layers, batches, quantize_layer, hessian=True, label="gptq")

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)
        codes, scales, zeros = results[name]
        return grouped_linear(layer, codes, scales, None if config.symmetric else zeros), {
            "kind": "weight_only", "layer": name, "group_size": config.group_size,
            "asymmetric": not config.symmetric}

    replaced = replace_layers_(model, [name for name, _ in layers], build)
    return {"bits": config.bits, **replaced,
            "skipped": {**skipped, **rounded_in_float(replaced, config.bits)},
            **uncalibrated_layers(run, "gptq", "rounded to nearest"),
            "calibration": {**run, "batches": len(batches)}}


register_technique(GPTQ, gptq_)
