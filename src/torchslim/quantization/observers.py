"""Observers: watch tensors during calibration, then choose the quantization range.

- `minmax`: the full observed range (per tensor or per channel).
- `moving_average`: an exponential moving average of each batch's min/max (robust to outlier
  batches; the usual choice for activations during QAT).
- `percentile`: clip to the given percentile of the observed values.
- `mse`: the clipping of [min, max] that minimises the mean squared quantization error.
- `kl`: TensorRT's entropy calibration: the symmetric threshold whose quantized histogram has
  the smallest KL divergence from the observed one.
The last three keep a bounded uniform sample of the observed values (reservoir), so memory does
not grow with the calibration set.
"""

from __future__ import annotations

from enum import StrEnum

import torch

from torchslim.errors import ConfigError
from torchslim.quantization.primitives import (
    QuantSpec,
    dequantize,
    qparams_from_range,
    quantize,
    tensor_range,
)

__all__ = ["Observer", "ObserverKind"]

RESERVOIR = 1 << 20


class ObserverKind(StrEnum):
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    MSE = "mse"
    KL = "kl"


class Observer:
    """Collects statistics with `observe(x)`; `qparams()` returns (scale, zero_point)."""

    def __init__(self, spec: QuantSpec, kind: ObserverKind = ObserverKind.MINMAX, *,
                 momentum: float = 0.1, percentile: float = 99.99, seed: int = 0) -> None:
        kind = ObserverKind(kind)
        if kind in (ObserverKind.PERCENTILE, ObserverKind.MSE, ObserverKind.KL) and (
                spec.axis is not None or spec.group_size is not None):
            raise ConfigError(f"the {kind.value} observer is per-tensor (for activations); use "
                              "minmax or moving_average for per-channel/per-group ranges")
        if not 0 < momentum <= 1 or not 50 < percentile <= 100:
            raise ConfigError(f"momentum={momentum} (valid: (0, 1]) or percentile={percentile} "
                              "(valid: (50, 100]) out of range")
        self.spec, self.kind = spec, kind
        self.momentum, self.percentile = momentum, percentile
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.sample = torch.empty(0)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        low, high = tensor_range(x, self.spec)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = low, high
        elif self.kind == ObserverKind.MOVING_AVERAGE:
            self.min_val = self.min_val + self.momentum * (low - self.min_val)
            self.max_val = self.max_val + self.momentum * (high - self.max_val)
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)
        if self.kind in (ObserverKind.PERCENTILE, ObserverKind.MSE, ObserverKind.KL):
            self._keep_sample(x.detach().float().reshape(-1))

    def _keep_sample(self, values: torch.Tensor) -> None:
        """A uniform sample of everything observed so far (reservoir by random priorities)."""
        self.seen += values.numel()
        if values.numel() > RESERVOIR:
            values = values[torch.randperm(values.numel(), generator=self.generator)[:RESERVOIR]]
        pool = torch.cat([self.sample, values])
        if pool.numel() > RESERVOIR:
            pool = pool[torch.randperm(pool.numel(), generator=self.generator)[:RESERVOIR]]
        self.sample = pool

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) for what was observed.

        Raises:
            ConfigError: nothing was observed (an empty calibration set).
        """
        if self.min_val is None or self.max_val is None:
            raise ConfigError("the observer saw no data: the calibration set is empty; pass "
                              "calibration batches")
        low, high = self.min_val, self.max_val
        if self.kind == ObserverKind.PERCENTILE:
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            low, high = torch.quantile(self.sample, q)
        elif self.kind == ObserverKind.MSE:
            low, high = self._best_mse_clip(low, high)
        elif self.kind == ObserverKind.KL:
            threshold = self._kl_threshold()
            low, high = torch.tensor(-threshold), torch.tensor(threshold)
        return qparams_from_range(low, high, self.spec)

    def _best_mse_clip(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, best_error = (low, high), float("inf")
        for fraction in torch.logspace(-2, 0, 81).tolist():  # clip to 1%..100% of the range
            scale, zero = qparams_from_range(low * fraction, high * fraction, self.spec)
            approx = dequantize(quantize(self.sample, scale, zero, self.spec), scale, zero, self.spec)
            error = float((approx - self.sample).pow(2).mean())
            if error < best_error:
                best, best_error = (low * fraction, high * fraction), error
        return best

    def _kl_threshold(self, bins: int = 2048) -> float:
        """TensorRT entropy calibration on |x| (symmetric)."""
        magnitudes = self.sample.abs()
        top = float(magnitudes.max())
        if top == 0.0:
            return 0.0
        histogram = torch.histc(magnitudes, bins=bins, min=0.0, max=top).double()
        levels = 2 ** (self.spec.bits - 1)
        best, best_kl = bins, float("inf")
        for cut in range(levels, bins + 1, max(1, (bins - levels) // 128)):
            reference = histogram[:cut].clone()
            reference[-1] += histogram[cut:].sum()  # outliers clipped into the last bin
            # Merge `cut` bins into `levels` quantization bins, then spread each back evenly
            # over its non-empty source bins.
            edges = torch.linspace(0, cut, levels + 1).round().long()
            candidate = torch.zeros(cut, dtype=torch.float64)
            for start, stop in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
                chunk = histogram[start:stop]
                nonzero = chunk > 0
                if stop > start and nonzero.any():
                    candidate[start:stop][nonzero] = chunk.sum() / nonzero.sum()
            p = reference / reference.sum()
            q = candidate / candidate.sum().clamp_min(1e-12)
            mask = p > 0
            kl = float((p[mask] * (p[mask] / q[mask].clamp_min(1e-12)).log()).sum())
            if kl < best_kl:
                best, best_kl = cut, kl
        return (best + 0.5) * top / bins
