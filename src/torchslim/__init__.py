"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.

The public surface: `apply_`/`finalize_` (run a technique in place and get its `Changes`
per layer / bake it in),
`save`/`load` for `.slim` artifacts, and the subpackages `models`, `data`, `training`,
`pruning`, `clustering`, `lowrank`, `distillation`, `measure`, `report` and `errors`.
"""

__version__ = "0.1.0"

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
    report,
    training,
)
from torchslim.api import apply_, finalize_
from torchslim.artifact import Encoding, load, save
from torchslim.batchnorm import RecalibrateBN, recalibrate_bn_
from torchslim.calibration import Calibration
from torchslim.changes import Changes
from torchslim.select import Select

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
    "lowrank",
    "measure",
    "models",
    "pruning",
    "recalibrate_bn_",
    "report",
    "save",
    "training",
]
