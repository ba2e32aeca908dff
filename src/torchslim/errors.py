"""The exceptions torchslim raises on bad input.

Every message names the value received, what is valid, and the fix. Callers catch `SlimError`
to handle anything torchslim rejects; the subclasses say which part of the input is at fault.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "GraphError",
    "NothingChangedWarning",
    "SelectionError",
    "SlimError",
    "UnsupportedModuleError",
]


class SlimError(Exception):
    """Base class of every error torchslim raises on purpose."""


class ConfigError(SlimError, ValueError):
    """An option, a name or a recipe key is invalid; the message lists the valid ones."""


class SelectionError(SlimError, ValueError):
    """A layer selector matched no layer, or matched layers it must not touch."""


class UnsupportedModuleError(SlimError, TypeError):
    """A technique was asked to change a layer type it has no handler for."""


class GraphError(SlimError, RuntimeError):
    """Dependency tracing met an operation it cannot map channels through."""


class ArtifactError(SlimError, OSError):
    """A saved file is missing, truncated, altered or not a torchslim file."""


class DataError(SlimError, OSError):
    """A dataset is not installed or its files are unreadable; the message says how to install it."""


class NothingChangedWarning(UserWarning):
    """A technique ran and changed nothing (every layer skipped, or a ratio too small to remove
    a unit). Make it an error with `warnings.simplefilter("error", NothingChangedWarning)`."""
