"""What an artifact holds, per tensor: shape, sparsity, bits, layout, coders, bytes by stream.

Inspecting is as safe as loading: the same checks run first (bounded decompression, the ONNX
program refused if it points outside the file), and a forged file ends in an `ArtifactError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torchslim.artifact import (
    ARTIFACT_VERSION,
    PAYLOAD,
    PROGRAM_VERSION,
    _declare_layout,
    _program_bytes,
    _read,
    _read_layout,
    source_class,
)
from torchslim.encoding.meta import TensorMeta

__all__ = ["inspect_artifact"]


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """Describe an artifact (checksum verified); see `torchslim inspect`.

    Raises:
        ArtifactError: the file is missing, corrupt or forged.
    """
    path = Path(path)
    raw, document = _read(path)
    version = document["version"]
    model, hf = document.get("model"), document.get("hf")
    if isinstance(model, dict):
        name = str(model.get("name"))[:200]
    elif isinstance(hf, dict):  # a Hugging Face model: its transformers class
        name = f"transformers {str(hf.get('class'))[:100]}"
    else:
        name = str(source_class(document) or "?")
    header = 0
    if version == PROGRAM_VERSION:
        tensors = _program_tensors(_program_bytes(path, raw, document))
        stored = raw["onnx"].numel()  # as stored (zstd-coded or raw)
    elif version == ARTIFACT_VERSION:
        tensors = [_dense_row(name, tensor) for name, tensor in raw.items()]
        stored = sum(t["bytes"] for t in tensors)
    else:
        spans = document.get("payload")
        data = raw[PAYLOAD].numpy().tobytes()
        layout = _read_layout(data, spans, path)
        _declare_layout(layout, path, len(data))  # validates every entry's metadata and spans
        tensors = [_encoded_row(n, e) for n, e in layout.items()]
        header = int(document["payload"]["layout_span"][1])  # the layout, zstd-coded in the payload
        stored = sum(t["bytes"] for t in tensors) + header
    size = path.stat().st_size
    return {"model": name, "version": version, "bytes": size,
            "tensor_bytes": stored, "header_bytes": size - stored, "tensors": tensors}


def _dense_row(name: str, tensor: Any) -> dict[str, Any]:
    size = tensor.numel() * tensor.element_size()
    return {"name": name, "shape": list(tensor.shape),
            "sparsity": float((tensor == 0).sum()) / max(1, tensor.numel()),
            "bits": tensor.element_size() * 8, "layout": "dense", "coders": "",
            "streams": {"raw": size}, "bytes": size}


def _encoded_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    if "meta" not in entry:
        streams = {"raw": int(entry["span"][1])}
        return {"name": name, "shape": entry["shape"], "sparsity": 0.0, "bits": None,
                "layout": "raw " + str(entry["dtype"]), "coders": "", "streams": streams,
                "bytes": sum(streams.values())}
    meta = TensorMeta.from_dict(entry["meta"])
    streams = dict(meta.stream_bytes)
    book = meta.codebook_size  # bits per weight: log2 of the codebook size
    return {"name": name, "shape": list(meta.shape),
            "sparsity": 1 - meta.nnz / max(1, math.prod(meta.shape)),
            "bits": max(1, (book - 1).bit_length()) if book else 32, "layout": meta.layout.value,
            "coders": ", ".join(f"{k}:{v}" for k, v in meta.coders.items()),
            "streams": streams, "bytes": sum(streams.values())}


def _program_tensors(program: bytes) -> list[dict[str, Any]]:
    """The weights (initializers) of an ONNX program (already checked: all inline)."""
    import onnx
    from onnx import numpy_helper

    rows = []
    for init in onnx.load_from_string(program).graph.initializer:
        array = numpy_helper.to_array(init)
        rows.append({"name": init.name, "shape": list(array.shape),
                     "sparsity": float((array == 0).sum()) / max(1, array.size),
                     "bits": array.dtype.itemsize * 8, "layout": f"onnx {array.dtype}",
                     "coders": "", "streams": {"raw": array.nbytes}, "bytes": array.nbytes})
    return rows
