"""AWQ (Lin et al. 2023): activation-aware scales and clipping for low-bit weight codes.

A few input channels of a language model's Linears carry much larger activations than the rest,
so the weights on those channels matter most. AWQ multiplies those weight columns by a scale
s_j = rms(X_j)^α before round-to-nearest quantization (they get finer steps) and divides the input
by s_j, folded into what produces that input (free at run time): the norm layer before q/k/v
and gate/up, or, for a gated MLP's down_proj, the up_proj whose output rows feed it channel by
channel (`torchslim.quantization.scalable_pairs` checks each such pair on real inputs). α is
searched per group of Linears reading the same source, in steps of 0.05, in that form and in the
second form of AWQ's code, s_j = rms(X_j)^α / w̄_j^(1-α) (w̄_j: the mean magnitude of input j's
weights relative to their group's largest), which also shrinks the channels whose weights already
span their group's range. The best few candidates are scored again on the clipped grids they
would get, and each group of weights is then clipped to the fraction of its range that quantizes
best.

Both searches minimise the output error on the calibration inputs exactly, from the input
Hessian H = 2/n XXᵀ that `torchslim.layerwise` gathers block by block: for a weight change D,
the mean squared output change is tr(D H Dᵀ)/2, with no activations kept. Linears with no such
source (o_proj: attention lies between it and v_proj) get the clipping search only, and are
named so; so do the readers of a source with fewer calibration rows than inputs, where a
scale would fit those rows rather than the model.

The experts of a mixture-of-experts layer (`torchslim.fused_experts`) read the rows of the norm's
output routed to each: a candidate scale is scored on every expert with its own rows' Hessian,
weighed by its share of the rows, and the router, a float matrix reading the same output, takes
the inverse scales in its columns (`scalable_pairs.fold_into_norm_`), so the routing is unchanged.

The result is `WeightOnly`'s `GroupedWeightLinear` (codes, scales, zero points).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import first_samples
from torchslim.config import TechniqueConfig, validated
from torchslim.layerwise import (
    InputStatistics,
    compress_layerwise,
    layerwise_job,
    rounded_in_float,
    uncalibrated_layers,
)
from torchslim.parametrized import original_weight, weight_of
from torchslim.quantization.group_clipping import best_clip, quantize_groups
from torchslim.quantization.primitives import QuantSpec
from torchslim.quantization.scalable_pairs import (
    divide_rows_,
    fold_into_norm_,
    readers_of,
    scalable_norms,
    scalable_pairs,
)
from torchslim.quantization.smoothquant import observe_inputs
from torchslim.quantization.weight_only import code_dtype, grid, grouped_linear
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, replace_layers_

__all__ = ["AWQ", "awq_"]

ALPHAS = tuple(i / 20 for i in range(21))  # AWQ's code searches 20 steps
FINALISTS = 4  # candidates scored again on clipped grids


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class AWQ(TechniqueConfig):
    """Activation-aware weight quantization to `bits`-bit group-wise codes.

    Attributes:
        bits: 2..8.
        group_size: inputs per scale (must divide in_features).
        symmetric: signed codes, no zero point (else unsigned with a zero point, AWQ's default).
        clip: search the clipping range of each group of weights.
        calibration_batches: calibration batches read.
    """

    kind = "awq"
    structural = True
    selects_layers = True

    bits: int = Field(default=4, ge=2, le=8)
    group_size: int = Field(default=64, ge=1)
    symmetric: bool = False
    clip: bool = True
    calibration_batches: int = Field(default=128, ge=1)


def _spec(config: AWQ) -> QuantSpec:
    return grid(config.bits, None, config.symmetric)


def _quantize(weight: torch.Tensor, config: AWQ, ratio: torch.Tensor | float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized, codes, scales, zeros) of `weight` (out, in), each group's range times `ratio`."""
    return quantize_groups(weight, _spec(config), config.group_size, ratio)


def _error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output change of a weight change `delta` on the calibration inputs."""
    return float(((delta @ hessian) * delta).sum())


def _diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """H's diagonal blocks of `group_size` inputs, (groups, k, k)."""
    return torch.stack([hessian[i:i + group_size, i:i + group_size]
                        for i in range(0, hessian.shape[0], group_size)])


def _group_error(delta: torch.Tensor, blocks: torch.Tensor) -> float:
    """`_error` with H cut to its diagonal `blocks`: what rounding each group costs on its own,
    at a group's share of the price (used to rank candidates)."""
    parts = delta.reshape(delta.shape[0], blocks.shape[0], -1).transpose(0, 1)  # (groups, rows, k)
    return float((torch.bmm(parts, blocks) * parts).sum())


def _clip_ratio(weight: torch.Tensor, hessian: torch.Tensor, config: AWQ) -> torch.Tensor | float:
    """Per (row, group), the clipped fraction of the range `weight`'s codes take (1.0 without `clip`)."""
    return best_clip(weight, hessian, _spec(config), config.group_size) if config.clip else 1.0


def _candidates(rms: torch.Tensor, members: list[torch.Tensor], group_size: int
                ) -> list[tuple[float, bool, torch.Tensor]]:
    """(α, weight-aware, s) per candidate input scale: s = rms(X)^α, and AWQ's code's second
    form s = rms(X)^α / w̄^(1-α), w̄ the mean magnitude of each input's weights relative to
    their group's largest (it also shrinks channels whose weights are already large)."""
    relative = []
    for weight in members:
        groups = weight.abs().reshape(weight.shape[0], -1, group_size)
        relative.append((groups / groups.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(weight.shape))
    w_bar = torch.cat(relative).mean(0).clamp(min=1e-8)
    found = []
    for alpha in ALPHAS:
        for aware in (False, True):
            if aware and alpha == 1.0:
                continue  # the same as the plain form
            s = rms.pow(alpha) / w_bar.pow(1 - alpha) if aware else rms.pow(alpha)
            found.append((alpha, aware, s / (s.max() * s.min()).sqrt()))
    return found


def _search_scale(members: list[torch.Tensor], hessians: list[torch.Tensor], stats: InputStatistics,
                  config: AWQ) -> tuple[torch.Tensor, float, bool]:
    """The input scale of one source's readers whose codes change their outputs least: every
    candidate ranked by the error of its round-to-nearest codes group by group, then the best
    `FINALISTS` scored exactly (the whole H) on the grids they would get, clipped if `clip`
    (the clipping search can reorder them). Each member's error is weighed by its own Hessian
    (the experts of a mixture-of-experts layer each see their routed rows); `stats` are the
    source's output, all readers' rows together. Returns (s, α, weight-aware)."""
    rms = (stats.sq_norm / max(stats.samples, 1)).sqrt().float().clamp(min=1e-8)
    blocks = [_diagonal_blocks(hessian, config.group_size) for hessian in hessians]
    scored = []
    for alpha, aware, s in _candidates(rms, members, config.group_size):
        error = sum(_group_error(_quantize(w * s, config)[0] / s - w, b) for w, b in zip(members, blocks,
                                                                                       strict=True))
        scored.append((error, alpha, aware, s))
    scored.sort(key=lambda row: row[0])
    best = (float("inf"), 0.0, False, torch.ones_like(rms))
    for _, alpha, aware, s in scored[:FINALISTS]:
        error = 0.0
        for w, hessian in zip(members, hessians, strict=True):
            ratio = _clip_ratio(w * s, hessian / (s[:, None] * s[None, :]), config)
            error += _error(_quantize(w * s, config, ratio)[0] / s - w, hessian)
        if error < best[0]:
            best = (error, alpha, aware, s)
    return best[3], best[1], best[2]


def member_hessians(parts: dict[str, InputStatistics], merged: InputStatistics, names: list[str]
                    ) -> list[torch.Tensor]:
    """Each reader's Hessian (`merged`: all of `parts` as one), weighed by its share of the rows
    (so that the errors they score add up to the error over every row); one shared Hessian when
    the readers read one tensor. An expert no calibration row reached is scored on all rows at
    an even share: a scale that suits the others must not wreck it, for other inputs will reach
    it."""
    assert merged.hessian is not None
    if len(parts) == len(names) and merged is next(iter(parts.values())):
        return [merged.hessian.float()] * len(names)
    total = max(merged.samples, 1)
    return [parts[n].hessian.float() * (parts[n].samples / total)  # type: ignore[union-attr]
            if n in parts and parts[n].samples else merged.hessian.float() / len(names) for n in names]


def merged_statistics(parts: list[InputStatistics]) -> InputStatistics:
    """The inputs of several readers of one source, as one: the readers of a norm read the same
    tensor (the first one's statistics are all of them), the experts of a mixture-of-experts
    layer each the rows routed to it (together, every routed row: the Hessians averaged by rows)."""
    first = parts[0]
    if all(p.samples == first.samples and torch.equal(p.sq_norm, first.sq_norm) for p in parts):
        return first
    total = sum(p.samples for p in parts)
    assert first.hessian is not None
    hessian = torch.zeros_like(first.hessian)
    for part in parts:
        if part.samples and part.hessian is not None:
            hessian.add_(part.hessian, alpha=part.samples / total)
    sq_norm = torch.stack([p.sq_norm for p in parts]).sum(0)
    return InputStatistics(hessian=hessian, sq_norm=sq_norm, samples=total)


def awq_(model: nn.Module, config: AWQ, *, targets: Select, calibration: Any = None) -> dict[str, Any]:
    """Handler of `AWQ`."""
    job = layerwise_job(model, targets, calibration, "awq", group_size=config.group_size,
                       replaces=True)
    layers, skipped, batches = job.layers, job.skipped, job.batches
    # which norm or Linear produces a Linear's input is the model's structure, not the data's:
    # one sequence shows it, where every batch's whole-model forward (logits included) cost
    # SmolLM2 more memory than its weights
    probe = first_samples(batches[0], 1)
    _, norms, float_readers = observe_inputs(model, layers, [probe])
    modules = dict(layers)
    norms, forms, behind = scalable_norms(model, norms, modules, probe, float_readers)
    unscaled = {name: f"clipping only: {why}" for name, why in behind.items()}
    producers = scalable_pairs(model, layers, probe, [n for n, _ in layers if n not in norms])
    groups = readers_of({**norms, **producers})  # a scale's source (a norm, or a Linear) -> its readers
    source_of = {name: source for source, names in groups.items() for name in names}
    scales: dict[str, torch.Tensor] = {}  # per source: the input scale folded into it
    chosen_alpha: dict[str, float] = {}
    weight_aware: list[str] = []  # sources whose scale also divides by the weights' magnitude
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    waiting: dict[str, InputStatistics] = {}  # producers held back until their readers' scales

    def search_scale(source: str, parts: dict[str, InputStatistics]) -> None:
        stats = merged_statistics(list(parts.values()))
        width = stats.sq_norm.shape[0]
        if stats.samples < width:  # fewer rows than inputs: a scale would fit the rows, not the model
            scales[source] = torch.ones(width)
            too_few[source] = (f"clipping only: its input scale would rest on {stats.samples} calibration "
                               f"rows for {width} inputs; give more calibration data")
            return
        members = [weight_of(modules[n]).detach().float() for n in groups[source]]
        best_s, best_alpha, weighted = _search_scale(members, member_hessians(parts, stats, groups[source]),
                                                     stats, config)
        if weighted:
            weight_aware.append(source)
        scales[source], chosen_alpha[source] = best_s, best_alpha
        with torch.no_grad():
            if source in modules:  # a Linear: its output rows carry 1/s
                divide_rows_(modules[source], best_s)
            else:  # a norm layer: its weight (and bias) carry 1/s
                fold_into_norm_(model, source, best_s, forms[source], float_readers.get(source, []))
            for n in groups[source]:
                original_weight(modules[n]).mul_(best_s[None, :].to(original_weight(modules[n]).dtype))

    arrived: dict[str, dict[str, tuple[nn.Linear, InputStatistics]]] = {}  # readers of an unscaled source
    too_few: dict[str, str] = {}  # sources left unscaled for want of calibration rows

    def quantize_layer(name: str, layer: nn.Linear, stats: InputStatistics) -> None:
        source = source_of.get(name)
        if source is not None and source not in scales:  # its scale waits for every reader's inputs
            arrived.setdefault(source, {})[name] = (layer, stats)
            if len(arrived[source]) == len(groups[source]):
                scale_and_quantize(source)
            return
        if name in groups and name not in scales:  # a producer: quantized once its rows are scaled
            waiting[name] = stats
            return
        quantize_reader(name, layer, stats)

    def scale_and_quantize(source: str) -> None:  # in the order AWQ's code scales a block
        readers = arrived.pop(source)
        search_scale(source, {name: stats for name, (_, stats) in readers.items()})
        for name, (layer, stats) in readers.items():
            quantize_layer(name, layer, stats)

    def quantize_reader(name: str, layer: nn.Linear, stats: InputStatistics) -> None:
        assert stats.hessian is not None
        source = source_of.get(name)
        # with no calibration input, the grid is clipped by the weights' own error
        hessian = stats.hessian.float() if stats.samples else torch.eye(layer.in_features)
        if source is not None:  # its input is now X / s
            s = scales[source]
            hessian = hessian / (s[:, None] * s[None, :])
        weight = weight_of(layer).detach().float()
        dequantized, codes, scale, zero = _quantize(weight, config, _clip_ratio(weight, hessian, config))
        results[name] = (codes.to(code_dtype(not config.symmetric)), scale, zero)  # a byte a code
        with torch.no_grad():  # the next blocks see this layer's codes
            original_weight(layer).copy_(dequantized)
        if source in waiting:  # the producer's rows now carry this layer's scales
            quantize_layer(source, modules[source], waiting.pop(source))

    run = compress_layerwise(model, layers, batches, quantize_layer, hessian=True, label="awq")
    for source in list(arrived):  # a reader never came: the scale comes from those that did
        scale_and_quantize(source)
    for name in list(waiting):  # a producer whose reader never came: its rows stay as they are
        scales[name] = torch.ones(modules[name].out_features)
        quantize_layer(name, modules[name], waiting.pop(name))

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, nn.Linear)
        codes, scale, zero = results[name]
        return grouped_linear(layer, codes, scale, None if config.symmetric else zero), {
            "kind": "weight_only", "layer": name, "group_size": config.group_size,
            "asymmetric": not config.symmetric}

    replaced = replace_layers_(model, [name for name, _ in layers], build)
    unscaled |= {name: "clipping only: no norm layer or Linear produces its input channel by channel"
                 for name, _ in layers if name not in source_of and name not in unscaled}
    unscaled |= {name: too_few[source] for name, source in source_of.items() if source in too_few}
    uncalibrated = uncalibrated_layers(run, "awq", "rounded to nearest, unscaled, its grid clipped by the "
                                       "weights' own error")
    return {"bits": config.bits, **replaced, "alpha": chosen_alpha, "weight_aware": weight_aware,
            **uncalibrated,
            "scaled_through": producers,
            "unscaled": unscaled,
            "skipped": {**skipped, **rounded_in_float(replaced, config.bits)},
            "calibration": {**run, "batches": len(batches)}}


register_technique(AWQ, awq_)
