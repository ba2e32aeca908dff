"""Trace a model into groups of coupled channels (`trace_channels`).

Why torch.fx: symbolic tracing gives every op with its exact arguments (the `dim` of a cat, the
shape a view asks for), and running the traced graph on the example inputs gives every tensor's
real shape, so channel mappings are computed, not guessed. Layers with a channel rule are traced
as single nodes (their forward is never looked into), which is also how models whose forward
fx cannot follow (Hugging Face BERT) are handled: a rule for the whole block. The autograd graph
(Torch-Pruning's choice) loses op arguments and needs shape heuristics; torch.export is slower
and specialises control flow the same way fx does.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from torchslim.errors import GraphError
from torchslim.graph import attention as _attention  # noqa: F401 - registers attention rules
from torchslim.graph.atoms import AtomTable, Member
from torchslim.graph.axes import Axis
from torchslim.graph.inherited import check_inherited_forward
from torchslim.graph.ops import _flat, propagate_op
from torchslim.graph.rules import Space, resolve_rule, rule_for

__all__ = ["ChannelGraph", "Group", "trace_channels"]


@dataclass
class Group:
    """Units (coupled channels) that share the same layers: pruned at one ratio, scored alike."""

    units: list[list[Member]]
    layers: tuple[tuple[str, str], ...]  # (module, axis) pairs touched

    @property
    def modules(self) -> list[str]:
        return sorted({m for m, _ in self.layers})


@dataclass
class ChannelGraph:
    """The traced model: axes, groups of removable units, and what was excluded and why."""

    axes: dict[tuple[str, str], Axis]
    sizes: dict[tuple[str, str], int]
    groups: list[Group]
    excluded: list[str] = field(default_factory=list)
    spaces: dict[str, Space] = field(default_factory=dict)  # fx node name -> its channels
    gm: torch.fx.GraphModule | None = None
    table: AtomTable | None = None

    def unit_of(self, atom: int) -> tuple[int, int] | None:
        """(group index, unit index) of the unit holding `atom`, or None (blocked / not removable)."""
        if self.table is None:
            return None
        if not hasattr(self, "_roots"):
            roots: dict[int, tuple[int, int]] = {}
            axes = self.table.axes()
            for g, group in enumerate(self.groups):
                for u, unit in enumerate(group.units):
                    m = unit[0]
                    roots[self.table.find(int(axes[(m.module, m.axis)][m.index]))] = (g, u)
            self._roots = roots
        return self._roots.get(self.table.find(int(atom)))


OUTPUT_KEEPS_SIZE = "the model's output keeps its size"


class _Tracer(torch.fx.Tracer):
    """fx tracing that evaluates a branch condition on the example inputs instead of giving up.

    Code such as `if pixel_values.shape[1] != self.num_channels: raise ...` (Hugging Face's vision
    models) or `for block in torch.split(...)` needs a real value while tracing. The graph traced
    so far computes it: it is run on the example inputs and the branch taken is recorded, as
    `torch.export` specializes on its example inputs. The graph serves only to map channels on
    those same inputs, so the specialization is exact for it.
    """

    def __init__(self, inputs: tuple[Any, ...]) -> None:
        super().__init__()
        self.inputs = inputs

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return rule_for(m) is not None or super().is_leaf_module(m, module_qualified_name)

    def _concrete(self, proxy: torch.fx.Proxy) -> Any:
        reads = _reads_values(proxy.node)
        if reads is not None:
            raise torch.fx.proxy.TraceError(
                f"the forward branches on the values of {reads}, not only on shapes")
        value = self._evaluate(proxy)
        if isinstance(value, torch.fx.Proxy):  # len() of it would evaluate again, without end
            raise torch.fx.proxy.TraceError(
                f"{proxy.node.name} cannot be evaluated on the example inputs while tracing")
        return value

    def _evaluate(self, proxy: torch.fx.Proxy) -> Any:
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.graph_copy(self.graph, env)
        graph.output(env[proxy.node])
        module = torch.fx.GraphModule(self.root, graph)
        # fx patches Module.__call__/__getattr__ while tracing; run the partial graph unpatched
        from torch.fx import _symbolic_trace as fx_trace

        patched = nn.Module.__call__, nn.Module.__getattr__
        nn.Module.__call__ = fx_trace._orig_module_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = fx_trace._orig_module_getattr  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                return module(*self.inputs)
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ConcreteProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return bool(self._concrete(obj))

    def keys(self, obj: torch.fx.Proxy) -> Any:
        if obj.node.op == "placeholder" and str(obj.node.target).startswith("**"):
            return []  # the root forward's own **kwargs: traced as given nothing, like the example
        return super().keys(obj)

    def iter(self, obj: torch.fx.Proxy) -> Any:
        return iter([obj[index] for index in range(len(self._concrete(obj)))])  # type: ignore[index]


SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_floating_point"}
SHAPE_METHODS = {"size", "dim", "numel", "is_floating_point", "is_contiguous"}


def _reads_values(node: torch.fx.Node) -> str | None:
    """The first node whose tensor values `node` depends on (not only its shape), or None.

    A branch on shapes is the same for every input of these shapes; a branch on values may go
    the other way on the next batch, so it is never specialized."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if (current.op == "call_function" and current.target is getattr
                and current.args[1] in SHAPE_ATTRIBUTES) or \
                (current.op == "call_method" and current.target in SHAPE_METHODS):
            continue  # metadata only: its input's values are not read
        if current.op in ("placeholder", "call_module", "get_attr"):
            return current.name
        stack.extend(current.all_input_nodes)
    return None


class _ConcreteProxy(torch.fx.Proxy):
    """A proxy that `int()`, `float()` and `len()` evaluate on the example inputs (padding
    arithmetic on shapes, as in Hugging Face's MobileNetV2)."""

    tracer: _Tracer

    def __int__(self) -> int:
        return int(self.tracer._concrete(self))

    def __index__(self) -> int:
        return int(self.tracer._concrete(self))

    def __float__(self) -> float:
        return float(self.tracer._concrete(self))

    def __len__(self) -> int:
        return len(self.tracer._concrete(self))


class _Coupler:
    """The `Coupling` the rules talk to: atoms per axis, unions, blocks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.table = AtomTable()
        self.axes: dict[tuple[str, str], Axis] = {}

    def atoms(self, module: str, axis: str, size: int) -> np.ndarray:
        if (module, axis) not in self.axes:
            layer = self.model.get_submodule(module)
            rule = rule_for(layer)
            known = rule.axes(layer) if rule is not None else {}
            if axis not in known:
                raise GraphError(f"the rule of {module} ({type(layer).__name__}) has no axis {axis!r}")
            self.axes[(module, axis)] = known[axis]
        return self.table.axis(module, axis, size, produces=self.axes[(module, axis)].produces)

    def couple(self, space: Space, atoms: np.ndarray) -> None:
        self.table.union(space.atoms, atoms)

    def block(self, spaces: Any, reason: str) -> None:
        for space in _flat(spaces):
            self.table.block(space.atoms, reason)


def _concrete_args(model: nn.Module, given: int) -> dict[str, Any]:
    """Defaults of forward's parameters not given as example inputs (e.g. `mask=None`)."""
    params = list(inspect.signature(model.forward).parameters.values())
    return {p.name: p.default for p in params[given:]
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def _symbolic(model: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    # A decorated forward (Hugging Face's `can_return_tuple`: `wrapper(self, *args, **kwargs)`)
    # hides its parameters from fx, which then hands the wrapper `None` for **kwargs: trace the
    # function it wraps (the decorator only reshapes the output), and put the class back after.
    cls: Any = type(model)
    decorated = cls.__dict__.get("forward")
    unwrapped = inspect.unwrap(decorated) if decorated is not None else None
    try:
        if unwrapped is not decorated:
            cls.forward = unwrapped
        graph = _Tracer(inputs).trace(model, concrete_args=_concrete_args(model, len(inputs)) or None)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... on dynamic code
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx: {exc or type(exc).__name__}. "
                         "Make the layer whose forward branches on tensor values a leaf with "
                         "register_channel_rule(ThatLayer, rule)") from exc
    finally:
        if unwrapped is not decorated:
            cls.forward = decorated
    return torch.fx.GraphModule(model, graph)


class _Propagator(torch.fx.Interpreter):
    """Runs the traced graph on real inputs and maps channels through every node."""

    def __init__(self, gm: torch.fx.GraphModule, coupler: _Coupler) -> None:
        super().__init__(gm)
        self.coupler = coupler
        self.spaces: dict[str, Any] = {}

    def _space_of(self, arg: Any) -> Any:
        return torch.fx.node.map_arg(arg, lambda n: self.spaces.get(n.name))

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        spaces = [self._space_of(a) for a in n.args]
        kw_spaces = {k: self._space_of(v) for k, v in n.kwargs.items()}
        self.spaces[n.name] = self._propagate(n, list(args), dict(kwargs), spaces, kw_spaces, out)
        return out

    def _propagate(self, n: torch.fx.Node, args: list[Any], kwargs: dict[str, Any],
                   spaces: list[Any], kw_spaces: dict[str, Any], out: Any) -> Any:
        coupler = self.coupler
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            tensors = [(s, v) for s, v in zip([*spaces, *kw_spaces.values()],
                                              [*args, *kwargs.values()], strict=True)]
            rule, parent = resolve_rule(module)
            refused = _refusal(str(n.target), module, rule, parent, [v for _, v in tensors], out)
            if refused is not None:
                coupler.block([s for s, _ in tensors], refused)
                if any(True for _ in module.parameters()):  # its own weights stay: named even when
                    coupler.table.reasons.append(refused)  # its inputs carry no tracked channels
                return None
            assert rule is not None  # _refusal names every module without one
            return rule.propagate(coupler, str(n.target), module, [s for s, _ in tensors],
                                  [v for _, v in tensors], out)
        if n.op in ("call_function", "call_method"):
            return propagate_op(coupler, n.target, n.name, args, kwargs, spaces, out)
        if n.op == "output":
            coupler.block(spaces, OUTPUT_KEEPS_SIZE)
        return None


def run_example(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """The model on its example inputs: one dict is keyword inputs (Hugging Face style)."""
    from torchslim.calibration import call_model

    return call_model(model, inputs[0]) if len(inputs) == 1 else model(*inputs)


def _propagate_root(model: nn.Module, rule: Any, coupler: _Coupler, inputs: tuple[Any, ...]) -> None:
    """Map the channels of a model whose own class has a rule: the rule sees it whole."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = run_example(model, inputs)
    finally:
        model.train(was_training)
    rule.propagate(coupler, "", model, [None] * len(inputs), list(inputs), out)


def _refusal(name: str, module: nn.Module, rule: Any, parent: Any, values: list[Any], out: Any) -> str | None:
    """Why a module is not traced through, if it is not: no rule for its class, or a subclass of
    a known layer whose own forward fails the check of `check_inherited_forward`."""
    kind = type(module).__name__
    if rule is None:
        return (f"{name} ({kind}) has no channel rule; it and its inputs are not pruned "
                f"(register_channel_rule({kind}, rule) to prune through it)")
    refused = None if parent is type(module) else check_inherited_forward(module, parent, values, out)
    if refused is None:
        return None
    return f"{name}: {refused}; it is not pruned (register_channel_rule({kind}, rule) to prune it)"


def _groups(table: AtomTable) -> list[Group]:
    by_layers: dict[tuple[tuple[str, str], ...], list[list[Member]]] = {}
    for unit in table.units():
        key = tuple(sorted({(m.module, m.axis) for m in unit}))
        by_layers.setdefault(key, []).append(sorted(unit, key=lambda m: (m.module, m.axis, m.index)))
    return [Group(units=sorted(units, key=lambda u: (u[0].module, u[0].axis, u[0].index)), layers=key)
            for key, units in by_layers.items()]


def trace_channels(model: nn.Module, example_inputs: Any, *, strict: bool = False) -> ChannelGraph:
    """Trace `model` on `example_inputs` (a tensor or tuple) into groups of coupled channels.

    Args:
        model: any module; layers with no rule and ops we cannot map are excluded, with a warning.
        example_inputs: what `model(*inputs)` is called with.
        strict: raise `GraphError` instead of excluding (and warning about) unmapped layers.

    Raises:
        GraphError: fx cannot trace the model, or (strict) a layer/op blocks channels.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> graph = trace_channels(net, torch.zeros(1, 3, 8, 8))
        >>> [(g.modules, len(g.units)) for g in graph.groups]
        [(['0', '1', '3'], 8)]
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    coupler = _Coupler(model)
    root_rule = rule_for(model)
    if root_rule is not None:  # a model with a rule of its own (transformers): one node, no fx
        gm, propagator = None, None
        _propagate_root(model, root_rule, coupler, inputs)
    else:
        gm = _symbolic(model, inputs)
        propagator = _Propagator(gm, coupler)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                propagator.run(*inputs)
        finally:
            model.train(was_training)
    excluded = list(dict.fromkeys(coupler.table.reasons))
    unexpected = [reason for reason in excluded if reason != OUTPUT_KEEPS_SIZE]  # that one is by design
    if unexpected and strict:
        raise GraphError("channels cannot be mapped through: " + "; ".join(unexpected))
    for reason in unexpected:
        warnings.warn(f"torchslim: channels excluded from pruning: {reason}", stacklevel=2)
    sizes = {key: len(atoms) for key, atoms in coupler.table.axes().items()}
    spaces = {k: v for k, v in propagator.spaces.items() if isinstance(v, Space)} if propagator else {}
    return ChannelGraph(axes=coupler.axes, sizes=sizes, groups=_groups(coupler.table),
                        excluded=excluded, spaces=spaces, gm=gm, table=coupler.table)
