"""What a model is called with, recorded so that a saved model can be benchmarked and exported
without its original data: per-sample shapes and dtypes, never values.

`apply_` records the signature of the `example_inputs` it is given, `save` stores it in the
artifact (or takes `example_inputs=` itself), and `load` puts it back. `example_for` builds a
batch of that signature. Signatures read from a file are untrusted: `from_dict` bounds them.

Example:
    >>> sig = input_signature(torch.zeros(2, 3, 8, 8))
    >>> sig
    {'kind': 'tensor', 'shape': [3, 8, 8], 'dtype': 'float32'}
    >>> tuple(example_for(sig, 4).shape)
    (4, 3, 8, 8)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchslim.errors import ArtifactError, ConfigError

__all__ = ["SIGNATURE_ATTRIBUTE", "example_for", "input_signature", "record_signature_",
           "signature_from_dict", "signature_of"]

SIGNATURE_ATTRIBUTE = "torchslim_inputs"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_MAX_ITEMS, _MAX_RANK, _MAX_SAMPLE = 16, 6, 1 << 24


def _tensor(value: torch.Tensor) -> dict[str, Any]:
    if value.dim() == 0:
        raise ConfigError("example inputs need a batch dimension; got a 0-d tensor")
    return {"kind": "tensor", "shape": list(value.shape[1:]),
            "dtype": str(value.dtype).removeprefix("torch.")}


def input_signature(example: Any) -> dict[str, Any]:
    """The per-sample signature of a batch: a tensor, a tuple/list or a dict of tensors.

    Raises:
        ConfigError: anything else (the message names the type).
    """
    if isinstance(example, torch.Tensor):
        return _tensor(example)
    if isinstance(example, tuple | list) and all(isinstance(v, torch.Tensor) for v in example):
        return {"kind": "tuple", "items": [_tensor(v) for v in example]}
    if isinstance(example, dict) and all(isinstance(v, torch.Tensor) for v in example.values()):
        return {"kind": "dict", "items": {str(k): _tensor(v) for k, v in example.items()}}
    raise ConfigError(f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                      f"got {type(example).__name__}")


def record_signature_(model: nn.Module, example: Any) -> None:
    """Remember on `model` what it is called with (kept by `save`)."""
    setattr(model, SIGNATURE_ATTRIBUTE, input_signature(example))


def signature_of(model: nn.Module) -> dict[str, Any] | None:
    """The recorded signature, if any."""
    found = getattr(model, SIGNATURE_ATTRIBUTE, None)
    return found if isinstance(found, dict) else None


def _check_tensor(entry: Any) -> dict[str, Any]:
    if (not isinstance(entry, dict) or entry.get("kind") != "tensor" or entry.get("dtype") not in _DTYPES
            or not isinstance(entry.get("shape"), list) or len(entry["shape"]) > _MAX_RANK
            or any(type(d) is not int or not 0 < d <= _MAX_SAMPLE for d in entry["shape"])
            or math.prod(entry["shape"]) > _MAX_SAMPLE):
        raise ArtifactError(f"the recorded input signature {str(entry)[:120]} is malformed; the file "
                            "is corrupt")
    return {"kind": "tensor", "shape": list(entry["shape"]), "dtype": entry["dtype"]}


def signature_from_dict(data: Any) -> dict[str, Any]:
    """Validate a signature read from a file.

    Raises:
        ArtifactError: a malformed or oversized signature.
    """
    kind = data.get("kind") if isinstance(data, dict) else None
    items = data.get("items") if isinstance(data, dict) else None
    if kind == "tensor":
        return _check_tensor(data)
    if kind == "tuple" and isinstance(items, list) and 0 < len(items) <= _MAX_ITEMS:
        return {"kind": "tuple", "items": [_check_tensor(v) for v in items]}
    if kind == "dict" and isinstance(items, dict) and 0 < len(items) <= _MAX_ITEMS:
        return {"kind": "dict", "items": {str(k): _check_tensor(v) for k, v in items.items()}}
    raise ArtifactError(f"the recorded input signature {str(data)[:120]} is malformed; the file is corrupt")


def _make(entry: dict[str, Any], batch: int, generator: torch.Generator) -> torch.Tensor:
    dtype, shape = _DTYPES[entry["dtype"]], (batch, *entry["shape"])
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.zeros(shape, dtype=dtype)  # ids / masks: 0 is valid for any vocabulary


def example_for(signature: dict[str, Any], batch: int = 1, *, seed: int = 0) -> Any:
    """A deterministic batch of `signature` (random floats, zero integers)."""
    generator = torch.Generator().manual_seed(seed)
    if signature["kind"] == "tensor":
        return _make(signature, batch, generator)
    if signature["kind"] == "tuple":
        return tuple(_make(item, batch, generator) for item in signature["items"])
    return {key: _make(item, batch, generator) for key, item in signature["items"].items()}
