"""Structured pruning: remove whole channels, neurons and heads, so the dense model is smaller.

`apply_(model, ChannelPruning(ratio=0.3), example_inputs=x)` traces the coupled channel groups
(`torchslim.graph`), scores every unit group-aware (`importance`), picks the least important
ones (uniformly per group, or globally; to a channel or a MAC target; `round_to` multiples),
and cuts them out of every layer they touch. The result is a plain module with fewer channels:
no masks, no hooks, so it runs as fast as its size says, compiles and exports. The new sizes are
recorded as a structural edit, so artifacts load without pickle.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import warnings
from collections import Counter
from dataclasses import replace
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError, GraphError, SelectionError
from torchslim.fused_experts import fused_experts, unfuse_experts_
from torchslim.graph import ChannelGraph, Group, cut_axis_, refresh_counts_, rule_for, trace_channels
from torchslim.graph.hf_blocks import TransformersRule
from torchslim.graph.trace import OUTPUT_KEEPS_SIZE, run_example
from torchslim.pruning.importance import Importance, unit_scores
from torchslim.registry import register_technique
from torchslim.select import Select
from torchslim.structure import Edit, record_edit_, register_edit, replace_module_

__all__ = ["ChannelPruning", "PruneScope", "PruneTarget", "Rounding", "cut_channels_", "plan_removal",
           "prune_channels_"]


class PruneTarget(StrEnum):
    CHANNELS = "channels"  # `ratio` of the units of each group (uniform) or of all units (global)
    MACS = "macs"  # remove units until MACs fall by `ratio`


class PruneScope(StrEnum):
    UNIFORM = "uniform"  # the same ratio in every group
    GLOBAL = "global"  # rank units of all groups together (scores normalised per group)


class Rounding(StrEnum):
    """Which multiple of `round_to` a group keeps when the ratio falls between two."""

    UP = "up"  # never removes more than the ratio asks (the default)
    DOWN = "down"  # removes at least the ratio (Torch-Pruning's `round_to`)
    NEAREST = "nearest"  # the multiple closest to the unrounded width


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class ChannelPruning(TechniqueConfig):
    """Remove a fraction `ratio` of channels (target `channels`) or of MACs (target `macs`).

    Args:
        ratio: fraction in [0, 1) removed: of each group's units, or of the model's MACs.
        target: `channels` or `macs`.
        importance: l1, l2, random, taylor, activation, apoz, bn_scale, gate (see `slimming`).
        scope: `uniform` (every group at `ratio`) or `global` (least important units anywhere).
        per_layer: ratio overrides by layer name or glob pattern (applied to the group holding
            the layer), e.g. `{"*.attention.self": 0.33, "*.intermediate.dense": 0.5}`.
        round_to: kept channel counts are multiples of this, or `auto` (the default): with the
            MAC target, multiples of the CPU's fp32 vector width (16 with AVX-512, 8 with AVX2),
            because its conv and matmul kernels pad every other width up to one, so an
            unaligned width costs the time of the next multiple; groups no wider than one vector
            are kept whole (cutting them saves MACs, not time; the result's `round_to` names
            them); the MAC target is still met. With the channel target `auto` keeps the exact
            ratio (1), as asked. Attention heads are never rounded.
        rounding: `up`, `down` or `nearest`: the multiple of `round_to` kept (at least one).
        calibration_batches: batches for data-driven criteria.
        strict: fail with `GraphError` instead of excluding layers the graph cannot map.

    Example:
        >>> from torchslim.api import apply_
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> result = apply_(net, ChannelPruning(ratio=0.5), example_inputs=torch.zeros(1, 4))
        >>> net[0].out_features, net[2].in_features, result["params_after"]
        (4, 4, 30)
    """

    kind = "structured_prune"
    structural = True
    targets_layers = False

    ratio: float = Field(ge=0.0, lt=1.0)
    target: PruneTarget = PruneTarget.CHANNELS
    importance: Importance = Importance.L2
    scope: PruneScope = PruneScope.UNIFORM
    per_layer: dict[str, float] = Field(default_factory=dict)
    round_to: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    rounding: Rounding = Rounding.UP
    calibration_batches: int = Field(default=4, ge=1)
    strict: bool = False
    seed: int = 0


def _ratio_of(group: Group, config: ChannelPruning, base: float) -> float:
    overrides = [ratio for rule, ratio in config.per_layer.items()
                 if any(m == rule or fnmatch.fnmatch(m, rule) for m in group.modules)]
    return max(overrides) if overrides else base


@functools.cache
def vector_lanes() -> int:
    """fp32 values in one SIMD register of this CPU, as torch's kernels use it: 16 with AVX-512,
    8 with AVX2 or 256-bit SVE, else 4 (128-bit NEON or SSE)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return 16 if "512" in capability else 8 if ("AVX2" in capability or "256" in capability) else 4


def _is_heads(group: Group) -> bool:
    return any(axis == "heads" or module.rsplit(".", 1)[-1] in ATTENTION_QUERIES
               for module, axis in group.layers)


def round_step(group: Group, config: ChannelPruning) -> int:
    """The multiple a group's kept width is rounded to (see `ChannelPruning.round_to`); a group
    no wider than one vector gets its own width as the step, so it is kept whole."""
    if config.round_to != "auto":
        return config.round_to
    if config.target is PruneTarget.CHANNELS or _is_heads(group):
        return 1
    lanes, size = vector_lanes(), len(group.units)
    return lanes if size > lanes else size


def _kept(size: int, removed: int, config: ChannelPruning, step: int) -> int:
    steps = max(size - removed, 1) / step
    multiple = {Rounding.UP: math.ceil(steps), Rounding.DOWN: math.floor(steps),
                Rounding.NEAREST: math.floor(steps + 0.5)}[config.rounding]
    return min(size, max(multiple, 1) * step)


def plan_removal(groups: list[Group], scores: list[np.ndarray], ratio: float, config: ChannelPruning,
                 eligible: list[bool]) -> list[np.ndarray]:
    """Indices of the units to remove in each group (lowest scores first, `round_to` respected)."""
    removed = [np.array([], dtype=int) for _ in groups]
    if config.scope is PruneScope.UNIFORM:
        for g, group in enumerate(groups):
            if not eligible[g]:
                continue
            size = len(group.units)
            keep = _kept(size, _removal_count(group, _ratio_of(group, config, ratio)), config,
                         round_step(group, config))
            removed[g] = _lowest(scores[g], size - keep)
        return removed
    pool = [(float(s / (np.mean(scores[g][np.isfinite(scores[g])]) + 1e-12)), g, u)
            for g in range(len(groups)) if eligible[g]
            for u, s in enumerate(scores[g]) if np.isfinite(s)]
    pool.sort()
    budget = int(ratio * len(pool))
    # Per-group normalisation keeps each group's order, so the units the budget picks in a group
    # are its lowest-scored ones: only their count matters, then rounded like a uniform cut.
    for g, count in Counter(g for _, g, _ in pool[:budget]).items():
        size = len(groups[g].units)
        removed[g] = _lowest(scores[g], size - _kept(size, count, config, round_step(groups[g], config)))
    return removed


def _by_position(model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, ...]:
    """Keyword inputs in the order of forward's parameters (for tracing)."""
    import inspect

    names = [p for p in inspect.signature(model.forward).parameters if p in inputs]
    if len(names) != len(inputs) or (list(inputs) != names[:len(inputs)] and set(names) != set(inputs)):
        raise ConfigError(f"the keyword inputs {sorted(inputs)} are not all parameters of "
                          f"{type(model).__name__}.forward; pass example_inputs as a tuple")
    return tuple(inputs[name] for name in names)


ATTENTION_QUERIES = ("q_proj", "query", "c_attn", "q_lin")  # a group holding these is heads


def _removal_count(group: Group, ratio: float) -> int:
    """Units to remove at `ratio`: attention heads round to the nearest count (a third of 12
    heads given as 0.33 is 4), channels and neurons round down (0.29 of 100 stays 28, as before)."""
    exact = ratio * len(group.units)
    if _is_heads(group):
        return math.floor(exact + 0.5)
    return int(exact)


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices (sorted) of the `count` lowest finite scores; a non-finite score keeps its unit."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[np.isfinite(scores[order])][:count])


def cut_channels_(model: nn.Module, graph: ChannelGraph,
                  removed: list[np.ndarray]) -> dict[str, dict[str, int]]:
    """Cut the chosen units out of every layer axis they touch; returns the new axis sizes."""
    dropped: dict[tuple[str, str], set[int]] = {}
    for group, units in zip(graph.groups, removed, strict=True):
        for u in units.tolist():
            for m in group.units[u]:
                dropped.setdefault((m.module, m.axis), set()).add(m.index)
    sizes: dict[str, dict[str, int]] = {}
    for (module, axis), gone in dropped.items():
        keep = [i for i in range(graph.sizes[(module, axis)]) if i not in gone]
        _cut(model, module, axis, keep)
        sizes.setdefault(module, {})[axis] = len(keep)
    refresh_counts_(model)  # transformers blocks: head counts (and config) follow the new shapes
    return sizes


def _cut(model: nn.Module, module: str, axis: str, keep: list[int]) -> None:
    layer = model.get_submodule(module)
    rule = rule_for(layer)
    axes = rule.axes(layer) if rule is not None else {}
    if axis not in axes:
        raise ConfigError(f"{module} ({type(layer).__name__}) has no prunable axis {axis!r}")
    replacement = cut_axis_(layer, axes[axis], keep)
    if replacement is not None:
        replace_module_(model, module, replacement)


def _replay(model: nn.Module, edit: Edit) -> None:
    for module, axes in edit["sizes"].items():
        for axis, size in axes.items():
            _cut(model, module, axis, list(range(int(size))))
    refresh_counts_(model)


register_edit("prune_channels", _replay)


def _eligible(graph: ChannelGraph, targets: Select) -> list[bool]:
    """Groups the selection allows: none of their layers excluded, one named (if names are given)."""
    def matches(name: str, rules: tuple[str, ...]) -> bool:
        return any(name == rule or fnmatch.fnmatch(name, rule) for rule in rules)

    chosen = targets.names + targets.patterns
    modules = sorted({m for group in graph.groups for m in group.modules})
    unmatched = [rule for rule in chosen + targets.exclude if not any(matches(m, (rule,)) for m in modules)]
    if unmatched:
        more = " ..." if len(modules) > 20 else ""
        raise SelectionError(f"structured pruning: {unmatched} match no layer of a prunable group; "
                             f"prunable layers: {', '.join(modules[:20])}{more}")
    return [not any(matches(m, targets.exclude) for m in group.modules)
            and (not chosen or any(matches(m, chosen) for m in group.modules))
            for group in graph.groups]


def _example(model: nn.Module, example_inputs: Any, calibration: Any) -> tuple[Any, ...]:
    if example_inputs is None and calibration:
        from torchslim.calibration import first_samples, split_batch

        example_inputs = first_samples(split_batch(next(iter(calibration)))[0], 2)
    if isinstance(example_inputs, dict) and rule_for(model) is None:
        return _by_position(model, example_inputs)  # fx traces positional inputs
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    from torchslim.models import example_inputs as spec_example
    from torchslim.models import spec_of

    try:
        return (spec_example(spec_of(model), 2),)
    except Exception:
        raise ConfigError("structured pruning traces the model: pass example_inputs= (a batch the "
                          "model accepts) or calibration batches") from None


def _macs(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # counting must not move BatchNorm statistics
    try:
        with torch.no_grad(), counter:
            run_example(model, inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _check(graph: ChannelGraph, config: ChannelPruning, eligible: list[bool]) -> None:
    bad = []
    for name, ratio in config.per_layer.items():
        if not 0 <= ratio < 1:
            bad.append(f"per_layer[{name!r}]={ratio} would remove every channel (valid: [0, 1))")
        elif not any(m == name or fnmatch.fnmatch(m, name) for g in graph.groups for m in g.modules):
            bad.append(f"per_layer names {name!r}, which is in no prunable group (prunable layers: "
                       f"{', '.join(sorted({m for g in graph.groups for m in g.modules})[:12])}...)")
    step = config.round_to if config.round_to != "auto" else 1
    small = sorted({m for g, ok in zip(graph.groups, eligible, strict=True)
                    if ok and len(g.units) < step for m in g.modules})
    if small:
        bad.append(f"round_to={config.round_to} is larger than the channel count of {', '.join(small)}; "
                   "lower round_to or exclude those layers")
    if bad:
        raise ConfigError("structured pruning: " + "; ".join(bad))


def _removal_for_macs(model: nn.Module, graph: ChannelGraph, scores: list[np.ndarray],
                      config: ChannelPruning, eligible: list[bool],
                      inputs: tuple[Any, ...], macs: int) -> list[np.ndarray]:
    """Bisect the channel ratio until the model's `macs` fall by `config.ratio`."""
    goal = (1 - config.ratio) * macs
    low, high, best = 0.0, 0.99, plan_removal(graph.groups, scores, 0.0, config, eligible)
    for _ in range(14):
        middle = (low + high) / 2
        plan = plan_removal(graph.groups, scores, middle, config, eligible)
        trial = copy.deepcopy(model)
        cut_channels_(trial, graph, plan)
        if _macs(trial, inputs) <= goal:
            high, best = middle, plan
        else:
            low = middle
    return best


def _unaligned(exact: list[np.ndarray]) -> list[np.ndarray]:
    warnings.warn("torchslim: structured pruning: no vector-aligned widths reach the MAC target "
                  "(the groups wider than one vector cannot remove enough); exact widths are kept, "
                  "which the CPU's kernels pad: lower the ratio for a faster model, or set "
                  "round_to=1 to silence this", stacklevel=3)
    return exact


def _aligned_for_macs(model: nn.Module, graph: ChannelGraph, scores: list[np.ndarray],
                      config: ChannelPruning, eligible: list[bool], inputs: tuple[Any, ...],
                      macs: int) -> list[np.ndarray]:
    """The MAC-target plan with every kept width on its group's step (`round_to="auto"`).

    All groups of a width move together under one ratio, so bisecting the ratio on a coarse grid
    overshoots or cannot land. Instead: the exact widths that meet the target, each rounded up
    to its step; then, while the MACs are above the goal, one group at a time loses one step,
    the one losing the least normalised importance per MAC saved; then any step the goal did
    not need is given back. Groups kept whole (no wider than a vector) never move.
    """
    exact = _removal_for_macs(model, graph, scores, replace(config, round_to=1), eligible, inputs, macs)
    goal = (1 - config.ratio) * macs
    sizes = [len(group.units) for group in graph.groups]
    steps = [round_step(group, config) if ok else 1 for group, ok in zip(graph.groups, eligible, strict=True)]
    widths = [min(size, math.ceil((size - len(cut)) / step) * step)
              for size, cut, step in zip(sizes, exact, steps, strict=True)]
    movable = [g for g, ok in enumerate(eligible) if ok and steps[g] < sizes[g]]
    ranked = [np.sort(scores[g][np.isfinite(scores[g])]) for g in range(len(sizes))]

    def plan(chosen: list[int]) -> list[np.ndarray]:
        return [_lowest(scores[g], sizes[g] - chosen[g]) for g in range(len(chosen))]

    def count(chosen: list[int]) -> int:
        trial = copy.deepcopy(model)
        cut_channels_(trial, graph, plan(chosen))
        return _macs(trial, inputs)

    def lower(g: int) -> int:  # the next multiple of the step below (24 -> 16 on 16 lanes, not 8)
        return (widths[g] - 1) // steps[g] * steps[g]

    def with_width(g: int, width: int) -> list[int]:
        return [width if i == g else w for i, w in enumerate(widths)]

    def lost(g: int) -> float:  # importance the next step down removes, normalised per group
        if not ranked[g].size:
            return 0.0
        gone = ranked[g][sizes[g] - widths[g]:sizes[g] - lower(g)]
        return float(gone.sum()) / (float(ranked[g].mean()) + 1e-12)

    current = count(widths)
    saving = {g: current - count(with_width(g, lower(g))) for g in movable if lower(g) > 0}
    lowered: list[tuple[int, int]] = []  # (group, its width before)
    while current > goal and saving:
        g = min(saving, key=lambda g: lost(g) / max(saving[g], 1))
        lowered.append((g, widths[g]))
        widths[g] = lower(g)
        current = count(widths)
        if lower(g) > 0:
            saving[g] = current - count(with_width(g, lower(g)))
        else:
            del saving[g]
    if current > goal:
        return _unaligned(exact)
    for g, before in reversed(lowered):  # give back the steps the goal did not need, last taken first
        trial = count(with_width(g, before))
        if trial <= goal:
            widths[g], current = before, trial
    return plan(widths)


def prune_channels_(model: nn.Module, config: ChannelPruning, *, targets: Select,
                    calibration: Any = None, example_inputs: Any = None) -> dict[str, Any]:
    """Handler of `ChannelPruning` (use `apply_`): trace, score, choose, cut, check, record."""
    inputs = _example(model, example_inputs, calibration)
    fused = fused_experts(model) if isinstance(rule_for(model), TransformersRule) else {}
    experts_kept = {name: f"{why}; its neurons are kept" for name, why in
                    unfuse_experts_(model, list(fused)).items()} if fused else {}
    graph = trace_channels(model, inputs, strict=config.strict)
    eligible = _eligible(graph, targets)
    _check(graph, config, eligible)
    batches = list(calibration or [])[:config.calibration_batches]
    scores = unit_scores(model, graph, config.importance, calibration=batches, seed=config.seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = run_example(model, inputs)
    params_before, macs_before = sum(p.numel() for p in model.parameters()), _macs(model, inputs)
    if config.target is PruneTarget.MACS and config.round_to == "auto":
        removed = _aligned_for_macs(model, graph, scores, config, eligible, inputs, macs_before)
    elif config.target is PruneTarget.MACS:
        removed = _removal_for_macs(model, graph, scores, config, eligible, inputs, macs_before)
    else:
        removed = plan_removal(graph.groups, scores, config.ratio, config, eligible)
    sizes = cut_channels_(model, graph, removed)
    try:
        with torch.no_grad():
            out = run_example(model, inputs)
    except Exception as exc:
        raise GraphError(f"the pruned model no longer runs ({exc}); a layer or op is mapped wrongly: "
                         "exclude it (targets exclude=...) or register_channel_rule for it") from exc
    finally:
        model.train(was_training)
    if _shapes(out) != _shapes(reference):  # every output of a tuple / dict keeps its shape
        raise GraphError(f"pruning changed the output shapes {_shapes(reference)} -> {_shapes(out)}")
    why_unchanged = _nothing_removed(graph, config) if config.ratio > 0 and not sizes else None
    if sizes:
        record_edit_(model, {"kind": "prune_channels", "sizes": sizes})
        model.__dict__.pop("torchslim_gate_scores", None)  # indices changed: the scores are spent
    return {"groups": len(graph.groups), "removed_units": int(sum(len(r) for r in removed)),
            "sizes": sizes, "excluded": graph.excluded, "replaced": [],
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "macs_before": macs_before, "macs_after": _macs(model, inputs),
            "round_to": _rounding_used(graph, config, eligible),
            **({"skipped": experts_kept} if experts_kept else {}),
            **({"why_unchanged": why_unchanged} if why_unchanged else {})}


def _rounding_used(graph: ChannelGraph, config: ChannelPruning, eligible: list[bool]) -> dict[str, Any]:
    """The multiples kept widths were rounded to, and (auto) the groups kept whole, with why."""
    steps = [(g, round_step(g, config)) for g, ok in zip(graph.groups, eligible, strict=True) if ok]
    used: dict[str, Any] = {"setting": config.round_to,
                            "multiples": sorted({step for g, step in steps if step < len(g.units)} or {1})}
    if config.round_to == "auto" and config.target is PruneTarget.MACS:
        used["kept_whole"] = {g.modules[0]: f"{len(g.units)} channels, no wider than one {vector_lanes()}"
                              "-lane vector: a narrower width would cost the same time"
                              for g, step in steps if step == len(g.units) > 1}
    return used


def _shapes(outputs: Any) -> Any:
    """The shapes of a model's outputs, through tuples, lists and dicts (HF outputs too)."""
    if isinstance(outputs, torch.Tensor):
        return tuple(outputs.shape)
    if isinstance(outputs, tuple | list):
        return [_shapes(v) for v in outputs]
    if hasattr(outputs, "items"):
        return {k: _shapes(v) for k, v in outputs.items()}
    return type(outputs).__name__


def _nothing_removed(graph: ChannelGraph, config: ChannelPruning) -> str:
    """No silent no-op: why nothing was removed (`apply_` warns with it; `strict` raises)."""
    reasons = [r for r in graph.excluded if r != OUTPUT_KEEPS_SIZE]
    if reasons:
        why = f"excluded: {'; '.join(reasons)}"
    elif graph.groups:
        why = f"the ratio is too small to remove a whole unit of its {len(graph.groups)} group(s)"
    else:
        why = "the model has no prunable channel group (only its output, which keeps its size)"
    message = f"ChannelPruning(ratio={config.ratio}) removed nothing: {why}"
    if config.strict:
        raise GraphError(message)
    return message


register_technique(ChannelPruning, prune_channels_)
