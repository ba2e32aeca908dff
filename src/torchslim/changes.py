"""The typed result of `apply_`: what a technique changed and what it skipped, per layer.

Handlers report their own summary (sparsity per layer, ranks, removed units) and the layers
they refused with the reason. `apply_` adds what it *observed*, by comparing the model before
and after, so no technique can report success while changing nothing, and no layer is skipped
without its name and reason in the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.fused_experts import UnfusedExperts, unfused_copy
from torchslim.linear_layers import as_linear, is_hf_conv1d

__all__ = ["Changes", "observed_changes"]


class Changes(dict[str, Any]):
    """What `apply_` did: `changed` (layer -> what changed), `skipped` (layer -> why it was
    left alone) and `technique`, next to the technique's own summary under its usual keys
    (`sparsity`, `ranks`, `removed_units`, ...). A mapping, so it lands in JSON reports as is.

    Example:
        >>> import torchslim as ts
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> changes = ts.apply_(model, ts.pruning.WeightPruning(sparsity=0.5))
        >>> sorted(changes.changed)
        ['0', '2']
        >>> changes.changed["0"]
        'weight parametrized (Mask)'
    """

    @property
    def technique(self) -> str:
        return str(self.get("technique", ""))

    @property
    def changed(self) -> dict[str, str]:
        return dict(self.get("changed", {}))

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.get("skipped", {}))

    def summary(self) -> str:
        """One line per layer: `changed` first, then `skipped` with the reason."""
        lines = [f"{self.technique}: {len(self.changed)} layer(s) changed, {len(self.skipped)} skipped"]
        lines += [f"  changed {name or '(model)'}: {what}" for name, what in self.changed.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _base_type(module: nn.Module) -> type:
    """The module's own class, seeing through the subclass torch makes for parametrizations."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) or "scalar"


def _tensor_changes(before: nn.Module, after: nn.Module) -> list[str]:
    """The module's own parameters and buffers (not its children's) whose shape or values differ."""
    old = {**dict(before.named_parameters(recurse=False)), **dict(before.named_buffers(recurse=False))}
    new = {**dict(after.named_parameters(recurse=False)), **dict(after.named_buffers(recurse=False))}
    found = []
    for key, tensor in old.items():
        now = new.get(key)
        if now is None:
            if not (parametrize.is_parametrized(after, key)):
                found.append(f"{key} removed")
        elif now.shape != tensor.shape:
            found.append(f"{key} {_shape(tensor)} -> {_shape(now)}")
        elif now.dtype != tensor.dtype:
            found.append(f"{key} {tensor.dtype} -> {now.dtype}".replace("torch.", ""))
        elif not torch.equal(now.detach(), tensor.detach()):
            found.append(f"{key} values")
    found += [f"{key} added" for key in new if key not in old]
    return found


def observed_changes(before: nn.Module, after: nn.Module, *,
                     materialize: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, str]:
    """Layer name -> what changed between two states of one model (`""` is the model itself).

    A replaced or removed module is reported once, not its children; a parametrized weight
    (mask, codebook) is reported by the parametrization's class. `materialize` gives a module
    of `before` its tensors' values when `before` holds only their shapes (`ModelSnapshot`).
    """
    old, new = dict(before.named_modules()), dict(after.named_modules())
    changed: dict[str, str] = {}
    covered: list[str] = []  # replaced or removed subtrees: their children are not listed again

    def inside(name: str) -> bool:
        return any(name.startswith(prefix + ".") or (prefix == "" and name) for prefix in covered)

    for name, module in old.items():
        if inside(name):
            continue
        now = new.get(name)
        if now is None:
            changed[name] = "removed"
            covered.append(name)
            continue
        what = []
        if materialize is not None:
            module = materialize(module)
        if isinstance(now, UnfusedExperts) and not isinstance(module, UnfusedExperts):
            # the same experts as Linears: what happened to each of them
            inner = observed_changes(unfused_copy(module, now.layout), now)
            changed.update({f"{name}.{key}": what for key, what in inner.items() if key})
            covered.append(name)
            continue
        if is_hf_conv1d(module) and _base_type(now) is nn.Linear:  # the same layer, weight transposed
            what.append("Conv1D as Linear")
            module = as_linear(module)
        if _base_type(now) is not _base_type(module):
            changed[name] = f"replaced: {_base_type(module).__name__} -> {_base_type(now).__name__}"
            covered.append(name)
            continue
        what += [f"{key} parametrized ({', '.join(type(p).__name__ for p in plist)})"
                for key, plist in getattr(now, "parametrizations", {}).items()
                if not parametrize.is_parametrized(module, key)]
        what += _tensor_changes(module, now)
        if what:
            changed[name] = "; ".join(what)
    return changed
