"""int4 weight-only Linear layers executed by onnxruntime's `MatMulNBits` kernel.

Why this kernel: measured on this class of machine (2 cores, a 576 x 1536 layer at batch 1),
onnxruntime's `MatMulNBits` (4-bit blocks, int8 activations inside the kernel) ran 4.5x faster
than torch's fp32 Linear, where torch 2.13's own packed int4 and int8 weight-only CPU ops ran at
0.09x and 0.23x of fp32. Decoding one token at a time is bound by reading the weights, so a
kernel that reads 4-bit weights is what makes a quantized language model faster, not only
smaller.

Each `Int4Linear` keeps the packed codes (two per byte), one scale and one zero point per block
of `block_size` inputs of a row, and the bias; its onnxruntime session is built on first use from
those tensors (nothing but tensors is saved). The layer stays a PyTorch module: the rest of the
model (attention, norms, generation with the key/value cache) runs in torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.runtime.onnx_program import cpu_session

__all__ = ["ACCURACY_LEVEL", "Int4Linear", "pack_int4"]

ACCURACY_LEVEL = 4  # activations quantized to int8 inside the kernel (its fast path)


def pack_int4(codes: torch.Tensor, zeros: torch.Tensor, block_size: int, bits: int = 4
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMulNBits' layout: codes (N, K) in [0, 15] -> (N, K/block, block/2) bytes (low nibble
    first); zero points (N, K/block) in [0, 15] -> (N, ceil(K/block / 2)) bytes. With `bits=8`,
    codes and zero points in [0, 255] are one byte each: (N, K/block, block) and (N, K/block)."""
    rows, columns = codes.shape
    q = codes.to(torch.uint8).reshape(rows, columns // block_size, block_size)
    if bits == 8:
        return q.contiguous(), zeros.to(torch.uint8).contiguous()
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    z = zeros.to(torch.uint8)
    if z.shape[1] % 2:
        z = torch.cat([z, torch.zeros(rows, 1, dtype=torch.uint8)], 1)
    return packed.contiguous(), (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous()


class Int4Linear(nn.Module):
    """`y = x Wᵀ + b` with W in 4-bit blocks (or 8-bit, `bits=8`: the same kernel, one byte per
    code, for layers kept at 8 bits such as a language model's tied head), run by onnxruntime's
    `MatMulNBits`."""

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor

    def __init__(self, in_features: int, out_features: int, *, block_size: int, bias: bool,
                 bits: int = 4) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"MatMulNBits layers here are 4- or 8-bit, not {bits}-bit")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.bits = bits
        blocks = in_features // block_size
        per_block, zero_bytes = (block_size // 2, (blocks + 1) // 2) if bits == 4 else (block_size, blocks)
        self.register_buffer("packed", torch.zeros(out_features, blocks, per_block, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, blocks))
        self.register_buffer("zero_points", torch.zeros(out_features, zero_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._session: Any = None
        self._threads = 0

    def _program(self) -> bytes:
        from onnx import TensorProto, helper

        k, n = self.in_features, self.out_features
        node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft",
                                K=k, N=n, bits=self.bits, block_size=self.block_size,
                                accuracy_level=ACCURACY_LEVEL)
        initializers = [
            helper.make_tensor("w", TensorProto.UINT8, list(self.packed.shape),
                               self.packed.numpy().tobytes(), raw=True),
            helper.make_tensor("s", TensorProto.FLOAT, [self.scales.numel()],
                               self.scales.float().numpy().tobytes(), raw=True),
            helper.make_tensor("z", TensorProto.UINT8, [self.zero_points.numel()],
                               self.zero_points.numpy().tobytes(), raw=True)]
        graph = helper.make_graph([node], "int4_linear",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                                  initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        return bytes(model.SerializeToString())

    def session(self) -> Any:
        threads = torch.get_num_threads()
        if self._session is None or threads != self._threads:
            # one session per layer: idle pools must sleep, not spin, or the model's hundreds of
            # thread pools fight for the cores between calls
            self._session = cpu_session(self._program(), threads=threads, spinning=False)
            self._threads = threads
        return self._session

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._session = None  # new tensors: the session is rebuilt from them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).detach().float().contiguous().numpy()
        (y,) = self.session().run(["y"], {"x": rows})
        out = torch.from_numpy(y)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

