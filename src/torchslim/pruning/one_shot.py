"""One-shot pruning of language models from calibration activations: Wanda and SparseGPT.

Magnitude pruning ranks a weight by |w| alone; in a language model a few input features carry
activations 100x larger than the rest, so a small weight on such a feature matters more than a
large one elsewhere. Both methods here look at the inputs each Linear really sees, block by block
(`torchslim.layerwise`: block i is calibrated on the outputs of the already-pruned blocks before
it), and need no training:

- **Wanda** (Sun et al. 2023): score |W_ij| · ‖X_j‖₂ and remove the lowest scores of each output
  row (the comparison group the paper found best), or the lowest N of every M inputs (N:M).
- **SparseGPT** (Frantar & Alistarh 2023): optimal-brain-surgeon reconstruction. Columns are
  processed left to right in blocks; each removed weight's error is spread over the not yet
  processed weights of its row through the inverse Hessian H⁻¹ (H = 2XXᵀ, dampened), so the
  layer's output on the calibration inputs changes as little as possible. The mask is chosen per
  block of columns by w² / [H⁻¹]²_jj (adaptive), or N of every M inputs.

The result is the same `Mask` parametrization as `WeightPruning` (so recipes keep the zeros
while later stages train, and `Encoding` stores them compactly); SparseGPT also rewrites the
kept weights. `pattern="2:4"` gives the layout sparse tensor cores and `to_sparse_semi_structured`
accelerate.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.layerwise import (
    InputStatistics,
    compress_layerwise,
    inverse_hessian_factor,
    layerwise_job,
    uncalibrated_layers,
)
from torchslim.parametrized import original_weight, weight_of
from torchslim.pruning.unstructured import set_mask_, sparsity_of
from torchslim.registry import register_technique
from torchslim.select import Select

__all__ = ["SparseGPT", "Wanda", "n_m_of", "sparsegpt_", "wanda_"]


def n_m_of(pattern: str | None) -> tuple[int, int] | None:
    """`"2:4"` -> (2, 4): N of every M consecutive weights of a row are removed (2:4, the
    layout of sparse tensor cores, removes 2 of every 4: 50%).

    Raises:
        ConfigError: not `N:M` with 0 < N < M.
    """
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(f"pattern {pattern!r} is not N:M with 0 < N < M (e.g. '2:4': 2 of every "
                          "4 consecutive weights of a row are removed)")
    return int(match[1]), int(match[2])


class _OneShot(TechniqueConfig):
    """Shared checks of Wanda and SparseGPT."""

    def __post_init__(self) -> None:
        fields: Any = self  # the subclasses' fields
        n_m = n_m_of(fields.pattern)
        sparsity = float(fields.sparsity)
        if n_m is not None and abs(sparsity - n_m[0] / n_m[1]) > 1e-9 and sparsity != 0.5:
            raise ConfigError(f"pattern {fields.pattern} removes {n_m[0]}/{n_m[1]} of the weights; "
                              f"sparsity={sparsity} contradicts it (leave sparsity at its default)")


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Wanda(_OneShot):
    """Remove the weights with the smallest |w|·‖x‖ in each output row (Sun et al. 2023).

    Attributes:
        sparsity: fraction of each layer's weights removed.
        pattern: `"N:M"` to remove N of every M consecutive weights of a row (e.g. `"2:4"`)
            instead (sparsity then follows the pattern).
        calibration_batches: calibration batches read (e.g. 128 sequences of 512 tokens).
    """

    kind = "wanda"
    selects_layers = True

    sparsity: float = Field(default=0.5, ge=0, lt=1)
    pattern: str | None = None
    calibration_batches: int = Field(default=128, ge=1)


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class SparseGPT(_OneShot):
    """Remove weights and reconstruct the rest with second-order updates (Frantar & Alistarh 2023).

    Attributes:
        sparsity: fraction of each layer's weights removed.
        pattern: `"N:M"` (e.g. `"2:4"`) instead of unstructured sparsity.
        block_size: columns processed together (the paper's 128).
        dampening: added to H's diagonal, as a fraction of its mean (the paper's 0.01).
        calibration_batches: calibration batches read.
    """

    kind = "sparsegpt"
    selects_layers = True

    sparsity: float = Field(default=0.5, ge=0, lt=1)
    pattern: str | None = None
    block_size: int = Field(default=128, ge=1)
    dampening: float = Field(default=0.01, gt=0)
    calibration_batches: int = Field(default=128, ge=1)


def _check_pattern(layers: list[tuple[str, nn.Linear]], n_m: tuple[int, int] | None) -> None:
    if n_m is None:
        return
    bad = [f"{n} (in_features {m.in_features})" for n, m in layers if m.in_features % n_m[1]]
    if bad:
        raise ConfigError(f"pattern {n_m[0]}:{n_m[1]} needs in_features divisible by {n_m[1]}; "
                          f"not {', '.join(bad)}: exclude them or pick another pattern")


def _n_m_removed(scores: torch.Tensor, n_m: tuple[int, int]) -> torch.Tensor:
    """True where a weight goes: the N lowest scores of every M consecutive inputs of a row."""
    n, m = n_m
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    lowest = groups.topk(n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(rows, cols)


def _wanda_layer(layer: nn.Linear, stats: InputStatistics, config: Wanda | SparseGPT) -> None:
    """Wanda's mask; with no calibration input, every input counts alike: magnitude pruning
    (per output row)."""
    weight = weight_of(layer).detach()
    norms = stats.sq_norm.sqrt() if stats.samples else torch.ones_like(stats.sq_norm)
    scores = weight.abs().double() * norms[None, :]  # (out, in)
    n_m = n_m_of(config.pattern)
    if n_m is not None:
        removed = _n_m_removed(scores, n_m)
    else:
        count = round(config.sparsity * weight.shape[1])
        removed = torch.zeros_like(weight, dtype=torch.bool)
        if count:
            removed.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
    set_mask_(layer, ~removed)


def _sparsegpt_layer(layer: nn.Linear, stats: InputStatistics, config: SparseGPT) -> None:
    assert stats.hessian is not None
    if not stats.samples:  # nothing to reconstruct against: the data-free mask
        _wanda_layer(layer, stats, config)
        return
    weight = original_weight(layer).detach()
    w = weight_of(layer).detach().double().clone()  # (out, in)
    h = stats.hessian.clone()
    columns = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never seen non-zero: nothing to reconstruct from
    h[dead, dead] = 1
    w[:, dead] = 0
    h_inv = inverse_hessian_factor(h, config.dampening)
    w = w.float()
    n_m = n_m_of(config.pattern)
    removed = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, config.block_size):
        end = min(start + config.block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        diag = torch.diag(h_block)
        if n_m is None:  # adaptive mask: the lowest w²/[H⁻¹]²_jj of this block of columns
            scores = block.pow(2) / diag[None, :].pow(2)
            count = round(config.sparsity * scores.numel())
            mask = torch.zeros_like(block, dtype=torch.bool)
            if count:
                mask.view(-1)[scores.view(-1).topk(count, largest=False).indices] = True
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                scores = block[:, i:i + n_m[1]].pow(2) / diag[None, i:i + n_m[1]].pow(2)
                mask[:, i:i + n_m[1]] = _n_m_removed(scores, n_m)
            column = block[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - kept) / diag[i]
            block[:, i:] -= error[:, None] * h_block[i, i:][None, :]  # spread over the rest
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        removed[:, start:end] = mask
        w[:, end:] -= errors @ h_inv[start:end, end:]
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
    set_mask_(layer, ~(removed | dead[None, :]))


def _run(model: nn.Module, config: Wanda | SparseGPT, targets: Select, calibration: Any,
         technique: str, one: Any) -> dict[str, Any]:
    job = layerwise_job(model, targets, calibration, technique)
    _check_pattern(job.layers, n_m_of(config.pattern))
    run = compress_layerwise(model, job.layers, job.batches,
                             lambda _n, layer, stats: one(layer, stats, config),
                             hessian=isinstance(config, SparseGPT), label=technique)
    return {"sparsity": {name: round(sparsity_of(layer), 6) for name, layer in job.layers},
            "skipped": job.skipped, **uncalibrated_layers(run, technique, "pruned by magnitude"),
            "calibration": {**run, "batches": len(job.batches)}}


def wanda_(model: nn.Module, config: Wanda, *, targets: Select, calibration: Any = None) -> dict[str, Any]:
    """Handler of `Wanda`."""
    return _run(model, config, targets, calibration, "wanda", _wanda_layer)


def sparsegpt_(model: nn.Module, config: SparseGPT, *, targets: Select,
               calibration: Any = None) -> dict[str, Any]:
    """Handler of `SparseGPT`."""
    return _run(model, config, targets, calibration, "sparsegpt", _sparsegpt_layer)


register_technique(Wanda, wanda_)
register_technique(SparseGPT, sparsegpt_)
