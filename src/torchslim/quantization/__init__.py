"""Quantization: affine primitives (pure math), observers, and int8 post-training quantization
executed by onnxruntime's integer kernels (`quantize_model`, returning an `OrtModule`)."""

from torchslim.quantization.awq import AWQ
from torchslim.quantization.gptq import GPTQ
from torchslim.quantization.int4_kernel import Int4Kernel
from torchslim.quantization.lowbit import LowBit, LowBitMode, finalize_lowbit_
from torchslim.quantization.observers import Observer, ObserverKind
from torchslim.quantization.primitives import (
    QuantSpec,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    quantize_dequantize,
    sqnr_db,
)
from torchslim.quantization.ptq import Backend, Calibrate, Quantization, QuantMethod, quantize_model
from torchslim.quantization.qat import convert_qat, fold_batchnorm_, prepare_qat_
from torchslim.quantization.smoothquant import SmoothQuant
from torchslim.quantization.weight_only import WeightOnly

__all__ = [
    "AWQ",
    "GPTQ",
    "Backend",
    "Calibrate",
    "Int4Kernel",
    "LowBit",
    "LowBitMode",
    "Observer",
    "ObserverKind",
    "QuantMethod",
    "QuantSpec",
    "Quantization",
    "SmoothQuant",
    "WeightOnly",
    "convert_qat",
    "dequantize",
    "fake_quantize",
    "finalize_lowbit_",
    "fold_batchnorm_",
    "prepare_qat_",
    "qparams_from_range",
    "quantize",
    "quantize_dequantize",
    "quantize_model",
    "sqnr_db",
]
