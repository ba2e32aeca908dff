"""Per-layer sensitivity: validation accuracy vs sparsity when one layer at a time is pruned.

The scan answers "which layers can lose most weights": it prunes a copy of the model one layer
at a time by magnitude (no fine-tuning), measures the validation split, and
`sparsities_for_drop` turns the curves into per-layer sparsities for an accuracy budget.
Each (layer, sparsity) trial is independent, so `run_trials` spreads them over Ray workers
when asked; the numbers are the same in-process.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.api import apply_
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.pruning.masks import check_sparsity
from torchslim.pruning.unstructured import WeightPruning
from torchslim.select import Select
from torchslim.trials import TrialBackend, choose_backend, run_trials

__all__ = ["DEFAULT_GRID", "plot_sensitivity", "scan_sensitivity", "sparsities_for_drop"]

DEFAULT_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def scan_sensitivity(model: nn.Module, val_loader: Iterable[Any], *,
                     sparsities: Sequence[float] = DEFAULT_GRID, targets: Select | None = None,
                     progress: bool = True, workers: int | None = None,
                     ray_address: str | None = None) -> dict[str, Any]:
    """Accuracy on `val_loader` for each selected layer pruned alone to each sparsity.

    The trials run through `run_trials`: in-process by default, as Ray tasks with `workers` > 1
    or a `ray_address` (the model and data go to Ray's object store once).

    Returns `{"baseline": acc, "sparsities": [...], "layers": {name: [acc, ...]},
    "samples": validation examples,
    "execution": {"backend", "workers", "ray_address", "seconds"}}`; `seconds` is the scan's
    wall-clock time (including starting a local Ray).

    Raises:
        ConfigError: a sparsity outside [0, 1), no sparsities, `workers` < 1, or Ray asked for
            and not installed.
    """
    for s in sparsities:
        check_sparsity(s)
    if not sparsities:
        raise ConfigError("give at least one sparsity to scan")
    backend = choose_backend(workers=workers, ray_address=ray_address)
    start = time.perf_counter()
    layers = [name for name, _ in (targets or Select()).resolve(model)]
    measured = evaluate(model, val_loader)
    baseline = measured["accuracy"]
    trials = [(name, s) for name in layers for s in sparsities]
    accuracies = run_trials(partial(pruned_accuracy, model, val_loader), trials, workers=workers,
                            ray_address=ray_address, progress=progress, desc="sensitivity")
    curves: dict[str, list[float]] = {}
    for (name, _), accuracy in zip(trials, accuracies, strict=True):
        curves.setdefault(name, []).append(accuracy)
    # workers None on a cluster: as many tasks in flight as the cluster has CPUs
    execution = {"backend": str(backend), "ray_address": ray_address,
                 "workers": workers if backend is TrialBackend.RAY else 1,
                 "seconds": time.perf_counter() - start}
    return {"baseline": baseline, "sparsities": list(sparsities), "layers": curves,
            "samples": int(measured["samples"]), "execution": execution}


def pruned_accuracy(model: nn.Module, val_loader: Iterable[Any], trial: tuple[str, float]) -> float:
    """One scan trial: accuracy of a copy of `model` with layer `trial[0]` pruned to `trial[1]`.

    Module-level (not a closure) so Ray workers import it instead of unpickling code.
    """
    name, sparsity = trial
    pruned = copy.deepcopy(model)
    apply_(pruned, WeightPruning(sparsity=sparsity), targets=Select(names=(name,)))
    return evaluate(pruned, val_loader)["accuracy"]


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
    """Validation accuracy vs sparsity, one line per layer (a curve: each layer is pruned
    further and further), with the unpruned accuracy as a dashed line and a legend beside the
    axes, so any number of layers stays readable."""
    from torchslim.report import MARKERS, accuracy_axis_, legend_outside_, new_figure, save_figure

    fig, axis = new_figure(size=(9, 4.8))
    values = []
    for index, (name, accuracies) in enumerate(scan["layers"].items()):
        values += [100 * a for a in accuracies]
        axis.plot(scan["sparsities"], [100 * a for a in accuracies], marker=MARKERS[index % len(MARKERS)],
                  markersize=4, label=name)
    accuracy_axis_(axis, values, baseline=100 * scan["baseline"], samples=scan.get("samples"),
                   label="validation accuracy (%)")
    axis.set_xlabel("sparsity of the layer (the others unpruned)")
    axis.set_title("Per-layer sensitivity: one layer pruned by magnitude at a time", fontsize=10)
    legend_outside_(axis)
    return save_figure(fig, path)
