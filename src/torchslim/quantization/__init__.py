"""Quantization: affine primitives (pure math) and observers; execution paths build on them."""

from torchslim.quantization.observers import Observer, ObserverKind, make_observer
from torchslim.quantization.primitives import (
    QuantSpec,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    quantize_dequantize,
    sqnr_db,
)

__all__ = ["Observer", "ObserverKind", "QuantSpec", "dequantize", "fake_quantize",
           "make_observer", "qparams_from_range", "quantize", "quantize_dequantize", "sqnr_db"]
