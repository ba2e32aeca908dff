"""Registry of reference models by name, and the spec that rebuilds one from an artifact.

Artifacts store a `ModelSpec` (registered name + JSON-able build arguments) instead of a pickled
module: loading rebuilds the architecture with `build_model(spec)` and fills in the tensors. The
registry registers itself with storage (`torchslim.artifact.register_architectures`); storage
never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.artifact import SPEC_ATTRIBUTE, Architectures, register_architectures
from torchslim.errors import ConfigError

__all__ = [
    "ModelEntry",
    "ModelSpec",
    "TrainDefaults",
    "build_model",
    "create_model",
    "dataset_for",
    "example_inputs",
    "get_entry",
    "model_names",
    "register_model",
    "spec_of",
]


@dataclass(frozen=True, kw_only=True)
class TrainDefaults:
    """Hyper-parameters that reach the reference accuracy for a model on its default dataset."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """How to build one reference model.

    `build(input_shape=..., num_classes=...)` returns a randomly initialised module;
    `load_pretrained(module)` fills it with the weights a package ships, if there are any.
    """

    name: str
    description: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    default_dataset: str | None = None
    load_pretrained: Callable[[nn.Module], None] | None = None
    input_kind: str = "image"  # "image": float tensor (B, *input_shape); "tokens": int64 ids
    vocab_size: int = 0
    train_defaults: TrainDefaults = field(default_factory=TrainDefaults)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What an artifact records to rebuild a model: a registered name and its build arguments."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """Validate a spec read from a file: exact types, bounded sizes (a forged spec must not
        make the builder allocate gigabytes or fail deep inside a layer constructor).

        Raises:
            ConfigError: naming the field, its value and the valid range.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"model spec must be a mapping with 'name', 'input_shape' and "
                              f"'num_classes', got {type(data).__name__}")
        name, shape, classes = data.get("name"), data.get("input_shape"), data.get("num_classes")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise ConfigError(f"model spec 'name' must be a registered model name, got {str(name)[:80]!r}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_SPEC_RANK
                or any(type(d) is not int or not 1 <= d <= MAX_SPEC_DIM for d in shape)):
            raise ConfigError(f"model spec 'input_shape' must be 1 to {MAX_SPEC_RANK} ints in "
                              f"[1, {MAX_SPEC_DIM}], got {str(shape)[:80]}")
        if type(classes) is not int or not 1 <= classes <= MAX_SPEC_CLASSES:
            raise ConfigError(f"model spec 'num_classes' must be an int in [1, {MAX_SPEC_CLASSES}], "
                              f"got {str(classes)[:40]}")
        return cls(name=name, input_shape=tuple(shape), num_classes=classes)


MAX_SPEC_RANK, MAX_SPEC_DIM, MAX_SPEC_CLASSES = 4, 1 << 16, 1 << 20


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a model to the registry; names are unique."""
    if entry.name in _REGISTRY:
        raise ConfigError(f"model name {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def model_names() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """Look a model up by name; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}") from None


def dataset_for(model_name: str | None, dataset: str | None) -> str:
    """`dataset` if given, else the model's default dataset.

    Raises:
        ConfigError: neither is known.
    """
    chosen = dataset or (get_entry(model_name).default_dataset if model_name else None)
    if chosen is None:
        raise ConfigError(f"model {model_name!r} has no default dataset; pass --dataset "
                          "(or `dataset:` in a recipe)")
    return chosen


def _resolve(spec: ModelSpec) -> Callable[[], nn.Module]:
    """How storage rebuilds a registered model: checked now, built when called."""
    get_entry(spec.name)
    return lambda: build_model(spec)


def _describe(model: nn.Module) -> dict[str, Any] | None:
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    return spec.to_dict() if isinstance(spec, ModelSpec) else None


register_architectures(Architectures(key="model", describe=_describe, parse=ModelSpec.from_dict,
                                     resolve=_resolve))


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the architecture a spec names, randomly initialised, with the spec attached."""
    entry = get_entry(spec.name)
    model = entry.build(input_shape=spec.input_shape, num_classes=spec.num_classes)
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def create_model(name: str, *, pretrained: bool | None = None,
                 input_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> nn.Module:
    """Build a registered model, with its shipped weights when it has them.

    Args:
        name: a registered name (see `model_names()`).
        pretrained: load the weights the model's package ships; default: yes when it has them.
        input_shape: per-sample input shape, e.g. `(1, 28, 28)`; default: the model's own.
        num_classes: size of the output; default: the model's own.

    Raises:
        ConfigError: unknown name, or pretrained weights asked for a model that has none or
            for a shape the weights do not fit.

    Example:
        >>> model = create_model("lenet300", pretrained=False)
        >>> tuple(model(torch.zeros(2, 1, 28, 28)).shape)
        (2, 10)
    """
    entry = get_entry(name)
    spec = ModelSpec(name=name, input_shape=tuple(input_shape or entry.input_shape),
                     num_classes=num_classes or entry.num_classes)
    if pretrained is None:
        pretrained = entry.load_pretrained is not None
    if pretrained:
        if entry.load_pretrained is None:
            raise ConfigError(f"model {name!r} has no pretrained weights; pass pretrained=False "
                              "and train it (torchslim train --model ...)")
        if spec.input_shape != entry.input_shape or spec.num_classes != entry.num_classes:
            raise ConfigError(
                f"pretrained {name!r} expects input {entry.input_shape} and {entry.num_classes} "
                f"classes, got {spec.input_shape} and {spec.num_classes}; use the model's own "
                "shapes or pretrained=False")
    model = build_model(spec)
    if pretrained:
        assert entry.load_pretrained is not None
        entry.load_pretrained(model)
    model.eval()
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec attached by `create_model`/`build_model`.

    Raises:
        ConfigError: the model was not built by torchslim, so there is nothing to rebuild it from.
    """
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if not isinstance(spec, ModelSpec):
        raise ConfigError(
            f"{type(model).__name__} was not built by torchslim.models.create_model, so its "
            "architecture cannot be recorded; build it with create_model(...) or pass spec=")
    return spec


def example_inputs(spec: ModelSpec, batch_size: int = 1, *, seed: int = 0) -> torch.Tensor:
    """A deterministic input batch of the model's own shape (token ids for text models)."""
    entry = get_entry(spec.name)
    generator = torch.Generator().manual_seed(seed)
    if entry.input_kind == "tokens":
        # (B, T) token ids, avoiding the special ids at the bottom of the vocabulary.
        return torch.randint(1000, entry.vocab_size, (batch_size, *spec.input_shape),
                             generator=generator)
    return torch.randn((batch_size, *spec.input_shape), generator=generator)
