"""The names of the registered models and datasets, readable without importing torch.

The CLI prints them in its help; `torchslim --help` must not pay torch's import time for a list of
names. `tests/test_cli_startup.py` checks that they match `models.model_names()` and
`data.dataset_names()`.
"""

from __future__ import annotations

__all__ = ["DATASET_NAMES", "MODEL_NAMES"]

MODEL_NAMES = ("lenet300", "lenet5", "minilm", "mlp-1200-1200", "mlp-800-800", "mnist-cnn", "mobilenet-v2",
               "resnet-small")
DATASET_NAMES = ("digits", "fashion-mnist", "mnist")
