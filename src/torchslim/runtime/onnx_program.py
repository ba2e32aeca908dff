"""Real int8 execution on CPU through ONNX Runtime: export, quantize, run.

Why ONNX Runtime: measured on this class of machine (2 threads, MiniLM-shaped encoder, batch 1,
seq 128, vs fp32 PyTorch eager in the same run) its int8 kernels gave 2.15x (dynamic) and 1.8x
(static QDQ), against 1.5x for the deprecated `torch.ao` dynamic path, 1.46x for torchao PT2E
with inductor, and ~20x *slower* for torchao int8 dynamic without freezing. `torch.ao` is
deprecated, so the main path is: export the fp32 model to ONNX, let onnxruntime's quantizer
rewrite it (dynamic: int8 weights, activations quantized per batch; static: QDQ with
calibrated activation ranges, per-channel weights), and run it with `OrtModule`, an
`nn.Module` whose forward calls the InferenceSession, so evaluation, benchmarks and artifacts
treat it like any model.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.fused_experts import traceable_experts

__all__ = [
    "KeywordCall",
    "OrtModule",
    "PackedInputs",
    "cpu_session",
    "dynamic_input_axes",
    "export_onnx",
    "optimize_onnx",
    "pack_inputs",
    "packable_keys",
    "quantize_onnx",
    "quantized_ops",
]

INSTALL_HINT = "pip install -c constraints.txt 'onnx>=1.15' 'onnxruntime>=1.17' (part of torchslim's install)"
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN")  # ops that carry weights
INT8_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM", "QAttention")


def _onnx() -> Any:
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError(f"int8 execution needs onnx and onnxruntime; run: {INSTALL_HINT}") from None
    return onnx


def dynamic_input_axes(model: nn.Module, example_inputs: torch.Tensor) -> dict[int, str]:
    """The input axes the exported program leaves free: the batch, and the sequence of token
    ids (B, T) or of the feature vectors (B, T, F) a recurrent model reads.

    Why: an axis not named here is frozen at the example's size, so a program exported from a
    (2, 6, 8) example would reject sequences of any other length. Only recurrent layers are
    defined for every length; a 3-D input to anything else (a Conv1d's (B, C, L) feeding a
    Linear, say) keeps its traced size.

    Example:
        >>> dynamic_input_axes(nn.LSTM(8, 4, batch_first=True), torch.randn(2, 6, 8))
        {0: 'batch', 1: 'sequence'}
        >>> dynamic_input_axes(nn.Conv1d(8, 4, 3), torch.randn(2, 8, 6))
        {0: 'batch'}
    """
    token_ids = example_inputs.dim() == 2 and not example_inputs.is_floating_point()
    recurrent = example_inputs.dim() == 3 and any(isinstance(m, nn.RNNBase) for m in model.modules())
    return {0: "batch", 1: "sequence"} if token_ids or recurrent else {0: "batch"}


def packable_keys(inputs: Any) -> list[str] | None:
    """The keys of a dict batch whose tensors can travel as one (B, K, ...) program input:
    tensors of one shape and dtype (Hugging Face's input_ids + attention_mask, or a single
    pixel_values / input_values / input_features)."""
    if not isinstance(inputs, dict) or not inputs:
        return None
    tensors = list(inputs.values())
    same = all(isinstance(t, torch.Tensor) and t.shape == tensors[0].shape and t.dtype == tensors[0].dtype
               for t in tensors)
    return [str(k) for k in inputs] if same else None


def pack_inputs(inputs: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """The dict batch as one tensor (B, K, ...), keys in `keys` order."""
    missing = [k for k in keys if k not in inputs]
    if missing:
        raise ConfigError(f"the int8 program takes {keys}; the batch lacks {missing}")
    return torch.stack([inputs[k] for k in keys], dim=1)


class KeywordCall(nn.Module):
    """Calls `model(**inputs)` for an exporter, returning its logits (the first tensor output).

    Decoders run without their key/value cache. Given `input_ids` alone, an all-ones attention
    mask is passed explicitly: it means what no mask means, and keeps transformers off its
    packed-sequence detection (torch.diff), which the ONNX exporter cannot write.
    """

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)
        parameters = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in parameters else {}
        self.ones_mask = ("attention_mask" in parameters and "attention_mask" not in self.keys
                          and "input_ids" in self.keys)

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        from torchslim.calibration import logits_of

        if self.ones_mask:
            inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
        return logits_of(self.model(**inputs, **self.extra))


class PackedInputs(KeywordCall):
    """A keyword-input model (Hugging Face) as a one-input program: its tensors packed as one
    (B, K, ...) tensor, keys in `keys` order."""

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.call({k: packed[:, i] for i, k in enumerate(self.keys)})


def export_onnx(model: nn.Module, example_inputs: torch.Tensor) -> bytes:
    """The model as an ONNX program (opset 17) with a dynamic batch (and sequence) dimension
    (see `dynamic_input_axes`). A model returning tuples, lists or dicts of tensors gets one
    program output per tensor and its layout in the program's metadata (`OrtModule` rebuilds it).

    Raises:
        UnsupportedModuleError: the exporter cannot trace the model; the message names the
            exporter's complaint.
    """
    _onnx()
    if not isinstance(example_inputs, torch.Tensor):
        raise UnsupportedModuleError(f"{type(model).__name__} takes {type(example_inputs).__name__} inputs; "
                                     "int8 programs take one tensor input: wrap the model in a module "
                                     "whose forward takes one tensor")
    packed_ids = example_inputs.dim() == 3 and not example_inputs.is_floating_point()
    if isinstance(model, PackedInputs):
        dynamic = {0: "batch", 2: "sequence"} if packed_ids else {0: "batch"}
    else:
        dynamic = dynamic_input_axes(model, example_inputs)
    was_training = model.training
    model.eval()
    names, layout = _output_names(model, example_inputs)
    folder = tempfile.TemporaryDirectory()
    target = Path(folder.name) / "model.onnx"
    try:
        import warnings

        # Grad mode stays on: under no_grad, nn.MultiheadAttention takes its fused fast path,
        # which the exporter cannot write (the exporter itself records no gradients).
        with warnings.catch_warnings(), traceable_experts(model):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (example_inputs,), str(target), input_names=["input"],
                              output_names=names, opset_version=17, dynamo=False,
                              dynamic_axes={"input": dynamic, **{n: {0: "batch"} for n in names}})
    except UnsupportedModuleError:  # ours, already naming the problem and the fix
        raise
    except Exception as exc:  # the exporter raises many types; name it and stop here
        raise UnsupportedModuleError(f"{type(model).__name__} cannot be exported to ONNX "
                                     f"({type(exc).__name__}: {str(exc)[:300]}); int8 execution "
                                     "needs an exportable model") from exc
    else:
        return _with_layout(target.read_bytes(), layout)
    finally:
        model.train(was_training)
        folder.cleanup()


def _output_names(model: nn.Module, example_inputs: torch.Tensor) -> tuple[list[str], Any]:
    """The program's output names and, for a model returning several tensors, their layout
    (None for one tensor, and for outputs it cannot describe: then the first tensor is kept,
    with a warning naming what is dropped)."""
    import warnings

    from torchslim.runtime import output_layout

    try:
        with torch.no_grad():
            example = model(example_inputs)
    except Exception:  # the exporter's own run reports it, with its message
        return ["output"], None
    layout = output_layout.describe(example)
    if layout == "tensor":
        return ["output"], None
    tensors = output_layout.leaves(example) if layout is not None else []
    if layout is None or not all(t.dim() > 0 for t in tensors):
        what = ("a tensor without a batch dimension among its outputs" if layout is not None
                else f"{type(example).__name__}")
        warnings.warn(f"torchslim: {type(model).__name__} returns {what}; the program keeps its first "
                      "tensor only (return batch-first tensors, or tuples, lists or dicts of them, to "
                      "keep every output)", stacklevel=3)
        return ["output"], None
    return ["output"] + [f"output_{i}" for i in range(1, len(tensors))], layout


def _with_layout(program: bytes, layout: Any) -> bytes:
    if layout is None:
        return program
    from torchslim.runtime import output_layout

    onnx = _onnx()
    model = onnx.load_from_string(program)
    entry = model.metadata_props.add()
    entry.key, entry.value = OUTPUT_LAYOUT_KEY, output_layout.dumps(layout)
    return bytes(model.SerializeToString())


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration batches."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches: Iterator[torch.Tensor] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch.detach().cpu().numpy()}


def quantized_ops(program: bytes) -> dict[str, Any]:
    """Which weight-bearing ops of an ONNX program run in int8, and which stayed float."""
    onnx = _onnx()
    graph = onnx.load_from_string(program).graph
    counts = Counter(node.op_type for node in graph.node)
    int8 = {op: n for op, n in counts.items() if op in INT8_OPS}
    # In QDQ form a float MatMul/Conv fed by DequantizeLinear is fused by ORT into an int8 kernel.
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear"
                   for out in node.output}
    qdq: Counter[str] = Counter()
    left: list[str] = []
    for node in graph.node:
        if node.op_type in WEIGHT_OPS:
            if node.input and all(i in dequantized for i in node.input[:2]):
                qdq[node.op_type] += 1
            else:
                left.append(f"{node.op_type} {node.name}")
    return {"int8_ops": {**int8, **{f"{k} (QDQ)": v for k, v in qdq.items()}}, "float_ops": left}


def fuse_transformer(path: Path, *, heads: int, hidden: int) -> None:
    """Rewrite a BERT-style ONNX file in place with onnxruntime's transformer optimizer:
    fused attention and LayerNorm / GELU kernels instead of dozens of small ops.

    Two of its fusions are left out because they measured slower on this CPU class (MiniLM int8
    at batch 32 x seq 128, 2 threads, onnxruntime 1.32 profile): its `SkipLayerNormalization`
    took 64 ms per run where `Add` + `LayerNormalization` take about 8, and `BiasGelu` 40 ms
    where the bias folded into the matmul and a plain `Gelu` take about 17-23; without both the
    int8 program ran 2.43x fp32 eager against 1.98x with them (interleaved medians, same run).
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_gelu = False
    optimized = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads,
                                         hidden_size=hidden, opt_level=1, optimization_options=options)
    optimized.save_model_to_file(str(path))


def optimize_onnx(program: bytes, *, transformer: tuple[int, int]) -> bytes:
    """The fp32 program with the transformer fusions `quantize_onnx` applies (for comparisons
    that separate the runtime's gain from quantization's)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(program)
        fuse_transformer(path, heads=transformer[0], hidden=transformer[1])
        return path.read_bytes()


def module_of_node(node_name: str) -> str:
    """The module an exported node belongs to: "/features/features.1/conv/conv.0/Conv" is in
    "features.1.conv.0" (each scope names its module relative to the one before it)."""
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def nodes_of_modules(program: bytes, patterns: tuple[str, ...]) -> list[str]:
    """ONNX node names that the exporter put inside the modules `patterns` name (module names
    or globs): a node "/features/features.1/conv/conv.0/Conv" belongs to "features",
    "features.1", "features.1.conv" and "features.1.conv.0"."""
    if not patterns:
        return []
    import onnx

    nodes = []
    for node in onnx.load_from_string(program).graph.node:
        parts = module_of_node(node.name).split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(owner, p) for owner in owners for p in patterns):
            nodes.append(node.name)
    return nodes


def weights_to_fp16(program: bytes, patterns: tuple[str, ...]) -> tuple[bytes, list[str]]:
    """Store the float weights of the nodes inside modules `patterns` as float16, each read
    through a Cast back to float: half the bytes, float compute (CPUs have few fp16 kernels).

    Returns the program and the names of the weights converted.
    """
    if not patterns:
        return program, []
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    onnx = _onnx()
    model = onnx.load_from_string(program)
    graph = model.graph
    nodes = set(nodes_of_modules(program, patterns))
    wanted = {name for node in graph.node if node.name in nodes for name in node.input}
    converted = []
    for init in list(graph.initializer):
        if init.name not in wanted or init.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        graph.initializer.remove(init)
        graph.initializer.append(half)
        graph.node.insert(0, helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                              name=init.name + "_fp16_cast"))
        converted.append(init.name)
    return model.SerializeToString(), converted


DEFAULT_PERCENTILE = 99.999  # onnxruntime's own default
ENTROPY_BINS = 2048  # histogram bins searched for the KL-optimal clipping threshold (TensorRT's)
ENTROPY_LEVELS = 128  # quantized bins each candidate range is compressed to


def _measured_ranges(prepared: Path, batches: list[Any], cache: Path, calibrate: str,
                     percentile: float | None) -> None:
    """The activation ranges `quantize_static` would measure, written where it reads them (so
    they can be changed first: `_set_ranges`).

    For `entropy` the calibrator is also given its bin counts: onnxruntime's
    `quantize_static(calibrate_method=Entropy)` builds it with 128 histogram bins and 128
    quantized bins, which leaves a single candidate threshold (the whole range): minmax under
    another name. Here it searches 2048 bins, as TensorRT does.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    choices: dict[str, tuple[Any, dict[str, Any]]] = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile, {"percentile": percentile or DEFAULT_PERCENTILE}),
        "entropy": (CalibrationMethod.Entropy, {"num_bins": ENTROPY_BINS,
                                                "num_quantized_bins": ENTROPY_LEVELS}),
    }
    method, options = choices[calibrate]
    augmented = cache.with_name("augmented.onnx")
    calibrator = create_calibrator(prepared, None, augmented_model_path=str(augmented),
                                   calibrate_method=method, extra_options=options)
    calibrator.collect_data(_Reader(batches))
    save_tensors_data(calibrator.compute_data(), cache)


ACTIVATION_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                            "Gelu", "FastGelu", "BiasGelu", "Elu", "Selu", "Softplus", "PRelu"})


def _set_ranges(program: bytes, cache: Path, inputs_given: dict[str, tuple[float, float]],
                outputs_given: dict[str, tuple[float, float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the given ranges (module name -> (min, max) of its Conv/Gemm/MatMul's input, or
    output) into the calibration cache `cache` in place of the measured ranges of those tensors.

    Returns what became of each: the count applied and, per module not applied, why (no such
    quantized tensor in `program`; for an output, also: an activation reads it first, it is a
    given input, or it comes before a MatMul's bias)."""
    from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data

    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    matmuls: set[str] = set()
    readers: dict[str, list[str]] = {}
    for node in _onnx().load_from_string(program).graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node.op_type)
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            inputs.setdefault(module_of_node(node.name), node.input[0])
            outputs.setdefault(module_of_node(node.name), node.output[0])
            if node.op_type == "MatMul":
                matmuls.add(node.output[0])
    measured = load_tensors_data(cache)

    def put(tensor: str, low: float, high: float) -> None:
        measured[tensor] = TensorData(lowest=np.array(min(low, 0.0), dtype=np.float32),
                                      highest=np.array(max(high, 0.0), dtype=np.float32))

    missing = {name: "no quantized Conv/Gemm/MatMul input of it in the program: calibrated instead"
               for name in sorted(inputs_given) if inputs.get(name) not in measured}
    for name, (low, high) in inputs_given.items():
        if name not in missing:
            put(inputs[name], low, high)
    given_inputs = {inputs[name] for name in inputs_given if name not in missing}
    kept: dict[str, str] = {}
    for name, (low, high) in outputs_given.items():
        tensor = outputs.get(name)
        if tensor is None or tensor not in measured:
            kept[name] = "no quantized Conv/Gemm/MatMul output of it in the program: calibrated instead"
        elif tensor in matmuls:
            kept[name] = "a MatMul's output comes before the bias is added: calibrated instead"
        elif tensor in given_inputs:
            kept[name] = "its output is the next layer's input: that layer's range stands"
        elif ACTIVATION_OPS.intersection(readers.get(tensor, [])):
            kept[name] = "an activation reads its output first: the next layer's input range stands"
        else:
            put(tensor, low, high)
    save_tensors_data(measured, cache)
    return ({"applied": len(inputs_given) - len(missing), "not_applied": missing},
            {"applied": len(outputs_given) - len(kept), "not_applied": kept})


@functools.cache
def reduced_weight_range() -> bool:
    """Whether int8 weights should span 7 bits ([-64, 64]) on this CPU: an x86 CPU without VNNI
    multiplies uint8 activations by int8 weights with an instruction (vpmaddubsw) that adds two
    products into int16 and saturates when both are large (255 x 127 x 2 > 32767), which cost
    3-4 dB of SQNR on small convnets here (AMD EPYC, AVX2). onnxruntime's answer is its
    `reduce_range` option; CPUs with VNNI or AMX, and ARM, keep the full range."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_onnx(program: bytes, *, method: str, calibration: Iterable[torch.Tensor] | None = None,
                  per_channel: bool = True, calibrate: str = "minmax",
                  transformer: tuple[int, int] | None = None,
                  exclude: tuple[str, ...] = (),
                  fp16: tuple[str, ...] = (),
                  percentile: float | None = None,
                  ranges_cache: Path | None = None,
                  input_ranges: dict[str, tuple[float, float]] | None = None,
                  output_ranges: dict[str, tuple[float, float]] | None = None
                  ) -> tuple[bytes, dict[str, Any]]:
    """Quantize an ONNX program with onnxruntime; returns (program, report).

    Args:
        program: fp32 ONNX bytes (from `export_onnx`).
        method: `dynamic` (int8 weights, activations quantized at run time) or `static` (QDQ,
            activations calibrated, uint8 activations x int8 weights).
        calibration: input batches for `static`.
        per_channel: per-output-channel weight scales.
        calibrate: minmax | entropy | percentile (static activation ranges): the observed
            range, the range whose clipped histogram is closest in KL divergence (2048 bins), or
            the `percentile` of the observed values.
        percentile: with `calibrate="percentile"`, the percentile kept (None: 99.999).
        transformer: (attention heads, hidden size) of a BERT-style encoder: fuse its attention,
            LayerNorm and GELU subgraphs first (onnxruntime's transformer optimizer).
        exclude: module names (globs) whose nodes stay float (see `nodes_of_modules`).
        fp16: module names (globs) whose nodes stay float with their weights stored as float16.
        ranges_cache: static: a file for the activation ranges; measured and written there if
            it does not exist, else read from it (two programs of one model on the same grids).
        input_ranges: static: module name -> (min, max) of the input of its Conv/Gemm/MatMul,
            used instead of the calibrated range (the ranges a QAT model was trained with). The
            report's `input_ranges` counts those applied and names the modules without such an
            input in the program (calibrated as usual).
        output_ranges: static: module name -> (min, max) of the output of its Conv/Gemm/MatMul,
            used where that output is quantized as it is (e.g. into a residual sum); not where
            an activation reads it first (its range is the next layer's input) or where it is
            itself a given input. Reported under `output_ranges`.

    Raises:
        ConfigError: static without calibration data, unknown method, or a result in which no
            op runs in int8 (never hand back a float model called int8).
    """
    _onnx()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in ("dynamic", "static") or calibrate not in methods:
        raise ConfigError(f"method={method!r} / calibrate={calibrate!r}; valid: dynamic|static and "
                          f"{'|'.join(methods)}")
    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(program)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        kept = nodes_of_modules(prepared.read_bytes(), exclude + fp16)  # named after pre-processing
        kept += [f"{name}_MatMul" for name in kept]  # the quantizer splits a Gemm into MatMul + Add
        extra: dict[str, Any] = {}
        given: dict[str, Any] | None = None  # what became of `input_ranges`
        outputs: dict[str, Any] | None = None  # and of `output_ranges`
        if transformer is not None:
            fuse_transformer(prepared, heads=transformer[0], hidden=transformer[1])
            # Fused ops come from the com.microsoft domain, which shape inference cannot type.
            extra["DefaultTensorType"] = _onnx().TensorProto.FLOAT
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(target), per_channel=per_channel,
                             reduce_range=reduced_weight_range(), weight_type=QuantType.QInt8,
                             extra_options=extra, nodes_to_exclude=kept)
        else:
            batches = list(calibration or [])
            if not batches:
                raise ConfigError("static quantization needs calibration data (activation ranges "
                                  "are measured on it); pass --calibration DATASET or batches")
            cache = ranges_cache
            given_any = bool(input_ranges or output_ranges)
            if (calibrate == "entropy" or given_any) and (cache is None or not cache.exists()):
                cache = cache or Path(folder) / "ranges.json"
                _measured_ranges(prepared, batches, cache, calibrate, percentile)
            if input_ranges or output_ranges:  # the measured ranges, with the given ones in their place
                assert cache is not None  # measured above
                given, outputs = _set_ranges(prepared.read_bytes(), cache, input_ranges or {},
                                             output_ranges or {})
            quantize_static(str(prepared), str(target), _Reader(batches), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            nodes_to_exclude=kept, reduce_range=reduced_weight_range(),
                            weight_type=QuantType.QInt8, calibrate_method=methods[calibrate],
                            calibration_cache_path=cache,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "CalibPercentile": percentile or DEFAULT_PERCENTILE, **extra})
        result, halved = weights_to_fp16(target.read_bytes(), fp16)
    report = quantized_ops(result)
    if fp16:
        report["fp16_weights"] = halved
    if input_ranges:
        report["input_ranges"] = given
    if output_ranges:
        report["output_ranges"] = outputs
    if not report["int8_ops"]:
        raise ConfigError(f"{method} quantization left every op in float ({report['float_ops'][:5]}); "
                          "the model has no layer with an int8 kernel for this method (dynamic "
                          "covers MatMul/Gemm and LSTM; use static for convolutions)")
    return result, report


OUTPUT_LAYOUT_KEY = "torchslim.output_layout"  # program metadata: the structure of the outputs
DISABLED_OPTIMIZERS = (
    # onnxruntime's own SkipLayerNormalization fusion: slower than Add + LayerNormalization
    # here (see `fuse_transformer`; MiniLM int8 at batch 32: 232 against 250 ms without it)
    "SkipLayerNormFusion",
    # It rounds the float weights of a Conv/Gemm between int8 neighbours to per-tensor int8 when
    # the session loads: the layers `exclude=` / `fp16=` / `sensitivity=` keep in float would
    # silently run on int8 weights (measured: 35.2 -> 5.8 dB on a layer with an outlier weight).
    "WeightBiasQuantization",
)


def cpu_session(program: bytes, *, threads: int, spinning: bool) -> Any:
    """An onnxruntime CPU session of `program` with `threads` intra-op threads (its pool is fixed
    when it is made: callers make a new one when torch's thread count changes), all graph
    optimisations, and worker threads that busy-wait between calls only if `spinning` (fast for
    one program called in a loop; many small sessions must sleep, or their pools fight)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    return ort.InferenceSession(program, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


class OrtModule(nn.Module):
    """An ONNX program run by onnxruntime, used like a module: tensors in, tensor out.

    The session follows `torch.get_num_threads()` (re-created when it changes), so latency
    measurements at a fixed thread count apply to it too.

    `spin_wait=False` stops the session's worker threads from busy-waiting for work after each
    op. Keep the default (spinning: lowest latency) for one model per process; turn it off when
    several sessions take turns on the same cores, as a benchmark comparing models does:
    measured on 2 cores, the idle sessions' spinning threads made MobileNetV2 at batch 1 up to
    3x slower and its timings bimodal.
    """

    def __init__(self, program: bytes, *, weight_count: int = 0, flops: int = 0,
                 spin_wait: bool = True, input_keys: list[str] | None = None) -> None:
        super().__init__()
        _onnx()
        self.program = program
        self.input_keys = input_keys  # a keyword-input model: dict batches are packed (PackedInputs)
        self.spin_wait = spin_wait
        # Counts of the float model it came from: the program's weights are not parameters.
        self.weight_count, self.flops_per_sample = weight_count, flops
        self.report: dict[str, Any] = {}
        self._session: Any = None
        self._threads = 0
        self._layout: Any = None  # the model's output structure, when it had several tensors
        self._outputs = ["output"]  # the program outputs a call fetches

    def session(self) -> Any:
        threads = torch.get_num_threads()
        if self._session is None or threads != self._threads:
            self._session = cpu_session(self.program, threads=threads, spinning=self.spin_wait)
            self._threads = threads
            self._layout = _layout_of(self._session)
            if self._layout is not None:
                self._outputs = [o.name for o in self._session.get_outputs()]
        return self._session

    def forward(self, inputs: torch.Tensor | None = None, **keywords: torch.Tensor) -> Any:
        if self.input_keys is not None and (keywords or isinstance(inputs, dict)):
            inputs = pack_inputs(dict(inputs or {}, **keywords), self.input_keys)
        if not isinstance(inputs, torch.Tensor):
            takes = f"a dict of {self.input_keys}" if self.input_keys else "one tensor"
            raise ConfigError(f"the int8 program takes {takes}, got {type(inputs).__name__}")
        session = self.session()
        layout = self._layout
        try:
            outputs = session.run(self._outputs, {"input": inputs.detach().cpu().numpy()})
        except Exception as exc:  # onnxruntime raises its own types: one clean error instead
            raise ConfigError(f"onnxruntime cannot run the int8 program on an input of shape "
                              f"{tuple(inputs.shape)} and dtype {inputs.dtype} ({str(exc)[:200]}); "
                              "pass inputs shaped like the ones it was converted with") from exc
        tensors = [torch.from_numpy(o) for o in outputs]
        if layout is None:
            return tensors[0]
        from torchslim.runtime.output_layout import rebuild

        return rebuild(layout, tensors)


def _layout_of(session: Any) -> Any:
    """The output layout a program's metadata records (None: one output), checked against the
    program's outputs, which must be "output", "output_1", ... in order."""
    from torchslim.runtime import output_layout

    text = session.get_modelmeta().custom_metadata_map.get(OUTPUT_LAYOUT_KEY)
    if text is None:
        return None
    names = [o.name for o in session.get_outputs()]
    try:
        layout = output_layout.loads(text)
        expected = ["output"] + [f"output_{i}" for i in range(1, output_layout.count(layout))]
    except ValueError as error:
        raise ConfigError(f"the program's output layout is not valid ({error})") from error
    if names != expected:
        raise ConfigError(f"the program's outputs {names[:4]} do not match its output layout "
                          f"({len(expected)} tensors)")
    return layout
