"""Sequential, block-by-block calibration for the one-shot methods of language models.

SparseGPT, Wanda and GPTQ compress each Linear from statistics of its inputs. Taken from the
dense model, those inputs drift from what the compressed model will feed the layer; so, as in
the papers, the model's repeated blocks (a decoder's layers) are compressed one at a time: the
calibration activations entering block i are the outputs of blocks 0..i-1 *already compressed*.
Only one block's activations are held at a time (memory: calibration tokens x hidden width, not
x depth), and the statistics of a block's Linears are gathered in one pass over them.

A model without a stack of repeated blocks (a CNN, a small MLP) is calibrated in one pass over
the whole model: the same statistics, without the sequential refresh.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from torchslim.calibration import call_uncached, first_samples
from torchslim.errors import ConfigError
from torchslim.heap import return_freed_memory, returning_memory_after
from torchslim.parametrized import original_weight
from torchslim.progress import ProgressLines
from torchslim.select import Select
from torchslim.structure import own_forward

__all__ = ["InputStatistics", "LayerwiseJob", "compress_layerwise", "inverse_hessian_factor",
           "layerwise_job", "linear_layers_for_llm", "repeated_blocks", "returning_memory_per_block",
           "uncalibrated_layers"]



@dataclass
class InputStatistics:
    """What one Linear's calibration inputs tell: `hessian` = 2/n Σ x xᵀ (SparseGPT, GPTQ) and
    `sq_norm` = Σ x² per input feature (Wanda), over `samples` input rows."""

    hessian: torch.Tensor | None
    sq_norm: torch.Tensor
    samples: int = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        count = rows.shape[0]
        total = self.samples + count
        self.sq_norm += rows.pow(2).sum(0).double()
        if self.hessian is not None:
            # a running mean of 2 x xᵀ (the product in float32, the sum in float64)
            self.hessian.mul_(self.samples / total).add_((rows.T @ rows).double(), alpha=2.0 / total)
        self.samples = total


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + dampening·mean(diag H)·I)⁻¹, in float32: what the column
    sweeps of SparseGPT and GPTQ read. Factorized in float64; the sweep runs in float32, as in
    the reference code (2x faster).

    Raises:
        ConfigError: H is not positive definite even dampened.
    """
    columns = hessian.shape[0]
    damped = hessian + dampening * torch.diag(hessian).mean() * torch.eye(columns, dtype=hessian.dtype)
    try:
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ConfigError(f"the calibration Hessian of a {columns}-input layer is not positive "
                          "definite even dampened; raise dampening or give more calibration "
                          "tokens") from exc
    return factor.float()


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's largest `ModuleList` of same-class blocks holding Linears (a transformer's
    layers), with its name; None if it has none. A list inside another one's blocks (a
    mixture-of-experts layer's experts, called only for their tokens) is not one: the outer
    list's blocks are what runs in sequence."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 1
             and len({type(block) for block in module}) == 1
             and any(isinstance(m, nn.Linear) for m in module[0].modules())]
    outer = [(name, module) for name, module in lists
             if not any(name.startswith(f"{other}.") for other, _ in lists if other)]
    return max(outer, key=lambda item: len(item[1]), default=None)


class _Captured(Exception):
    """Raised by the hook on the first block: the model's forward stops there."""


@dataclass
class _BlockInputs:
    """What the blocks are called with, per calibration batch: the first block's positional
    inputs (the hidden states first), and the rest of the inputs (positional after the hidden
    states, and keyword) for each kind of block. Blocks of one model can take different inputs:
    Gemma 2 and 3 alternate sliding-window and full attention, each with its own mask (and
    Gemma 3 its own rotary embeddings), so `kind[i]` names the first block whose inputs block i
    shares."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    rest: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)
    kwargs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    kind: list[int] = field(default_factory=list)


_PLAIN = (int, float, str, bool, type(None))


def _same(a: Any, b: Any) -> bool:
    """Whether two blocks' inputs are the same (equal tensors, equal plain values, the same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, _PLAIN) and isinstance(b, _PLAIN):
        return a == b
    return False


def _rest_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's inputs without its hidden states (the first positional input, or `hidden_states`)."""
    if args:
        return args[1:], kwargs
    return (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _capture(model: nn.Module, blocks: nn.ModuleList, heads: list[int], inputs: Any
             ) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The (args, kwargs) of each block in `heads` for one batch; the forward stops at the last."""
    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    last = max(heads)

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int) -> None:
        captured[index] = (args, kwargs)
        if index == last:
            raise _Captured

    handles = [blocks[i].register_forward_pre_hook(partial(hook, index=i), with_kwargs=True) for i in heads]
    try:
        with torch.no_grad():
            call_uncached(model, inputs)
    except _Captured:
        return captured
    finally:
        for handle in handles:
            handle.remove()
    raise ConfigError("the model's forward never reached its blocks; calibration needs the blocks "
                      "on the path from the inputs")


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[Any]) -> _BlockInputs:
    """Each batch's inputs to the first block, and to the first block of each other kind (found
    on one sequence, where every block's inputs are compared); the forward stops there."""
    probe = _capture(model, blocks, list(range(len(blocks))), first_samples(batches[0], 1))
    rests = [_rest_of(*probe[i]) for i in range(len(blocks))]
    kind: list[int] = []
    for index, rest in enumerate(rests):
        kind.append(next(j for j in [*dict.fromkeys(kind), index] if _same(rests[j], rest)))
    heads = sorted(set(kind))
    captured = _BlockInputs(kind=kind, rest={j: [] for j in heads}, kwargs={j: [] for j in heads})
    for inputs in batches:
        seen = _capture(model, blocks, heads, inputs)
        args, kwargs = seen[0]
        captured.hidden.append(args[0] if args else kwargs["hidden_states"])
        for j in heads:
            rest, extra = _rest_of(*seen[j])
            captured.rest[j].append(rest)
            captured.kwargs[j].append(extra)
    return captured


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"a block returned {type(output).__name__}; sequential calibration needs "
                      "blocks returning the hidden states (a tensor or a tuple starting with one)")


@torch.no_grad()
def _run_block(block: nn.Module, hidden: list[torch.Tensor], rest: list[tuple[Any, ...]],
               kwargs: list[dict[str, Any]]) -> None:
    """Run `block` on every batch for its layers' hooks; each output is dropped at once."""
    for h, args, extra in zip(hidden, rest, kwargs, strict=True):
        _first_tensor(block(h, *args, **extra))


@torch.no_grad()
def _advance(block: nn.Module, hidden: list[torch.Tensor], rest: list[tuple[Any, ...]],
             kwargs: list[dict[str, Any]]) -> None:
    """Replace each batch's hidden states by `block`'s output, one batch at a time: one copy of
    the calibration activations is held, not two (151 MB at 128 x 512 tokens of width 576)."""
    for index, (args, extra) in enumerate(zip(rest, kwargs, strict=True)):
        hidden[index] = _first_tensor(block(hidden[index], *args, **extra))


def returning_memory_per_block(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within it, each call of one of the model's repeated blocks ends by handing freed heap
    pages back (`torchslim.heap`): a whole-model forward holds one block's activations."""
    stack = repeated_blocks(model)
    return returning_memory_after(stack[1] if stack else [])


def _run_model(model: nn.Module, batches: list[Any]) -> None:
    with returning_memory_per_block(model):
        for inputs in batches:  # each output dropped at once: a model's logits can outweigh it
            call_uncached(model, inputs)
            return_freed_memory()


@torch.no_grad()
def _gather(layers: list[tuple[str, nn.Linear]], run: Callable[[], Any], *,
            hessian: bool) -> dict[str, InputStatistics]:
    stats = {name: InputStatistics(
        hessian=torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) if hessian else None,
        sq_norm=torch.zeros(layer.in_features, dtype=torch.float64)) for name, layer in layers}
    handles = [layer.register_forward_hook(
        lambda _m, args, _out, s=stats[name]: s.add(args[0].detach())) for name, layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def compress_layerwise(model: nn.Module, layers: list[tuple[str, nn.Linear]], batches: list[Any],
                       compress: Callable[[str, nn.Linear, InputStatistics], None], *,
                       hessian: bool, label: str) -> dict[str, Any]:
    """Calibrate and `compress(name, layer, statistics)` every Linear of `layers`, block by block.

    Args:
        layers: the selected Linears (qualified names); others are left alone.
        batches: calibration model inputs (token-id tensors or dicts).
        compress: edits one layer in place from its input statistics.
        hessian: gather the input Hessian (SparseGPT, GPTQ) besides the squared norms (Wanda).
        label: the technique's name, for progress lines.

    Returns:
        {"blocks": number of blocks calibrated one after the other (0: one pass), "seconds",
        "uncalibrated": the layers no calibration input reached}. Those are compressed too, from
        statistics of no samples (`samples == 0`): each method then falls back to its data-free
        twin (see `uncalibrated_layers`).
    """
    if not batches:
        raise ConfigError(f"{label} needs calibration data: pass calibration=batches of token ids "
                          "(e.g. 128 sequences of 512 tokens)")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        unreached: list[str] = []

        def compress_each(chosen: list[tuple[str, nn.Linear]], stats: dict[str, InputStatistics]) -> None:
            for name, layer in chosen:
                if not stats[name].samples:
                    unreached.append(name)
                compress(name, layer, stats[name])
                return_freed_memory()

        stack = repeated_blocks(model)
        if stack is None:
            stats = _gather(layers, partial(_run_model, model, batches), hessian=hessian)
            compress_each(layers, stats)
            return {"blocks": 0, "seconds": time.perf_counter() - start, "uncalibrated": unreached}
        prefix, blocks = stack
        lines = ProgressLines(f"{label} block", len(blocks))
        inputs = _block_inputs(model, blocks, batches)
        hidden = inputs.hidden  # replaced block by block
        for index, block in enumerate(blocks):
            where = f"{prefix}.{index}." if prefix else f"{index}."
            mine = [(name, layer) for name, layer in layers if name.startswith(where)]
            rest, kwargs = inputs.rest[inputs.kind[index]], inputs.kwargs[inputs.kind[index]]
            if mine:
                compress_each(mine, _gather(mine, partial(_run_block, block, hidden, rest, kwargs),
                                            hessian=hessian))
            # the compressed block's outputs feed the next one
            _advance(block, hidden, rest, kwargs)
            return_freed_memory()
            lines.update(index + 1, f"{len(mine)} layers")
        outside = [name for name, _ in layers if not name.startswith(f"{prefix}.")]
        if outside:  # e.g. lm_head: calibrated on the compressed stack's final activations
            chosen = [(n, dict(layers)[n]) for n in outside]
            compress_each(chosen, _gather(chosen, partial(_run_model, model, batches), hessian=hessian))
        return {"blocks": len(blocks), "seconds": time.perf_counter() - start, "uncalibrated": unreached}
    finally:
        model.train(was_training)


NO_INPUT = ("no calibration input reached it (an expert the router did not pick for these tokens, "
            "or a layer the forward does not call)")


def uncalibrated_layers(run: dict[str, Any], technique: str, fallback: str) -> dict[str, dict[str, str]]:
    """`{"uncalibrated": {layer: reason}}` for the layers `compress_layerwise`'s `run` got no
    input for, with the data-free `fallback` the method used (taken out of `run`), or {} when
    every layer got some; a warning names them."""
    names = run.pop("uncalibrated", [])
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        warnings.warn(f"torchslim: {technique}: {len(names)} layer(s) got no calibration input and were "
                      f"{fallback}: {shown}; more calibration data reaches more of them", stacklevel=3)
    return {"uncalibrated": {name: f"{NO_INPUT}: {fallback}" for name in names}} if names else {}


def linear_layers_for_llm(model: nn.Module, targets: Select, technique: str, *, replaces: bool = False
                          ) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """The selected Linears a layer-wise method can compress, and the others with the reason.

    `replaces`: the method swaps each layer for another module (GPTQ's codes, SmoothQuant's int8
    layers), so a Linear subclass with a forward of its own is left too (`own_forward`).

    A Linear whose weight is shared with another layer (a language model's `lm_head` tied to the
    token embeddings) is skipped: compressing it would change the embeddings too.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(f"{name}.{pname}" if name else pname)
    layers, skipped = [], {}
    for name, module in targets.resolve(model):
        if not isinstance(module, nn.Linear):
            skipped[name] = (f"{type(module).__name__} is not a Linear; {technique} compresses "
                             "Linear layers (exclude it, or convert it to nn.Linear)")
        elif replaces and (reason := own_forward(module)):
            skipped[name] = reason
        elif len(owners.get(id(original_weight(module)), [])) > 1:
            skipped[name] = (f"its weight is shared with {owners[id(original_weight(module))][0]} "
                             "(tied embeddings): left dense so the embeddings stay as they are")
        else:
            layers.append((name, module))
    return layers, skipped


def rounded_in_float(replaced: dict[str, Any], bits: int) -> dict[str, str]:
    """The layers `replace_layers_` could not swap for their codes (a parent reads their weight
    tensor itself, as Bloom's attention does), with the reason: their weights hold the rounded
    values, still stored in float."""
    return {name: f"{reason.removesuffix('; it is left as it is')}: it stays a float layer, its weights "
                  f"rounded to the {bits}-bit grid in place (no smaller, no faster)"
            for name, reason in replaced["skipped"].items()}


@dataclass
class LayerwiseJob:
    """What a layer-wise method works on: the Linears it compresses, the selected layers it leaves
    (with the reason), and the calibration inputs."""

    layers: list[tuple[str, nn.Linear]]
    skipped: dict[str, str]
    batches: list[Any]


def layerwise_job(model: nn.Module, targets: Select, calibration: Any, technique: str, *,
                  group_size: int | None = None, needs_calibration: bool = True,
                  replaces: bool = False) -> LayerwiseJob:
    """The checks every layer-wise method (Wanda, SparseGPT, GPTQ, AWQ, SmoothQuant) makes before
    any work, each failure a clear error: a Linear to compress, a group size dividing every
    layer's inputs, and calibration inputs.

    Raises:
        ConfigError: no compressible Linear among the selection, a group size that does not divide
            a layer's in_features, or no calibration batches (when `needs_calibration`).
    """
    layers, skipped = linear_layers_for_llm(model, targets, technique, replaces=replaces)
    if group_size is not None:
        bad = [f"{n} (in_features {m.in_features})" for n, m in layers if m.in_features % group_size]
        if bad:
            raise ConfigError(f"{technique}: group_size={group_size} does not divide {', '.join(bad)}; "
                              "pick a divisor (64 for SmolLM2) or exclude those layers")
    if not layers:
        raise ConfigError(f"{technique}: no Linear layer to compress among the selected layers "
                          f"({', '.join(f'{n}: {why}' for n, why in skipped.items()) or 'none selected'})")
    batches = [inputs for inputs, _ in (calibration or [])]
    if needs_calibration and not batches:
        raise ConfigError(f"{technique} needs calibration data: pass calibration=batches of token ids "
                          "(e.g. 128 sequences of 512 tokens)")
    return LayerwiseJob(layers, skipped, batches)
