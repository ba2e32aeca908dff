"""Weight sharing (Deep Compression stage 2): per-layer k-means codebooks and centroid fine-tuning.

Each selected weight becomes `codebook[index]` (pruned positions stay exactly +0.0). The codebook
is a trainable parameter and the indices are fixed, so fine-tuning sums the gradients of every
weight in a cluster into its centroid, as in Han et al. 2016. After `finalize_` the weight holds
at most 2**bits distinct non-zero values, which the encoder stores as bits-wide indices.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn
from torch.nn.utils import parametrize

from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.parametrized import original_weight, remove_weight_parametrizations, weight_of
from torchslim.registry import register_technique
from torchslim.select import Select

__all__ = [
    "CentroidInit",
    "SharedWeights",
    "WeightSharing",
    "keep_shared_",
    "kmeans_codebook",
    "share_weights_",
]


class CentroidInit(StrEnum):
    LINEAR = "linear"  # evenly spaced over [min, max]: the paper's best (keeps large weights)
    DENSITY = "density"  # quantiles of the weight distribution
    RANDOM = "random"  # k random weights


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class WeightSharing(TechniqueConfig):
    """Cluster each selected layer's non-zero weights into 2**bits shared values.

    Attributes:
        bits: index width: at most 2**bits centroids per layer (1..16).
        per_layer: bit-width overrides by layer name.
        init: centroid initialisation (`linear` as in the paper).
        max_iter: k-means iterations.
        seed: k-means seed (for `random` init).
    """

    kind = "cluster"
    selects_layers = True

    bits: int = Field(default=5, ge=1, le=16)
    per_layer: dict[str, int] = Field(default_factory=dict)
    init: CentroidInit = CentroidInit.LINEAR
    max_iter: int = Field(default=100, ge=1)
    seed: int = 0

    def __post_init__(self) -> None:
        bad = {name: b for name, b in self.per_layer.items() if not 1 <= b <= 16}
        if bad:
            raise ConfigError(f"per_layer bits must be in 1..16, got {bad}")


def kmeans_codebook(values: np.ndarray, clusters: int, *, init: CentroidInit = CentroidInit.LINEAR,
                    max_iter: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means with scikit-learn; returns (codebook (k,) float32, labels (n,) int64).

    Example:
        >>> book, labels = kmeans_codebook(np.array([0.1, 0.11, 0.9, 1.0], np.float32), 2)
        >>> [round(float(c), 3) for c in book], labels.tolist()
        ([0.105, 0.95], [0, 0, 1, 1])
    """
    from sklearn.cluster import KMeans

    values = np.asarray(values, dtype=np.float64).reshape(-1, 1)  # (n, 1)
    distinct = np.unique(values)
    if len(distinct) <= clusters:  # already shared: every value is its own centroid
        labels = np.searchsorted(distinct, values[:, 0])
        return distinct.astype(np.float32), labels.astype(np.int64)
    match init:
        case CentroidInit.LINEAR:
            start: Any = np.linspace(values.min(), values.max(), clusters).reshape(-1, 1)
        case CentroidInit.DENSITY:
            start = np.quantile(values, np.linspace(0, 1, clusters)).reshape(-1, 1)
        case CentroidInit.RANDOM:
            start = "random"
    kmeans = KMeans(n_clusters=clusters, init=start, n_init=1, max_iter=max_iter,
                    random_state=seed).fit(values)
    return kmeans.cluster_centers_[:, 0].astype(np.float32), kmeans.labels_.astype(np.int64)


class SharedWeights(nn.Module):
    """Parametrization `weight = codebook[index]` where kept, exactly +0.0 where pruned."""

    torchslim_parametrization = True  # ours: finalize_ bakes it in

    constraint = "shared"  # what a recipe keeps while later stages train (see `constrain_`)
    index: torch.Tensor
    keep: torch.Tensor

    def __init__(self, codebook: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("index", index)
        self.register_buffer("keep", keep.to(torch.bool))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        shared = self.codebook[self.index]  # gather; its backward sums gradients per centroid
        return torch.where(self.keep, shared, torch.zeros((), dtype=shared.dtype))


def share_weights_(model: nn.Module, config: WeightSharing, *, targets: Select,
                   calibration: Iterable[Any] | None = None) -> dict[str, Any]:
    """Handler of `WeightSharing`: replace each selected weight by a k-means codebook."""
    layers = targets.resolve(model)
    unknown = sorted(set(config.per_layer) - {n for n, _ in layers})
    if unknown:
        raise ConfigError(f"per_layer names {unknown} are not among the selected layers "
                          f"{[n for n, _ in layers]}")
    summary: dict[str, Any] = {}
    for name, module in layers:
        if parametrize.is_parametrized(module, "weight"):  # bake masks in: zeros stay pruned
            remove_weight_parametrizations(module, leave_parametrized=True)
        weight = weight_of(module).detach()
        keep = weight != 0
        bits = config.per_layer.get(name, config.bits)
        values = weight[keep].cpu().numpy()
        if values.size == 0:
            raise ConfigError(f"layer {name!r} has no non-zero weight left to cluster")
        codebook, labels = kmeans_codebook(values, min(2 ** bits, values.size), init=config.init,
                                           max_iter=config.max_iter, seed=config.seed)
        index = torch.zeros(weight.shape, dtype=torch.int64)
        index[keep.cpu()] = torch.from_numpy(labels)
        parametrize.register_parametrization(module, "weight", SharedWeights(
            torch.from_numpy(codebook).to(weight.device), index.to(weight.device), keep))
        original_weight(module).requires_grad_(False)
        summary[name] = {"bits": bits, "centroids": len(codebook)}
    return {"clusters": summary}


def keep_shared_(module: nn.Module) -> int:
    """Re-attach `SharedWeights` to a weight that already holds few distinct values.

    Used to resume fine-tuning of a clustered layer from a plain (finalized) checkpoint: the
    codebook is the distinct non-zero values and the indices point into it, so the weight is
    unchanged to the bit. Returns the codebook size.
    """
    weight = weight_of(module).detach()
    keep = weight != 0
    codebook, index_of_kept = torch.unique(weight[keep], return_inverse=True)
    index = torch.zeros(weight.shape, dtype=torch.int64, device=weight.device)
    index[keep] = index_of_kept
    parametrize.register_parametrization(module, "weight", SharedWeights(codebook, index, keep))
    original_weight(module).requires_grad_(False)
    return int(codebook.numel())


register_technique(WeightSharing, share_weights_)
