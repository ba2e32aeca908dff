"""Post-training int8 quantization: one config, one call, a model that runs int8 kernels.

`quantize_model(model, Quantization(method="static"), calibration=batches)` exports the model,
quantizes it with onnxruntime (see `torchslim.runtime.onnx_program` for why that runtime) and
returns an `OrtModule`. Unlike `apply_`, this is a conversion, not an in-place edit: the result
is a different kind of module (an ONNX program), so it is returned and the float model is kept.
The report says which ops run in int8 and which stayed float (never a float model called int8).
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import first_samples, take_inputs
from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError, SelectionError
from torchslim.fused_experts import fused_experts, routers, unfuse_experts_
from torchslim.runtime.onnx_program import (
    OrtModule,
    PackedInputs,
    export_onnx,
    nodes_of_modules,
    optimize_onnx,
    pack_inputs,
    packable_keys,
    quantize_onnx,
)
from torchslim.select import unselectable_weight_layers
from torchslim.signature import record_signature_

__all__ = ["Backend", "Calibrate", "QuantMethod", "Quantization", "float_program", "quantize_model"]


class QuantMethod(StrEnum):
    DYNAMIC = "dynamic"  # int8 weights; activations quantized per batch at run time
    STATIC = "static"  # int8 weights and calibrated int8 activations (QDQ)


class Backend(StrEnum):
    ONNXRUNTIME = "onnxruntime"  # measured fastest: the default
    TORCH = "torch"  # stays a PyTorch module: dynamic int8 Linear on torch._int_mm


class Calibrate(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"  # KL divergence (TensorRT-style)
    PERCENTILE = "percentile"


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Quantization(TechniqueConfig):
    """Int8 post-training quantization executed by onnxruntime.

    Attributes:
        method: dynamic | static.
        bits: weight/activation width; the int8 kernels need 8.
        per_channel: one weight scale per output channel (else per tensor).
        calibrate: how static activation ranges are chosen: minmax | entropy (KL divergence,
            2048 histogram bins) | percentile.
        percentile: with `calibrate="percentile"`, the percentile of the observed activations
            kept as the range (the rest is clipped); None: 99.999; on MobileNetV2, 99.99
            kept more top-1 agreement (see the quantization page).
        calibration_batches: batches of the training split used to calibrate.
        backend: onnxruntime (an ONNX program: Linear and Conv; LSTM with `dynamic`, on
            onnxruntime's DynamicQuantizeLSTM kernel) or torch (dynamic only: Linear layers on
            `torch._int_mm`). Layers without an int8 kernel on the chosen path (GRU and RNN
            always, LSTM under `static`, recurrent layers on torch) stay float and are listed in
            the result's `report["float_ops"]`.
        exclude: layers kept in float, by module name or glob (`["lstm.0", "head.*"]`): e.g. a
            first layer whose raw inputs per-tensor int8 cannot represent. Each must match a
            module; onnxruntime backend only.
        fp16: layers kept out of int8 like `exclude`, their weights stored as float16 (half the
            bytes of float; computed in float).
        adaround: static only: learn whether each weight rounds up or down so that each layer
            reproduces the float model's output on the calibration data, given the int8 input
            the layers before it produce (AdaRound, Nagel et al. 2020; see
            `layer_reconstruction`). Slower to convert, same int8 program and speed.
        bias_correction: static only: subtract each output channel's mean int8 error on the
            calibration data through the layer's bias (Nagel et al. 2019).
        adaround_iterations: optimisation steps per layer for `adaround`.
        equalize: static only: before anything else, rescale the channels between each pair
            of consecutive layers (through ReLU/ReLU6/pooling) so that the activation between
            them fills its per-tensor int8 grid (cross-layer equalization, Nagel et al. 2019,
            balanced for per-channel weights; see `equalization`). The model computes the same.
        range_search: static only: each Conv/Linear input's int8 range minimises its rounding
            and clipping error weighted by how much the model's output moves with each value
            (estimated from output gradients on the calibration data; see `range_search`), in
            place of the calibrated range. Reported under "range_search".
        sensitivity: static only: a budget, the share of the model (0-1) that may stay float;
            each layer's int8 cost is measured (the model's output SQNR with only that layer's
            weights rounded) and the worst are kept in float, worst first, while their cost fits:
            the larger of their share of the multiply-adds and of the activation values moved
            (see `sensitivity`). Reported under "sensitivity".
    """

    kind = "quantize"
    converts = True

    method: QuantMethod = QuantMethod.DYNAMIC
    bits: int = Field(default=8, ge=2, le=8)
    per_channel: bool = True
    calibrate: Calibrate = Calibrate.MINMAX
    percentile: float | None = Field(default=None, gt=50, le=100)
    calibration_batches: int = Field(default=8, ge=1)
    backend: Backend = Backend.ONNXRUNTIME
    exclude: tuple[str, ...] = ()
    fp16: tuple[str, ...] = ()
    adaround: bool = False
    bias_correction: bool = False
    adaround_iterations: int = Field(default=300, ge=1)
    equalize: bool = False
    range_search: bool = False
    sensitivity: float | None = Field(default=None, gt=0, le=1)

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ConfigError(f"bits={self.bits}: the int8 kernels that execute {self.method.value} "
                              "quantization are 8-bit; use bits=8")
        if self.percentile is not None and self.calibrate != Calibrate.PERCENTILE:
            raise ConfigError(f"percentile={self.percentile} is used by calibrate='percentile' only "
                              f"(calibrate={self.calibrate.value!r}); set calibrate='percentile' or drop it")
        if ((self.adaround or self.bias_correction or self.equalize or self.range_search
                or self.sensitivity is not None) and self.method != QuantMethod.STATIC):
            raise ConfigError("equalize, range_search, sensitivity, adaround and bias_correction fit "
                              "the model to calibrated int8 activations: they need method='static', not "
                              f"{self.method.value!r}")
        if self.backend == Backend.TORCH and self.method != QuantMethod.DYNAMIC:
            raise ConfigError("backend torch runs dynamic int8 only; use backend onnxruntime for "
                              f"{self.method.value}")


def quantize_model(model: nn.Module, config: Quantization, *, example_inputs: torch.Tensor,
                   calibration: Iterable[Any] | None = None,
                   input_ranges: dict[str, tuple[float, float]] | None = None) -> nn.Module:
    """An int8 model computing what `model` computes: an `OrtModule` (onnxruntime backend) or
    a copy of `model` with `Int8DynamicLinear` layers (torch backend).

    Args:
        model: the float model (left unchanged).
        config: the quantization options.
        example_inputs: one input batch (shapes and dtypes for export).
        calibration: a `Calibration` or any iterable of batches (tensors, `(x, y)` pairs, a
            DataLoader); static only; at most `config.calibration_batches` are read.
        input_ranges: static, onnxruntime: module name -> (min, max) of its input, used in
            place of the calibrated range (`convert_qat` passes the ranges QAT trained with).

    Raises:
        ConfigError: static without calibration data, or nothing quantizable.
        UnsupportedModuleError: the model cannot be exported.
    """
    from torchslim.measure import count_flops, count_params

    if config.backend == Backend.TORCH:
        if config.exclude or config.fp16:
            raise ConfigError("exclude= and fp16= are supported by the onnxruntime backend; drop "
                              "backend='torch'")
        return _torch_dynamic(model, config)
    kept = excluded_modules(model, config.exclude)
    routing = [name for name in routers(model) if name not in kept]  # float: int8 logits pick other experts
    exclude, kept = config.exclude + tuple(routing), kept + routing
    halved = excluded_modules(model, config.fp16)
    _warn_dynamic_convolutions(model, config, kept + halved)
    batches = None
    if config.method == QuantMethod.STATIC:
        batches = take_inputs(calibration, config.calibration_batches)
    reconstruction, ranges, equalization, sensitivity, searched = None, None, None, None, None
    output_ranges: dict[str, tuple[float, float]] | None = None
    if batches and config.equalize:
        model, equalization = _equalized(model, batches, kept + halved)
    if batches and config.range_search:
        from torchslim.quantization.range_search import output_aware_ranges

        found, output_ranges, searched = output_aware_ranges(model, batches)
        input_ranges = {**found, **(input_ranges or {})}  # ranges the caller gives win
    floating = exclude  # module names and globs the program keeps in float
    if batches and config.sensitivity is not None:
        sensitive, sensitivity = _most_sensitive(model, config, batches, kept + halved)
        kept, floating = kept + sensitive, floating + tuple(sensitive)
    if batches and (config.adaround or config.bias_correction):
        ranges = Path(tempfile.mkdtemp(prefix="torchslim-ranges-")) / "ranges.json"
        try:
            model, reconstruction = _reconstructed(model, config, batches, kept + halved, floating,
                                                   example_inputs, ranges, input_ranges, output_ranges)
        except BaseException:
            shutil.rmtree(ranges.parent, ignore_errors=True)
            raise
    transformer = _transformer_shape(model)
    keys = packable_keys(example_inputs)  # keyword inputs (Hugging Face): one packed program input
    halves, given = config.fp16, input_ranges
    if keys is not None:
        batches = None if batches is None else [pack_inputs(b, keys) for b in batches]
        assert isinstance(example_inputs, dict)
        program = _export(PackedInputs(model, keys), pack_inputs(example_inputs, keys), transformer)
        # the wrapper holds the model as `model`: its layers are exported as "/model/..."
        floating, halves = (tuple(f"model.{p}" for p in floating), tuple(f"model.{p}" for p in halves))
        given = None if input_ranges is None else {f"model.{n}": r for n, r in input_ranges.items()}
        output_ranges = None if output_ranges is None else {f"model.{n}": r for n, r in output_ranges.items()}
    else:
        program = _export(model, example_inputs, transformer)
    try:
        quantized, report = quantize_onnx(program, method=config.method.value, calibration=batches,
                                          per_channel=config.per_channel, calibrate=config.calibrate.value,
                                          percentile=config.percentile, transformer=transformer,
                                          exclude=floating, fp16=halves, ranges_cache=ranges,
                                          input_ranges=given, output_ranges=output_ranges)
    finally:
        if ranges is not None:
            shutil.rmtree(ranges.parent, ignore_errors=True)
    for key in ("input_ranges", "output_ranges"):
        if keys is not None and key in report:  # the user's names, not the wrapper's
            missed = report[key]["not_applied"].items()
            report[key]["not_applied"] = {name.removeprefix("model."): why for name, why in missed}
    if kept or halved:
        chosen = set(sensitivity["kept_float"]) if sensitivity else set()
        report["excluded"] = {**{name: ("kept in float by sensitivity=" if name in chosen else
                                        "kept in float: a mixture-of-experts router (int8 logits send "
                                        "tokens to other experts)" if name in routing else
                                        "kept in float by exclude=") for name in kept},
                              **{name: "kept in float16 by fp16=" for name in halved}}
        prefix = "model." if keys is not None else ""
        for name in report["excluded"]:  # said, where the program has no node of it
            if not nodes_of_modules(program, (prefix + name,)):
                report["excluded"][name] = "not in the int8 program: the exported graph does not use it"
    if sensitivity is not None:
        report["sensitivity"] = sensitivity
    if searched is not None:
        report["range_search"] = searched
    if equalization is not None:
        report["equalization"] = equalization
    if reconstruction is not None:
        report["reconstruction"] = reconstruction
    flops = count_flops(model, first_samples(example_inputs, 1))
    result = OrtModule(quantized, weight_count=count_params(model)[0], flops=flops, input_keys=keys)
    result.report = {"backend": "onnxruntime", "method": config.method.value,
                     "config": config.to_dict(), **report}
    spec = getattr(model, "torchslim_spec", None)
    if spec is not None:
        result.torchslim_spec = spec
    else:  # any module: the file says which class it came from (information only)
        setattr(result, "torchslim_source_class",  # noqa: B010
                f"{type(model).__module__}.{type(model).__qualname__}")
    record_signature_(result, example_inputs)
    return result.eval()


def _reconstructed(model: nn.Module, config: Quantization, batches: list[Any], kept: list[str],
                   floating: tuple[str, ...], example_inputs: Any, ranges: Path,
                   input_ranges: dict[str, tuple[float, float]] | None = None,
                   output_ranges: dict[str, tuple[float, float]] | None = None
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with AdaRound weights and/or corrected biases, and its report.

    The program of the model as it is shows where and on which grids the int8 program quantizes
    activations; the simulation the weights are fitted in uses the same, and the adjusted
    model's program keeps them (its activation ranges are read from `ranges`, written here):
    re-measured on the adjusted model, percentile ranges moved enough to lose the gain.
    """
    import copy

    from torchslim.quantization.layer_reconstruction import program_grids, reconstruct_for_int8_

    if not all(isinstance(b, torch.Tensor) for b in batches):
        raise ConfigError("adaround / bias_correction take calibration batches of one input tensor "
                          f"(got {type(batches[0]).__name__}); models with keyword inputs: drop them")
    percentile = _simulated_percentile(config)
    program = _export(model, example_inputs, _transformer_shape(model))
    plain, _ = quantize_onnx(program, method=config.method.value, calibration=batches,
                             per_channel=config.per_channel, calibrate=config.calibrate.value,
                             percentile=config.percentile, exclude=floating, fp16=config.fp16,
                             ranges_cache=ranges, input_ranges=input_ranges, output_ranges=output_ranges)
    clone = copy.deepcopy(model)
    report = reconstruct_for_int8_(clone, torch.cat(batches), adaround=config.adaround,
                                   bias_correction=config.bias_correction,
                                   iterations=config.adaround_iterations, percentile=percentile,
                                   exclude=tuple(kept), grids=program_grids(plain))
    return clone, report


def _equalized(model: nn.Module, batches: list[Any], kept: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with its channels equalized for int8 (see `equalization`), and its report."""
    import copy

    from torchslim.quantization.equalization import equalize_for_int8_

    clone = copy.deepcopy(model)
    return clone, equalize_for_int8_(clone, batches, exclude=tuple(kept))


def _most_sensitive(model: nn.Module, config: Quantization, batches: list[Any], kept: list[str]
                    ) -> tuple[list[str], dict[str, Any]]:
    """The layers `config.sensitivity` keeps in float, and the report of every layer's cost."""
    import copy

    from torchslim.quantization.qat import fold_batchnorm_
    from torchslim.quantization.sensitivity import int8_sensitivity, keep_most_sensitive

    assert config.sensitivity is not None
    folded = copy.deepcopy(model)  # onnxruntime folds BatchNorm into the weights before rounding them
    fold_batchnorm_(folded)
    layers = int8_sensitivity(folded, batches, per_channel=config.per_channel, exclude=tuple(kept))
    chosen = keep_most_sensitive(layers, config.sensitivity)
    return chosen, {"budget": config.sensitivity, "kept_float": chosen,
                    "float_cost": round(sum(layers[n].cost for n in chosen), 4),
                    "float_macs_share": round(sum(layers[n].macs_share for n in chosen), 4),
                    "layers": {name: {"sqnr_db": s.sqnr_db, "macs_share": s.macs_share,
                                      "traffic_share": s.traffic_share} for name, s in layers.items()}}


def _simulated_percentile(config: Quantization) -> float | None:
    """The percentile of activations the conversion's ranges keep, for the torch simulations
    (None: the whole range; entropy ranges are not simulated: the observed range stands in)."""
    if config.calibrate != Calibrate.PERCENTILE:
        return None
    from torchslim.runtime.onnx_program import DEFAULT_PERCENTILE

    return config.percentile or DEFAULT_PERCENTILE


def excluded_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The module names `patterns` keep in float; a pattern matching no module is an error."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise SelectionError(f"exclude {unmatched} matched no module; modules are: {', '.join(names[:20])}")
    return [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]


def _warn_dynamic_convolutions(model: nn.Module, config: Quantization, kept: list[str]) -> None:
    """Dynamic int8 convolutions (ConvInteger) run slower than fp32 on CPU: say so, with the fix."""
    if config.method != QuantMethod.DYNAMIC:
        return
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
             and not any(name == k or name.startswith(k + ".") for k in kept)]
    if convs:
        warnings.warn(f"torchslim: dynamic int8 quantizes {len(convs)} convolution(s) ({', '.join(convs[:4])}"
                      f"{', ...' if len(convs) > 4 else ''}) into ConvInteger, measured 2.7-3x slower than "
                      "fp32 on CPU; use method='static' for convolutional models, or exclude= them",
                      stacklevel=3)


def _transformer_shape(model: nn.Module) -> tuple[int, int] | None:
    """(heads, attention width) when the model holds a Hugging Face BERT encoder, else None.

    Read from the attention layers, not the config: structured pruning removes heads and leaves
    the config as it was. Layers pruned to different widths: None (no fused attention).
    """
    for module in model.modules():
        config: Any = getattr(module, "config", None)
        if getattr(config, "model_type", None) == "bert":
            attention: list[Any] = [m for m in module.modules() if hasattr(m, "attention_head_size")]
            shapes = {(int(m.num_attention_heads), int(m.all_head_size)) for m in attention}
            return shapes.pop() if len(shapes) == 1 else None
    return None


def _export(model: nn.Module, example_inputs: torch.Tensor,
            transformer: tuple[int, int] | None) -> bytes:
    return export_onnx(_eager_attention(model) if transformer else model, example_inputs)


def float_program(model: nn.Module, example_inputs: torch.Tensor) -> OrtModule:
    """The fp32 model on onnxruntime with the graph optimisations the int8 path applies, so
    benchmarks can tell the runtime's gain from quantization's."""
    transformer = _transformer_shape(model)
    program = _export(model, example_inputs, transformer)
    if transformer is not None:
        program = optimize_onnx(program, transformer=transformer)
    return OrtModule(program)


def _eager_attention(model: nn.Module) -> nn.Module:
    """A copy whose BERT attention is the explicit matmul-softmax form, which onnxruntime's
    transformer optimizer recognises and fuses (the SDPA export it does not)."""
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        switch: Any = getattr(module, "set_attn_implementation", None)
        if getattr(getattr(module, "config", None), "model_type", None) == "bert" and switch:
            switch("eager")
    return clone


def _torch_dynamic(model: nn.Module, config: Quantization) -> nn.Module:
    import copy

    from torchslim.quantization.torch_int8 import quantize_linears_int8_

    result = copy.deepcopy(model).eval()
    fused = unfuse_experts_(result, list(fused_experts(result)))  # each expert an int8 Linear too
    try:
        replaced = quantize_linears_int8_(result)["replaced"]
    except SelectionError:
        replaced = []
    if not replaced:
        raise ConfigError(f"{type(model).__name__} has no Linear layer: the torch backend has "
                          "nothing to run in int8; use backend onnxruntime (Linear and Conv)")
    # Weight-bearing layers this backend has no int8 kernel for: named, never silently float.
    float_layers = {n: m for n, m in result.named_modules()
                    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear | nn.RNNBase)}
    left = [f"{type(m).__name__} {n}" for n, m in float_layers.items()]
    left += [f"{n}: {why}" for n, why in {**unselectable_weight_layers(result), **fused}.items()
             if n not in float_layers]  # a router's matrix, experts left fused
    setattr(result, "report", {  # noqa: B010 - a plain attribute on the module
        "backend": "torch", "method": "dynamic", "config": config.to_dict(),
        "int8_ops": {"Int8DynamicLinear (torch._int_mm)": len(replaced)}, "float_ops": left})
    return result
