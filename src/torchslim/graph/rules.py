"""Channel rules of layers: their prunable axes, and how channels flow through them.

A rule answers two questions for one layer type: which axes it has (`axes`: what to slice when
channels go), and, during tracing, how the channels of its inputs relate to its own axes and to
its output (`propagate`). Built-in rules cover Conv1d/2d/3d (plain, depthwise; other grouped
convs are excluded), ConvTranspose1d/2d/3d, Linear, BatchNorm, LayerNorm, GroupNorm (whole
groups), Embedding and channel-wise layers (activations, dropout, pooling). Attention rules
live in `torchslim.graph.attention`.
Users add their own layers with `register_channel_rule(MyLayer, rule)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

import torchslim
from torchslim.errors import ConfigError
from torchslim.graph.axes import Axis, ParamSlice

__all__ = ["ChannelRule", "Coupling", "Space", "register_channel_rule", "resolve_rule", "rule_for"]


@dataclass(frozen=True)
class Space:
    """Tensor dim `dim` carries channels; entry i of `atoms` is channel i's atom."""

    dim: int
    atoms: np.ndarray


class Coupling(Protocol):
    """What a rule may do while tracing (implemented by the tracer)."""

    def atoms(self, module: str, axis: str, size: int) -> np.ndarray: ...

    def couple(self, space: Space, atoms: np.ndarray) -> None: ...

    def block(self, spaces: Any, reason: str) -> None: ...


class ChannelRule:
    """How one layer type's channels are pruned; subclass and `register_channel_rule` it.

    Example (a layer that scales each channel by a learned vector, shape (C,)):
        >>> import torch
        >>> class Scale(nn.Module):
        ...     def __init__(self, c): super().__init__(); self.s = nn.Parameter(torch.ones(c))
        ...     def forward(self, x): return x * self.s[:, None, None]
        >>> class ScaleRule(ChannelRule):
        ...     def axes(self, module):
        ...         return {"channel": Axis((ParamSlice("s", 0),), resize=lambda m, n: None)}
        ...     def propagate(self, graph, name, module, inputs, values, output):
        ...         return self.pass_through(graph, name, module, inputs, "channel", 1)
        >>> register_channel_rule(Scale, ScaleRule())
    """

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        return {}

    def applies(self, module: nn.Module) -> bool:
        """Whether this rule takes `module` (a rule for a broad base class may decline a module
        it has nothing to say about, which is then traced through like any other)."""
        return True

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        """Couple input channels to the layer's axes; return the output's channel spaces."""
        raise NotImplementedError

    @staticmethod
    def pass_through(graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                     axis: str | None, dim: int) -> Space | None:
        """Channel-wise layer on `dim`: output channel i is input channel i (with param i of `axis`)."""
        space = inputs[0] if inputs else None
        if space is None:
            return None
        if space.dim != dim:
            if axis is None:  # acts elementwise: any dim passes
                return space
            graph.block(space, f"{name} ({type(module).__name__}) sees channels on dim "
                        f"{space.dim}, not {dim}")
            return None
        if axis is not None:
            graph.couple(space, graph.atoms(name, axis, len(space.atoms)))
        return space


_RULES: dict[type, ChannelRule] = {}
_NAMED_RULES: dict[str, ChannelRule] = {}


def register_channel_rule(layer: type | str, rule: ChannelRule) -> None:
    """Teach the graph a layer type (a class, or `"package.module.ClassName"` to avoid importing it).

    A layer with a rule is traced as one node: its forward is not looked into.
    """
    if not isinstance(rule, ChannelRule):
        raise ConfigError(f"rule for {layer} must be a ChannelRule instance, got {type(rule).__name__}")
    if isinstance(layer, str):
        _NAMED_RULES[layer] = rule
    else:
        _RULES[layer] = rule


def rule_for(module: nn.Module) -> ChannelRule | None:
    """The rule of `module`'s most specific registered class (a `Conv2d` subclass gets the
    `Conv2d` rule), or None."""
    return resolve_rule(module)[0]


def resolve_rule(module: nn.Module) -> tuple[ChannelRule | None, type | None]:
    """(rule, the class it was registered for): the first class along `module`'s MRO that has
    a rule, by class or by qualified name."""
    torchslim.load_public_surface()
    for cls in type(module).__mro__:
        found = _RULES.get(cls) or _NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None and found.applies(module):
            return found, cls
    return None, None


def _set(**attributes: Callable[[nn.Module, int], Any]) -> Callable[[nn.Module, int], None]:
    def resize(module: nn.Module, size: int) -> None:
        for key, value in attributes.items():
            setattr(module, key, value(module, size))
    return resize


def _size(module: nn.Module, size: int) -> int:
    return size


# ------------------------------------------------------------------------------ built-in rules
class ConvRule(ChannelRule):
    """Conv1d/2d/3d and ConvTranspose1d/2d/3d: groups=1 has `out` and `in`; depthwise has one
    `channel` axis."""

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        if _depthwise(module):
            return {"channel": Axis((ParamSlice("weight", 0), ParamSlice("bias", 0, scored=False)),
                                    _set(in_channels=_size, out_channels=_size, groups=_size))}
        # A transposed conv's weight is (in, out, *kernel), the other way round from a conv's.
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        return {"out": Axis((ParamSlice("weight", out_dim), ParamSlice("bias", 0, scored=False)),
                            _set(out_channels=_size), produces=True),
                "in": Axis((ParamSlice("weight", in_dim),), _set(in_channels=_size))}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        assert isinstance(module, nn.modules.conv._ConvNd)
        space = inputs[0] if inputs else None
        if _depthwise(module):
            return self.pass_through(graph, name, module, inputs, "channel", 1)
        if module.groups != 1:
            graph.block(space, f"{name}: grouped convolution (groups={module.groups}) is not pruned")
            out = graph.atoms(name, "out", module.out_channels)
            graph.block(Space(1, out), f"{name}: grouped convolution (groups={module.groups}) is not pruned")
            return None
        if space is not None:
            if space.dim == 1:
                graph.couple(space, graph.atoms(name, "in", module.in_channels))
            else:
                graph.block(space, f"{name}: channels arrive on dim {space.dim}, not 1")
        return Space(1, graph.atoms(name, "out", module.out_channels))


def _depthwise(module: nn.modules.conv._ConvNd) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


class LinearRule(ChannelRule):
    """Linear: `out` rows and `in` columns; it acts on the last dim only."""

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        return {"out": Axis((ParamSlice("weight", 0), ParamSlice("bias", 0, scored=False)),
                            _set(out_features=_size), produces=True),
                "in": Axis((ParamSlice("weight", 1),), _set(in_features=_size))}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        assert isinstance(module, nn.Linear)
        space = inputs[0] if inputs else None
        if space is not None:
            if space.dim == values[0].dim() - 1:
                graph.couple(space, graph.atoms(name, "in", module.in_features))
            else:  # channels on another dim would need a second tracked dim
                graph.block(space, f"{name}: channels on dim {space.dim} pass a Linear on the last dim")
        return Space(output.dim() - 1, graph.atoms(name, "out", module.out_features))


class NormRule(ChannelRule):
    """BatchNorm (dim 1), LayerNorm over the last dim, GroupNorm (several channels a group:
    whole groups are removed)."""

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        params = (ParamSlice("weight", 0), ParamSlice("bias", 0, scored=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            stats = (ParamSlice("running_mean", 0, scored=False), ParamSlice("running_var", 0, scored=False))
            return {"channel": Axis(params + stats, _set(num_features=_size))}
        if isinstance(module, nn.LayerNorm):
            return {"channel": Axis(params, _set(normalized_shape=lambda m, n: (n,)))}
        assert isinstance(module, nn.GroupNorm)
        per = module.num_channels // module.num_groups  # channels a group normalises together
        groups = (lambda m, n: 1) if module.num_groups == 1 else (lambda m, n: n // per)
        return {"channel": Axis(params, _set(num_channels=_size, num_groups=groups))}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        if isinstance(module, nn.LayerNorm):
            space = inputs[0] if inputs else None
            last = values[0].dim() - 1
            if len(module.normalized_shape) != 1:
                graph.block(space, f"{name}: LayerNorm over {len(module.normalized_shape)} dims")
                return None
            if space is not None and space.dim != last:
                return space  # normalises rows of another dim: channel-wise for this one
            return self.pass_through(graph, name, module, inputs, "channel", last)
        if isinstance(module, nn.GroupNorm) and module.num_groups not in (1, module.num_channels):
            # A group's channels are normalised together: they go as one unit, whole groups.
            atoms = graph.atoms(name, "channel", module.num_channels)
            per = module.num_channels // module.num_groups
            for start in range(0, module.num_channels, per):
                graph.couple(Space(1, atoms[start + 1:start + per]), np.repeat(atoms[start], per - 1))
        return self.pass_through(graph, name, module, inputs, "channel", 1)


class EmbeddingRule(ChannelRule):
    """Embedding: the `out` axis is the embedding dim (columns of the table)."""

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        return {"out": Axis((ParamSlice("weight", 1),), _set(embedding_dim=_size), produces=True)}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        assert isinstance(module, nn.Embedding)
        return Space(output.dim() - 1, graph.atoms(name, "out", module.embedding_dim))


class ChannelwiseRule(ChannelRule):
    """Layers that act per element or per channel plane: output channel i = input channel i."""

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim  # None: elementwise on any dim; 1: per channel plane (pooling)

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        space = inputs[0] if inputs else None
        if space is not None and self.dim is not None and space.dim != self.dim:
            graph.block(space, f"{name} ({type(module).__name__}) pools over the channel dim")
            return None
        return space


class SoftmaxRule(ChannelRule):
    """Softmax over a dim other than the channels' is channel-wise; over the channels it couples all."""

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        space = inputs[0] if inputs else None
        dim = getattr(module, "dim", None)
        if space is not None and (dim is None or dim % values[0].dim() == space.dim):
            graph.block(space, f"{name}: softmax across the channels")
            return None
        return space


class FlattenRule(ChannelRule):
    """nn.Flatten: merged dims are handled like `torch.flatten` (see `ops.reshape_space`)."""

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        from torchslim.graph.ops import reshape_space

        return reshape_space(graph, name, inputs[0] if inputs else None, values[0], output,
                             hardcoded=())


def _register_builtins() -> None:
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d):
        register_channel_rule(conv, ConvRule())
    register_channel_rule(nn.Linear, LinearRule())
    for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm):
        register_channel_rule(norm, NormRule())
    register_channel_rule(nn.Embedding, EmbeddingRule())
    elementwise: tuple[type[nn.Module], ...] = (
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
        nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
        nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
    for kind in elementwise:
        register_channel_rule(kind, ChannelwiseRule())
    planes: tuple[type[nn.Module], ...] = (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
    for kind in planes:
        register_channel_rule(kind, ChannelwiseRule(dim=1))
    register_channel_rule(nn.Softmax, SoftmaxRule())
    register_channel_rule(nn.LogSoftmax, SoftmaxRule())
    register_channel_rule(nn.Flatten, FlattenRule())


_register_builtins()
