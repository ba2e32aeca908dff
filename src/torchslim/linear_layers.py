"""Hugging Face's `Conv1D` (GPT-2, GPT, DistilGPT-2...) is a linear layer with its weight stored
transposed, `(in, out)`. Every technique treats it as the `nn.Linear` it is: `apply_` swaps each
selected `Conv1D` for an `nn.Linear` holding the same numbers (the same function, up to float
rounding order) and records the swap, so files replay it and `export --format hf` can write the
transposed layout back. Recognised by class name, so `transformers` is never imported here.
"""

from __future__ import annotations

import torch
from torch import nn

from torchslim.structure import Edit, read_in_place, record_edit_, register_edit, replace_module_

__all__ = ["as_linear", "hf_conv1d_layers", "is_hf_conv1d", "linearize_", "restore_hf_conv1d_"]

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether `module` is (a subclass of) Hugging Face's transposed-weight `Conv1D`."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == HF_CONV1D for cls in type(module).__mro__)


def as_linear(module: nn.Module) -> nn.Linear:
    """An `nn.Linear` computing what the `Conv1D` `module` computes (weights copied, transposed)."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.detach().t())
        if bias is not None:
            assert linear.bias is not None
            linear.bias.copy_(bias.detach())
    linear.weight.requires_grad_(weight.requires_grad)
    return linear


def hf_conv1d_layers(model: nn.Module) -> list[str]:
    """Names of the `Conv1D` layers in `model`, in model order."""
    return [name for name, module in model.named_modules() if name and is_hf_conv1d(module)]


def linearize_(model: nn.Module, names: list[str] | None = None) -> dict[str, str]:
    """Swap the `Conv1D` layers `names` (default: all) for equivalent `nn.Linear`s, in place.

    Returns the layers left as they are, with the reason (a weight tied to another module).
    """
    chosen = hf_conv1d_layers(model) if names is None else \
        [n for n in names if is_hf_conv1d(model.get_submodule(n))]
    left = {name: reason for name in chosen if (reason := read_in_place(model, name))}
    done = [name for name in chosen if name not in left]
    for name in done:
        replace_module_(model, name, as_linear(model.get_submodule(name)))
    if done:
        record_edit_(model, {"kind": "hf_conv1d_as_linear", "layers": done})
    return left


def _replay(model: nn.Module, edit: Edit) -> None:
    for name in edit["layers"]:
        layer = model.get_submodule(str(name))
        if not is_hf_conv1d(layer):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Conv1D")
        replace_module_(model, str(name), as_linear(layer))


register_edit("hf_conv1d_as_linear", _replay)


def restore_hf_conv1d_(model: nn.Module) -> list[str]:
    """Put back, as `Conv1D`, the layers `linearize_` turned into Linear (for `save_pretrained`)."""
    from transformers.pytorch_utils import Conv1D

    from torchslim.structure import edits_of

    names = [str(n) for edit in edits_of(model) if edit.get("kind") == "hf_conv1d_as_linear"
             for n in edit["layers"]]
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        conv = Conv1D(linear.out_features, linear.in_features)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.detach().t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias.detach())
        replace_module_(model, name, conv.to(linear.weight.dtype))
    return names
