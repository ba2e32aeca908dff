"""The user's own model and data on the command line: `FILE.py:FUNCTION` or `package.module:FUNCTION`.

A factory string names a function in the user's code that returns what torchslim needs: an
`nn.Module` with its weights loaded (`--model`), or a mapping with DataLoaders under `train`,
`val` and optionally `test` (`--dataset`). Importing it runs the user's own code, by the user's
own command; loading an artifact never does (see `torchslim.artifact`). Every way this can go
wrong is one `ConfigError` naming the string and the fix, before any work starts.

Example:
    >>> is_factory("mypkg/nets.py:build_model"), is_factory("mypkg.nets:build"), is_factory("lenet5")
    (True, True, False)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.errors import ConfigError

__all__ = ["build_from_factory", "is_factory", "load_data_factory", "resolve_factory"]

_MODULE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_FUNCTION = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_factory(text: str) -> bool:
    """Whether `text` is shaped like `FILE.py:FUNCTION` or `package.module:FUNCTION`."""
    target, sep, function = text.rpartition(":")
    if not sep or not _FUNCTION.match(function):
        return False
    return target.endswith(".py") or bool(_MODULE.match(target))


def _import_file(path: Path, text: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{text!r}: {path} does not exist; give FILE.py:FUNCTION with a path to "
                          "your Python file")
    name = "torchslim_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{text!r}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:  # the file's own siblings import as they do when the user runs it
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{text!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(folder)
    return module


def resolve_factory(text: str) -> Callable[[], Any]:
    """The function a factory string names (imported, not yet called).

    Raises:
        ConfigError: the file or module is missing or fails to import, or the function is
            missing or not callable.
    """
    target, _, function = text.rpartition(":")
    if not is_factory(text):
        raise ConfigError(f"{text!r} is not FILE.py:FUNCTION or package.module:FUNCTION")
    if target.endswith(".py"):
        module = _import_file(Path(target), text)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ConfigError(f"{text!r}: importing {target} raised {type(exc).__name__}: {exc}; is "
                              "the package installed (or its folder on PYTHONPATH)?") from exc
    found: Any = module
    for part in function.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"{text!r}: {target} has no function {function!r}; callables there: "
                          f"{', '.join(names[:12]) or 'none'}")
    return found


def _call(text: str, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except Exception as exc:
        raise ConfigError(f"{text!r} raised {type(exc).__name__}: {exc}") from exc


def build_from_factory(text: str) -> nn.Module:
    """Call a model factory; it must return an `nn.Module` (with its weights loaded).

    Raises:
        ConfigError: the factory cannot be found, raises, or returns something else.
    """
    model = _call(text, resolve_factory(text))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{text!r} returned a {type(model).__name__}, not an nn.Module; the "
                          "factory must return the model with its weights loaded")
    return model.eval()


def load_data_factory(text: str) -> dict[str, Any]:
    """Call a data factory; it must return a mapping with iterables of batches under `train`
    and `val` (and optionally `test`), e.g. torch DataLoaders.

    Raises:
        ConfigError: the factory cannot be found, raises, or returns something else.
    """
    loaders = _call(text, resolve_factory(text))
    if not isinstance(loaders, Mapping):
        raise ConfigError(f"{text!r} returned a {type(loaders).__name__}; a data factory returns a "
                          "dict like {'train': DataLoader, 'val': DataLoader, 'test': DataLoader}")
    missing = [key for key in ("train", "val") if key not in loaders]
    wrong = [key for key, value in loaders.items() if not hasattr(value, "__iter__")]
    if missing or wrong:
        raise ConfigError(f"{text!r} returned keys {sorted(map(str, loaders))}: "
                          + (f"missing {missing} " if missing else "")
                          + (f"not iterable {wrong}" if wrong else "")
                          + "; return DataLoaders under 'train' and 'val' (and optionally 'test')")
    return dict(loaders)
