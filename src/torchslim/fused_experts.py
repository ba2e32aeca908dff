"""Mixture-of-experts layers that hold their experts as 3-D tensors, unfused into Linears.

Hugging Face's MoE decoders (Qwen3-MoE, Mixtral, OLMoE, DeepSeek, GPT-OSS, ...) keep all experts
of a block in one module with 3-D parameters: `gate_up_proj` (experts, 2·inner, width), or
`up_proj` for ungated experts, and `down_proj` (experts, width, inner), transposed in some models,
with biases in some. No Linear-layer technique can see them, yet on a real MoE they hold most of
the weights. `unfuse_experts_` swaps such a module for `UnfusedExperts`: the same experts as
one `nn.Linear` per expert and projection, run by the same routed loop, so GPTQ, AWQ, Wanda,
SparseGPT, round-to-nearest and the rest compress each expert like any Linear, and the
calibration hooks of a layer see exactly the tokens routed to its expert.

A module is unfused only when `UnfusedExperts` reproduces it: both run on random tokens routed
to every expert and must agree; otherwise it is left as it is, with the reason. The swap is a
recorded edit, replayed when a file is loaded, like `linear_layers`' Conv1D swap.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.structure import Edit, forward_source, record_edit_, register_edit, replace_module_

__all__ = ["UnfusedExperts", "fuse_experts_", "fused_experts", "routers", "traceable_experts",
           "unfuse_experts_", "unfused_copy", "unfused_names"]


@dataclass(frozen=True)
class _Layout:
    """Where an experts module keeps its tensors: the first projection's name (`gate_up_proj`
    or `up_proj`), and whether its 3-D tensors are stored (experts, in, out)."""

    first: str
    transposed: bool


def _matrices(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in module._parameters.items()
            if isinstance(value, nn.Parameter) and value.dim() == 3 and value.is_floating_point()}


def _layouts(module: nn.Module) -> list[_Layout]:
    """The layouts `module`'s tensors could have, most likely first ([]: not an experts module)."""
    matrices = _matrices(module)
    first = next((key for key in ("gate_up_proj", "up_proj") if key in matrices), None)
    if first is None or "down_proj" not in matrices or set(matrices) != {first, "down_proj"}:
        return []
    stated = getattr(module, "is_transposed", None)
    orders = [stated] if isinstance(stated, bool) else [False, True]
    return [_Layout(first, transposed) for transposed in orders]


class UnfusedExperts(nn.Module):
    """A mixture-of-experts layer's experts as Linears: `first[e]` (the gate-and-up or up
    projection) and `down[e]` for each expert e, called as Hugging Face's experts are:
    `(hidden_states (tokens, width), top_k_index (tokens, k), top_k_weights (tokens, k))`.

    The original module stays as `source`, without its 3-D tensors, for its gate: its own
    `_apply_gate` (e.g. GPT-OSS's clamped SwiGLU on interleaved halves), else its `act_fn` on
    the first half times the second, or `act_fn` alone for ungated experts.
    """

    def __init__(self, source: nn.Module, layout: _Layout) -> None:
        super().__init__()
        first, down = getattr(source, layout.first), source.down_proj
        assert isinstance(first, torch.Tensor) and isinstance(down, torch.Tensor)
        self.num_experts = int(first.shape[0])
        self.gated = layout.first == "gate_up_proj"
        self.layout = layout
        self.first = nn.ModuleList(self._linears(first, getattr(source, f"{layout.first}_bias", None)))
        self.down = nn.ModuleList(self._linears(down, getattr(source, "down_proj_bias", None)))
        for key in (layout.first, "down_proj", f"{layout.first}_bias", "down_proj_bias"):
            source._parameters.pop(key, None)
        self.source = source

    def _linears(self, stacked: torch.Tensor, bias: Any) -> list[nn.Linear]:
        layers = []
        for e in range(stacked.shape[0]):
            weight = stacked[e].detach()
            weight = weight.t() if self.layout.transposed else weight  # (out, in)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=isinstance(bias, torch.Tensor),
                              dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if layer.bias is not None:
                    layer.bias.copy_(bias[e].detach())
            layers.append(layer)
        return layers

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        source = self.source
        if not self.gated:
            return source.act_fn(h)  # type: ignore[operator]
        if callable(getattr(source, "_apply_gate", None)):
            return source._apply_gate(h)  # type: ignore[operator]
        gate, up = h.chunk(2, dim=-1)
        return source.act_fn(gate) * up  # type: ignore[operator]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # traced (the ONNX exporter), every expert is written: a program must route any input
        hit = range(self.num_experts) if torch.jit.is_tracing() else torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:  # Hugging Face's index for "no expert"
                continue
            position, token = torch.where((top_k_index == e).t())  # Hugging Face's order of sums
            h = self.down[e](self._gate(self.first[e](hidden_states[token])))
            out.index_add_(0, token, (h * top_k_weights[token, position, None]).to(out.dtype))
        return out

    def neuron_layout(self) -> str | None:
        """How the first projection's rows make the gate's outputs (the experts' neurons), found
        by perturbing one row's output at a time: `"plain"` (row i is neuron i, ungated),
        `"halves"` (rows i and inner + i: [gate; up]), `"pairs"` (rows 2i and 2i + 1: gate and up
        interleaved, GPT-OSS), or None when it is none of these (its neurons cannot be pruned)."""
        first = self.first[0]
        assert isinstance(first, nn.Module)
        width = int(getattr(first, "out_features", 0))
        if width == 0:
            return None
        generator = torch.Generator().manual_seed(0)
        base = torch.rand(1, width, generator=generator) + 0.5  # inside any clamp of the gate
        perturbed = base + 0.25 * torch.eye(width)
        with torch.no_grad():
            try:
                reads = (self._gate(perturbed) - self._gate(base)).abs().t() > 0  # (neurons, rows)
            except Exception:  # a gate that fails on plain rows: no layout to prune by
                return None
        neurons = reads.shape[0]
        expected = {"plain": [[j] for j in range(neurons)],
                    "halves": [[j, neurons + j] for j in range(neurons)],
                    "pairs": [[2 * j, 2 * j + 1] for j in range(neurons)]}
        found = [torch.nonzero(row).flatten().tolist() for row in reads]
        return next((name for name, rows in expected.items() if rows == found), None)

    def fused(self) -> tuple[dict[str, torch.Tensor], nn.Module]:
        """The 3-D tensors as the source module held them, and that module (without them)."""
        tensors = {}
        for key, layers in ((self.layout.first, self.first), ("down_proj", self.down)):
            linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
            if len(linears) < len(layers):
                kinds = sorted({type(layer).__name__ for layer in layers} - {"Linear"})
                raise TypeError(f"experts held as {', '.join(kinds)} cannot be fused back into 3-D "
                                "tensors; dequantize them to Linears first")
            if len({tuple(layer.weight.shape) for layer in linears}) > 1:
                raise ConfigError("experts pruned to different widths cannot be stored as one 3-D "
                                  "tensor; prune with scope uniform, or keep the .slim file (it loads "
                                  "with torchslim.load)")
            weights = torch.stack([layer.weight.detach() for layer in linears])
            tensors[key] = weights.transpose(1, 2) if self.layout.transposed else weights
            biases = [layer.bias.detach() for layer in linears if layer.bias is not None]
            if biases:
                tensors[f"{key}_bias"] = torch.stack(biases)
        return tensors, self.source


def _probe(module: nn.Module, width: int, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens with every expert routed to at least once (two experts per token)."""
    generator = torch.Generator().manual_seed(0)
    tokens = max(8, 2 * experts)
    parameter = next(module.parameters())
    hidden = torch.randn(tokens, width, generator=generator).to(parameter.dtype)
    k = min(2, experts)
    first = torch.arange(tokens) % experts
    index = torch.stack([first, (first + 1) % experts], 1)[:, :k]
    weights = torch.rand(tokens, k, generator=generator).softmax(-1).to(parameter.dtype)
    return hidden, index, weights


def _reproduces(original: nn.Module, unfused: UnfusedExperts, probe: tuple[torch.Tensor, ...]
                ) -> str | None:
    """Why `unfused` does not compute what `original` computed on `probe`, if it does not."""
    try:
        with torch.no_grad():
            reference = original(*probe)
    except Exception as failure:  # any failure means it is not called this way
        return (f"calling it as Hugging Face's experts are called (hidden_states, top_k_index, "
                f"top_k_weights) failed: {str(failure) or type(failure).__name__}")
    with torch.no_grad():
        own = unfused(*probe)
    if not isinstance(reference, torch.Tensor) or reference.shape != own.shape:
        return f"it returns {type(reference).__name__}, not one tensor of the tokens' shape"
    error = float((own - reference).abs().max()) / (float(reference.abs().max()) + 1e-12)
    return None if error < 1e-4 else \
        f"a per-expert Linear loop differs from its forward ({error:.1e} relative)"


def _unfused(model: nn.Module, name: str) -> tuple[UnfusedExperts | None, str]:
    """`name`'s `UnfusedExperts` (its tensors copied, the module itself untouched), or None and
    why it cannot be unfused."""
    module = model.get_submodule(name)
    if getattr(module, "has_post_expert_norm", False):
        return None, ("its experts apply a norm of their own after the down projection, which the "
                      "per-expert Linear loop does not; left unchanged")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layout_names = {layout.first for layout in _layouts(module)} | {"down_proj"}
    source = forward_source(type(parent))  # type: ignore[arg-type]
    if any(f"self.{child}.{key}" in source for key in layout_names):
        return None, (f"{type(parent).__name__}.forward reads its tensors itself, so Linears in "
                      "their place would break it; left unchanged")
    reasons = []  # per layout tried, the most likely first
    for layout in _layouts(module):
        first = getattr(module, layout.first)
        width = first.shape[1] if layout.transposed else first.shape[2]
        candidate = unfused_copy(module, layout)
        why = _reproduces(module, candidate, _probe(module, int(width), int(first.shape[0])))
        if why is None:
            return candidate, ""
        reasons.append(why)
    return None, f"{reasons[0]}; left unchanged"


def _copy_without_tensors(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose parameter table is its own (so popping the 3-D tensors
    from the copy leaves `module` whole until it is swapped out)."""
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__ = {**module.__dict__, "_parameters": dict(module._parameters),
                     "_modules": dict(module._modules), "_buffers": dict(module._buffers)}
    return copy


def unfused_copy(module: nn.Module, layout: _Layout) -> UnfusedExperts:
    """`module`'s experts as an `UnfusedExperts` of the given layout (its tensors copied;
    `module` itself is left whole)."""
    return UnfusedExperts(_copy_without_tensors(module), layout)


def fused_experts(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """The modules holding experts as 3-D `gate_up_proj`/`up_proj` and `down_proj` tensors, with
    their number of experts, except those `exclude` names (exactly or by pattern)."""
    return {name: int(_matrices(module)["down_proj"].shape[0]) for name, module in model.named_modules()
            if name and _layouts(module) and not any(name == e or fnmatch.fnmatch(name, e) for e in exclude)}


@contextlib.contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s fused experts modules are `UnfusedExperts` (put back after):
    traced, a routed loop writes every expert into the program, which then routes any input as
    the model does. Tracing Hugging Face's own experts fails (grouped_mm) or, in its eager loop,
    writes only the experts the example input reached. An experts module that cannot be unfused
    raises `UnsupportedModuleError`."""
    names = list(fused_experts(model))
    swapped = {}
    try:
        for name in names:
            unfused, why = _unfused(model, name)
            if unfused is None:
                raise UnsupportedModuleError(
                    f"{name} routes tokens to experts by value and cannot be traced as one Linear per "
                    f"expert ({why}); an ONNX trace would fix the example input's routing. Keep the "
                    ".slim file (it runs in torch), or use int8 with backend torch")
            swapped[name] = replace_module_(model, name, unfused)
        yield
    finally:
        for name, original in swapped.items():
            replace_module_(model, name, original)


def routers(model: nn.Module) -> list[str]:
    """The modules choosing each token's experts: a sibling of an experts module (fused or
    `UnfusedExperts`) whose 2-D weight has one row per expert (`Qwen3MoeTopKRouter`, a Linear
    `gate`). int8 on them moves their logits enough to send tokens to other experts."""
    counts = {**fused_experts(model), **{name: module.num_experts for name, module in model.named_modules()
                                         if isinstance(module, UnfusedExperts)}}
    found = []
    for name, experts in counts.items():
        parent_name, _, own = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for child, sibling in parent.named_children():
            weight = sibling._parameters.get("weight")
            if child != own and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                    and weight.shape[0] == experts:
                found.append(f"{parent_name}.{child}" if parent_name else child)
    return found


def unfused_names(name: str, experts: int) -> list[str]:
    """The Linears `unfuse_experts_` gives the experts module `name`."""
    return [f"{name}.{part}.{e}" for part in ("first", "down") for e in range(experts)]


def unfuse_experts_(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Swap each experts module `names` for the `UnfusedExperts` that reproduces it, in place,
    and record the swap. Returns the modules left as they are, with the reason."""
    left, done = {}, []
    for name in names:
        unfused, why = _unfused(model, name)
        if unfused is None:
            left[name] = why
            continue
        replace_module_(model, name, unfused)
        done.append({"layer": name, "first": unfused.layout.first, "transposed": unfused.layout.transposed})
    if done:
        record_edit_(model, {"kind": "unfuse_experts", "modules": done})
    return left


def fuse_experts_(model: nn.Module) -> list[str]:
    """Put back each `UnfusedExperts` as the module it came from, its 3-D tensors rebuilt from
    the Linears' current weights (for `save_pretrained`; the Linears must be plain by then).
    Returns the modules restored."""
    names = [name for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]
    for name in names:
        unfused = model.get_submodule(name)
        assert isinstance(unfused, UnfusedExperts)
        tensors, source = unfused.fused()
        for key, tensor in tensors.items():
            source.register_parameter(key, nn.Parameter(tensor.clone()))
        replace_module_(model, name, source)
    return names


def _replay(model: nn.Module, edit: Edit) -> None:
    entries = edit.get("modules")
    if not isinstance(entries, list):
        raise TypeError("unfuse_experts edit: 'modules' is not a list")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), str) \
                or entry.get("first") not in ("gate_up_proj", "up_proj") \
                or not isinstance(entry.get("transposed"), bool):
            raise TypeError(f"unfuse_experts edit: malformed entry {str(entry)[:80]}")
        module = model.get_submodule(entry["layer"])
        if {entry["first"], "down_proj"} - set(_matrices(module)):
            raise TypeError(f"{entry['layer']} is a {type(module).__name__} without 3-D "
                            f"{entry['first']} and down_proj tensors")
        layout = _Layout(entry["first"], entry["transposed"])
        replace_module_(model, entry["layer"], UnfusedExperts(module, layout))


register_edit("unfuse_experts", _replay)
