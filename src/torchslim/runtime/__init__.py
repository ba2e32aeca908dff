"""Running compiled programs, below quantization and storage: ONNX export, onnxruntime's int8
conversion, `OrtModule` (a program that behaves like an `nn.Module`), and the checks that an
untrusted program is safe to hand to onnxruntime."""

from torchslim.runtime.program_check import check_program

__all__ = ["check_program"]
