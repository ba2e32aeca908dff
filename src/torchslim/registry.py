"""Explicit registry of techniques and recipe stages.

A technique is a config class and a handler (`apply_` finds the handler by the config's type).
Every technique is also a recipe stage of the same `kind`, run by applying it; a stage that is
more than one `apply_` (it trains, converts the model, or writes the file) registers a runner.
The recipe schema, the recipe runner, the CLI and `apply_` all look techniques up here, so adding
one means its module and its tests, never an edit to a runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchslim
from torchslim.errors import ConfigError

__all__ = ["Handler", "StageRunner", "StageType", "handler_for", "register_stage", "register_technique",
           "stage_kinds", "stage_type", "technique_config", "technique_kinds"]

Handler = Callable[..., dict[str, Any]]
# runner(run, stage, model, constraints, checkpoint_dir) -> summary; a converting stage's
# runner returns (the converted model, summary). `run` is the recipe run (`CompressionRun`).
StageRunner = Callable[..., Any]


@dataclass(frozen=True)
class StageType:
    """One recipe stage name: its config class, and how it runs (None: `apply_` the technique)."""

    config: type
    runner: StageRunner | None = None

    @property
    def structural(self) -> bool:
        return bool(getattr(self.config, "structural", False))

    @property
    def converts(self) -> bool:
        return bool(getattr(self.config, "converts", False))


_HANDLERS: dict[type, Handler] = {}
_KINDS: dict[str, type] = {}
_STAGES: dict[str, StageType] = {}


def register_technique(config_cls: type, handler: Handler) -> None:
    """Make `apply_(model, config_cls(...))` call `handler(model, config, **context)`, and the
    recipe stage `config_cls.kind` apply it."""
    kind = getattr(config_cls, "kind", "")
    if not kind or kind in _KINDS:
        raise ConfigError(f"technique kind {kind!r} of {config_cls.__name__} is empty or taken")
    _HANDLERS[config_cls] = handler
    _KINDS[kind] = config_cls
    _STAGES.setdefault(kind, StageType(config_cls))


def register_stage(config_cls: type, runner: StageRunner) -> None:
    """A recipe stage that is more than one `apply_`: `runner` runs it. It may take over a
    technique's stage name (`lowbit` trains with the technique, then bakes it in)."""
    kind = getattr(config_cls, "kind", "")
    taken = _STAGES.get(kind)
    if not kind or (taken is not None and taken.runner is not None and taken.config is not config_cls):
        raise ConfigError(f"stage kind {kind!r} of {config_cls.__name__} is empty or taken")
    _STAGES[kind] = StageType(config_cls, runner)


def handler_for(config: object) -> Handler:
    """The handler registered for the type of `config`."""
    torchslim.load_public_surface()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered technique config; "
                          f"known: {', '.join(sorted(c.__name__ for c in _HANDLERS))}") from None


def technique_kinds() -> list[str]:
    """Names of the techniques `apply_` runs."""
    torchslim.load_public_surface()
    return sorted(_KINDS)


def technique_config(kind: str) -> type:
    """The config class of a technique name."""
    torchslim.load_public_surface()
    try:
        return _KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown technique {kind!r}; known: {', '.join(technique_kinds())}") from None


def stage_kinds() -> list[str]:
    """Stage names usable in recipes."""
    torchslim.load_public_surface()
    return sorted(_STAGES)


def stage_type(kind: str) -> StageType:
    """How the recipe stage `kind` is configured and run."""
    torchslim.load_public_surface()
    try:
        return _STAGES[kind]
    except KeyError:
        raise ConfigError(f"unknown stage {kind!r}; valid stages: {', '.join(stage_kinds())}") from None
