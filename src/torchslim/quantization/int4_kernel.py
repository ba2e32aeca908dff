"""Run 4-bit weight codes on a real int4 kernel: `GroupedWeightLinear` -> `Int4Linear`.

`WeightOnly`, `GPTQ` and `AWQ` produce layers that store 4-bit codes but dequantize them to
float for every call: smaller files, no speed. `Int4Kernel` hands every such layer whose groups
the kernel takes (a power of two, at least 16) to onnxruntime's `MatMulNBits`
(`torchslim.runtime.int4_linear`), which reads the packed codes directly: as 4-bit codes when
they fit 4 bits, else as 8-bit ones (the same kernel; e.g. a language model's head kept at 8
bits); any other layer stays as it is and is named with the reason.

Layers found reading the very same input tensor in one forward pass (q/k/v of an attention
block, gate/up of a gated MLP) then run as one stacked call (`SharedInput`): decoding a token
pays a fixed cost per kernel call, which grouping cuts from 7 to 4 calls per Llama block. The
forward pass uses the `example_inputs` given, else the first calibration batch, else the
signature recorded on the model, else two token ids for a Hugging Face language model; with none
of those, nothing is grouped and the result says why.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import call_model
from torchslim.config import TechniqueConfig, validated
from torchslim.quantization.weight_only import GroupedCodes, GroupedWeightEmbedding, GroupedWeightLinear
from torchslim.registry import register_technique
from torchslim.runtime.int4_linear import Int4Linear, SharedInput, pack_int4
from torchslim.select import Select
from torchslim.signature import example_for, signature_of
from torchslim.structure import Edit, record_edit_, register_edit, replace_layers_, replace_module_

__all__ = ["Int4Kernel", "int4_kernel_", "int4_layer", "kernel_codes"]

MANY_SESSIONS = 2000  # kernel layers above which their sessions' memory is worth a warning


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class Int4Kernel(TechniqueConfig):
    """Execute 4-bit weight-only layers with onnxruntime's `MatMulNBits` (no options)."""

    kind = "int4_kernel"
    structural = True
    converts = True


def _width(layer: GroupedCodes) -> int:
    """4 if the layer's codes fit 4 bits, else 8 (every weight-only code fits a byte)."""
    codes = layer.codes.detach()
    low, high = int(codes.min()), int(codes.max())
    signed = layer.zeros is None
    return 4 if (low >= -8 and high <= 7 if signed else high <= 15) else 8


def _unsigned(layer: GroupedCodes, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zero points) in [0, 2^bits - 1]: signed symmetric codes shifted by 2^(bits-1)."""
    codes = layer.codes.detach().long()
    if layer.zeros is None:  # signed symmetric codes: shift to unsigned, zero point 2^(bits-1)
        middle = 1 << (bits - 1)
        return codes + middle, torch.full_like(layer.scales, float(middle))
    return codes, layer.zeros.detach()


def kernel_codes(layer: GroupedCodes) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(bits, packed codes, packed zero points) of a coded layer or table in the layout of
    onnxruntime's `MatMulNBits` and `GatherBlockQuantized` (`pack_int4`): 4-bit when the codes
    fit 4 bits, else 8-bit."""
    bits = _width(layer)
    codes, zeros = _unsigned(layer, bits)
    packed, zero_points = pack_int4(codes, zeros.round().long(), layer.group_size, bits)
    return bits, packed, zero_points


def int4_layer(layer: GroupedWeightLinear) -> Int4Linear:
    """The `Int4Linear` running `layer`'s codes: 4-bit when they fit 4 bits, else 8-bit."""
    out_features, in_features = layer.codes.shape
    bits, packed, zero_points = kernel_codes(layer)
    new = Int4Linear(in_features, out_features, block_size=layer.group_size, bias=layer.bias is not None,
                     bits=bits)
    with torch.no_grad():
        new.packed.copy_(packed)
        new.zero_points.copy_(zero_points)
        new.scales.copy_(layer.scales.detach())
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias.detach())
    return new


def _inputs_for(model: nn.Module, example_inputs: Any, calibration: Any) -> Any:
    """What to run the model on to see which layers share an input (None: nothing to run)."""
    if example_inputs is not None:
        return example_inputs
    for batch in calibration or ():
        return batch[0] if isinstance(batch, tuple | list) else batch
    signature = signature_of(model)
    if signature is not None:
        return example_for(signature)
    if isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int) \
            and getattr(model, "main_input_name", None) == "input_ids":
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}
    return None


def _shared_inputs(model: nn.Module, inputs: Any) -> list[list[str]]:
    """Names of the Int4Linear layers called with one and the same input tensor, per tensor
    (only layers of one input width, bit width and block size together)."""
    seen: dict[tuple[int, int, int], list[str]] = {}
    held: list[torch.Tensor] = []  # kept alive so that no two inputs share an id

    def hook(name: str) -> Any:
        def record(layer: nn.Module, args: tuple[Any, ...]) -> None:
            assert isinstance(layer, Int4Linear)
            held.append(args[0])
            key = (id(args[0]), layer.bits, layer.block_size)
            if name not in seen.setdefault(key, []):
                seen[key].append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, Int4Linear)]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [names for names in seen.values() if len(names) > 1]


def _group_(model: nn.Module, names: list[str]) -> None:
    layers = [model.get_submodule(name) for name in names]
    if not all(isinstance(layer, Int4Linear) for layer in layers):
        raise TypeError(f"a shared-input group must be Int4Linear layers: {', '.join(names)}")
    SharedInput(layers)  # type: ignore[arg-type]


def int4_kernel_(model: nn.Module, config: Int4Kernel, *, targets: Select,
                 calibration: Any = None, example_inputs: Any = None) -> dict[str, Any]:
    """Handler of `Int4Kernel`."""
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, GroupedWeightLinear):
            continue
        size = module.group_size
        if size < 16 or size & (size - 1):
            skipped[name] = (f"left dequantizing in float: group size {size} is not a power of two "
                             ">= 16 (MatMulNBits blocks)")
        else:
            chosen.append(name)

    def build(name: str, layer: nn.Module) -> tuple[nn.Module, Edit]:
        assert isinstance(layer, GroupedWeightLinear)
        new = int4_layer(layer)
        return new, {"kind": "int4_kernel", "layer": name, **({"bits": 8} if new.bits == 8 else {})}

    tables = {id(m.codes): n for n, m in model.named_modules() if isinstance(m, GroupedWeightEmbedding)}
    copied = {name: f"its codes are shared with the embedding {tables[id(module.codes)]}, which keeps "
                    "them for lookups; the kernel holds a packed copy"
              for name, module in model.named_modules()
              if name in chosen and isinstance(module, GroupedWeightLinear) and id(module.codes) in tables}
    result: dict[str, Any] = {**replace_layers_(model, chosen, build), "skipped": skipped}
    if len(result["replaced"]) > MANY_SESSIONS:  # a large mixture-of-experts model: one per expert
        count = len(result["replaced"])
        warnings.warn(f"torchslim: int4_kernel made {count} layers, each its own onnxruntime session "
                      f"(about 0.5 MB and 3 ms to open each, {count * 0.5 / 1024:.1f} GB in all); the "
                      "grouped codes need none", stacklevel=2)
    if copied:
        result["copied"] = copied
    inputs = _inputs_for(model, example_inputs, calibration) if result["replaced"] else None
    if inputs is None:
        result["shared_input"] = ("not grouped: no example inputs, calibration batch or recorded "
                                  "signature to find the layers that read one input")
        return result
    groups = _shared_inputs(model, inputs)
    for names in groups:
        _group_(model, names)
        record_edit_(model, {"kind": "int4_shared_input", "layers": names})
    result["shared_input"] = groups
    return result


def _replay(model: nn.Module, edit: Edit) -> None:
    layer = model.get_submodule(edit["layer"])
    if not isinstance(layer, GroupedWeightLinear):
        raise TypeError(f"{edit['layer']} is a {type(layer).__name__}, not a GroupedWeightLinear")
    out_features, in_features = layer.codes.shape
    bits = int(edit.get("bits", 4))
    if bits not in (4, 8):
        raise TypeError(f"int4_kernel edit of {edit['layer']} has bits={bits}; 4 or 8")
    replace_module_(model, edit["layer"], Int4Linear(in_features, out_features, block_size=layer.group_size,
                                                     bias=layer.bias is not None, bits=bits))


def _replay_group(model: nn.Module, edit: Edit) -> None:
    names = edit["layers"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError("int4_shared_input edit: 'layers' is not a list of layer names")
    _group_(model, names)


register_technique(Int4Kernel, int4_kernel_)
register_edit("int4_kernel", _replay)
register_edit("int4_shared_input", _replay_group)
