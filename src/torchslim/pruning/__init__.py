"""Pruning: unstructured weight masks, schedules and sensitivity analysis."""

from torchslim.pruning.unstructured import (
    Criterion,
    Mask,
    Scope,
    WeightPruning,
    prune_weights_,
    sparsity_of,
)

__all__ = ["Criterion", "Mask", "Scope", "WeightPruning", "prune_weights_", "sparsity_of"]
