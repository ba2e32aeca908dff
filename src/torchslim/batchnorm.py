"""BatchNorm re-estimation: fresh running statistics after the layers before them changed.

Structured pruning, low-rank factorization or weight sharing change what a BatchNorm layer sees,
while its running mean and variance still describe the old activations. Re-estimating them on a
few hundred unlabeled samples (no gradients, no labels) recovers much of the lost accuracy when
no labels or too little data are at hand for fine-tuning (Li et al. 2020, "EagleEye").

`recalibrate_bn_(model, data)` is the function; `RecalibrateBN` is the technique config, so the
same step runs through `apply_` and as the recipe stage `recalibrate_bn`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from torchslim.calibration import as_calibration
from torchslim.config import TechniqueConfig, validated
from torchslim.errors import ConfigError
from torchslim.registry import register_technique
from torchslim.select import Select

__all__ = ["RecalibrateBN", "recalibrate_bn_"]


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, dict):
        model(**inputs)
    elif isinstance(inputs, tuple):
        model(*inputs)
    else:
        model(inputs)


def recalibrate_bn_(model: nn.Module, data: Any, *, num_samples: int | None = None) -> dict[str, Any]:
    """Reset every BatchNorm's running statistics and re-estimate them (a cumulative average)
    on `data` (a `Calibration` or any iterable of batches), in place; returns what it used.

    Only the BatchNorm layers run in training mode (dropout stays off); no weight changes.

    Raises:
        ConfigError: the model has no BatchNorm layer, or `data` yields no batch.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> recalibrate_bn_(net, [torch.randn(8, 1, 6, 6) + 3])["samples"]
        8
        >>> bool(net[1].running_mean.abs().sum() > 0)
        True
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ConfigError(f"{type(model).__name__} has no BatchNorm layer: there are no statistics "
                          "to re-estimate")
    calibration = as_calibration(data)
    if num_samples is not None:
        calibration = type(calibration)(calibration.data, calibration.transform, num_samples)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every batch weighs the same
        norm.train()
    seen = 0
    try:
        with torch.no_grad():
            for inputs in calibration.inputs():
                _call(model, inputs)
                seen += int(next(iter(inputs.values())).shape[0]) if isinstance(inputs, dict) else \
                    int((inputs[0] if isinstance(inputs, tuple) else inputs).shape[0])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    if not seen:
        raise ConfigError("recalibrate_bn_ got no batches: the data is empty")
    return {"layers": len(norms), "samples": seen}


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class RecalibrateBN(TechniqueConfig):
    """Re-estimate BatchNorm statistics on `calibration_batches` training batches (no labels used)."""

    kind = "recalibrate_bn"
    calibration_batches: int = Field(default=16, ge=1)


def _recalibrate(model: nn.Module, config: RecalibrateBN, *, targets: Select,
                 calibration: Any = None) -> dict[str, Any]:
    """Handler of `RecalibrateBN` (use `apply_`)."""
    if not calibration:
        raise ConfigError("recalibrate_bn needs data: pass calibration= (a few training batches)")
    return recalibrate_bn_(model, calibration)


register_technique(RecalibrateBN, _recalibrate)
