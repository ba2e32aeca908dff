"""Importance of coupled channel units: one score per unit, computed over the whole group.

A unit (say output channel 5 of a conv, entry 5 of its BatchNorm and input channel 5 of the
next conv) is scored as one: its magnitude is the norm over every weight slice it would take
away, not just the producing filter's (group-aware, as in DepGraph). Criteria:
`l1`/`l2` (weight norms), `random`, `taylor` (first-order |sum w * dL/dw|, Molchanov et al.
2019), `activation` (mean |activation| on calibration data), `apoz` (1 - average percentage of
zeros after ReLU, Hu et al. 2016; groups with no ReLU fall back to mean activation), `bn_scale`
(|gamma|, network slimming), `gate` (learned gates, `torchslim.pruning.slimming`).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError
from torchslim.graph import ChannelGraph, ParamSlice

__all__ = ["Importance", "unit_scores"]


class Importance(StrEnum):
    L1 = "l1"
    L2 = "l2"
    RANDOM = "random"
    TAYLOR = "taylor"
    ACTIVATION = "activation"
    APOZ = "apoz"
    BN_SCALE = "bn_scale"
    GATE = "gate"


DATA_CRITERIA = {Importance.TAYLOR, Importance.ACTIVATION, Importance.APOZ}


def _per_index(value: torch.Tensor, piece: ParamSlice, size: int) -> torch.Tensor:
    """`(size, blocks*width*rest)` view of a parameter: row i = everything channel i owns."""
    moved = value.detach().movedim(piece.dim, 0)  # (blocks*size*width, ...)
    per = moved.reshape(piece.blocks, size, piece.width, -1)  # (blocks, size, width, rest)
    return per.transpose(0, 1).reshape(size, -1)


def _slice_values(model: nn.Module, graph: ChannelGraph, tensors: dict[str, torch.Tensor],
                  reduce: str) -> dict[tuple[str, str], np.ndarray]:
    """Per (module, axis): each index's `reduce` (l1 / sq / sum) over its scored slices."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for (module, axis_name), axis in graph.axes.items():
        size = graph.sizes[(module, axis_name)]
        total = torch.zeros(size, dtype=torch.float64)
        for piece in axis.slices:
            key = f"{module}.{piece.name}" if module else piece.name
            value = tensors.get(key)
            if not piece.scored or value is None:
                continue
            rows = _per_index(value, piece, size).double()
            total += {"l1": rows.abs().sum(1), "sq": rows.pow(2).sum(1), "sum": rows.sum(1).abs()}[reduce]
        out[(module, axis_name)] = total.numpy()
    return out


def _aggregate(graph: ChannelGraph, values: dict[tuple[str, str], np.ndarray]) -> list[np.ndarray]:
    return [np.array([sum(float(values[(m.module, m.axis)][m.index]) for m in unit)
                      for unit in group.units]) for group in graph.groups]


def _taylor_products(model: nn.Module, batches: list[tuple[torch.Tensor, Any]]) -> dict[str, torch.Tensor]:
    """Sum over batches of w * dL/dw for every parameter (loss: cross-entropy or MSE to targets)."""
    params = dict(model.named_parameters())
    products = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            model.zero_grad(set_to_none=True)
            outputs = model(inputs)
            if targets is None:
                raise ConfigError("taylor importance needs labelled calibration batches (inputs, targets)")
            loss = F.cross_entropy(outputs, targets) if targets.dtype == torch.long and \
                outputs.dim() == 2 else F.mse_loss(outputs, targets.to(outputs.dtype))
            loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    products[name] += p.detach() * p.grad
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return products


RELU_LIKE = ("ReLU", "ReLU6", "relu", "relu6", "relu_")


def _activation_scores(graph: ChannelGraph, batches: list[tuple[torch.Tensor, Any]],
                       criterion: Importance) -> list[np.ndarray]:
    """Mean |activation| (or 1 - APoZ after ReLUs) per unit, over the nodes carrying it."""
    assert graph.gm is not None
    gm, spaces = graph.gm, graph.spaces
    relu_nodes = {n.name for n in gm.graph.nodes
                  if (n.op == "call_module" and type(gm.get_submodule(str(n.target))).__name__ in RELU_LIKE)
                  or (n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target)
                      in RELU_LIKE)}
    wanted = relu_nodes if criterion is Importance.APOZ else set(spaces)
    sums: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted and n.name in spaces and isinstance(out, torch.Tensor):
                dims = [d for d in range(out.dim()) if d != spaces[n.name].dim]
                stat = (out != 0).float().mean(dims) if criterion is Importance.APOZ \
                    else out.abs().float().mean(dims)
                sums[n.name] = sums.get(n.name, 0) + stat
            return out

    with torch.no_grad():
        for inputs, _ in batches:
            Recorder(gm).run(inputs)
    totals = [np.zeros(len(g.units)) for g in graph.groups]
    counts = [np.zeros(len(g.units)) for g in graph.groups]
    for node, stat in sums.items():
        for atom, value in zip(spaces[node].atoms.tolist(), stat.tolist(), strict=True):
            where = graph.unit_of(atom)
            if where is not None:
                totals[where[0]][where[1]] += value
                counts[where[0]][where[1]] += 1
    return [np.where(c > 0, t / np.maximum(c, 1), np.inf) for t, c in zip(totals, counts, strict=True)]


def _gate_scores(model: nn.Module, graph: ChannelGraph) -> list[np.ndarray]:
    from torchslim.pruning.slimming import GATE_SCORES

    scores = getattr(model, GATE_SCORES, None)
    if not scores:
        raise ConfigError("importance 'gate' needs trained gates: attach_gates_(model, x), train with "
                          "GateSparsity, then gates.fold_(model) before pruning")
    return [np.array([scores.get(f"{u[0].module}|{u[0].axis}|{u[0].index}", np.inf) for u in group.units])
            for group in graph.groups]


def unit_scores(model: nn.Module, graph: ChannelGraph, criterion: Importance | str, *,
                calibration: Iterable[tuple[torch.Tensor, Any]] | None = None,
                seed: int = 0) -> list[np.ndarray]:
    """One score per unit of each group (higher = more important; `inf` = keep).

    Raises:
        ConfigError: a data-driven criterion without calibration batches.
    """
    criterion = Importance(criterion)
    batches = list(calibration or [])
    if criterion in DATA_CRITERIA and not batches:
        raise ConfigError(f"importance {criterion.value!r} needs calibration batches; pass "
                          "calibration= (a few training batches) or use importance l1/l2")
    if criterion is Importance.RANDOM:
        rng = np.random.default_rng(seed)
        return [rng.random(len(group.units)) for group in graph.groups]
    if criterion is Importance.ACTIVATION:
        return _activation_scores(graph, batches, criterion)
    if criterion is Importance.APOZ:  # groups with no ReLU after them: ranked by mean activation
        apoz = _activation_scores(graph, batches, criterion)
        mean = _activation_scores(graph, batches, Importance.ACTIVATION)
        return [np.where(np.isfinite(a), a, m) for a, m in zip(apoz, mean, strict=True)]
    if criterion is Importance.TAYLOR:
        values = _slice_values(model, graph, _taylor_products(model, batches), "sum")
        return _aggregate(graph, values)
    if criterion is Importance.GATE:
        return _gate_scores(model, graph)
    tensors = dict(model.state_dict(keep_vars=False))
    if criterion is Importance.BN_SCALE:
        bn = {key: np.zeros(size) for key, size in graph.sizes.items()}
        for module, axis in graph.sizes:
            layer = model.get_submodule(module)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
                bn[(module, axis)] = layer.weight.detach().abs().double().numpy()
        has_bn = [np.array([any(isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
                                for m in unit) for unit in group.units]) for group in graph.groups]
        return [np.where(mask, score, np.inf) for mask, score in zip(has_bn, _aggregate(graph, bn),
                                                                       strict=True)]
    values = _slice_values(model, graph, tensors, "l1" if criterion is Importance.L1 else "sq")
    scores = _aggregate(graph, values)
    return scores if criterion is Importance.L1 else [np.sqrt(s) for s in scores]
