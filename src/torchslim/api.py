"""The one verb: `apply_(model, config)` runs a technique in place; `finalize_` bakes it in.

Techniques leave reversible parametrizations (masks, shared-weight codebooks) on the layers they
touch so that fine-tuning keeps their constraint; `finalize_` turns them into plain tensors.
A handler that fails leaves the model exactly as it was.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from torchslim.calibration import take_pairs
from torchslim.changes import Changes, observed_changes
from torchslim.errors import NothingChangedWarning
from torchslim.fused_experts import fused_experts, unfuse_experts_, unfused_names
from torchslim.linear_layers import hf_conv1d_layers, is_hf_conv1d, linearize_
from torchslim.parametrized import (
    foreign_parametrized,
    remove_weight_parametrizations,
    weight_parametrizations,
)
from torchslim.registry import handler_for
from torchslim.select import Select, unselectable_weight_layers
from torchslim.signature import record_signature_
from torchslim.snapshot import ModelSnapshot

__all__ = ["apply_", "finalize_", "parametrized_layers"]

Batches = Iterable[Any]


def apply_(model: nn.Module, config: object, *, targets: Select | None = None,
           calibration: Batches | None = None, example_inputs: Any = None) -> Changes:
    """Apply a technique to `model` in place and return what changed, per layer.

    Args:
        model: the module to change.
        config: a technique config, e.g. `WeightPruning(sparsity=0.9)`.
        targets: the layers to touch (default: the technique's own default selection).
        calibration: batches for criteria that look at data (Taylor, activations): a
            `Calibration`, or any iterable of batches (a DataLoader of `(x, y)`, dicts, tensors),
            read lazily up to the technique's `calibration_batches`.
        example_inputs: what the model is called with, for techniques that trace it
            (structured pruning); other techniques ignore it.

    Returns:
        `Changes`: per layer, what changed (`.changed`) and what was skipped with the reason
        (`.skipped`), with the technique's own summary. A technique that changed nothing warns
        (`NothingChangedWarning`, which `warnings.simplefilter("error", ...)` makes an error).

    Raises:
        ConfigError, SelectionError: bad options or a selection matching no layer; the model
            is left unchanged.
    """
    handler = handler_for(config)
    foreign = foreign_parametrized(model) if getattr(config, "selects_layers", False) else {}
    if foreign:  # the model's own parametrizations (weight_norm): never selected, named below
        chosen = targets or Select()
        targets = replace(chosen, exclude=(*chosen.exclude, *foreign))
    if calibration is not None:  # any iterable of batches, read only as far as the technique needs
        calibration = take_pairs(calibration, getattr(config, "calibration_batches", None) or 64)
    if example_inputs is not None:
        record_signature_(model, example_inputs)  # kept by `save`: benchmarks and export need it
    with ModelSnapshot(model) as before:  # its tensors wait on disk: the model's memory is not doubled
        try:
            _linearize_selected(model, config, targets)
            experts_left = _unfuse_selected_experts(model, config, targets)
            takes_inputs = "example_inputs" in inspect.signature(handler).parameters
            extra = {"example_inputs": example_inputs} if takes_inputs and example_inputs is not None else {}
            result = handler(model, config, targets=targets or Select(), calibration=calibration, **extra)
        except BaseException:
            model.__dict__.clear()  # the failed state goes before the old one is read back
            restored = before.restore()
            model.__dict__.update(restored.__dict__)
            model.__class__ = restored.__class__
            raise
        changed = observed_changes(before.structure, model, materialize=before.materialize)
    kind = str(getattr(config, "kind", type(config).__name__))
    why_unchanged = result.pop("why_unchanged", None)
    changes = Changes(technique=kind, **result, changed=changed)
    everything = targets is None or not (targets.names or targets.patterns)  # less any exclusions
    if everything and getattr(config, "selects_layers", False):
        _name_unhandled_layers(model, changes, kind, () if targets is None else targets.exclude)
    if foreign:
        changes["skipped"] = {**foreign, **changes.get("skipped", {})}
    if experts_left:  # the specific reason, over the generic "holds its weights as parameters"
        changes["skipped"] = {**changes.get("skipped", {}), **experts_left}
    if not changes.changed:
        why = why_unchanged or "; ".join(f"{k}: {v}" for k, v in changes.skipped.items()) or "no reason given"
        warnings.warn(f"torchslim: {kind} changed nothing: {why}", NothingChangedWarning, stacklevel=2)
    return changes


def _linearize_selected(model: nn.Module, config: object, targets: Select | None) -> None:
    """Hugging Face `Conv1D` layers the technique will touch become the `nn.Linear`s they are
    (recorded, replayed on load): every technique then handles them as Linear layers."""
    if not hf_conv1d_layers(model):
        return
    if getattr(config, "selects_layers", False):
        chosen = (targets or Select()).resolve(model)
        linearize_(model, [name for name, layer in chosen if is_hf_conv1d(layer)])
    elif getattr(config, "structural", False):
        linearize_(model)


def _unfuse_selected_experts(model: nn.Module, config: object, targets: Select | None) -> dict[str, str]:
    """Mixture-of-experts modules holding their experts as 3-D tensors become one Linear per
    expert and projection (recorded, replayed on load) when the technique picks layers and would
    pick some of those Linears. Returns the modules left fused, with the reason."""
    if not getattr(config, "selects_layers", False):
        return {}
    chosen = targets or Select()
    if "Linear" not in chosen.types:
        return {}
    names = [name for name, experts in fused_experts(model, chosen.exclude).items()
             if any(chosen.picks(layer) for layer in unfused_names(name, experts))]
    return unfuse_experts_(model, names) if names else {}


def _name_unhandled_layers(model: nn.Module, result: Changes, kind: str, exclude: tuple[str, ...]) -> None:
    """No silent skips: weight layers of types the default selection (less what the user
    excluded) cannot pick are listed under `skipped` with the reason, and named in a warning."""
    left = unselectable_weight_layers(model, exclude)
    if left:
        result["skipped"] = {**left, **result.get("skipped", {})}
        names = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in list(left)[:6])
        warnings.warn(f"torchslim: {kind} left {len(left)} weight layer(s) of types it does not handle "
                      f"unchanged: {names}{', ...' if len(left) > 6 else ''}", stacklevel=2)


def parametrized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers carrying torchslim parametrizations (only) on their weight."""
    return [(name, m) for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight")
            and all(getattr(p, "torchslim_parametrization", False) for p in weight_parametrizations(m))]


def finalize_(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight by its current value: masks -> zeros, codebooks -> values.

    Example:
        >>> from torchslim.pruning import WeightPruning
        >>> layer = nn.Sequential(nn.Linear(4, 4))
        >>> _ = apply_(layer, WeightPruning(sparsity=0.5))
        >>> int((finalize_(layer)[0].weight == 0).sum())
        8
    """
    for _, module in parametrized_layers(model):
        remove_weight_parametrizations(module, leave_parametrized=True)
    return model
