"""Running compiled programs: checks that an untrusted ONNX program is safe to hand to onnxruntime."""

from torchslim.runtime.program_check import check_program

__all__ = ["check_program"]
