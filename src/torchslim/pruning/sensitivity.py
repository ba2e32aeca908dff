"""Per-layer sensitivity: validation accuracy vs sparsity when one layer at a time is pruned.

The scan answers "which layers can lose most weights": it prunes a copy of the model one layer
at a time by magnitude (no fine-tuning), measures the validation split, and
`sparsities_for_drop` turns the curves into per-layer sparsities for an accuracy budget.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from torchslim.api import apply_
from torchslim.data import TensorLoader
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.pruning.masks import check_sparsity
from torchslim.pruning.unstructured import WeightPruning
from torchslim.select import Select

__all__ = ["DEFAULT_GRID", "plot_sensitivity", "scan_sensitivity", "sparsities_for_drop"]

DEFAULT_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def scan_sensitivity(model: nn.Module, val_loader: TensorLoader, *,
                     sparsities: Sequence[float] = DEFAULT_GRID, targets: Select | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Accuracy on `val_loader` for each selected layer pruned alone to each sparsity.

    Returns `{"baseline": acc, "sparsities": [...], "layers": {name: [acc, ...]}}`.
    """
    for s in sparsities:
        check_sparsity(s)
    if not sparsities:
        raise ConfigError("give at least one sparsity to scan")
    layers = [name for name, _ in (targets or Select()).resolve(model)]
    baseline = evaluate(model, val_loader)["accuracy"]
    curves: dict[str, list[float]] = {}
    trials = [(name, s) for name in layers for s in sparsities]
    for name, sparsity in tqdm(trials, desc="sensitivity", disable=None if progress else True):
        trial = copy.deepcopy(model)
        apply_(trial, WeightPruning(sparsity=sparsity), targets=Select(names=(name,)))
        curves.setdefault(name, []).append(evaluate(trial, val_loader)["accuracy"])
    return {"baseline": baseline, "sparsities": list(sparsities), "layers": curves}


def sparsities_for_drop(scan: dict[str, Any], max_drop: float) -> dict[str, float]:
    """Per layer, the highest scanned sparsity whose accuracy drop is at most `max_drop`.

    Example:
        >>> scan = {"baseline": 0.98, "sparsities": [0.5, 0.9],
        ...         "layers": {"fc1": [0.98, 0.975], "fc2": [0.97, 0.90]}}
        >>> sparsities_for_drop(scan, 0.01)
        {'fc1': 0.9, 'fc2': 0.5}
    """
    if max_drop < 0:
        raise ConfigError(f"max_drop must be >= 0, got {max_drop}")
    chosen = {}
    for name, accuracies in scan["layers"].items():
        ok = [s for s, acc in zip(scan["sparsities"], accuracies, strict=True)
              if scan["baseline"] - acc <= max_drop + 1e-12]
        chosen[name] = max(ok, default=0.0)
    return chosen


def plot_sensitivity(scan: dict[str, Any], path: Path) -> Path:
    """Accuracy vs sparsity, one line per layer, as a PNG."""
    from torchslim.report import new_figure, save_figure

    fig, axis = new_figure()
    for name, accuracies in scan["layers"].items():
        axis.plot(scan["sparsities"], [100 * a for a in accuracies], marker="o", label=name)
    axis.axhline(100 * scan["baseline"], color="grey", linestyle="--", label="unpruned")
    axis.set_xlabel("sparsity of the layer (others unpruned)")
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(fig, path)
