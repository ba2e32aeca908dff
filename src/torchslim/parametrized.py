"""Typed access to layer weights that may carry parametrizations (masks, codebooks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["foreign_parametrized", "original_weight", "remove_weight_parametrizations", "weight_of",
           "weight_parametrizations"]


def weight_of(module: nn.Module) -> torch.Tensor:
    """The effective weight (after any parametrization)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def weight_parametrizations(module: nn.Module) -> list[nn.Module]:
    """The parametrizations on `module.weight`, outermost last (empty if none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return list(module.parametrizations["weight"])  # type: ignore[index]


def remove_weight_parametrizations(module: nn.Module, *, leave_parametrized: bool) -> None:
    """Take the parametrizations off `module.weight` (torch's `remove_parametrizations`) without
    breaking its copies: torch deletes the weight property from the module's class, and a module
    copied with `copy.deepcopy` shares that class with the module it was copied from, which then
    has no `weight` left. So the module first gets a class of its own, of the same name and
    contents; torch then puts the plain class back when no parametrization is left."""
    cls = type(module)
    own = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave_parametrized)


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor underneath the parametrizations (the weight itself if none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return weight_of(module)
    original = module.parametrizations["weight"].original  # type: ignore[index,union-attr]
    assert isinstance(original, torch.Tensor)
    return original


def foreign_parametrized(model: nn.Module) -> dict[str, str]:
    """Layers whose weight carries a parametrization that is not torchslim's (a model's own
    weight_norm, say), with the reason techniques leave them alone: baking masks or codebooks
    into such a weight would also remove the model's own parametrization."""
    found = {}
    for name, module in model.named_modules():
        theirs = [type(p).__name__ for p in weight_parametrizations(module)
                  if not getattr(p, "torchslim_parametrization", False)]
        if name and theirs:
            found[name] = (f"its weight is parametrized by the model itself ({', '.join(theirs)}); "
                           "it is left unchanged")
    return found
