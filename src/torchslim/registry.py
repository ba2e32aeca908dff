"""Explicit registry of techniques: config class -> handler, and stage name -> config class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchslim.errors import ConfigError

__all__ = ["Handler", "handler_for", "register_technique", "technique_config", "technique_kinds"]

Handler = Callable[..., dict[str, Any]]


_HANDLERS: dict[type, Handler] = {}
_KINDS: dict[str, type] = {}


def register_technique(config_cls: type, handler: Handler) -> None:
    """Make `apply_(model, config_cls(...))` call `handler(model, config, **context)`."""
    kind = getattr(config_cls, "kind", "")
    if not kind or kind in _KINDS:
        raise ConfigError(f"technique kind {kind!r} of {config_cls.__name__} is empty or taken")
    _HANDLERS[config_cls] = handler
    _KINDS[kind] = config_cls


def handler_for(config: object) -> Handler:
    """The handler registered for the type of `config`."""
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a registered technique config; "
                          f"known: {', '.join(sorted(c.__name__ for c in _HANDLERS))}") from None


def technique_kinds() -> list[str]:
    """Stage names usable in recipes."""
    return sorted(_KINDS)


def technique_config(kind: str) -> type:
    """The config class of a stage name."""
    try:
        return _KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown technique {kind!r}; known: {', '.join(technique_kinds())}") from None


