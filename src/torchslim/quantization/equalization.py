"""Channel equalization for static int8: rescale the channels between two layers so that the
activation between them fills its per-tensor int8 grid.

Static int8 gives each activation tensor one grid (per-tensor uint8), and each weight one grid
per output channel. A channel whose values span 0.3 shares the grid of a channel spanning 6: it
gets 13 of the 256 levels. Between a layer A and the layer B that consumes A's output (through a
ReLU, a LeakyReLU, a ReLU6 or nothing) each channel c can carry a factor s_c: A's output row c
(weights and bias) divided by s_c, B's input column c multiplied by it, and the model computes
exactly what it computed (these activations commute with a positive scale).

This is Nagel et al. 2019's cross-layer equalization ("data-free quantization") adapted to the
grids the int8 program has: with per-channel weight scales the weights' own ranges no longer
need equalizing (a row's scale follows it), so the factors balance what still shares a grid,
measured on the calibration data:

- B depthwise (each output channel reads one input channel): its per-channel weight grid follows
  the factor for free, so every channel of the activation is brought to the widest one's range.
- B mixing channels (a 1x1 conv, a Linear): a column multiplied by s_c widens B's rows, so the
  factor balances the activation's range a_c against the column's weight range r_c,
  s_c = sqrt(a_c / r_c) (SmoothQuant's migration at strength 0.5).
- ReLU6 commutes with a factor only below its clip: a channel that reaches 6 on the calibration
  data keeps s_c = 1, and no channel is scaled past the clip (s_c >= a_c / 6), so the model is
  unchanged on the calibration data; the report counts the channels pinned this way.

Pairs are found by following tensors through one forward pass (A's output, its activation, B's
input), not by names, and each is checked: the model's output must stay the same with the pair
rescaled, else it is put back and reported (A's output used somewhere else too, e.g. a residual).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.calibration import call_model, first_samples, output_tensors
from torchslim.errors import ConfigError
from torchslim.quantization.primitives import sqnr_db
from torchslim.quantization.qat import fold_batchnorm_

__all__ = ["equalize_for_int8_"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity,  # f(x / s) * s == f(x) for every s > 0
               nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
               nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
CLIP = 6.0  # ReLU6's upper clip
SCALE_LIMITS = (1e-2, 1e2)  # no channel is moved by more than this either way
CHECK_SAMPLES = 8  # calibration samples each pair's check runs on
SEARCH_SAMPLES = 16  # calibration samples each pair's strength is chosen on
STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # migration strengths tried (and none: s_c = 1)


@dataclass
class _Pair:
    producer: str
    consumer: str
    between: tuple[nn.Module, ...]  # the modules between the two (activations, pooling, ...)


def equalize_for_int8_(model: nn.Module, batches: list[Any], *, exclude: tuple[str, ...] = (),
                       percentile: float | None = None) -> dict[str, Any]:
    """Fold BatchNorm, then equalize the channels of every Conv/Linear pair in place.

    Args:
        model: a float model (changed in place; it computes what it computed).
        batches: calibration inputs, batches of what the model takes (a tensor, a tuple, a dict
            of keyword inputs); each channel's range is its largest over all of them.
        exclude: module names left as they are (kept in float by the conversion).
        percentile: the activation ranges the conversion's calibration will keep (None: the
            whole observed range), for the simulation that picks each pair's strength.

    Returns:
        A report: per consumer layer, its producer, the activation between them, the spread of
        the activation's channel ranges (widest / median) before and after, the channels pinned
        by a ReLU6 clip; candidate pairs left as they were, each with the reason; and
        `float_sqnr_db`, the equalized model's output against the original's (SQNR, dB) on the
        calibration data, which only rounding should keep from infinity.

    Raises:
        ConfigError: no pair of layers the model can carry factors between.
    """
    if not batches:
        raise ConfigError("equalize needs calibration batches")
    folded = fold_batchnorm_(model)
    model.eval()
    reference = [output_tensors(_forward(model, batch)) for batch in batches]
    pairs, skipped, stats = _find_pairs(model, batches, exclude)
    check = first_samples(batches[0], CHECK_SAMPLES)
    search = first_samples(batches[0], SEARCH_SAMPLES)
    kept: dict[str, dict[str, Any]] = {}  # pairs where no factors simulated better
    expected = output_tensors(_forward(model, check))
    rows: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        producer = _scaled_module(model.get_submodule(pair.producer), pair.between)
        consumer = model.get_submodule(pair.consumer)
        reach, peak = stats[pair.producer]
        x = _input_of(model, consumer, search)
        if x is None:
            skipped[pair.consumer] = "its input was not one tensor on the search samples: left as it was"
            continue
        factors, pinned, strength, gain = _best_factors(consumer, x, reach, peak, percentile)
        if strength == 0.0:
            kept[pair.consumer] = {"producer": pair.producer,
                                   "reason": "no strength simulated a lower int8 error than none"}
            continue
        saved = [t.detach().clone() for t in _tensors(producer) + _tensors(consumer)]
        _rescale_(producer, consumer, factors)
        after = output_tensors(_forward(model, check))
        if not _same(expected, after):
            for tensor, value in zip(_tensors(producer) + _tensors(consumer), saved, strict=True):
                with torch.no_grad():
                    tensor.copy_(value)
            skipped[pair.consumer] = (f"rescaling its input channels with {pair.producer}'s output changed "
                                      f"the model's output ({pair.producer}'s output is used elsewhere "
                                      "too): left as it was")
            continue
        reached = reach / factors
        rows[pair.consumer] = {
            "producer": pair.producer,
            "through": [type(m).__name__ for m in pair.between],
            "scaled": "weights" if producer is model.get_submodule(pair.producer) else "BatchNorm",
            "channels": int(factors.numel()), "pinned_by_clip": pinned, "strength": strength,
            "simulated_error_ratio": round(gain, 4),
            "spread_before": _spread(reach), "spread_after": _spread(reached),
            "factor_range": [round(float(factors.min()), 4), round(float(factors.max()), 4)]}
    if not rows and kept:  # pairs there were, none worth rescaling: said, not silent
        warnings.warn(f"torchslim: equalize changed no layer of {type(model).__name__}: for each of its "
                      f"{len(kept)} pair(s) no factors simulated a lower int8 error (see the report's "
                      "'unchanged')", stacklevel=3)
    elif not rows:
        raise ConfigError(f"equalize found no pair of layers in {type(model).__name__} to rescale "
                          f"({len(skipped)} candidate(s): "
                          f"{'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3]) or 'none'}): "
                          "it needs a Conv/Linear whose output feeds another one directly or through "
                          "a ReLU, LeakyReLU or ReLU6; drop equalize")
    result = [output_tensors(_forward(model, batch)) for batch in batches]
    fidelity = min(sqnr_db(r, o) for rs, os in zip(reference, result, strict=True)
                   for r, o in zip(rs, os, strict=True))
    return {"pairs": rows, "unchanged": kept, "skipped": skipped, "folded_batchnorm": folded,
            "float_sqnr_db": round(fidelity, 1)}


def _forward(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return call_model(model, inputs)


def _same(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> bool:
    return len(expected) == len(actual) and all(
        torch.allclose(a, e, rtol=1e-3, atol=1e-4 * float(e.abs().max().clamp_min(1e-12)))
        for e, a in zip(expected, actual, strict=True))


def _find_pairs(model: nn.Module, batches: list[Any], exclude: tuple[str, ...]
                ) -> tuple[list[_Pair], dict[str, str], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """The (producer, what lies between, consumer) chains of the forward passes, the candidates
    refused with the reason, and per producer its channels' reach (abs max of what the consumer
    sees) and, where a ReLU6 lies between, its peak (the max entering the ReLU6, to tell which
    channels reach its clip)."""
    names: dict[nn.Module, str] = {m: n for n, m in model.named_modules() if isinstance(m, LAYERS) and n}
    calls: dict[str, int] = {}
    chains: dict[int, tuple[str, tuple[nn.Module, ...]]] = {}  # id(tensor) -> (layer, modules since)
    fed: dict[str, tuple[str, tuple[nn.Module, ...], int]] = {}  # consumer -> (producer, chain, input dims)
    entering: dict[tuple[str, int], torch.Tensor] = {}  # (layer, modules since): max of what enters next
    first_reach: dict[str, torch.Tensor] = {}  # a layer's own output
    reach: dict[tuple[str, int], torch.Tensor] = {}  # (layer, modules since): what they give

    def widest(into: dict[Any, torch.Tensor], key: Any, value: torch.Tensor) -> None:
        into[key] = torch.maximum(into[key], value) if key in into else value
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live

    def channel_max(x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.detach().abs().transpose(0, axis).reshape(x.shape[axis], -1).amax(1)

    def axis_of(module: nn.Module, x: torch.Tensor) -> int:
        return x.dim() - 1 if isinstance(module, nn.Linear) or x.dim() == 2 else 1

    def on_layer_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and id(x) in chains:
            producer, chain = chains[id(x)]
            fed.setdefault(names[module], (producer, chain, x.dim()))

    def on_layer_output(module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            chains[id(output)] = (name, ())
            keep_alive.append(output)
            axis = axis_of(module, output)
            widest(first_reach, name, channel_max(output, axis))

    def on_other_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and id(x) in chains and x.dim() >= 2:
            producer, chain = chains[id(x)]
            axis = axis_of(model.get_submodule(producer), x)  # before an in-place activation clips it
            widest(entering, (producer, len(chain)), channel_max(x.clamp_min(0), axis))

    def on_other(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and id(x) in chains and isinstance(output, torch.Tensor):
            producer, chain = chains[id(x)]
            chains[id(output)] = (producer, (*chain, module))
            keep_alive.append(output)
            if output.dim() >= 2:
                axis = axis_of(model.get_submodule(producer), output)
                widest(reach, (producer, len(chain) + 1), channel_max(output, axis))

    handles = [m.register_forward_pre_hook(on_layer_input) for m in names]
    handles += [m.register_forward_hook(on_layer_output) for m in names]
    leaves = [m for m in model.modules() if not isinstance(m, LAYERS) and not list(m.children())]
    handles += [m.register_forward_pre_hook(on_other_input) for m in leaves]
    handles += [m.register_forward_hook(on_other) for m in leaves]
    try:
        for batch in batches:
            _forward(model, batch)
            chains.clear()
            keep_alive.clear()
    finally:
        for handle in handles:
            handle.remove()
    pairs: list[_Pair] = []
    skipped: dict[str, str] = {}
    order = {name: i for i, name in enumerate(calls)}
    for consumer, (producer, chain, dims) in sorted(fed.items(), key=lambda item: order.get(item[0], 0)):
        reason = _refusal(model, producer, consumer, chain, dims, calls, len(batches), exclude)
        if reason:
            skipped[consumer] = reason
        else:
            pairs.append(_Pair(producer, consumer, chain))
    stats: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for pair in pairs:
        clip = next((i for i, m in enumerate(pair.between) if _is_relu6(m)), None)
        stats[pair.producer] = (reach.get((pair.producer, len(pair.between)), first_reach[pair.producer]),
                                None if clip is None else entering[(pair.producer, clip)])
    return pairs, skipped, stats


def _refusal(model: nn.Module, producer: str, consumer: str, chain: tuple[nn.Module, ...], dims: int,
             calls: dict[str, int], passes: int, exclude: tuple[str, ...]) -> str | None:
    """Why the pair cannot carry factors, or None."""
    a, b = model.get_submodule(producer), model.get_submodule(consumer)
    if producer in exclude or consumer in exclude:
        return f"{producer if producer in exclude else consumer} is excluded (kept in float)"
    if calls.get(producer) != passes or calls.get(consumer) != passes:
        return "a layer of the pair is called more than once per forward pass"
    if any(parametrize.is_parametrized(m, "weight") for m in (a, b)):
        return "a weight of the pair is computed by a parametrization (finalize it first)"
    between = [m for i, m in enumerate(chain) if not (_commutes(m) or (i == 0 and _is_affine_norm(m)))]
    if between:
        return (f"{type(between[0]).__name__} between {producer} and {consumer} does not commute with a "
                "per-channel scale (ReLU, LeakyReLU, ReLU6, pooling, Dropout and Flatten do)")
    if sum(_is_relu6(m) for m in chain) > 1:
        return "two clipping activations between the layers"
    if _out_channels(a) != _in_channels(b):
        return f"{producer} gives {_out_channels(a)} channels, {consumer} reads {_in_channels(b)}"
    if isinstance(b, nn.modules.conv._ConvNd) and b.groups not in (1, b.in_channels):
        return f"{consumer} is a grouped convolution ({b.groups} groups)"
    if isinstance(b, nn.modules.conv._ConvNd) and isinstance(a, nn.Linear):
        return "a Linear feeding a convolution: their channel axes differ"
    if isinstance(b, nn.Linear) and not isinstance(a, nn.Linear) and dims != 2:
        return f"{consumer} reads {producer}'s channels with other axes flattened into them"
    return None


def _is_affine_norm(module: nn.Module) -> bool:
    """An eval-mode BatchNorm with affine parameters: right after the producer, the factors go
    into its scale and shift instead (torch.fx could not fold it, e.g. after a custom forward)."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
            and not module.training and module.track_running_stats)


def _scaled_module(producer: nn.Module, between: tuple[nn.Module, ...]) -> nn.Module:
    """The module whose output channels carry the factors: the producer, or its BatchNorm."""
    return between[0] if between and _is_affine_norm(between[0]) else producer


def _commutes(module: nn.Module) -> bool:
    """Whether the module computes f(x / s) * s == f(x) for a positive per-channel s (ReLU6: below
    its clip, see `_factors`)."""
    if isinstance(module, HOMOGENEOUS) or _is_relu6(module):
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return not module.training
    return isinstance(module, nn.Flatten)


def _is_relu6(activation: nn.Module | None) -> bool:
    return isinstance(activation, nn.Hardtanh) and activation.min_val == 0.0 and activation.max_val == CLIP


def _out_channels(layer: nn.Module) -> int:
    return int(layer.get_parameter("weight").shape[0])


def _in_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    assert isinstance(layer, nn.modules.conv._ConvNd)
    return layer.in_channels


def _columns(consumer: nn.Module, channels: int) -> torch.Tensor:
    """The consumer's weight range per input channel."""
    weight = consumer.get_parameter("weight").detach()
    if isinstance(consumer, nn.modules.conv._ConvNd) and consumer.groups == channels and channels > 1:
        return weight.abs().reshape(channels, -1).amax(1)  # depthwise: channel c is row c
    return weight.abs().transpose(0, 1).reshape(channels, -1).amax(1)


def _factors(consumer: nn.Module, reach: torch.Tensor, peak: torch.Tensor | None, strength: float
             ) -> tuple[torch.Tensor, int]:
    """Each channel's factor s_c at a migration strength (see the module docstring) and how many
    a ReLU6 clip pinned."""
    channels = reach.numel()
    live = reach > reach.max() * 1e-6
    if _depthwise(consumer, channels):
        factors = (reach / reach.max()).pow(strength)
    else:
        columns = _columns(consumer, channels).clamp_min(1e-12)
        factors = reach.clamp_min(1e-12).pow(strength) / columns.pow(1 - strength)
        factors = factors * (reach / factors)[live].max() / reach.max()  # the widest stays as wide
    factors = torch.where(live, factors, torch.ones_like(factors)).clamp(*SCALE_LIMITS)
    pinned = 0
    if peak is not None:  # a ReLU6 lies between
        clipped = peak >= CLIP * (1 - 1e-6)
        pinned = int(clipped.sum())
        factors = torch.where(clipped, torch.ones_like(factors), torch.maximum(factors, peak / CLIP))
    return factors, pinned


def _depthwise(consumer: nn.Module, channels: int) -> bool:
    return isinstance(consumer, nn.modules.conv._ConvNd) and consumer.groups == channels and channels > 1


def _best_factors(consumer: nn.Module, x: torch.Tensor, reach: torch.Tensor, peak: torch.Tensor | None,
                  percentile: float | None) -> tuple[torch.Tensor, int, float, float]:
    """The factors among `STRENGTHS` (and none) whose int8 simulation of the consumer (its input on
    one per-tensor grid, its weight on per-channel grids) errs least on `x`: (factors, channels
    pinned by a clip, the strength, the error over the error without factors)."""
    from torchslim.quantization.layer_reconstruction import WEIGHT_LEVELS, _call, _fake_quantize, _grid

    generator = torch.Generator().manual_seed(0)
    axis = x.dim() - 1 if isinstance(consumer, nn.Linear) else 1
    view = [1] * x.dim()
    view[axis] = -1
    weight = consumer.get_parameter("weight").detach()
    depthwise = _depthwise(consumer, reach.numel())
    columns = [-1] + [1] * (weight.dim() - 1) if depthwise else [1, -1] + [1] * (weight.dim() - 2)
    with torch.no_grad():
        target = _call(consumer, x)

        def error(factors: torch.Tensor) -> float:
            scaled = weight * factors.reshape(columns)
            scale, units = _grid(scaled)
            codes = torch.clamp(torch.round(units), -WEIGHT_LEVELS, WEIGHT_LEVELS)
            quantized = _fake_quantize(x / factors.reshape(view), percentile, generator)
            return float((_call(consumer, quantized, codes * scale) - target).pow(2).mean())

        best = (torch.ones_like(reach), 0, 0.0, error(torch.ones_like(reach)))
        plain = best[3]
        for strength in STRENGTHS:
            factors, pinned = _factors(consumer, reach, peak, strength)
            if (found := error(factors)) < best[3]:
                best = (factors, pinned, strength, found)
    return best[0], best[1], best[2], best[3] / max(plain, 1e-30)


def _input_of(model: nn.Module, layer: nn.Module, batch: Any) -> torch.Tensor | None:
    """What `layer` reads in one forward pass of `batch`."""
    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and not seen:
            seen.append(args[0].detach().clone())

    handle = layer.register_forward_pre_hook(keep)
    try:
        _forward(model, batch)
    finally:
        handle.remove()
    return seen[0] if seen else None


def _tensors(layer: nn.Module) -> list[torch.Tensor]:
    bias = getattr(layer, "bias", None)
    return [layer.get_parameter("weight")] + ([bias] if isinstance(bias, torch.Tensor) else [])


def _rescale_(producer: nn.Module, consumer: nn.Module, factors: torch.Tensor) -> None:
    """Divide the producer's output channels by `factors`, multiply the consumer's inputs."""
    weight = producer.get_parameter("weight")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    with torch.no_grad():
        weight.div_(factors.reshape(shape).to(weight.dtype))
        bias = getattr(producer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(factors.to(bias.dtype))
        target = consumer.get_parameter("weight")
        channels = factors.numel()
        if (isinstance(consumer, nn.modules.conv._ConvNd) and consumer.groups == channels
                and channels > 1):
            target.mul_(factors.reshape((-1,) + (1,) * (target.dim() - 1)).to(target.dtype))
        else:
            target.mul_(factors.reshape((1, -1) + (1,) * (target.dim() - 2)).to(target.dtype))


def _spread(reach: torch.Tensor) -> float:
    """The widest channel's range over the median channel's: how much of the grid the typical
    channel is left with is 1 / spread."""
    live = reach[reach > reach.max() * 1e-6]
    return round(float(live.max() / live.median().clamp_min(1e-12)), 2) if live.numel() else 1.0

