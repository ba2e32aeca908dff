"""The JSON metadata of one encoded tensor, and its validation on the way back in.

The metadata is what the artifact stores next to the byte streams; a decoder must trust none of
it. `TensorMeta.from_dict` checks every field's type and range, and the fields against each
other, so that a damaged or hand-edited file fails with an `ArtifactError` naming the field
instead of an IndexError or a huge allocation somewhere inside the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from torchslim.encoding.sparse_index import MAX_INDEX_BITS
from torchslim.errors import ArtifactError

__all__ = ["FORMAT", "MAX_CODEBOOK", "MAX_ELEMENTS", "Layout", "TensorMeta", "code_bits_for"]

FORMAT = 1
MAX_CODEBOOK = 1 << 16
MAX_ELEMENTS = 1 << 31  # per tensor; bounds the one allocation the streams cannot bound
_MAX_RANK = 32


class Layout(StrEnum):
    """Where the non-zeros are: an index stream (sparse) or a code for every element (dense)."""

    AUTO = "auto"  # encode both, keep the smaller
    SPARSE = "sparse"
    DENSE = "dense"


def code_bits_for(codebook_size: int, layout: Layout) -> int:
    """Width of a codebook index: ceil(log2(k)) (min 1) sparse; dense adds a symbol for zero."""
    return codebook_size.bit_length() if layout is Layout.DENSE else max(1, (codebook_size - 1).bit_length())


def _fail(field: str, problem: str) -> ArtifactError:
    return ArtifactError(f"encoded tensor metadata field {field!r} {problem}; the metadata is corrupt "
                         "or from another version, re-encode the tensor")


def _int(meta: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = meta.get(field)
    if type(value) is not int or not low <= value <= high:
        raise _fail(field, f"must be an int in [{low}, {high}], got {value!r}")
    return value


def _mapping(meta: Mapping[str, Any], field: str, names: tuple[str, ...], kind: type) -> dict[str, Any]:
    value = meta.get(field)
    if not isinstance(value, Mapping) or any(type(value.get(n)) is not kind for n in names):
        raise _fail(field, f"must map {list(names)} to {kind.__name__}, got {value!r}")
    return {name: value[name] for name in names}


@dataclass(frozen=True, kw_only=True)
class TensorMeta:
    """Everything besides the bytes needed to rebuild one tensor (see `to_dict` for the JSON)."""

    shape: tuple[int, ...]
    nnz: int
    layout: Layout  # SPARSE or DENSE, never AUTO
    index_bits: int | None  # sparse only
    index_count: int | None  # sparse only: real entries + fillers
    codebook_size: int | None  # None: non-zeros stored as raw float32 "values"
    code_bits: int | None  # width of the "codes" stream; None without a codebook
    coders: dict[str, str]  # coder used per symbol stream ("index", "codes")
    stream_bytes: dict[str, int]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def symbol_streams(self) -> tuple[str, ...]:
        names = ("index",) if self.layout is Layout.SPARSE else ()
        return names + (("codes",) if self.codebook_size is not None else ())

    @property
    def streams(self) -> tuple[str, ...]:
        raw = ("codebook",) if self.codebook_size is not None else ("values",)
        return self.symbol_streams + raw

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in an artifact."""
        return {"format": FORMAT, "dtype": "float32", "shape": list(self.shape), "nnz": self.nnz,
                "layout": self.layout.value, "index_bits": self.index_bits, "index_count": self.index_count,
                "codebook_size": self.codebook_size, "code_bits": self.code_bits,
                "coders": dict(self.coders), "stream_bytes": dict(self.stream_bytes)}

    @classmethod
    def from_dict(cls, meta: Any) -> TensorMeta:
        """Validate untrusted metadata.

        Raises:
            ArtifactError: a missing field, a wrong type, an out-of-range or inconsistent value.
        """
        if not isinstance(meta, Mapping):
            raise ArtifactError(f"encoded tensor metadata must be a dict, got {type(meta).__name__}")
        if meta.get("format") != FORMAT or type(meta.get("format")) is not int:
            raise _fail("format", f"must be {FORMAT}, got {meta.get('format')!r}")
        if meta.get("dtype") != "float32":
            raise _fail("dtype", f"must be 'float32', got {meta.get('dtype')!r}")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) > _MAX_RANK \
                or any(type(d) is not int or d < 0 for d in shape):
            raise _fail("shape", f"must be a list of at most {_MAX_RANK} non-negative ints, got {shape!r}")
        size = math.prod(shape)
        if size > MAX_ELEMENTS:
            raise _fail("shape", f"describes {size} elements, beyond the limit of {MAX_ELEMENTS}")
        layout = meta.get("layout")
        if layout not in (Layout.SPARSE.value, Layout.DENSE.value):
            raise _fail("layout", f"must be 'sparse' or 'dense', got {layout!r}")
        return cls._from_checked(meta, tuple(shape), size, Layout(layout))

    @classmethod
    def _from_checked(cls, meta: Mapping[str, Any], shape: tuple[int, ...], size: int,
                      layout: Layout) -> TensorMeta:
        nnz = _int(meta, "nnz", 0, size)
        sparse = layout is Layout.SPARSE
        index_bits = _int(meta, "index_bits", 1, MAX_INDEX_BITS) if sparse else None
        index_count = _int(meta, "index_count", nnz, size) if sparse else None
        codebook_size, code_bits = None, None
        if meta.get("codebook_size") is not None:
            codebook_size = _int(meta, "codebook_size", 1, MAX_CODEBOOK)
            code_bits = code_bits_for(codebook_size, layout)
            _int(meta, "code_bits", code_bits, code_bits)
        unused = (("index_bits", index_bits), ("index_count", index_count), ("code_bits", code_bits))
        for field, value in unused:
            if value is None and meta.get(field) is not None:
                raise _fail(field, f"must be null for this layout and codebook, got {meta.get(field)!r}")
        partial = cls(shape=shape, nnz=nnz, layout=layout, index_bits=index_bits, index_count=index_count,
                      codebook_size=codebook_size, code_bits=code_bits, coders={}, stream_bytes={})
        coders = _mapping(meta, "coders", partial.symbol_streams, str)
        stream_bytes = _mapping(meta, "stream_bytes", partial.streams, int)
        return replace(partial, coders=coders, stream_bytes=stream_bytes)
