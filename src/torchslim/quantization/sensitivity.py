"""Which layers int8 hurts most, and which to keep in float for a budget of compute.

Static int8 rounds every Conv/Linear's weights and every activation. Keeping a layer in float
(`exclude=`) takes its weights off the int8 grid; the activations around it stay on theirs, as
its int8 neighbours still quantize what they produce and read. So a layer's sensitivity is
measured as what its own weight rounding costs: the model's output SQNR (dB, against the float
model, on calibration samples) with only that layer's weights on the int8 grid the conversion
gives them (per output channel, or per tensor), everything else float.

`keep_most_sensitive` then keeps the lowest-SQNR layers in float, worst first, as long as their
cost fits the budget (a share of the model's). A float layer between int8 ones costs its float
arithmetic and the dequantize / quantize passes over its input and output, so its cost is the
larger of its share of the multiply-adds and its share of the activation values the layers read
and write: an early depthwise convolution does 1% of MobileNetV2's multiply-adds but moves far
more data (measured: four such layers, 4.8% of the MACs, kept float made batch 32 2.2x slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.calibration import call_model, first_samples, output_tensors
from torchslim.errors import ConfigError
from torchslim.quantization.layer_reconstruction import WEIGHT_LEVELS
from torchslim.quantization.primitives import sqnr_db

__all__ = ["LayerSensitivity", "int8_sensitivity", "keep_most_sensitive"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SAMPLES = 16  # calibration samples each layer is measured on
NEGLIGIBLE = 0.01  # a layer below this share of the summed error power is never kept in float


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's int8 cost: the model's output SQNR (dB) with only its weights rounded to
    int8; its share of the model's multiply-adds and of the activation values its layers read
    and write."""

    sqnr_db: float
    macs_share: float
    traffic_share: float = 0.0

    @property
    def cost(self) -> float:
        """What keeping it in float costs, as a share of the model (see the module docstring)."""
        return max(self.macs_share, self.traffic_share)


def _rounded(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """`weight` on onnxruntime's symmetric int8 grid (max|w| / 127, per output channel or not)."""
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    scale = (flat.abs().amax(1, keepdim=True) / WEIGHT_LEVELS).clamp_min(1e-12)
    codes = torch.clamp(torch.round(flat / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    return (codes * scale).reshape(weight.shape)


def _work(model: nn.Module, layers: dict[str, nn.Module], inputs: Any
          ) -> tuple[dict[str, int], dict[str, int]]:
    """Multiply-adds, and activation values read and written, per layer in one forward pass of
    `inputs` (every call counted)."""
    macs = dict.fromkeys(layers, 0)
    traffic = dict.fromkeys(layers, 0)

    def count(name: str, layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        traffic[name] += output.numel() + sum(a.numel() for a in args[:1] if isinstance(a, torch.Tensor))
        if isinstance(layer, nn.Linear):
            macs[name] += output.numel() * layer.in_features
        else:
            assert isinstance(layer, nn.modules.conv._ConvNd)
            kernel = int(torch.tensor(layer.kernel_size).prod())
            macs[name] += output.numel() * (layer.in_channels // layer.groups) * kernel

    handles = [layer.register_forward_hook(lambda m, a, o, n=name: count(n, m, a, o))
               for name, layer in layers.items()]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return macs, traffic


def int8_sensitivity(model: nn.Module, batches: list[Any], *, per_channel: bool = True,
                     exclude: tuple[str, ...] = ()) -> dict[str, LayerSensitivity]:
    """Each Conv/Linear layer's int8 sensitivity (see the module docstring), worst first.

    Args:
        model: the float model (its weights are put back as they were).
        batches: calibration inputs; the first `SAMPLES` samples of the first batch are used.
        per_channel: the weight grids are per output channel (as the conversion's).
        exclude: module names already kept in float (not measured).

    Raises:
        ConfigError: the model has no Conv/Linear layer to measure.
    """
    if not batches:
        raise ConfigError("sensitivity needs calibration batches")
    inputs = first_samples(batches[0], SAMPLES)
    layers: dict[str, nn.Module] = {name: m for name, m in model.named_modules()
              if isinstance(m, LAYERS) and name and name not in exclude
              and not parametrize.is_parametrized(m, "weight")}
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to measure int8 sensitivity "
                          "on; drop sensitivity")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = output_tensors(call_model(model, inputs))
        macs, traffic = _work(model, layers, inputs)
        total, moved = max(sum(macs.values()), 1), max(sum(traffic.values()), 1)
        result: dict[str, LayerSensitivity] = {}
        for name, layer in layers.items():
            weight = layer.get_parameter("weight")
            saved = weight.detach().clone()
            try:
                with torch.no_grad():
                    weight.copy_(_rounded(saved, per_channel))
                    outputs = output_tensors(call_model(model, inputs))
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
            fidelity = min((sqnr_db(r, o) for r, o in zip(reference, outputs, strict=True)),
                           default=float("inf"))
            result[name] = LayerSensitivity(round(min(fidelity, 200.0), 2), round(macs[name] / total, 5),
                                            round(traffic[name] / moved, 5))
    finally:
        model.train(was_training)
    return dict(sorted(result.items(), key=lambda item: item[1].sqnr_db))


def keep_most_sensitive(sensitivities: dict[str, LayerSensitivity], budget: float) -> list[str]:
    """The layers to keep in float: the lowest SQNR first, each taken while the float layers'
    cost (`LayerSensitivity.cost`) stays within `budget` (a share of the model's, 0-1); a layer
    too costly for what is left is passed over for cheaper ones after it. Layers whose error is
    under `NEGLIGIBLE` of all layers' summed error power stay int8 whatever the budget: float
    would cost speed for nothing."""
    power = {name: 10 ** (-layer.sqnr_db / 10) for name, layer in sensitivities.items()}
    floor = NEGLIGIBLE * sum(power.values())
    kept: list[str] = []
    spent = 0.0
    for name, layer in sorted(sensitivities.items(), key=lambda item: item[1].sqnr_db):
        if power[name] >= floor and spent + layer.cost <= budget:
            kept.append(name)
            spent += layer.cost
    return kept
