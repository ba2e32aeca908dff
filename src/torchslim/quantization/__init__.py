"""Quantization: affine primitives (pure math), observers, and int8 post-training quantization
executed by onnxruntime's integer kernels (`quantize_model`, returning an `OrtModule`)."""

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
from torchslim.quantization.ptq import Calibrate, Quantization, QuantMethod, quantize_model

__all__ = ["Calibrate", "Observer", "ObserverKind", "QuantMethod", "QuantSpec", "Quantization",
           "dequantize", "fake_quantize", "make_observer", "qparams_from_range", "quantize",
           "quantize_dequantize", "quantize_model", "sqnr_db"]
