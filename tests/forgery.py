"""Forge `.slim` files the way an attacker would: valid checksum, hostile contents.

Shared by the artifact safety tests and the fuzz script that runs them under a memory limit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from torchslim import artifact
from torchslim.models import create_model
from torchslim.safefile import read_checked, write_checked

Tensors = dict[str, torch.Tensor]


def onnx_program(*, output: str = "output", nodes: tuple[Any, ...] = (),
                 initializers: tuple[Any, ...] = (), outputs: tuple[str, ...] = ()) -> bytes:
    """A tiny valid program: output = input + 1 (plus whatever `nodes` add)."""
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "one"], [output]), *nodes], "forged",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (output, *outputs)],
        initializer=[one, *initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def external_tensor(name: str, location: str, length: int = 16) -> Any:
    """A float tensor whose bytes live in a file outside the artifact."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor(name, TensorProto.FLOAT, [length // 4], [0.0] * (length // 4))
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def program_artifact(path: Path, program: bytes, *, coding: str = "raw") -> Path:
    """A version-2 (int8 program) artifact holding `program` as is (coded if asked)."""
    stored = zstandard.ZstdCompressor(level=3).compress(program) if coding == "zstd" else program
    document = {"format": artifact.ARTIFACT_FORMAT, "version": artifact.PROGRAM_VERSION,
                "model": {"name": "lenet300", "input_shape": [4], "num_classes": 10},
                "metadata": {}, "runtime": {"backend": "onnxruntime", "program_coding": coding,
                                            "weight_count": 4, "flops_per_sample": 4, "report": {}}}
    write_checked(path, {artifact.PROGRAM: torch.frombuffer(bytearray(stored), dtype=torch.uint8)},
                  document)
    return path


def zstd_bomb(size: int, chunk: int = 1 << 20) -> bytes:
    """A zstd frame of `size` zero bytes that declares its content size (a few KB per GiB)."""
    sink = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=1).stream_writer(sink, size=size, closefd=False)
    zeros = bytes(chunk)
    for _ in range(size // chunk):
        writer.write(zeros)
    writer.close()
    return sink.getvalue()


def small_model() -> torch.nn.Module:
    """LeNet-300-100 on 8x8 inputs (~50k weights): saves in milliseconds."""
    torch.manual_seed(0)
    return create_model("lenet300", pretrained=False, input_shape=(1, 8, 8))


def dense_artifact(path: Path) -> Path:
    return artifact.save(small_model(), path)


def encoded_artifact(path: Path) -> Path:
    model = small_model()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            layer.weight[layer.weight.abs() < 0.05] = 0
    return artifact.save(model, path, encoding=artifact.Encoding())


def rewrite(path: Path, edit: Callable[[Tensors, dict[str, Any]], None]) -> Path:
    """Apply `edit` to a file's tensors and document, then re-sign it (a valid checksum)."""
    tensors, document = read_checked(path)
    edit(tensors, document)
    write_checked(path, tensors, document)
    return path


def read_layout(tensors: Tensors, document: dict[str, Any]) -> dict[str, Any]:
    data = tensors[artifact.PAYLOAD].numpy().tobytes()
    start, length = document["payload"]["layout_span"]
    return dict(json.loads(zstandard.ZstdDecompressor().decompress(data[start:start + length])))


def replace_layout(tensors: Tensors, document: dict[str, Any], layout: Any, *,
                   packed: bytes | None = None) -> None:
    """Append a new (forged) zstd layout to the payload and point the document at it."""
    data = tensors[artifact.PAYLOAD].numpy().tobytes()
    if packed is None:
        packed = zstandard.ZstdCompressor().compress(json.dumps(layout).encode())
    tensors[artifact.PAYLOAD] = torch.from_numpy(np.frombuffer(data + packed, dtype=np.uint8).copy())
    document["payload"] = {"layout_span": [len(data), len(packed)]}
