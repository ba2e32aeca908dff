"""Axes: which parameter slices belong to channel i of a layer, and how to cut them out.

An axis lists `(parameter, dim, width)` slices: index i of the axis owns elements
`[i*width, (i+1)*width)` along `dim` of that parameter (width 1 for a conv filter, `head_dim` for
an attention head). Removing channels is then one generic `index_select` per slice plus a
`resize` that updates the layer's size attributes. Artifacts replay the same function with
`keep = range(new_size)`, so a pruned model is rebuilt without pickle from its sizes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Axis", "ParamSlice", "cut_axis_"]


@dataclass(frozen=True)
class ParamSlice:
    """Elements `[i*width, (i+1)*width)` along `dim` of parameter/buffer `name` (dotted path)."""

    name: str
    dim: int
    width: int = 1
    scored: bool = True  # weights count for magnitude importance; biases and running stats do not
    blocks: int = 1  # the dim holds `blocks` equal parts indexed alike (packed q/k/v projections)


@dataclass(frozen=True)
class Axis:
    """A prunable axis of a layer: its slices, how to update the layer, and whether it makes channels.

    `produces` marks axes that create channels (a conv's filters, a Linear's outputs, heads): a
    coupled set without one (say, only a consumer's input channels) is not removable.
    `resize(module, size)` updates size attributes after slicing and may return a replacement
    module (e.g. a `nn.MultiheadAttention` whose heads no longer fill `embed_dim`).
    """

    slices: tuple[ParamSlice, ...]
    resize: Callable[[nn.Module, int], nn.Module | None]
    produces: bool = False


def _tensor(module: nn.Module, name: str) -> tuple[nn.Module, str, torch.Tensor | None]:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    value = getattr(owner, leaf, None)
    return owner, leaf, value if isinstance(value, torch.Tensor) else None


def cut_axis_(module: nn.Module, axis: Axis, keep: Sequence[int]) -> nn.Module | None:
    """Keep only channels `keep` (sorted indices) of `axis` in `module`, in place.

    Returns the replacement module if the axis' `resize` made one (the caller swaps it in).
    """
    kept = torch.as_tensor(list(keep), dtype=torch.long)
    for piece in axis.slices:
        owner, leaf, value = _tensor(module, piece.name)
        if value is None:  # e.g. bias=False
            continue
        block = value.shape[piece.dim] // piece.blocks
        index = (kept[:, None] * piece.width + torch.arange(piece.width)).reshape(-1)  # (K*width,)
        index = (torch.arange(piece.blocks)[:, None] * block + index).reshape(-1)  # (blocks*K*width,)
        data = value.detach().index_select(piece.dim, index).contiguous()
        if isinstance(value, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(data, requires_grad=value.requires_grad))
        else:
            owner._buffers[leaf] = data
    return axis.resize(module, len(kept))
