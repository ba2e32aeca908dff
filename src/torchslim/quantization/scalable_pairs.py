"""Pairs of Linears whose connecting channels can be rescaled without changing the model.

AWQ moves a scale s_j from a Linear's input channel j into whatever produces that channel. A norm
layer is one such producer; another Linear is one too when what lies between the two is linear
in each channel, as in a gated MLP: down(act(gate(x)) * up(x)) is unchanged when up's output row
j is divided by s_j and down's input column j multiplied by it; between gate and down the
activation is not linear, and between v and o of grouped-query attention the widths differ.

Rather than trust layer names, each candidate (a sibling Linear of the consumer's module, listed
before it, whose output width is the consumer's input width) is tried on real inputs: the module
is run with the pair rescaled by random factors, and the pair counts only if the module's output
stays the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.calibration import call_model
from torchslim.parametrized import original_weight

__all__ = ["divide_rows_", "scalable_pairs"]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def divide_rows_(producer: nn.Linear, s: torch.Tensor) -> None:
    """Divide output channel j of `producer` (weight row and bias) by s_j."""
    with torch.no_grad():
        original_weight(producer).div_(s[:, None].to(original_weight(producer).dtype))
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))


def _rescale_(producer: nn.Linear, consumer: nn.Linear, s: torch.Tensor) -> None:
    divide_rows_(producer, s)
    with torch.no_grad():
        original_weight(consumer).mul_(s[None, :].to(original_weight(consumer).dtype))


def _tensors(layer: nn.Linear) -> list[torch.Tensor]:
    return [original_weight(layer)] + ([layer.bias] if layer.bias is not None else [])


def _first_tensor(value: Any) -> torch.Tensor | None:
    while isinstance(value, tuple | list) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def scalable_pairs(model: nn.Module, layers: list[tuple[str, nn.Linear]], batch: Any,
                   consumers: list[str]) -> dict[str, str]:
    """{consumer: producer} for each of `consumers` with a Linear among `layers` whose output
    channels can carry its input scales (checked on `batch`, see the module docstring)."""
    modules = dict(layers)
    order = {name: i for i, (name, _) in enumerate(layers)}
    candidates = {c: [p for p in modules if _parent(p) == _parent(c) and order[p] < order[c]
                      and modules[p].out_features == modules[c].in_features]
                  for c in consumers}
    candidates = {c: ps for c, ps in candidates.items() if ps}
    parents = {_parent(c) for c in candidates}
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for name in parents:
        def keep(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: str = name) -> None:
            captured.setdefault(n, (args, kwargs))
        handles.append(model.get_submodule(name).register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    generator = torch.Generator().manual_seed(0)
    pairs: dict[str, str] = {}
    with torch.no_grad():
        for consumer, producers in candidates.items():
            parent = _parent(consumer)
            if parent not in captured:
                continue
            module = model.get_submodule(parent)
            args, kwargs = captured[parent]
            before = _first_tensor(module(*args, **kwargs))
            if before is None:
                continue
            for producer in producers:
                pair = (modules[producer], modules[consumer])
                saved = [t.clone() for layer in pair for t in _tensors(layer)]
                s = torch.rand(modules[consumer].in_features, generator=generator) * 1.5 + 0.5
                _rescale_(*pair, s)
                after = _first_tensor(module(*args, **kwargs))
                for tensor, value in zip([t for layer in pair for t in _tensors(layer)], saved, strict=True):
                    tensor.copy_(value)  # exactly as they were
                if after is not None and torch.allclose(after, before, rtol=1e-3,
                                                        atol=1e-4 * float(before.abs().max())):
                    pairs[consumer] = producer
                    break
    return pairs
