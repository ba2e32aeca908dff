"""`Select`: which layers a technique touches, by name, glob pattern and type.

A rule that matches nothing is an error (`SelectionError`) rather than a silent no-op: a typo in a
layer name must not produce an uncompressed model that looks compressed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from torchslim.errors import ConfigError, SelectionError
from torchslim.linear_layers import is_hf_conv1d

__all__ = ["LAYER_TYPES", "Select", "unselectable_weight_layers"]

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Embedding": nn.Embedding,
}


@dataclass(frozen=True, kw_only=True)
class Select:
    """Layers chosen by exact `names`, glob `patterns` (`blocks.*.conv1`) and `types` (by name).

    With no `names` or `patterns`, every layer of the given `types` is chosen (default types:
    Linear and Conv; `Linear` includes Hugging Face's transposed `Conv1D`). `exclude` holds
    names or patterns removed from the result.

    Example:
        >>> from torchslim.models import create_model
        >>> model = create_model("lenet5", pretrained=False)
        >>> [name for name, _ in Select(types=("Linear",), exclude=("fc2",)).resolve(model)]
        ['fc1']
    """

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Select:
        """Build from a recipe mapping; unknown keys list the valid ones."""
        data = {} if data is None else data
        valid = {"names", "patterns", "types", "exclude"}
        if not isinstance(data, dict):
            raise ConfigError(f"targets must be a mapping of {sorted(valid)} to lists of names, got "
                              f"{type(data).__name__} {str(data)[:60]}")
        unknown = sorted(str(key) for key in set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown selector key(s) {unknown}; valid keys: {sorted(valid)}")
        bad = [key for key, value in data.items()
               if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)]
        if bad:
            raise ConfigError(f"targets {bad} must be lists of strings (e.g. `names: [fc1]`), got "
                              f"{[data[k] for k in bad]}")
        return cls(**{key: tuple(value) for key, value in data.items()})

    def to_dict(self) -> dict[str, list[str]]:
        return {"names": list(self.names), "patterns": list(self.patterns),
                "types": list(self.types), "exclude": list(self.exclude)}

    def picks(self, name: str) -> bool:
        """Whether a layer called `name`, of one of `types`, is chosen: named or matched (or no
        names and patterns given), and not excluded."""
        return ((not self.names and not self.patterns) or name in self.names
                or any(fnmatch.fnmatch(name, p) for p in self.patterns)) and \
            not any(name == e or fnmatch.fnmatch(name, e) for e in self.exclude)

    def resolve(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The matching `(name, module)` pairs in model order.

        Raises:
            ConfigError: an unknown type name.
            SelectionError: a name or pattern matching no layer, or an empty result.
        """
        unknown = [t for t in self.types if t not in LAYER_TYPES]
        if unknown:
            raise ConfigError(f"unknown layer type(s) {unknown}; known: {sorted(LAYER_TYPES)}")
        kinds = tuple(LAYER_TYPES[t] for t in self.types)
        linear = "Linear" in self.types  # Hugging Face's Conv1D is a Linear with its weight transposed
        layers = {name: module for name, module in model.named_modules()
                  if name and (isinstance(module, kinds) or (linear and is_hf_conv1d(module)))}
        problems = [f"name {n!r}" for n in self.names if n not in layers]
        problems += [f"pattern {p!r}" for p in self.patterns
                     if not fnmatch.filter(layers, p)]
        if problems:
            raise SelectionError(f"{', '.join(problems)} matched no {'/'.join(self.types)} layer; "
                                 f"layers are: {', '.join(layers) or 'none'}")
        chosen = [name for name in layers if self.picks(name)]
        if not chosen:
            raise SelectionError(f"the selection {self.to_dict()} matched no layer of "
                                 f"{type(model).__name__}; layers are: {', '.join(layers) or 'none'}")
        return [(name, layers[name]) for name in chosen]


EMBEDDING_WORDS = ("embed", "position", "token", "pos_")  # a ViT's cls_token, a Swin position-bias table


def unselectable_weight_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Modules holding a weight matrix or kernel of a type no selector names, with the reason they
    were left alone: a module with a raw `weight` Parameter, or one that holds its weights as
    parameters of its own (a mixture-of-experts layer's fused `gate_up_proj` / `down_proj`
    tensors in Hugging Face's models, a router's matrix), except the names or patterns in
    `exclude`.

    Embedding and normalisation layers are left out, and so are parameters named as embeddings,
    tokens or positions: keeping them is the convention. A module of ours (a compressed layer's
    scales) is not listed.
    """
    kept = (*LAYER_TYPES.values(), nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    found = {}
    for name, module in model.named_modules():
        matrices = {key: tuple(value.shape) for key, value in module._parameters.items()
                    if isinstance(value, nn.Parameter) and value.dim() >= 2 and value.is_floating_point()}
        if (not name or not matrices or isinstance(module, (*kept, parametrize.ParametrizationList))
                or is_hf_conv1d(module)
                or any(name == e or fnmatch.fnmatch(name, e) for e in exclude)):
            continue
        if list(matrices) == ["weight"]:
            found[name] = (f"{type(module).__name__} is not a layer type this technique handles "
                           f"({', '.join(LAYER_TYPES)}); it is left unchanged")
            continue
        weights = {key: shape for key, shape in matrices.items()
                   if not any(word in key.lower() for word in EMBEDDING_WORDS)}
        if weights and not type(module).__module__.startswith("torchslim."):
            tensors = ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in weights.items())
            found[name] = (f"{type(module).__name__} holds its weights as parameters ({tensors}), not as "
                           f"layers of a type this technique handles ({', '.join(LAYER_TYPES)}); they "
                           "are left unchanged")
    return found
