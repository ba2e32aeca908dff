"""Int8-aware weights for static quantization: learned rounding (AdaRound) and bias correction.

Static int8 rounds every weight to its nearest grid point and every activation to a per-tensor
grid; the errors add up layer after layer (MobileNetV2 keeps 83% top-1 agreement with its fp32
self). Two post-training remedies, both data-light, fix what the next layer sees instead of
what each weight is:

- AdaRound (Nagel et al. 2020): each weight rounds up or down, chosen by gradient descent on a
  soft rounding variable so that the layer's output matches the float model's; a regulariser
  anneals every choice to 0 or 1.
- Bias correction (Nagel et al. 2019): the mean error the int8 layer makes per output channel
  on the calibration data is subtracted through its bias.

Both run in one pass over the calibration set (one batch) in execution order, on a copy of the
model with BatchNorm folded into the convolutions (onnxruntime folds them too, before it rounds).
Each Conv/Linear sees the input the already-adjusted layers before it produce with fake-quantized
inputs and weights (what the int8 program computes), and is fitted to the float model's output
at the same place, so a layer also makes up for the activation error it inherits.

The adjusted float weights lie exactly on the per-channel int8 grid (symmetric, max|w| / 127)
that onnxruntime computes, and the largest weight of each channel is kept where it was, so the
scale does not move and the conversion keeps every learned choice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from torchslim.errors import ConfigError
from torchslim.quantization.primitives import QuantSpec, fake_quantize, qparams_from_range, sqnr_db
from torchslim.quantization.qat import fold_batchnorm_
from torchslim.runtime.onnx_program import reduced_weight_range

__all__ = ["ProgramGrids", "program_grids", "reconstruct_for_int8_"]

# onnxruntime's symmetric int8 weights: [-127, 127], scale max|w| / 127; [-64, 64] on a CPU
# whose int8 kernels would saturate (`reduced_weight_range`)
WEIGHT_LEVELS = 64 if reduced_weight_range() else 127
ACTIVATION_SPEC = QuantSpec(bits=8, symmetric=False, signed=False)  # uint8, as onnxruntime's QDQ
STRETCH = (-0.1, 1.1)  # AdaRound's rectified sigmoid: h(V) = clip(sigmoid(V)·(ζ-γ) + γ, 0, 1)
REGULARISATION = 0.01  # weight of the rounding regulariser (the paper's λ)
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
WARMUP = 0.2  # share of the iterations fitted without the regulariser
SAMPLES_PER_STEP = 8  # calibration samples in each AdaRound step
QUANTILE_SAMPLE = 1 << 22  # values drawn to estimate a percentile range (torch.quantile's limit is 2^24)
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
               nn.Tanh, nn.ELU)


@dataclass
class ProgramGrids:
    """The activation grids (scale, zero point) of an int8 program, by the module they belong
    to: each Conv/Gemm's input and output, and each elementwise sum's output in program order.
    With them the simulation quantizes where and how the program does."""

    inputs: dict[str, tuple[float, int]] = field(default_factory=dict)
    outputs: dict[str, tuple[float, int]] = field(default_factory=dict)
    sums: list[tuple[float, int]] = field(default_factory=list)


def program_grids(program: bytes) -> ProgramGrids:
    """Read the activation grids of an onnxruntime QDQ program (see `ProgramGrids`)."""
    import onnx
    from onnx import numpy_helper

    from torchslim.runtime.onnx_program import module_of_node

    graph = onnx.load_from_string(program).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def grid(node: Any) -> tuple[float, int] | None:
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            return None
        scale, zero = constants.get(node.input[1]), constants.get(node.input[2])
        if scale is None or zero is None or scale.size != 1:
            return None
        return float(scale.reshape(())), int(zero.reshape(()))

    def quantizer_of(tensor: str) -> tuple[float, int] | None:
        return next((g for n in consumers.get(tensor, []) if n.op_type == "QuantizeLinear"
                     if (g := grid(n)) is not None), None)

    grids = ProgramGrids()
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            module = module_of_node(node.name)
            if (found := grid(producers.get(node.input[0]))) is not None:
                grids.inputs[module] = found
            if (found := quantizer_of(node.output[0])) is not None:
                grids.outputs[module] = found
        elif node.op_type == "Add" and (found := quantizer_of(node.output[0])) is not None:
            grids.sums.append(found)
    return grids


def reconstruct_for_int8_(model: nn.Module, inputs: torch.Tensor, *, adaround: bool,
                          bias_correction: bool, iterations: int = 300, percentile: float | None = None,
                          exclude: tuple[str, ...] = (), grids: ProgramGrids | None = None,
                          seed: int = 0) -> dict[str, Any]:
    """Fold BatchNorm, then round (AdaRound) and/or bias-correct every Conv/Linear in place.

    Args:
        model: a float model (changed in place: BatchNorm folded, weights on their int8 grid).
        inputs: the calibration samples, one batch (the whole set is one pass).
        adaround: learn each weight's rounding (else: nearest, as onnxruntime does).
        bias_correction: subtract each output channel's mean error through the bias.
        iterations: AdaRound steps per layer.
        percentile: the activation ranges of the simulation keep this percentile of the values
            (None: the whole observed range), as the conversion's calibration will.
        exclude: module names kept in float: neither adjusted nor fake-quantized.
        grids: the activation grids of the int8 program of the unadjusted model; where one is
            known the simulation uses it, else it measures its own range (`percentile`).
        seed: the samples each AdaRound step draws.

    Returns:
        A report: per layer, the output error (mean squared, on the calibration samples) with
        nearest rounding and after the adjustment, the share of weights rounded the other way,
        and the mean bias shift; layers left as they were, each with the reason.
    """
    if not (adaround or bias_correction):
        raise ConfigError("reconstruct_for_int8_ needs adaround=True or bias_correction=True")
    known = grids or ProgramGrids()
    folded = fold_batchnorm_(model)
    unfolded = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    reference = copy.deepcopy(model).eval()
    model.eval()
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, LAYERS) and name not in exclude}
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer to round or "
                          "correct; drop adaround / bias_correction")
    targets, calls, activations, expected = _float_outputs(reference, set(layers), inputs)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    busy: set[str] = set()  # layers inside their own adjustment (functional_call re-enters hooks)

    def adjust(name: str, layer: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if name in busy:
            return output
        if calls.get(name, 0) != 1:
            skipped[name] = (f"called {calls.get(name, 0)} times in one forward pass; AdaRound and "
                             "bias correction fit a layer called once: left at nearest rounding")
            return output
        if parametrize.is_parametrized(layer, "weight"):
            skipped[name] = ("its weight is computed by a parametrization (finalize it first): "
                             "left at nearest rounding")
            return output
        if not isinstance(output, torch.Tensor) or not isinstance(args[0], torch.Tensor):
            skipped[name] = "its input or output is not one tensor: left at nearest rounding"
            return output
        busy.add(name)
        try:
            quantized = _fake_quantize(args[0], percentile, generator, grid=known.inputs.get(name))
            rows[name] = _adjust_layer(layer, quantized, targets.pop(name), activations.get(name),
                                       adaround=adaround,
                                       bias_correction=bias_correction, iterations=iterations,
                                       generator=generator)
            # What the int8 layer hands the next one: its output on its own grid (that of the
            # activation's output when one follows: the int8 kernel applies it by clipping).
            output = _call(layer, quantized)
            activation = activations.get(name)
            return _fake_quantize(output, percentile, generator, grid=known.outputs.get(name),
                                  range_of=None if activation is None else activation(output))
        finally:
            busy.discard(name)

    handles = [layer.register_forward_hook(lambda m, a, o, n=name: adjust(n, m, a, o))
               for name, layer in layers.items()]
    simulated, sums = _with_quantized_sums(model, percentile, generator, known.sums)
    produced = _run_hooked(simulated, inputs, handles)
    for name in layers:
        if name not in rows and name not in skipped:
            skipped[name] = "not called in the forward pass"
    report: dict[str, Any] = {"adaround": adaround, "bias_correction": bias_correction,
                              "iterations": iterations if adaround else 0, "samples": len(inputs),
                              "layers": rows, "skipped": skipped, "folded_batchnorm": folded,
                              "quantized_sums": sums,
                              "program_grids": {"inputs": len(known.inputs), "outputs": len(known.outputs),
                                                "sums": len(known.sums)}}
    if isinstance(expected, torch.Tensor) and isinstance(produced, torch.Tensor):
        report["simulated_sqnr_db"] = round(sqnr_db(expected, produced), 2)  # on the calibration data
    if unfolded:
        report["unfolded_batchnorm"] = {name: "not right after a traceable Conv2d: onnxruntime may "
                                        "fold it itself and re-round that conv" for name in unfolded}
    return report


class _SumQuantizer(nn.Module):
    """The int8 program's requantization of an elementwise sum (a residual connection)."""

    def __init__(self, percentile: float | None, generator: torch.Generator,
                 grid: tuple[float, int] | None) -> None:
        super().__init__()
        self.percentile, self.generator, self.grid = percentile, generator, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_quantize(x, self.percentile, self.generator, grid=self.grid)


def _with_quantized_sums(model: nn.Module, percentile: float | None, generator: torch.Generator,
                         grids: list[tuple[float, int]]) -> tuple[nn.Module, int | str]:
    """`model` with each tensor sum's output on its int8 grid, as the int8 program computes
    residual connections (the layer hooks see the rest), and how many sums that is.

    Traced with torch.fx (sharing the model's layers); a model fx cannot trace runs as it is,
    its sums in float, which the report says.
    """
    import operator

    import torch.fx

    class LayersStayWhole(torch.fx.Tracer):  # a user's Conv2d subclass stays one hooked call
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return isinstance(module, LAYERS) or super().is_leaf_module(module, qualified_name)

    try:
        traced = torch.fx.GraphModule(model, LayersStayWhole().trace(model))
    except Exception as error:  # untraceable: the layers' own quantization still runs
        return model, f"not simulated (torch.fx cannot trace {type(model).__name__}: {error})"
    sums = [node for node in traced.graph.nodes
            if (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
            or (node.op == "call_method" and node.target in ("add", "add_"))]
    known = len(grids) == len(sums)  # the program's sums, in the same order; else measured here
    for index, node in enumerate(sums):
        name = f"torchslim_sum_quantizer_{index}"
        traced.add_submodule(name, _SumQuantizer(percentile, generator, grids[index] if known else None))
        with traced.graph.inserting_after(node):
            quantized = traced.graph.call_module(name, (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
    traced.recompile()
    return traced, len(sums)


def _float_outputs(model: nn.Module, names: set[str], inputs: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, nn.Module], Any]:
    """Each named layer's float output on `inputs`, how often each layer was called, the
    activation module applied right to its output (through a folded BatchNorm's Identity), and
    the model's output."""
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    activations: dict[str, nn.Module] = {}
    last: list[Any] = [None, None]  # the latest layer output: (name, tensor), held so `is` is exact

    def keep(name: str, output: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            outputs[name] = output.detach().clone()  # an in-place activation after it would clip it
            last[:] = [name, output]

    def follow(module: nn.Module, args: tuple[Any, ...]) -> None:
        if last[1] is not None and args and args[0] is last[1] and isinstance(module, ACTIVATIONS):
            activations[last[0]] = _out_of_place(module)

    handles = [m.register_forward_hook(lambda _m, _a, o, n=name: keep(n, o))
               for name, m in model.named_modules() if name in names]
    handles += [m.register_forward_pre_hook(follow) for m in model.modules() if isinstance(m, ACTIVATIONS)]
    result = _run_hooked(model, inputs, handles)
    return outputs, calls, activations, result


def _run_hooked(model: nn.Module, inputs: torch.Tensor, handles: list[Any]) -> Any:
    """One no-grad forward pass with the hooks `handles` registered, which it then removes."""
    try:
        with torch.no_grad():
            return model(inputs)
    finally:
        for handle in handles:
            handle.remove()


def _out_of_place(activation: nn.Module) -> nn.Module:
    """A copy of an activation module that leaves its input as it is."""
    clone = copy.deepcopy(activation)
    if hasattr(clone, "inplace"):
        setattr(clone, "inplace", False)  # noqa: B010 - not every activation declares it
    return clone


def _fake_quantize(x: torch.Tensor, percentile: float | None, generator: torch.Generator,
                   *, grid: tuple[float, int] | None = None,
                   range_of: torch.Tensor | None = None) -> torch.Tensor:
    """`x` on the per-tensor uint8 grid the int8 program gives it: `grid` (scale, zero point)
    when known, else the range of `range_of` (default `x`), observed or the `percentile` of its
    values cut from each side."""
    if grid is not None:
        return fake_quantize(x, torch.tensor(grid[0]), torch.tensor(float(grid[1])), ACTIVATION_SPEC)
    values = (x if range_of is None else range_of).detach().float().flatten()
    if percentile is None:
        low, high = values.min(), values.max()
    else:
        if values.numel() > QUANTILE_SAMPLE:
            values = values[torch.randint(values.numel(), (QUANTILE_SAMPLE,), generator=generator)]
        cut = (100 - percentile) / 200
        low, high = torch.quantile(values, torch.tensor([cut, 1 - cut]))
    scale, zero = qparams_from_range(low, high, ACTIVATION_SPEC)
    return fake_quantize(x, scale, zero.float(), ACTIVATION_SPEC)


def _call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's own forward (a user subclass keeps its forward) with the given parameters."""
    parameters: dict[str, torch.Tensor] = {}
    if weight is not None:
        parameters["weight"] = weight
    if bias is not None:
        parameters["bias"] = bias
    result = functional_call(layer, parameters, (x,))
    assert isinstance(result, torch.Tensor)
    return result


def _grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-output-channel scale broadcastable to the weight, the weight in grid units)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(1) / WEIGHT_LEVELS).clamp_min(1e-12)
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return scale, weight.detach() / scale


def _channel_axis(layer: nn.Module, output: torch.Tensor) -> int:
    """The output's channel dimension: last for a Linear, 1 for a convolution."""
    return output.dim() - 1 if isinstance(layer, nn.Linear) else 1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    low, high = STRETCH
    return torch.clamp(torch.sigmoid(v) * (high - low) + low, 0, 1)


def _adjust_layer(layer: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  activation: nn.Module | None, *, adaround: bool,
                  bias_correction: bool, iterations: int, generator: torch.Generator) -> dict[str, Any]:
    """Round the layer's weight on its int8 grid (learned or nearest) and correct its bias.

    The errors are measured after `activation` (the one applied to the layer's output, e.g. a
    ReLU6) when there is one: what it clips does not reach the next layer.
    """
    act = activation if activation is not None else nn.Identity()
    target = act(target)
    weight = layer.get_parameter("weight")
    scale, units = _grid(weight)
    nearest = torch.clamp(torch.round(units), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    with torch.no_grad():
        rounded = _call(layer, x, nearest * scale)  # the output onnxruntime's rounding gives
        error_nearest = float((act(rounded) - target).pow(2).mean())
    row: dict[str, Any] = {"error_nearest": error_nearest,
                           "measured_after": type(activation).__name__ if activation else "the layer"}
    if bias_correction:  # first, so that AdaRound fits its rounding to the corrected bias
        with torch.no_grad():
            # The mean error the rounded weights add (not the error inherited from the input:
            # what follows the layer, e.g. a ReLU, clips that one differently from its mean).
            error = _call(layer, x) - rounded
            axis = _channel_axis(layer, error)
            shift = error.mean(dim=[d for d in range(error.dim()) if d != axis])
            if getattr(layer, "bias", None) is None:
                layer.register_parameter("bias", nn.Parameter(torch.zeros_like(shift)))
            layer.get_parameter("bias").add_(shift)
            row["bias_shift"] = float(shift.abs().mean())
    codes = nearest
    if adaround:
        codes = _learn_rounding(layer, x, target, act, scale, units, iterations, generator)
    with torch.no_grad():
        weight.copy_(codes * scale)
        row["rounded_other_way"] = round(float((codes != nearest).float().mean()), 4)
        row["error"] = float((act(_call(layer, x)) - target).pow(2).mean())
    return row


def _learn_rounding(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, activation: nn.Module,
                    scale: torch.Tensor, units: torch.Tensor, iterations: int,
                    generator: torch.Generator) -> torch.Tensor:
    """AdaRound: the rounding (down or up, per weight) whose output, through `activation`,
    reproduces `target` from `x`.

    The largest weight of each output channel keeps its nearest rounding (+-127): it sets the
    scale onnxruntime computes, which must not move. Zero weights stay zero: a pruned model
    keeps its sparsity (and what the entropy coder gains from it).
    """
    floor = torch.floor(units)
    rest = (units - floor).clamp(1e-4, 1 - 1e-4)
    low, high = STRETCH
    v = nn.Parameter(-torch.log((high - low) / (rest - low) - 1))  # h(v) = rest at the start
    flat = units.reshape(units.shape[0], -1).abs()
    anchor = torch.zeros_like(flat, dtype=torch.bool)
    anchor[torch.arange(flat.shape[0]), flat.argmax(1)] = True
    anchor = anchor.reshape(units.shape) | (units == 0)  # pruned weights stay exactly zero
    fixed = torch.clamp(torch.round(units), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    optimizer = torch.optim.Adam([v], lr=1e-2)
    axis = _channel_axis(layer, target)
    warm = int(iterations * WARMUP)
    with torch.enable_grad():
        for step in range(iterations):
            rows = torch.randint(len(x), (min(SAMPLES_PER_STEP, len(x)),), generator=generator)
            soft = torch.clamp(floor + _rectified_sigmoid(v), -WEIGHT_LEVELS, WEIGHT_LEVELS)
            codes = torch.where(anchor, fixed, soft)
            output = activation(_call(layer, x[rows], codes * scale))
            reconstruction = (output - target[rows]).pow(2).sum(axis).mean()
            loss = reconstruction
            if step >= warm:
                progress = (step - warm) / max(1, iterations - warm)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)
                h = _rectified_sigmoid(v)
                loss = loss + REGULARISATION * (1 - (2 * h - 1).abs().pow(beta)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        hard = torch.clamp(floor + (_rectified_sigmoid(v) >= 0.5).float(), -WEIGHT_LEVELS, WEIGHT_LEVELS)
        return torch.where(anchor, fixed, hard)

