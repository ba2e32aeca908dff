"""Per-layer sparsity and bit widths for a size target: greedy on measured sensitivity.

The search needs a cheap model of "what does this policy cost in accuracy and bytes" to pick
candidates worth a fine-tune. Accuracy: the validation drop of pruning one layer alone
(`scan_sensitivity`) plus that of clustering it alone (`scan_bits`), summed over layers.
Bytes: the real entropy-coded size of every layer's weight at every (sparsity, bits) pair,
read from artifacts saved by the same encoder the final model uses. Greedy: starting from the
densest policy, take the move (one layer one step sparser, or one bit narrower) that saves the
most bytes per point of predicted drop, until the predicted size reaches the target.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchslim import artifact
from torchslim.api import apply_, finalize_
from torchslim.clustering import WeightSharing
from torchslim.data import TensorLoader
from torchslim.inspect import inspect_artifact
from torchslim.measure import evaluate
from torchslim.pruning.unstructured import WeightPruning
from torchslim.select import Select

__all__ = ["SizeModel", "SizePolicy", "greedy_path", "measure_size_model", "scan_bits"]

SPARSITY_LEVELS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98)
BIT_LEVELS = (8, 6, 5, 4, 3)  # widest first: the greedy walk only narrows
SCAN_ITERATIONS = 20  # k-means iterations in the scans: enough to rank, far cheaper than 100


@dataclass(frozen=True)
class SizePolicy:
    """Per-layer sparsity (fraction of weights removed) and codebook bits."""

    sparsity: dict[str, float]
    bits: dict[str, int]


@dataclass
class SizeModel:
    """Measured drops (accuracy fraction) and bytes per layer, per sparsity / bits level.

    `prune_drop[layer][i]` is the validation drop of pruning `layer` alone to
    `sparsities[i]`; `bits_drop[layer][j]` that of clustering it alone to `bits[j]`;
    `bytes[layer][i][j]` its weight's encoded bytes at (sparsities[i], bits[j]); `other_bytes`
    everything else in the file (biases, header).
    """

    sparsities: list[float]
    bits: list[int]
    prune_drop: dict[str, list[float]]
    bits_drop: dict[str, list[float]]
    bytes: dict[str, list[list[int]]]
    other_bytes: int
    dense_bytes: int
    layers: list[str] = field(default_factory=list)

    def predict(self, state: dict[str, tuple[int, int]]) -> tuple[int, float]:
        """(bytes, drop) of a state {layer: (sparsity index, bits index)}."""
        size = self.other_bytes + sum(self.bytes[n][i][j] for n, (i, j) in state.items())
        drop = sum(self.prune_drop[n][i] + self.bits_drop[n][j] for n, (i, j) in state.items())
        return size, drop

    def policy(self, state: dict[str, tuple[int, int]]) -> SizePolicy:
        return SizePolicy(sparsity={n: self.sparsities[i] for n, (i, _) in state.items()},
                          bits={n: self.bits[j] for n, (_, j) in state.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"sparsities": self.sparsities, "bits": self.bits, "prune_drop": self.prune_drop,
                "bits_drop": self.bits_drop, "bytes": self.bytes, "other_bytes": self.other_bytes,
                "dense_bytes": self.dense_bytes}


def _monotone(drops: Sequence[float]) -> list[float]:
    """Cumulative max, floored at 0: more compression never predicts less damage (noise)."""
    out, worst = [], 0.0
    for value in drops:
        worst = max(worst, value)
        out.append(worst)
    return out


def scan_bits(model: nn.Module, val_loader: TensorLoader, layers: Sequence[str],
              bits: Sequence[int]) -> dict[str, list[float]]:
    """Validation accuracy with each layer alone clustered to each bit width (no fine-tune)."""
    curves: dict[str, list[float]] = {}
    for name in layers:
        for width in bits:
            trial = copy.deepcopy(model)
            apply_(trial, WeightSharing(bits=width, max_iter=SCAN_ITERATIONS), targets=Select(names=(name,)))
            curves.setdefault(name, []).append(evaluate(trial, val_loader)["accuracy"])
    return curves


def _encoded_weight_bytes(model: nn.Module, layers: Sequence[str], sparsity: float,
                          bits: int) -> tuple[dict[str, int], int]:
    """Per-layer weight bytes and the file's total, every layer at (sparsity, bits)."""
    trial = copy.deepcopy(model)
    if sparsity > 0:
        apply_(trial, WeightPruning(sparsity=sparsity), targets=Select(names=tuple(layers)))
        finalize_(trial)
    apply_(trial, WeightSharing(bits=bits, max_iter=SCAN_ITERATIONS), targets=Select(names=tuple(layers)))
    finalize_(trial)
    with tempfile.TemporaryDirectory() as folder:
        path = artifact.save(trial, Path(folder) / "trial.slim", encoding=artifact.Encoding())
        described = inspect_artifact(path)
    per_tensor = {t["name"]: int(t["bytes"]) for t in described["tensors"]}
    return {name: per_tensor[f"{name}.weight"] for name in layers}, int(described["bytes"])


def measure_size_model(model: nn.Module, val_loader: TensorLoader, prune_scan: dict[str, Any],
                       *, bits: Sequence[int] = BIT_LEVELS) -> SizeModel:
    """Combine a pruning sensitivity scan with a bits scan and the encoded-bytes table."""
    layers = list(prune_scan["layers"])
    baseline = prune_scan["baseline"]
    sparsities = [0.0] + [float(s) for s in prune_scan["sparsities"] if s > 0]
    prune_drop = {n: _monotone([0.0] + [baseline - a for a, s in zip(prune_scan["layers"][n],
                                                                       prune_scan["sparsities"],
                                                                       strict=True) if s > 0])
                  for n in layers}
    bits_curves = scan_bits(model, val_loader, layers, bits)
    bits_drop = {n: _monotone([baseline - a for a in bits_curves[n]]) for n in layers}
    table: dict[str, list[list[int]]] = {n: [[0] * len(bits) for _ in sparsities] for n in layers}
    other = 0
    for i, sparsity in enumerate(sparsities):
        for j, width in enumerate(bits):
            per_layer, total = _encoded_weight_bytes(model, layers, sparsity, width)
            for name, size in per_layer.items():
                table[name][i][j] = size
            if i == 0 and j == 0:
                other = total - sum(per_layer.values())
    with tempfile.TemporaryDirectory() as folder:
        dense = artifact.save(model, Path(folder) / "dense.slim").stat().st_size
    return SizeModel(sparsities=sparsities, bits=list(bits), prune_drop=prune_drop,
                     bits_drop=bits_drop, bytes=table, other_bytes=other, dense_bytes=dense,
                     layers=layers)


def greedy_path(size_model: SizeModel, *, max_ratio: float) -> list[tuple[float, float, SizePolicy]]:
    """The greedy walk: (predicted ratio, predicted drop, policy) after every move.

    Stops when the predicted ratio (dense bytes / predicted bytes) reaches `max_ratio` or no
    move is left. Each move saves the most bytes per unit of predicted drop (free moves first).
    """
    state = {name: (0, 0) for name in size_model.layers}
    size, drop = size_model.predict(state)
    path = [(size_model.dense_bytes / size, drop, size_model.policy(state))]
    while size_model.dense_bytes / size < max_ratio:
        best: tuple[float, str, tuple[int, int]] | None = None
        for name, (i, j) in state.items():
            for move in ((i + 1, j), (i, j + 1)):
                if move[0] >= len(size_model.sparsities) or move[1] >= len(size_model.bits):
                    continue
                trial = {**state, name: move}
                new_size, new_drop = size_model.predict(trial)
                saved = size - new_size
                if saved <= 0:
                    continue
                score = saved / (max(new_drop - drop, 0.0) + 1e-4)
                if best is None or score > best[0]:
                    best = (score, name, move)
        if best is None:
            break
        state = {**state, best[1]: best[2]}
        size, drop = size_model.predict(state)
        path.append((size_model.dense_bytes / size, drop, size_model.policy(state)))
    return path
