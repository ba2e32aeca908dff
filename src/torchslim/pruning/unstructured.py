"""Unstructured (weight) pruning: zero individual weights by a criterion, keep them at zero.

The mask is a parametrization (`weight = original * mask`), so while fine-tuning the gradient
reaching a pruned weight is exactly zero and no optimizer step can resurrect it; `finalize_`
bakes the zeros in. Pruning a layer that is already masked only removes more weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn
from torch.nn.utils import parametrize

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.parametrized import original_weight, weight_of, weight_parametrizations
from torchslim.pruning import masks as M
from torchslim.registry import register_technique
from torchslim.select import Select

__all__ = ["Criterion", "Mask", "Scope", "WeightPruning", "prune_weights_", "sparsity_of"]


class Criterion(StrEnum):
    MAGNITUDE = "magnitude"  # |w| (L1)
    L2 = "l2"  # w²
    RANDOM = "random"
    TAYLOR = "taylor"  # |w · dL/dw| over calibration batches
    ACTIVATION = "activation"  # |w| · ||x_in||


class Scope(StrEnum):
    LAYER = "layer"  # every layer pruned to the same sparsity
    GLOBAL = "global"  # one ranking over all selected layers


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class WeightPruning(TechniqueConfig):
    """Zero weights by score. Give exactly one of `sparsity`, `threshold`, `std_multiple`.

    Attributes:
        sparsity: fraction of each layer's (or, with `scope=global`, of all) weights to remove.
        per_layer: sparsity overrides by layer name (layer scope).
        threshold: remove |w| <= threshold.
        std_multiple: remove |w| <= std_multiple · std(w) per layer (Han et al. 2015).
        criterion: the score ranking weights for `sparsity`.
        scope: `layer` or `global` ranking.
        calibration_batches: batches used by the taylor and activation criteria.
        seed: seed of the random criterion.
    """

    kind = "prune"
    selects_layers = True

    sparsity: float | None = Field(default=None, ge=0, lt=1)
    per_layer: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = Field(default=None, ge=0)
    std_multiple: float | None = Field(default=None, ge=0)
    criterion: Criterion = Criterion.MAGNITUDE
    scope: Scope = Scope.LAYER
    calibration_batches: int = Field(default=8, ge=1)
    seed: int = 0

    def __post_init__(self) -> None:
        given = [n for n in ("sparsity", "threshold", "std_multiple") if getattr(self, n) is not None]
        if len(given) != 1 and not (self.per_layer and not given):
            raise ConfigError(f"give exactly one of sparsity, threshold, std_multiple (or only "
                              f"per_layer); got {given or 'none'}")
        for name, value in self.per_layer.items():
            M.check_sparsity(value, name=f"per_layer[{name!r}]")


class Mask(nn.Module):
    """Parametrization `weight * mask`: gradients of pruned weights are zero."""

    torchslim_parametrization = True  # ours: finalize_ bakes it in

    constraint = "sparse"  # what a recipe keeps while later stages train (see `constrain_`)
    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where(), not weight * mask: pruned entries become +0.0, never -0.0, so the encoded
        # artifact (which stores zeros as +0.0) reproduces them bit for bit.
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype))


def _existing_mask(module: nn.Module) -> Mask | None:
    found = [p for p in weight_parametrizations(module) if isinstance(p, Mask)]
    return found[0] if found else None


def set_mask_(module: nn.Module, keep: torch.Tensor) -> None:
    """Mask `module.weight` with `keep` (AND-ed with any mask it already has)."""
    current = _existing_mask(module)
    if current is not None:
        current.mask.logical_and_(keep.to(current.mask.device))
    else:
        parametrize.register_parametrization(module, "weight", Mask(keep.to(weight_of(module).device)))


def sparsity_of(module: nn.Module) -> float:
    """Fraction of exact zeros in the (effective) weight."""
    weight = weight_of(module).detach()
    return float((weight == 0).sum()) / weight.numel()


def _calibration_statistics(model: nn.Module, layers: list[tuple[str, nn.Module]],
                            batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            limit: int, criterion: Criterion) -> dict[str, torch.Tensor]:
    """Summed |gradient| (taylor) or input-feature L2 norms (activation) per layer."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    if criterion is Criterion.ACTIVATION:
        def hook(name: str) -> Any:
            def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
                x = args[0].detach()
                dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
                sq = x.pow(2).sum(dim=dims)  # (in,)
                stats[name] = stats.get(name, torch.zeros_like(sq)) + sq
            return record
        handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        for index, (inputs, labels) in enumerate(batches):
            if index >= limit:
                break
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(criterion is Criterion.TAYLOR):
                loss = nn.functional.cross_entropy(model(inputs), labels)
            if criterion is Criterion.TAYLOR:
                loss.backward()
                for name, module in layers:
                    grad = original_weight(module).grad
                    if grad is not None:
                        stats[name] = stats.get(name, 0) + grad.detach().abs()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not stats:
        raise ConfigError(f"criterion {criterion.value!r} needs calibration batches; pass "
                          "calibration= (a loader of (inputs, labels))")
    return {name: stat.sqrt() if criterion is Criterion.ACTIVATION else stat
            for name, stat in stats.items()}


def _scores(config: WeightPruning, layers: list[tuple[str, nn.Module]],
            stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    scores = {}
    for index, (name, module) in enumerate(layers):
        weight = weight_of(module).detach()
        match config.criterion:
            case Criterion.MAGNITUDE:
                score = M.magnitude_scores(weight)
            case Criterion.L2:
                score = M.magnitude_scores(weight, norm=2)
            case Criterion.RANDOM:
                score = M.random_scores(weight, seed=config.seed + index).to(weight.device)
            case Criterion.TAYLOR:
                score = M.taylor_scores(weight, stats[name])
            case Criterion.ACTIVATION:
                score = M.activation_scores(weight, stats[name])
        scores[name] = torch.where(weight == 0, torch.full_like(score, -1.0), score)  # zeros first
    return scores


def prune_weights_(model: nn.Module, config: WeightPruning, *, targets: Select,
                   calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> dict[str, Any]:
    """Handler of `WeightPruning`: mask the selected layers; returns sparsity per layer."""
    layers = targets.resolve(model)
    unknown = sorted(set(config.per_layer) - {n for n, _ in layers})
    if unknown:
        raise ConfigError(f"per_layer names {unknown} are not among the selected layers "
                          f"{[n for n, _ in layers]}")
    if config.threshold is not None or config.std_multiple is not None:
        keeps = {name: M.mask_by_threshold(weight_of(m), config.threshold
                                           if config.threshold is not None
                                           else M.std_threshold(weight_of(m), config.std_multiple or 0))
                 for name, m in layers}
    else:
        stats: dict[str, torch.Tensor] = {}
        if config.criterion in (Criterion.TAYLOR, Criterion.ACTIVATION):
            stats = _calibration_statistics(model, layers, calibration or [],
                                            config.calibration_batches, config.criterion)
        scores = _scores(config, layers, stats)
        if config.scope is Scope.GLOBAL and config.sparsity is not None:
            keeps = M.global_masks(scores, config.sparsity)
        else:
            keeps = {name: M.mask_by_sparsity(scores[name], config.per_layer.get(
                name, config.sparsity or 0.0)).to(scores[name].device) for name in scores}
    for name, module in layers:
        set_mask_(module, keeps[name])
    return {"sparsity": {name: round(sparsity_of(module), 6) for name, module in layers}}


register_technique(WeightPruning, prune_weights_)
