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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.runtime.onnx_program import cpu_session

__all__ = ["ACCURACY_LEVEL", "Int4Linear", "SharedInput", "matmul_nbits_node", "matmul_nbits_program",
           "pack_int4"]

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


def matmul_nbits_node(x: str, y: str, *, name: str, in_features: int, out_features: int, bits: int,
                      block_size: int, packed: torch.Tensor, scales: torch.Tensor,
                      zero_points: torch.Tensor) -> tuple[Any, list[Any]]:
    """A `MatMulNBits` node `y = x Wᵀ` (W in the layout of `pack_int4`) and its three
    initializers, named after `name`: the one way this package writes the kernel's node."""
    from onnx import TensorProto, helper

    w, s, z = f"{name}.qweight", f"{name}.scales", f"{name}.qzeros"
    node = helper.make_node("MatMulNBits", [x, w, s, z], [y], name=name, domain="com.microsoft",
                            K=in_features, N=out_features, bits=bits, block_size=block_size,
                            accuracy_level=ACCURACY_LEVEL)
    initializers = [
        helper.make_tensor(w, TensorProto.UINT8, list(packed.shape), packed.numpy().tobytes(), raw=True),
        helper.make_tensor(s, TensorProto.FLOAT, [scales.numel()], scales.float().numpy().tobytes(),
                           raw=True),
        helper.make_tensor(z, TensorProto.UINT8, [zero_points.numel()], zero_points.numpy().tobytes(),
                           raw=True)]
    return node, initializers


def matmul_nbits_program(in_features: int, out_features: int, *, bits: int, block_size: int,
                         packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> bytes:
    """A one-node ONNX program `y = x Wᵀ` with W given in `MatMulNBits`' layout."""
    from onnx import TensorProto, helper

    node, initializers = matmul_nbits_node("x", "y", name="int4_linear", in_features=in_features,
                                           out_features=out_features, bits=bits, block_size=block_size,
                                           packed=packed, scales=scales, zero_points=zero_points)
    graph = helper.make_graph([node], "int4_linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return bytes(model.SerializeToString())


class _Session:
    """An onnxruntime session built on first use and rebuilt when torch's thread count changes.
    Idle pools sleep, not spin: a model holds hundreds of these and they take turns on the cores."""

    def __init__(self) -> None:
        self._session: Any = None
        self._threads = 0

    def get(self, program: Callable[[], bytes]) -> Any:
        threads = torch.get_num_threads()
        if self._session is None or threads != self._threads:
            self._session = cpu_session(program(), threads=threads, spinning=False)
            self._threads = threads
        return self._session

    def reset(self) -> None:
        self._session = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Session:
        return _Session()  # a copy builds its own session from its own tensors


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
        self._session = _Session()
        self.shared: SharedInput | None = None  # set by `SharedInput`: one call for the group

    def _program(self) -> bytes:
        return matmul_nbits_program(self.in_features, self.out_features, bits=self.bits,
                                    block_size=self.block_size, packed=self.packed, scales=self.scales,
                                    zero_points=self.zero_points)

    def session(self) -> Any:
        return self._session.get(self._program)

    def weight(self) -> torch.Tensor:
        """W (out, in) in float (`dequantized_weight`), as every compressed Linear of ours gives it."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        """W (out, in) in float, `(code - zero point) * scale` per block: what the kernel computes with."""
        blocks = self.in_features // self.block_size
        if self.bits == 4:
            codes = torch.stack([self.packed & 15, self.packed >> 4], -1)
            codes = codes.reshape(self.out_features, blocks, -1)
            zeros = torch.stack([self.zero_points & 15, self.zero_points >> 4], -1)
            zeros = zeros.reshape(self.out_features, -1)[:, :blocks]
        else:
            codes, zeros = self.packed, self.zero_points
        weight = (codes.float() - zeros.float()[..., None]) * self.scales[..., None]
        return weight.reshape(self.out_features, self.in_features)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._session.reset()  # new tensors: the sessions are rebuilt from them
        if self.shared is not None:
            self.shared.reset()

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This layer's output rows `y` (rows, out) back in `x`'s shape, bias added."""
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.output(self, x)
        (y,) = self.session().run(["y"], {"x": rows_of(x, self.in_features)})
        return self.finish(torch.from_numpy(y), x)


def rows_of(x: torch.Tensor, width: int) -> Any:
    """`x` as the float32 (rows, width) array a session takes."""
    return x.reshape(-1, width).detach().float().contiguous().numpy()


class SharedInput:
    """Int4Linear layers that read the same input (a block's q/k/v projections, a gated MLP's
    gate and up) run as one `MatMulNBits` call over their rows stacked: one kernel launch instead
    of several, which is what decoding one token at a time pays for most.

    The first member called with an input computes every member's rows and keeps them until each
    member has taken its own; a member called with another input recomputes, so the result is
    right whatever the call order. Each layer keeps its own tensors (saved as before); the
    stacked program is built from them on first use.
    """

    def __init__(self, members: list[Int4Linear]) -> None:
        first = members[0]
        if len(members) < 2 or any((m.in_features, m.bits, m.block_size)
                                   != (first.in_features, first.bits, first.block_size) for m in members):
            raise ValueError("a shared-input group needs two or more layers of one input width, "
                             "bit width and block size")
        self.members = members
        self._session = _Session()
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._pending: set[int] = set()
        for member in members:
            member.shared = self

    def _program(self) -> bytes:
        first = self.members[0]
        return matmul_nbits_program(
            first.in_features, sum(m.out_features for m in self.members), bits=first.bits,
            block_size=first.block_size, packed=torch.cat([m.packed for m in self.members]),
            scales=torch.cat([m.scales for m in self.members]),
            zero_points=torch.cat([m.zero_points for m in self.members]))

    def reset(self) -> None:
        self._session.reset()
        self._input, self._outputs, self._pending = None, [], set()

    def output(self, member: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        index = next(i for i, m in enumerate(self.members) if m is member)
        if x is not self._input or index not in self._pending:
            session = self._session.get(self._program)
            (y,) = session.run(["y"], {"x": rows_of(x, member.in_features)})
            stacked = torch.from_numpy(y)
            self._outputs = list(stacked.split([m.out_features for m in self.members], dim=1))
            self._input, self._pending = x, set(range(len(self.members)))
        out = member.finish(self._outputs[index].contiguous(), x)
        self._pending.discard(index)
        if not self._pending:  # every member has its rows: hold on to nothing
            self._input, self._outputs = None, []
        return out
