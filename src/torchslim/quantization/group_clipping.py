"""Group-wise weight grids whose range is clipped where that changes the layer's output least.

A grid spanning each group's full [min, max] wastes its steps on one outlier weight; shrinking
the range rounds the outlier harder and every other weight finer. Which fraction is best depends
on the inputs, so the choice is scored by the output error on the calibration inputs: for a
weight change D, tr(D H Dᵀ) with H = XXᵀ/n, one group's block of H at a time. AWQ clips this
way after its scale search, and GPTQ's `clip` option chooses its grids so before its error
correction.
"""

from __future__ import annotations

import torch

from torchslim.quantization.primitives import QuantSpec, qparams_from_range

__all__ = ["CLIPS", "best_clip", "quantize_groups"]

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def quantize_groups(weight: torch.Tensor, spec: QuantSpec, group_size: int,
                    ratio: torch.Tensor | float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized, codes, scales, zeros) of `weight` (out, in) on grids of `group_size` inputs,
    each group's range times `ratio` (a float, or one per (row, group))."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // group_size, group_size)
    shrink = ratio if isinstance(ratio, torch.Tensor) else torch.full(groups.shape[:2], ratio)
    scale, zero = qparams_from_range(groups.amin(-1) * shrink, groups.amax(-1) * shrink, spec)
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], spec.qmin, spec.qmax)
    dequantized = ((codes - zero[..., None]) * scale[..., None]).reshape(rows, columns)
    return dequantized, codes.reshape(rows, columns), scale, zero


def best_clip(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, group_size: int
              ) -> torch.Tensor:
    """Per (row, group), the fraction of the range (one of `CLIPS`) whose codes change that
    group's output least; `hessian` is the (in, in) input Hessian (groups scored on its diagonal
    blocks, independently)."""
    rows, columns = weight.shape
    count = columns // group_size
    best = torch.ones(rows, count)
    lowest = torch.full((rows, count), float("inf"), dtype=torch.float64)
    weight = weight.float()
    hessian = hessian.double()
    for ratio in CLIPS:
        dequantized, *_ = quantize_groups(weight, spec, group_size, ratio)
        delta = (dequantized - weight).double()
        for g in range(count):
            part = slice(g * group_size, (g + 1) * group_size)
            error = ((delta[:, part] @ hessian[part, part]) * delta[:, part]).sum(1)
            better = error < lowest[:, g]
            lowest[better, g] = error[better]
            best[better, g] = ratio
    return best
