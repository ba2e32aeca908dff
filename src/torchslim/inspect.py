"""What an artifact holds, per tensor: shape, sparsity, bits, layout, coders, bytes by stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchslim.artifact import read_metadata
from torchslim.safefile import read_checked

__all__ = ["inspect_artifact"]


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """Describe an artifact (checksum verified); see `torchslim inspect`."""
    path = Path(path)
    document = read_metadata(path)
    tensors = []
    stored = 0
    if document["version"] == 2:
        raw, _ = read_checked(path)
        tensors = _program_tensors(raw["onnx"].numpy().tobytes())
        stored = sum(t["bytes"] for t in tensors)
    elif document["version"] == 0:
        raw, _ = read_checked(path)
        for name, tensor in raw.items():
            size = tensor.numel() * tensor.element_size()
            stored += size
            tensors.append({"name": name, "shape": list(tensor.shape),
                            "sparsity": float((tensor == 0).sum()) / max(1, tensor.numel()),
                            "bits": tensor.element_size() * 8, "layout": "dense", "coders": "",
                            "streams": {"raw": size}, "bytes": size})
    else:
        for name, entry in document["layout"].items():
            if "meta" in entry:
                meta = entry["meta"]
                shape = meta["shape"]
                count = int(torch.tensor(shape).prod()) if shape else 1
                streams = dict(meta["stream_bytes"])
                book = meta.get("codebook_size")  # bits per weight: log2 of the codebook size
                bits = max(1, (int(book) - 1).bit_length()) if book else 32
                coders = ", ".join(f"{k}:{v}" for k, v in meta["coders"].items())
                sparsity = 1 - meta["nnz"] / max(1, count)
                layout = meta["layout"]
            else:
                shape, streams = entry["shape"], {"raw": entry["span"][1]}
                bits, coders, layout, sparsity = None, "", "raw " + entry["dtype"], 0.0
            total = sum(streams.values())
            stored += total
            tensors.append({"name": name, "shape": shape, "sparsity": sparsity, "bits": bits,
                            "layout": layout, "coders": coders, "streams": streams, "bytes": total})
    size = path.stat().st_size
    if document["version"] == 1:  # the layout itself is stored in the payload, zstd-compressed
        stored += int(document["payload"]["layout_span"][1])
    return {"model": document["model"]["name"], "version": document["version"], "bytes": size,
            "tensor_bytes": stored, "header_bytes": size - stored, "tensors": tensors}


def _program_tensors(program: bytes) -> list[dict[str, Any]]:
    """The weights (initializers) of an ONNX program: int8 weights show 8 bits."""
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
