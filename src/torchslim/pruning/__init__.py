"""Pruning: unstructured weight masks, structured channel removal, schedules, sensitivity."""

from torchslim.pruning.importance import Importance, unit_scores
from torchslim.pruning.one_shot import SparseGPT, Wanda
from torchslim.pruning.schedules import (
    GradualPruning,
    cubic_sparsity,
    iterative_prune_,
    iterative_sparsities,
    rewind_,
)
from torchslim.pruning.sensitivity import plot_sensitivity, scan_sensitivity, sparsities_for_drop
from torchslim.pruning.structured import ChannelPruning, PruneScope, PruneTarget, Rounding, prune_channels_
from torchslim.pruning.unstructured import (
    Criterion,
    Mask,
    Scope,
    WeightPruning,
    prune_weights_,
    sparsity_of,
)

__all__ = [
    "ChannelPruning",
    "Criterion",
    "GradualPruning",
    "Importance",
    "Mask",
    "PruneScope",
    "PruneTarget",
    "Rounding",
    "Scope",
    "SparseGPT",
    "Wanda",
    "WeightPruning",
    "cubic_sparsity",
    "iterative_prune_",
    "iterative_sparsities",
    "plot_sensitivity",
    "prune_channels_",
    "prune_weights_",
    "rewind_",
    "scan_sensitivity",
    "sparsities_for_drop",
    "sparsity_of",
    "unit_scores",
]
