"""Structural edits: how a compressed model's layers differ from its registered architecture.

A factorized Linear becomes two Linears; a decomposed conv becomes three convs. Artifacts must
still load without pickle, so every technique that changes structure records a small JSON edit
(`{"kind": "low_rank_linear", "layer": "fc1", "rank": 32}`) on the model. `artifact.save` writes
the list, and `artifact.load` rebuilds the registered architecture, replays the edits in order
(shapes only), then fills in the tensors. Replays are registered explicitly by edit kind.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchslim
from torchslim.errors import ArtifactError, ConfigError

__all__ = ["Edit", "edits_of", "forward_source", "own_forward", "record_edit_", "register_edit",
           "replace_layers_", "replace_module_", "replay_edits_"]

EDITS_ATTRIBUTE = "torchslim_edits"
Edit = dict[str, Any]
Replay = Callable[[nn.Module, Edit], None]

_REPLAYS: dict[str, Replay] = {}


def register_edit(kind: str, replay: Replay) -> None:
    """Make `replay_edits_` rebuild edits of `kind` with `replay(model, edit)`."""
    if kind in _REPLAYS:
        raise ConfigError(f"structural edit kind {kind!r} is already registered")
    _REPLAYS[kind] = replay


def edits_of(model: nn.Module) -> list[Edit]:
    """The edits recorded on `model`, oldest first (a copy)."""
    return copy.deepcopy(list(getattr(model, EDITS_ATTRIBUTE, [])))


def record_edit_(model: nn.Module, edit: Edit) -> None:
    """Append `edit` to the model's edit list (after the technique has made it)."""
    if edit.get("kind") not in _REPLAYS:
        raise ConfigError(f"structural edit kind {edit.get('kind')!r} is not registered; "
                          f"known: {', '.join(sorted(_REPLAYS))}")
    setattr(model, EDITS_ATTRIBUTE, [*getattr(model, EDITS_ATTRIBUTE, []), copy.deepcopy(edit)])


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` is; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def replace_layers_(model: nn.Module, names: list[str],
                    build: Callable[[str, nn.Module], tuple[nn.Module, Edit]]) -> dict[str, Any]:
    """Swap each layer `name` for `build(name, layer)`'s module and record its edit.

    Returns the names replaced and the model's parameter count before and after.
    """
    before = sum(p.numel() for p in model.parameters())
    skipped = {name: reason for name in names if (reason := read_in_place(model, name))}
    done = []
    for name in [name for name in names if name not in skipped]:
        new, edit = build(name, model.get_submodule(name))
        if _weight_read_by_parent(model, name) == "dtype" and not hasattr(new, "weight"):  # T5's wo
            parent = type(model.get_submodule(name.rpartition(".")[0])).__name__
            skipped[name] = (f"{name}'s weight is read by {parent}.forward, and a {type(new).__name__} "
                             "has none; it is left as it is")
            continue
        replace_module_(model, name, new)
        record_edit_(model, edit)
        done.append(name)
    return {"replaced": done, "skipped": skipped, "params_before": before,
            "params_after": sum(p.numel() for p in model.parameters())}


def own_forward(module: nn.Module) -> str | None:
    """Why `module` cannot be replaced by a torch-layer equivalent, if it cannot: its class
    extends a torch layer (`nn.Linear`, `nn.Embedding`, ...) with a forward of its own (a scaled
    embedding, a Linear with a built-in activation), which a replacement would silently drop.

    A forward that only restates the base one (Falcon's `FalconLinear` computes x @ Wᵀ + b) is
    found out by running both on random inputs, small and large: equal outputs, nothing to drop."""
    cls = type(module)
    base = next((k for k in cls.__mro__ if k.__module__.startswith("torch.nn.") and k is not nn.Module),
                None)  # the torch layer it extends; None for a module of its own (ours, a user's)
    if (base not in (None, cls) and getattr(cls, "forward", None) is not getattr(base, "forward", None)
            and not _same_forward(module, base)):
        return (f"its class {cls.__name__} replaces {base.__name__}'s forward; a replacement would "
                "drop what it adds, so it is left as it is (exclude it, or give it the base forward)")
    return None


def _same_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether `module`'s own forward gives what `base.forward` gives, on random inputs."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return False
    generator = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Linear):
        probes = [torch.randn(3, module.in_features, generator=generator).to(weight.dtype)]
        probes.append(100 * probes[0])
    elif isinstance(module, nn.Embedding):
        probes = [torch.randint(0, module.num_embeddings, (2, 5), generator=generator)]
    else:
        return False
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for x in probes:
                own, reference = module(x), base.forward(module, x)
                tolerance = 1e-5 * float(reference.abs().max())
                if not (isinstance(own, torch.Tensor) and own.shape == reference.shape
                        and torch.allclose(own, reference, rtol=1e-4, atol=tolerance)):
                    return False
    except Exception:  # a forward that fails on a plain input is not the base's
        return False
    finally:
        module.train(was_training)
    return True


def read_in_place(model: nn.Module, name: str) -> str | None:
    """Why layer `name` cannot be swapped for another module, if it cannot: its class replaces
    the forward of the torch layer it extends (see `own_forward`); its parent reads its tensors
    instead of calling it (nn.MultiheadAttention's `out_proj`, for one), so a replacement
    without a `.weight` would break the model; or its weight is tied to another module's, so a
    replacement would untie them and grow the model."""
    own = own_forward(model.get_submodule(name))
    if own:
        return own
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name} is read as a weight by its {type(parent).__name__} (never called), so it "
                "cannot be replaced; it is left as it is")
    if _weight_read_by_parent(model, name) == "tensor":
        return (f"{name}'s weight is read by {type(parent).__name__}.forward, so a replacement "
                "without one would break it; it is left as it is")
    weight = getattr(model.get_submodule(name), "weight", None)
    tied = [other for other, param in model.named_parameters(remove_duplicate=False)
            if param is weight and not other.startswith(name + ".")]
    if tied:  # e.g. a language model's output head tied to its input embedding
        return (f"{name}'s weight is tied to {tied[0]}; replacing it would untie the two and add "
                "parameters, so it is left as it is")
    return None


def _weight_read_by_parent(model: nn.Module, name: str) -> str | None:
    """How the forward of layer `name`'s parent reads `self.<child>.weight`: `"tensor"` (it
    computes with it: a replacement must keep it), `"dtype"` (only as T5's MLP does,
    `isinstance(self.wo.weight, torch.Tensor) and ... self.wo.weight.dtype`, to cast its input:
    a replacement needs a `weight` attribute of any kind, and our compressed layers' `weight()`
    is one), or None when it does not read it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    source = forward_source(type(parent))  # type: ignore[arg-type]
    reads = source.count(f"self.{child}.weight")
    if not reads:
        return None
    guard = f"isinstance(self.{child}.weight, torch.Tensor)"
    guarded = guard in source and reads == source.count(guard) + source.count(f"self.{child}.weight.dtype")
    return "dtype" if guarded else "tensor"


@functools.cache
def forward_source(cls: type) -> str:
    """The source of a module class's forward ('' when it has none to read)."""
    try:
        return inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError, AttributeError):
        return ""


def replay_edits_(model: nn.Module, edits: Any, *, source: str = "artifact") -> nn.Module:
    """Rebuild the structure `edits` describe on a freshly built `model` (weights left random).

    Raises:
        ArtifactError: an edit of an unknown kind, or one that does not fit the model.
    """
    torchslim.load_public_surface()
    if not isinstance(edits, list):
        raise ArtifactError(f"{source}: the structural edit list is malformed ({type(edits).__name__})")
    for index, edit in enumerate(edits):
        kind = edit.get("kind") if isinstance(edit, dict) else None
        replay = _REPLAYS.get(str(kind))
        if replay is None:
            raise ArtifactError(f"{source}: structural edit {index} has kind {kind!r}, which this "
                                f"torchslim cannot rebuild (known: {', '.join(sorted(_REPLAYS))}); "
                                "upgrade torchslim")
        try:
            replay(model, edit)
        except (AttributeError, KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"{source}: structural edit {index} ({edit}) does not fit "
                                f"{type(model).__name__}: {exc}") from exc
        record_edit_(model, edit)
    return model
