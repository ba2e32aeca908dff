"""Base of every technique config, and the one way configs are validated.

A technique is one frozen, keyword-only config dataclass plus one registered handler. Configs
are pydantic dataclasses so a wrong value or an unknown key fails at construction with the
field, the value and what is valid, whether it came from Python, the CLI or a YAML recipe.
"""

from __future__ import annotations

import dataclasses
import functools
from enum import Enum
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError

from torchslim.errors import ConfigError

__all__ = ["TechniqueConfig", "build_config", "to_jsonable", "validated"]

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    """Enums to their values, tuples to lists, recursively (for JSON and YAML)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _describe(cls: type, exc: ValidationError, what: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err['input']!r})"
        if err["loc"] else err["msg"].removeprefix("Value error, ")
        for err in exc.errors())
    valid = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type,unused-ignore]
    return f"invalid {what}: {problems}; valid keys: {', '.join(valid)}"


def validated(cls: type[T]) -> type[T]:
    """Class decorator for pydantic dataclasses: raise `ConfigError` instead of ValidationError."""
    init = cls.__init__
    what = getattr(cls, "what", cls.__name__)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc, what)) from None
        except TypeError as exc:
            raise ConfigError(f"invalid {what}: {exc}") from None

    setattr(cls, "__init__", __init__)  # noqa: B010 - wrap the generated __init__
    return cls


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """`cls(**values)` for a `@validated` config, from a mapping (CLI, YAML)."""
    if not isinstance(values, dict):
        raise ConfigError(f"options of {cls.__name__} must be a mapping, got {values!r}")
    return cls(**values)


class TechniqueConfig:
    """Mixin of technique configs: a `kind` name (the recipe stage key) and `to_dict`.

    `selects_layers`: the technique picks its layers by type with a `Select` (so `apply_`
    names the weight layers of other types it left alone); `structural`: it replaces or
    reshapes layers (a recipe resolves later stages' selections only after it runs);
    `converts`: the model becomes an int8 program (a recipe's last model stage);
    `targets_layers`: its `targets:` names layers (not channel groups), checked up front.
    """

    kind: ClassVar[str] = ""
    selects_layers: ClassVar[bool] = False
    structural: ClassVar[bool] = False
    converts: ClassVar[bool] = False
    targets_layers: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        return {name: to_jsonable(value) for name, value in self.__dict__.items()
                if not name.startswith("_")}
