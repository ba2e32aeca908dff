"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.

The public surface: `save`/`load` for `.slim` artifacts, and the subpackages `models`, `data`,
`training`, `measure`, `report` and `errors`.
"""

__version__ = "0.1.0"

from torchslim import data, errors, measure, models, report, training
from torchslim.artifact import load, save

__all__ = ["__version__", "data", "errors", "load", "measure", "models", "report", "save",
           "training"]
