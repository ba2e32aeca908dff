"""Pruning: unstructured weight masks, schedules and sensitivity analysis."""

from torchslim.pruning.schedules import (
    GradualPruning,
    cubic_sparsity,
    iterative_prune_,
    iterative_sparsities,
    rewind_,
)
from torchslim.pruning.sensitivity import plot_sensitivity, scan_sensitivity, sparsities_for_drop
from torchslim.pruning.unstructured import (
    Criterion,
    Mask,
    Scope,
    WeightPruning,
    prune_weights_,
    sparsity_of,
)

__all__ = [
    "Criterion",
    "GradualPruning",
    "Mask",
    "Scope",
    "WeightPruning",
    "cubic_sparsity",
    "iterative_prune_",
    "iterative_sparsities",
    "plot_sensitivity",
    "prune_weights_",
    "rewind_",
    "scan_sensitivity",
    "sparsities_for_drop",
    "sparsity_of",
]
