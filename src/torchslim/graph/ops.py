"""Channel mapping through tensor operations: add, mul, cat, split, reshape, permute, index, reduce.

The tracer calls `propagate_op` for every `call_function` / `call_method` node with the channel
spaces of its tensor arguments and their real values (so every shape is known). Each rule says
where the channels are in the result, couples channels that must go together (both sides of an
add), or blocks them when the op mixes channels in a way we cannot follow. An op we do not know
blocks its inputs with a reason naming it: excluded, never pruned wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchslim.graph.rules import Coupling, Space

__all__ = ["propagate_op", "reshape_space"]

OpRule = Callable[[Coupling, str, list[Any], dict[str, Any], list[Any], Any], Any]

ELEMENTWISE = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "dropout", "dropout2d", "contiguous",
    "clone", "detach", "float", "half", "double", "to", "type", "type_as", "abs", "neg", "exp", "log",
    "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "square", "sin", "cos", "erf", "sign",
    "pow", "masked_fill", "expand", "expand_as", "max_pool1d", "max_pool2d", "avg_pool1d",
    "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "interpolate", "identity", "requires_grad_", "cpu", "pad",
}
BINARY = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "maximum",
          "minimum", "add_", "mul_", "sub_", "div_", "rsub", "floordiv"}
NON_TENSOR = {"size", "dim", "numel", "getattr", "shape", "device", "dtype", "eq", "ne", "lt",
              "le", "gt", "ge", "long", "int", "bool"}


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _tensor_spaces(spaces: list[Any], values: list[Any]) -> list[tuple[Space | None, torch.Tensor]]:
    return [(s, v) for s, v in zip(spaces, values, strict=True) if isinstance(v, torch.Tensor)]


def _elementwise(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
                 spaces: list[Any], out: Any) -> Any:
    """Broadcasting op: tracked operands are coupled channel by channel."""
    if not isinstance(out, torch.Tensor):
        return None
    tracked = [(s, v) for s, v in _tensor_spaces(spaces, args) if isinstance(s, Space)]
    if not tracked:
        return None
    dims = {s.dim + out.dim() - v.dim() for s, v in tracked}
    if len(dims) != 1:
        graph.block([s for s, _ in tracked], f"{where}: operands carry channels on different dims")
        return None
    dim = dims.pop()
    for space, value in _tensor_spaces(spaces, args):
        aligned = dim - (out.dim() - value.dim())
        if space is None and aligned >= 0 and value.shape[aligned] > 1:
            graph.block([s for s, _ in tracked], f"{where}: combines with a tensor whose channels "
                        "are not tracked (an input, a parameter, or a layer whose width is kept)")
            return None
    first = tracked[0][0]
    for space, _ in tracked[1:]:
        graph.couple(space, first.atoms)
    if out.shape[dim] != len(first.atoms):
        graph.block(first, f"{where}: broadcast changes the channel count")
        return None
    return Space(dim, first.atoms)


def _cat(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
         spaces: list[Any], out: Any) -> Any:
    parts = spaces[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
    tracked = [p for p in parts if isinstance(p, Space)]
    if not tracked:
        return None
    if any(p.dim != dim for p in tracked):  # concatenating along another dim couples the parts
        if len(tracked) != len(parts) or len({p.dim for p in tracked}) != 1:
            graph.block(tracked, f"{where}: concatenation of tracked and untracked tensors")
            return None
        for p in tracked[1:]:
            graph.couple(p, tracked[0].atoms)
        return tracked[0]
    if len(tracked) != len(parts):
        graph.block(tracked, f"{where}: concatenation with a tensor whose channels are not tracked")
        return None
    return Space(dim, np.concatenate([p.atoms for p in tracked]))


def _split(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
           spaces: list[Any], out: Any) -> Any:
    space, value = spaces[0], args[0]
    if not isinstance(space, Space):
        return None
    name = where.rsplit(": ", 1)[-1]
    position = 1 if name == "unbind" else 2
    dim = kwargs.get("dim", args[position] if len(args) > position else 0) % value.dim()
    if name == "unbind":
        if dim == space.dim:
            graph.block(space, f"{where}: unbinds the channel dim")
            return tuple(None for _ in out)
        return tuple(Space(space.dim - (dim < space.dim), space.atoms) for _ in out)
    if dim != space.dim:
        return tuple(space for _ in out)
    parts, start = [], 0
    for piece in out:  # consecutive slices of the channels
        size = piece.shape[dim]
        parts.append(Space(dim, space.atoms[start:start + size]))
        start += size
    return tuple(parts)


def _hardcoded_positions(name: str, args: list[Any]) -> tuple[int, ...]:
    """Output dims whose size the call spells as a literal int (a pruned size would break them)."""
    if name not in ("view", "reshape"):
        return ()
    shape = args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]
    return tuple(i for i, s in enumerate(shape) if isinstance(s, int) and s != -1)


def reshape_space(graph: Coupling, where: str, space: Space | None, value: torch.Tensor,
                  out: torch.Tensor, *, hardcoded: tuple[int, ...]) -> Space | None:
    """Channels through a reshape: kept as a dim, or merged with the dims after them (flatten)."""
    if space is None:
        return None
    before = math.prod(value.shape[:space.dim])
    channels = value.shape[space.dim]
    for dim in range(out.dim()):
        if math.prod(out.shape[:dim]) != before:
            continue
        trailing = out.shape[dim] // channels if out.shape[dim] % channels == 0 else 0
        rest = value.shape[space.dim + 1:]
        fits = trailing > 0 and any(math.prod(rest[:k]) == trailing for k in range(len(rest) + 1))
        if not fits:
            continue
        if dim in hardcoded:
            graph.block(space, f"{where}: the new shape spells the channel size as a constant; "
                        "use -1 or flatten() so a pruned model still reshapes")
            return None
        return Space(dim, np.repeat(space.atoms, trailing))
    graph.block(space, f"{where}: reshape splits or merges the channels with earlier dims")
    return None


def _reshape(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    name = where.rsplit(": ", 1)[-1]
    return reshape_space(graph, where, spaces[0], args[0], out,
                         hardcoded=_hardcoded_positions(name, args))


def _permute(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    space, value = spaces[0], args[0]
    if not isinstance(space, Space):
        return None
    name = where.rsplit(": ", 1)[-1]
    ndim = value.dim()
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]
        dims = kwargs.get("dims", dims)
        order = [d % ndim for d in dims]
    elif name == "t":
        order = [1, 0] if ndim == 2 else list(range(ndim))
    else:  # transpose / swapaxes
        a = kwargs.get("dim0", args[1]) % ndim
        b = kwargs.get("dim1", args[2]) % ndim
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    return Space(order.index(space.dim), space.atoms)


def _unsqueeze(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
               spaces: list[Any], out: Any) -> Any:
    space = spaces[0]
    if not isinstance(space, Space):
        return None
    dim = kwargs.get("dim", args[1]) % out.dim()
    return Space(space.dim + (dim <= space.dim), space.atoms)


def _squeeze(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    space, value = spaces[0], args[0]
    if not isinstance(space, Space):
        return None
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dims is None:
        dims = [d for d in range(value.dim()) if value.shape[d] == 1]
    dims = [d % value.dim() for d in (dims if isinstance(dims, tuple | list) else [dims])]
    removed = [d for d in dims if value.shape[d] == 1]
    if space.dim in removed:
        graph.block(space, f"{where}: squeezes the channel dim")
        return None
    return Space(space.dim - sum(d < space.dim for d in removed), space.atoms)


REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"}


def _reduce(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
            spaces: list[Any], out: Any) -> Any:
    space, value = spaces[0], args[0]
    if not isinstance(space, Space):
        return None
    dims = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    if isinstance(out, tuple):  # max/min with dim return (values, indices)
        out = out[0]
    if dims is None:
        graph.block(space, f"{where}: reduces over every dim, channels included")
        return None
    dims = [d % value.dim() for d in (dims if isinstance(dims, tuple | list) else [dims])]
    if space.dim in dims:
        graph.block(space, f"{where}: reduces over the channels")
        return None
    keep = kwargs.get("keepdim", False) or out.dim() == value.dim()
    return Space(space.dim if keep else space.dim - sum(d < space.dim for d in dims), space.atoms)


def _softmax(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    space, value = spaces[0], args[0]
    if not isinstance(space, Space):
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if where.rsplit(": ", 1)[-1] == "normalize":  # a scale per row: channel-wise, keeps channels
        return space
    if dim is None or dim % value.dim() == space.dim:
        graph.block(space, f"{where}: softmax across the channels")
        return None
    return space


def _getitem(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    container, index = spaces[0], args[1]
    if not isinstance(args[0], torch.Tensor):  # tuple / list / dict of outputs
        if isinstance(container, dict):
            return container.get(index)
        if isinstance(container, tuple | list):
            return container[index]
        return None
    if not isinstance(container, Space):
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded.extend([slice(None)] * (args[0].dim() - consuming) if item is Ellipsis else [item])
    in_dim = out_dim = 0
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if in_dim == container.dim:
            if item == slice(None):
                return Space(out_dim, container.atoms)
            graph.block(container, f"{where}: indexes into the channels")
            return None
        if isinstance(item, int):
            in_dim += 1
        elif isinstance(item, slice):
            in_dim += 1
            out_dim += 1
        else:
            graph.block(container, f"{where}: advanced indexing")
            return None
    return Space(out_dim + container.dim - in_dim, container.atoms)


def _getattr(graph: Coupling, where: str, args: list[Any], kwargs: dict[str, Any],
             spaces: list[Any], out: Any) -> Any:
    container = spaces[0]
    if isinstance(container, dict):
        return container.get(args[1])
    return None


RULES: dict[str, OpRule] = {
    **dict.fromkeys(BINARY, _elementwise),
    "cat": _cat, "concat": _cat, "concatenate": _cat,
    "split": _split, "chunk": _split, "unbind": _split, "tensor_split": _split,
    "view": _reshape, "reshape": _reshape, "flatten": _reshape,
    "permute": _permute, "transpose": _permute, "swapaxes": _permute, "t": _permute,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze,
    **dict.fromkeys(REDUCE, _reduce),
    "softmax": _softmax, "log_softmax": _softmax, "normalize": _softmax,
    "getitem": _getitem, "getattr": _getattr,
}


def propagate_op(graph: Coupling, target: Any, where: str, args: list[Any], kwargs: dict[str, Any],
                 spaces: list[Any], out: Any) -> Any:
    """The output spaces of one function/method call (`spaces` mirrors `args` for tensors)."""
    name = _name(target)
    rule = RULES.get(name)
    here = f"{where}: {name}"
    if rule is not None:
        return rule(graph, here, args, kwargs, spaces, out)
    if name in ELEMENTWISE:
        first = spaces[0] if spaces else None
        if isinstance(first, Space) and isinstance(out, torch.Tensor) and \
                out.dim() == args[0].dim() and out.shape[first.dim] == len(first.atoms):
            return first
        graph.block(first, f"{here}: changes the channel count")
        return None
    if name in NON_TENSOR or not any(isinstance(s, Space) for s in _flat(spaces)):
        return None
    graph.block(_flat(spaces), f"{here}: no channel rule for this op; its inputs are not pruned "
                "(wrap it in a module and register_channel_rule(MyLayer, rule) to prune through it)")
    return None


def _flat(spaces: Any) -> list[Space]:
    if isinstance(spaces, Space):
        return [spaces]
    if isinstance(spaces, tuple | list):
        return [s for item in spaces for s in _flat(item)]
    if isinstance(spaces, dict):
        return [s for item in spaces.values() for s in _flat(item)]
    return []
