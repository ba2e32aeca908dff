"""SmoothQuant (Xiao et al. 2023): W8A8 for language models, outliers moved from activations to weights.

A language model's activations have a few input channels 10-100x larger than the rest, so one
int8 scale per token spends almost all its range on them and rounds the others to nothing. The
weights have no such channels. SmoothQuant divides each input channel j of a Linear's input by
s_j = max|X_j|^α / max|W_:,j|^(1-α) and multiplies the weight's column j by the same s_j: the
product is unchanged, and `α` sets how much of the difficulty moves to the weights (0.5 in the
paper). The division is folded into the normalization layer that produces the input (LayerNorm or
RMSNorm weight and bias), so it costs nothing at run time.

Pairs are found by observation, not by architecture tables: during one calibration pass, a
Linear whose input *is* the output tensor of a norm layer (its class name ends in `Norm`, with a
1-D weight) is smoothed through that norm, once the whole model's output is seen not to change
when that norm and its readers are rescaled (`scalable_norms`: Gemma's (1 + w) norms are folded in
their own form; a post-norm block's LayerNorm, whose output is also the residual, is refused);
every other Linear is quantized unsmoothed, and named with the reason. All selected Linears then
run as `Int8DynamicLinear` (int8 weights per output row, int8 activations per token,
`torch._int_mm`).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import batch_size_of, call_uncached, first_samples
from torchslim.config import TechniqueConfig, validated
from torchslim.fused_experts import UnfusedExperts
from torchslim.heap import return_freed_memory
from torchslim.layerwise import layerwise_job, returning_memory_per_block
from torchslim.parametrized import original_weight
from torchslim.quantization.scalable_pairs import fold_into_norm_, readers_of, scalable_norms
from torchslim.quantization.torch_int8 import quantize_linears_int8_
from torchslim.registry import register_technique
from torchslim.select import Select

__all__ = ["SmoothQuant", "observe_inputs", "smoothquant_"]


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class SmoothQuant(TechniqueConfig):
    """Smooth activation outliers into the weights, then run the Linears in int8 (W8A8).

    Attributes:
        alpha: migration strength in [0, 1]: 0 leaves activations as they are, 1 moves all
            their range into the weights.
        calibration_batches: calibration batches read for the activation maxima.
    """

    kind = "smoothquant"
    structural = True
    selects_layers = True

    alpha: float = Field(default=0.5, ge=0, le=1)
    calibration_batches: int = Field(default=32, ge=1)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.dim() == 1


class _SeenAll(Exception):
    """Every observed Linear has run: the rest of the forward (a language model's head and its
    logits, often larger than the model) is not needed."""


def _float_reader(module: nn.Module) -> bool:
    """A module computing x Wᵀ with a raw 2-D `weight` of its own, not a Linear (a mixture-of-
    experts router, `Qwen3MoeTopKRouter`): it stays float, and a norm's scales can be folded
    into its columns too."""
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.is_floating_point() \
        and not isinstance(module, nn.Linear | nn.Embedding) and not _is_norm(module)


@torch.no_grad()
def observe_inputs(model: nn.Module, layers: list[tuple[str, nn.Linear]], batches: list[Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[str]]]:
    """Per-input-channel max |x| of each Linear, the norm whose output each Linear reads, and the
    float readers of each norm (routers: see `_float_reader`).

    A Linear reads a norm when its input is the norm's output tensor. An expert's Linear
    (`UnfusedExperts`) reads the rows routed to it: it reads the norm whose output (or a view of
    it) its experts module was called with; so does a router called with such a view.

    One sequence of the first batch runs first (the batch itself when it holds one) and shows
    the structure; when it calls every Linear exactly once, each batch's forward stops after the
    last of them.
    """
    maxima: dict[str, torch.Tensor] = {}
    # id of a norm's output tensor -> (the norm's name, a weak reference to that output): an id
    # alone is reused by a later tensor once the output is freed, which then passed for the norm's
    produced: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
    fed_by: dict[str, set[str | None]] = {name: set() for name, _ in layers}
    calls: dict[str, int] = {}
    stop_when_all_seen = False
    handles = []
    experts = {f"{name}.first.{e}": name for name, module in model.named_modules()
               if isinstance(module, UnfusedExperts) for e in range(module.num_experts)}
    routed: dict[str, str | None] = {}  # experts module -> the norm its tokens came from
    floats: dict[str, set[str | None]] = {}

    def norm_output(_m: nn.Module, _args: tuple[Any, ...], out: Any, n: str) -> None:
        if isinstance(out, torch.Tensor):  # a norm returning more than its output scales nothing
            produced[id(out)] = (n, weakref.ref(out))

    def output_of(x: Any) -> str | None:  # the norm whose output `x` is
        source, output = produced.get(id(x), (None, None))
        return source if output is not None and output() is x else None

    def view_of(x: Any) -> str | None:  # ... or whose output `x` reshapes (rows of channels kept)
        if not isinstance(x, torch.Tensor) or not x.is_contiguous():
            return None
        for source, output in produced.values():
            held = output()
            if held is not None and held.is_contiguous() and held.data_ptr() == x.data_ptr() \
                    and held.numel() == x.numel() and held.shape[-1] == x.shape[-1]:
                return source
        return None

    def experts_input(_m: nn.Module, args: tuple[Any, ...], n: str) -> None:
        routed[n] = view_of(args[0]) if args else None

    def float_input(m: nn.Module, args: tuple[Any, ...], n: str) -> None:  # x Wᵀ reads W's columns
        weight = m._parameters["weight"]
        reads = bool(args) and isinstance(args[0], torch.Tensor) and weight is not None \
            and weight.shape[1] == args[0].shape[-1]
        floats.setdefault(n, set()).add(view_of(args[0]) if reads else None)

    for name, module in model.named_modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(partial(norm_output, n=name)))
        elif isinstance(module, UnfusedExperts):
            handles.append(module.register_forward_pre_hook(partial(experts_input, n=name)))
        elif _float_reader(module):
            handles.append(module.register_forward_pre_hook(partial(float_input, n=name)))
    for name, layer in layers:
        def record(_m: nn.Module, args: tuple[Any, ...], n: str = name) -> None:
            x = args[0]
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            maxima[n] = torch.maximum(maxima[n], peak) if n in maxima else peak
            fed_by[n].add(routed.get(experts[n]) if n in experts else output_of(x))
            calls[n] = calls.get(n, 0) + 1
            if stop_when_all_seen and len(calls) == len(layers):
                raise _SeenAll
        handles.append(layer.register_forward_pre_hook(record))
    was_training = model.training
    model.eval()
    try:  # freed pages go back after each block and each forward: see `torchslim.heap`
        with returning_memory_per_block(model):
            single = batch_size_of(batches[0]) == 1  # the first batch is its own probe
            for index, inputs in enumerate(batches if single else [first_samples(batches[0], 1), *batches]):
                produced.clear()
                calls.clear()
                try:
                    call_uncached(model, inputs)
                except _SeenAll:
                    continue
                finally:
                    return_freed_memory()
                if index == 0:  # layers called in a loop or not at all: every forward runs to its end
                    stop_when_all_seen = len(calls) == len(layers) and set(calls.values()) == {1}
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    norms = {name: next(iter(sources)) for name, sources in fed_by.items()
             if len(sources) == 1 and None not in sources}
    float_readers: dict[str, list[str]] = {}
    for name, sources in floats.items():
        if len(sources) == 1 and None not in sources:
            float_readers.setdefault(str(next(iter(sources))), []).append(name)
    return maxima, {name: str(norm) for name, norm in norms.items()}, float_readers


def smoothquant_(model: nn.Module, config: SmoothQuant, *, targets: Select,
                 calibration: Any = None) -> dict[str, Any]:
    """Handler of `SmoothQuant`."""
    job = layerwise_job(model, targets, calibration, "smoothquant", replaces=True)
    layers, skipped, batches = job.layers, job.skipped, job.batches
    maxima, norms, float_readers = observe_inputs(model, layers, batches)
    modules = dict(layers)
    norms, forms, behind = scalable_norms(model, norms, modules, first_samples(batches[0], 1), float_readers)
    unsmoothed = {name: f"int8 without smoothing: {why}" for name, why in behind.items()}
    groups = readers_of(norms)
    with torch.no_grad():
        for norm_name, names in groups.items():
            activation = torch.stack([maxima[n] for n in names]).amax(0).clamp(min=1e-5)
            weight_max = torch.stack([original_weight(modules[n]).abs().amax(0) for n in names]
                                     ).amax(0).float().clamp(min=1e-5)
            scale = (activation.pow(config.alpha) / weight_max.pow(1 - config.alpha)).clamp(min=1e-5)
            fold_into_norm_(model, norm_name, scale, forms[norm_name], float_readers.get(norm_name, []))
            for name in names:
                original_weight(modules[name]).mul_(scale[None, :].to(original_weight(modules[name]).dtype))
    unsmoothed |= {name: "int8 without smoothing: its input is not the output of a norm layer"
                   for name, _ in layers if name not in norms and name not in unsmoothed}
    return_freed_memory()  # the observation's and smoothing's pages, before the int8 copies are made
    replaced = quantize_linears_int8_(model, targets=Select(names=tuple(n for n, _ in layers)))
    return {**replaced, "smoothed": {norm: names for norm, names in groups.items()},
            "unsmoothed": unsmoothed, "skipped": {**skipped, **replaced["skipped"]}, "alpha": config.alpha}


register_technique(SmoothQuant, smoothquant_)
