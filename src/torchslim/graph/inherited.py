"""May a subclass of a known layer be pruned with its parent's rule? Checked, never assumed.

Third-party code subclasses `nn.Conv2d` and `nn.Linear` all the time: TF-"SAME" padding convs,
weight-standardised convs, LoRA-style linears. With its parent's rule such a layer is sliced like
the parent (output channels = weight dim 0, input channels = weight dim 1), which is right only
if its forward really is that operation on its own weight. So a subclass whose forward is
overridden is tested on the inputs the tracer saw:

- its output equals the parent's forward on the same module: nothing to worry about; or
- for weight layers (conv, linear), channel by channel: nudging weight row `o` changes output
  channel `o` only, and with weight column `i` zeroed, input channel `i` no longer matters.

A layer that fails is not pruned, and the reason names it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["check_inherited_forward"]

_ATOL = 1e-5


def _close(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and bool(torch.allclose(a, b, atol=_ATOL, rtol=1e-4)))


def _channel_dims(module: nn.Module) -> tuple[int, int] | None:
    """(output channel dim, input channel dim) of a weight layer's tensors, else None."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        return 1, 1
    if isinstance(module, nn.Linear):
        return -1, -1
    return None


def _only_channel_changes(before: torch.Tensor, after: torch.Tensor, dim: int, channel: int) -> bool:
    moved = (after - before).abs().movedim(dim, 0).reshape(before.shape[dim], -1).amax(dim=1)  # (C,)
    others = torch.cat([moved[:channel], moved[channel + 1:]])
    return bool(moved[channel] > _ATOL) and bool((others <= _ATOL).all())


def _acts_per_channel(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    dims = _channel_dims(module)
    weight = getattr(module, "weight", None)
    if dims is None or not isinstance(weight, nn.Parameter) or weight.dim() < 2:
        return False
    out_dim, in_dim = dims
    generator = torch.Generator().manual_seed(0)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            o = int(torch.randint(weight.shape[0], (1,), generator=generator))
            weight[o] += torch.randn(weight.shape[1:], generator=generator)
            if not _only_channel_changes(out, module(x), out_dim, o):
                return False
            weight.copy_(saved)
            i = int(torch.randint(weight.shape[1], (1,), generator=generator))
            weight[:, i] = 0
            base = module(x)
            nudged = x.clone()
            nudged.select(in_dim, i).add_(torch.randn(nudged.select(in_dim, i).shape, generator=generator))
            return _close(base, module(nudged))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def check_inherited_forward(module: nn.Module, parent: Any, values: list[Any], out: Any) -> str | None:
    """None if `module` (an instance of a subclass of `parent`) may be pruned by `parent`'s rule
    on the inputs `values` it was traced with; else why not."""
    if type(module).forward is parent.forward:
        return None
    with torch.no_grad():
        try:
            if _close(parent.forward(module, *values), out):
                return None
        except Exception:  # the parent's forward may not even accept these inputs: test on
            pass
        tensor = values[0] if values and isinstance(values[0], torch.Tensor) else None
        if tensor is not None and isinstance(out, torch.Tensor) and _acts_per_channel(module, tensor, out):
            return None
    return (f"{type(module).__name__} subclasses {parent.__name__} but overrides forward, and does not "
            f"compute a {parent.__name__} of its own weight channel by channel")
