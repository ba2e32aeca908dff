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

A norm layer is trusted no more than a name: `scalable_norms` first finds how the norm's output
follows its weight (y = n(x)·w + b, or Gemma's y = n(x)·(1 + w)), then rescales every norm with
its readers at once and runs the whole model; a norm whose output something else also reads (the
residual of a post-norm block, a layer left out of the targets) changes the output, and is left
unscaled, with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchslim.calibration import call_uncached, output_tensors
from torchslim.parametrized import original_weight

__all__ = ["divide_norm_", "divide_rows_", "fold_into_norm_", "readers_of", "scalable_norms",
           "scalable_pairs"]

WEIGHT, OFFSET = "weight", "offset"  # y = n(x)·w + b, and Gemma's y = n(x)·(1 + w)


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


@contextlib.contextmanager
def _restored(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Within it, `tensors` may be rescaled for a trial: they are put back exactly as they were."""
    saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)


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
            call_uncached(model, batch)
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
                s = torch.rand(modules[consumer].in_features, generator=generator) * 1.5 + 0.5
                with _restored([t for layer in pair for t in _tensors(layer)]):
                    _rescale_(*pair, s)
                    after = _first_tensor(module(*args, **kwargs))
                if after is not None and torch.allclose(after, before, rtol=1e-3,
                                                        atol=1e-4 * float(before.abs().max())):
                    pairs[consumer] = producer
                    break
    return pairs


def divide_norm_(norm: nn.Module, s: torch.Tensor, form: str) -> None:
    """Divide output channel j of a norm layer by s_j, in its `form` (see `norm_form`)."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        if form == OFFSET:  # (1 + w') = (1 + w) / s
            weight.copy_((1 + weight.float()) / s.float() - 1)
        else:
            weight.div_(s.to(weight.dtype))
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))


def _float_weight(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name)._parameters["weight"]
    assert isinstance(weight, torch.Tensor)
    return weight


def fold_into_norm_(model: nn.Module, norm: str, s: torch.Tensor, form: str,
                    float_readers: list[str]) -> None:
    """Divide the norm's output channel j by s_j (`divide_norm_`) and multiply column j of each
    float reader's weight (a router's, left in float) by s_j, so that it reads what it read."""
    divide_norm_(model.get_submodule(norm), s, form)
    with torch.no_grad():
        for name in float_readers:
            weight = _float_weight(model, name)
            weight.mul_(s[None, :].to(weight.dtype))


def _norm_tensors(norm: nn.Module) -> list[torch.Tensor]:
    return [t for t in (getattr(norm, "weight", None), getattr(norm, "bias", None))
            if isinstance(t, torch.Tensor)]


def norm_form(norm: nn.Module) -> str | None:
    """How a norm's output follows its weight, tried on random inputs: `"weight"` when dividing
    weight (and bias) by s divides the output by s, `"offset"` when the layer multiplies by
    (1 + weight) (Gemma's RMSNorm), None when neither holds."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.numel(), generator=generator).to(weight.dtype)
    s = torch.rand(weight.numel(), generator=generator) * 1.5 + 0.5
    try:
        with torch.no_grad():
            before = norm(x)
            if not isinstance(before, torch.Tensor):
                return None
            for form in (WEIGHT, OFFSET):
                with _restored(_norm_tensors(norm)):
                    divide_norm_(norm, s, form)
                    after = norm(x)
                if torch.allclose(after.float() * s, before.float(), rtol=1e-3,
                                  atol=1e-5 * float(before.abs().max()) + 1e-12):
                    return form
    except (RuntimeError, TypeError, ValueError):  # a norm that does not take (rows, width)
        return None
    return None


def _relative_change(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    if len(after) != len(before):
        return float("inf")
    worst = 0.0
    for a, b in zip(after, before, strict=True):
        if a.shape != b.shape:
            return float("inf")
        if b.is_floating_point():
            worst = max(worst, float((a - b).norm() / (b.norm() + 1e-12)))
    return worst


class _HeadReached(Exception):
    """The forward reached the output head: what it reads is the model's output for the check."""


def _output_head(model: nn.Module, readers: list[nn.Linear]) -> nn.Module | None:
    """A Hugging Face model's output head (`get_output_embeddings`), unless it reads a scaled norm
    itself (then its input changes by design, and only the logits can be compared)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module) or any(reader is head for reader in readers):
        return None
    return head


def _model_output(model: nn.Module, batch: Any, head: nn.Module | None) -> list[torch.Tensor]:
    """The model's outputs on `batch`; with an output `head`, the hidden states it reads (a
    language model's logits for one sequence can be 100 MB), the forward stopped there."""
    if head is None:
        return output_tensors(call_uncached(model, batch))
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach().float())
        raise _HeadReached

    handle = head.register_forward_pre_hook(stop)
    try:
        call_uncached(model, batch)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    return seen or output_tensors(call_uncached(model, batch))


def scalable_norms(model: nn.Module, sources: dict[str, str], modules: dict[str, nn.Linear], batch: Any,
                   float_readers: dict[str, list[str]] | None = None
                   ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Which of `sources` ({Linear: the norm producing its input}, Linears in `modules`) can carry
    their readers' input scales (see the module docstring): the model's output on `batch` must
    not change when every such norm is divided by random factors and its readers' columns
    multiplied by them (its `float_readers`' columns too: a router that stays float).

    Returns:
        ({Linear: norm} kept, {norm: its form for `divide_norm_`}, {Linear: why its norm is not}).
    """
    readers = readers_of(sources)
    forms, refused = {}, {}
    for name in readers:
        form = norm_form(model.get_submodule(name))
        if form is None:
            refused[name] = ("its output does not follow its weight as y = n(x)·w or y = n(x)·(1 + w), "
                             "so no scale can be folded into it")
        else:
            forms[name] = form
    generator = torch.Generator().manual_seed(0)
    factors = {name: torch.rand(modules[readers[name][0]].in_features, generator=generator) * 1.5 + 0.5
               for name in forms}
    head = _output_head(model, [modules[r] for n in forms for r in readers[n]])

    floats = float_readers or {}

    def change_when_scaled(names: list[str]) -> float:
        tensors = [t for n in names for t in _norm_tensors(model.get_submodule(n))
                   + [original_weight(modules[r]) for r in readers[n]]
                   + [_float_weight(model, f) for f in floats.get(n, [])]]
        with torch.no_grad(), _restored(tensors):
            for n in names:
                fold_into_norm_(model, n, factors[n], forms[n], floats.get(n, []))
                for reader in readers[n]:
                    weight = original_weight(modules[reader])
                    weight.mul_(factors[n][None, :].to(weight.dtype))
            return _relative_change(_model_output(model, batch, head), reference)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = _model_output(model, batch, head) if forms else []
        if forms and change_when_scaled(list(forms)) > 1e-3:  # a norm is read elsewhere: which?
            for name in [n for n in forms if change_when_scaled([n]) > 1e-3]:
                del forms[name]
                refused[name] = ("scaling it changes the model's output: something besides "
                                 f"{', '.join(readers[name])} reads it "
                                 "(the residual of a post-norm block, or a layer outside the targets)")
    finally:
        model.train(was_training)
    kept = {reader: norm for reader, norm in sources.items() if norm in forms}
    why = {reader: f"its input comes from {norm}, but {refused[norm]}"
           for reader, norm in sources.items() if norm in refused}
    return kept, forms, why


def readers_of(sources: dict[str, str]) -> dict[str, list[str]]:
    """{source: [readers]} from {reader: source}, readers in their order."""
    groups: dict[str, list[str]] = {}
    for reader, source in sources.items():
        groups.setdefault(source, []).append(reader)
    return groups
