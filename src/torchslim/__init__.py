"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.

The public surface: `apply_`/`finalize_` (run a technique in place and get its `Changes`
per layer / bake it in),
`save`/`load` for `.slim` artifacts, and the subpackages `models`, `data`, `training`,
`pruning`, `quantization`, `clustering`, `lowrank`, `distillation`, `measure`, `report` and `errors`.

The package loads lazily (PEP 562): `import torchslim` is instant and the first attribute
(`ts.save`, `ts.pruning`, ...) loads the whole public surface, so that `torchslim --help` does not
import torch. Registries call `load_public_surface()` before a lookup, so a technique, a structural
edit or an architecture registered by any public module is known however the caller came in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("artifact", "clustering", "data", "depth", "distillation", "errors", "huggingface",
               "lowrank", "measure", "models", "pruning", "quantization", "report", "training")
_ATTRIBUTES = {
    "apply_": "torchslim.api", "finalize_": "torchslim.api",
    "Encoding": "torchslim.artifact", "load": "torchslim.artifact", "save": "torchslim.artifact",
    "RecalibrateBN": "torchslim.batchnorm", "recalibrate_bn_": "torchslim.batchnorm",
    "Calibration": "torchslim.calibration", "Changes": "torchslim.changes", "Select": "torchslim.select",
}
_loaded = False

if TYPE_CHECKING:
    from torchslim import (
        artifact,
        clustering,
        data,
        depth,
        distillation,
        errors,
        huggingface,
        lowrank,
        measure,
        models,
        pruning,
        quantization,
        report,
        training,
    )
    from torchslim.api import apply_, finalize_
    from torchslim.artifact import Encoding, load, save
    from torchslim.batchnorm import RecalibrateBN, recalibrate_bn_
    from torchslim.calibration import Calibration
    from torchslim.changes import Changes
    from torchslim.select import Select


def load_public_surface() -> None:
    """Import every public module once (they register their techniques, structural edits,
    channel rules and architectures as they load)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so that a lookup made while these modules load does not recurse
    try:
        for name in (*_SUBMODULES, *sorted(set(_ATTRIBUTES.values()))):
            importlib.import_module(name if "." in name else f"torchslim.{name}")
    except BaseException:
        _loaded = False
        raise


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES or name in _ATTRIBUTES:
        load_public_surface()
        module = importlib.import_module(_ATTRIBUTES.get(name, f"torchslim.{name}"))
        return module if name in _SUBMODULES else getattr(module, name)
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, *_ATTRIBUTES])


__all__ = [
    "Calibration",
    "Changes",
    "Encoding",
    "RecalibrateBN",
    "Select",
    "__version__",
    "apply_",
    "artifact",
    "clustering",
    "data",
    "depth",
    "distillation",
    "errors",
    "finalize_",
    "huggingface",
    "load",
    "load_public_surface",
    "lowrank",
    "measure",
    "models",
    "pruning",
    "quantization",
    "recalibrate_bn_",
    "report",
    "save",
    "training",
]
