"""Quantization-aware training: train through the int8 grid, then convert like PTQ.

`prepare_qat_` folds each BatchNorm into the conv before it (so training sees the folded
weights the int8 kernel will use), then attaches to every selected Conv/Linear:
- a weight parametrization that fake-quantizes the weight per output channel (symmetric int8,
  as the converter will), gradients straight through;
- an input fake-quantizer (asymmetric uint8 activations) whose range is a moving average of
  the batches seen in training, or, with `learn_scale`, a learned LSQ step size (Esser et al.
  2020) initialised from that range. Under torchrun the range is that of the whole global
  batch (a max all-reduce over processes), so data-parallel QAT is the single-process QAT.
Training is the ordinary `Trainer` (so QAT combines with distillation losses and pruning
callbacks). `convert_qat` removes the fake-quantizers and hands the trained float model to the
same onnxruntime static conversion as PTQ, calibrated with the learned ranges' data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.errors import ConfigError
from torchslim.parametrized import remove_weight_parametrizations
from torchslim.quantization.primitives import QuantSpec, fake_quantize, qparams_from_range
from torchslim.select import Select
from torchslim.structure import Edit, record_edit_, register_edit, replace_module_
from torchslim.training import distributed

__all__ = ["InputQuantizer", "WeightFakeQuant", "convert_qat", "fold_batchnorm_", "prepare_qat_"]

WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, axis=0)
ACTIVATION_SPEC = QuantSpec(bits=8, symmetric=False, signed=False)


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight through its per-output-channel int8 grid (STE)."""

    torchslim_parametrization = True  # ours: finalize_ bakes it in

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().reshape(weight.shape[0], -1)
        scale, zero = qparams_from_range(flat.amin(1), flat.amax(1), WEIGHT_SPEC)
        return fake_quantize(weight, scale, zero, WEIGHT_SPEC)


class InputQuantizer(nn.Module):
    """Fake-quantizes a layer's input on the uint8 grid; the range is tracked or learned."""

    min_val: torch.Tensor
    max_val: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, *, momentum: float = 0.01, learn_scale: bool = False) -> None:
        super().__init__()
        self.momentum, self.learn_scale = momentum, learn_scale
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))
        self.log_scale = nn.Parameter(torch.tensor(0.0), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.initialised):
            low, high = x.detach().amin(), x.detach().amax()
            if self.training:  # under torchrun: the range of the global batch
                low, high = distributed.global_range(low, high)
            if not bool(self.initialised):
                self.min_val.copy_(low)
                self.max_val.copy_(high)
                self.initialised.fill_(True)
                scale, _ = qparams_from_range(self.min_val, self.max_val, ACTIVATION_SPEC)
                self.log_scale.data.copy_(scale.log())
            elif not self.learn_scale:
                self.min_val.lerp_(low, self.momentum)
                self.max_val.lerp_(high, self.momentum)
        scale, zero = qparams_from_range(self.min_val, self.max_val, ACTIVATION_SPEC)
        if self.learn_scale:
            # LSQ: the step size is a parameter; its gradient is scaled by 1/sqrt(N·qmax).
            numel = x.numel() * distributed.world_size()  # of the global batch
            grad_scale = 1.0 / (numel * ACTIVATION_SPEC.qmax) ** 0.5
            learned = self.log_scale.exp()
            scale = learned * grad_scale + (learned - learned * grad_scale).detach()
        return fake_quantize(x, scale, zero.float().detach(), ACTIVATION_SPEC)

    def trained_range(self) -> tuple[float, float] | None:
        """The (min, max) whose uint8 grid is the one applied in eval (the tracked range, or with
        `learn_scale` the learned step around its zero point); None before any data was seen."""
        if not bool(self.initialised):
            return None
        scale, zero = qparams_from_range(self.min_val, self.max_val, ACTIVATION_SPEC)
        if self.learn_scale:
            scale = self.log_scale.detach().exp()
        low = float((ACTIVATION_SPEC.qmin - zero) * scale)
        return low, low + float(scale) * (ACTIVATION_SPEC.qmax - ACTIVATION_SPEC.qmin)


def _input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    quantizer = module.get_submodule("input_quantizer")
    return (quantizer(args[0]), *args[1:])


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv (eval statistics).

    Found by tracing with torch.fx; the BatchNorm becomes an Identity. Returns the folded convs.
    A model fx cannot trace is left as it is (an empty list): its BatchNorms then train as usual.
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable models simply keep their BatchNorms
        return []
    modules = dict(model.named_modules())
    users: dict[str, int] = {}
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            users[arg.name] = users.get(arg.name, 0) + 1
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(str(source.target)), nn.Conv2d) and users[source.name] == 1):
            continue
        conv, bn = modules[str(source.target)], modules[str(node.target)]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
        edit = {"kind": "fold_batchnorm", "conv": str(source.target), "batchnorm": str(node.target)}
        _replay_fold(model, edit)  # the structure: bias on the conv, Identity for the BN
        with torch.no_grad():
            conv.weight.copy_(fused.weight)
            assert conv.bias is not None and fused.bias is not None
            conv.bias.copy_(fused.bias)
        record_edit_(model, edit)
        folded.append(str(source.target))
    return folded


def _replay_fold(model: nn.Module, edit: Edit) -> None:
    conv = model.get_submodule(edit["conv"])
    if not isinstance(conv, nn.Conv2d) or not isinstance(model.get_submodule(edit["batchnorm"]),
                                                         nn.BatchNorm2d):
        raise ConfigError(f"{edit['conv']} / {edit['batchnorm']} are not a Conv2d and a BatchNorm2d")
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    replace_module_(model, edit["batchnorm"], nn.Identity())


def prepare_qat_(model: nn.Module, *, targets: Select | None = None, learn_scale: bool = False,
                 momentum: float = 0.01) -> dict[str, Any]:
    """Fold BatchNorms, then attach weight and input fake-quantizers to the selected layers.

    Raises:
        ConfigError: a selected layer is already prepared.
    """
    folded = fold_batchnorm_(model)
    layers = (targets or Select(types=("Linear", "Conv2d"))).resolve(model)
    prepared = [name for name, layer in layers if hasattr(layer, "input_quantizer")]
    if prepared:
        raise ConfigError(f"layers {prepared} are already prepared for QAT; convert_qat first")
    for _, layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant())
        layer.add_module("input_quantizer", InputQuantizer(momentum=momentum, learn_scale=learn_scale))
        layer.register_forward_pre_hook(_input_hook)
    return {"layers": [name for name, _ in layers], "folded_batchnorm": folded}


def strip_qat_(model: nn.Module) -> nn.Module:
    """Remove every fake-quantizer, keeping the trained float weights."""
    for module in model.modules():
        if hasattr(module, "input_quantizer"):
            if parametrize.is_parametrized(module, "weight"):
                remove_weight_parametrizations(module, leave_parametrized=False)
            del module.input_quantizer
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _input_hook:
                    del module._forward_pre_hooks[key]
    return model


def convert_qat(model: nn.Module, *, example_inputs: torch.Tensor,
                calibration: Iterable[torch.Tensor]) -> nn.Module:
    """The QAT-trained model as the same int8 onnxruntime program PTQ makes (a new module).

    Each prepared layer's input keeps the uint8 grid it was trained on (its tracked or learned
    range); the other activations the program quantizes (sums, outputs) are calibrated on
    `calibration`, as in PTQ."""
    import copy

    from torchslim.quantization.ptq import Quantization, QuantMethod, quantize_model

    # Layers of the kinds QAT prepares that were left out of it (targets=) stay in float: they
    # were trained without fake quantization, so converting them would be a silent PTQ.
    left_out = tuple(name for name, layer in model.named_modules()
                     if name and isinstance(layer, nn.Linear | nn.Conv2d)
                     and not hasattr(layer, "input_quantizer")
                     and not any(hasattr(m, "input_quantizer") for m in layer.modules() if m is not layer))
    trained = {name: layer.get_submodule("input_quantizer").trained_range()
               for name, layer in model.named_modules() if hasattr(layer, "input_quantizer")}
    plain = strip_qat_(copy.deepcopy(model)).eval()
    result = quantize_model(plain, Quantization(method=QuantMethod.STATIC, exclude=left_out),
                            example_inputs=example_inputs, calibration=calibration,
                            input_ranges={n: r for n, r in trained.items() if r is not None})
    report: dict[str, Any] = getattr(result, "report")  # noqa: B009 - set by quantize_model
    report["qat"] = True
    return result


register_edit("fold_batchnorm", _replay_fold)
