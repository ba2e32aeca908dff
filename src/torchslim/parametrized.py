"""Typed access to layer weights that may carry parametrizations (masks, codebooks)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["original_weight", "weight_of", "weight_parametrizations"]


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


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor underneath the parametrizations (the weight itself if none)."""
    if not parametrize.is_parametrized(module, "weight"):
        return weight_of(module)
    original = module.parametrizations["weight"].original  # type: ignore[index,union-attr]
    assert isinstance(original, torch.Tensor)
    return original
