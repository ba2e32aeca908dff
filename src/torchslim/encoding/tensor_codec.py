"""Encode one pruned, weight-shared float32 tensor into a few byte streams, and back bit-exactly.

This is the storage stage of Deep Compression: where the non-zeros are (gap-coded "index"), which
shared weight each one is ("codes", indices into "codebook"), each stream entropy-coded by the
coder that makes it smallest. Without a codebook the non-zeros are stored as raw float32
"values". A tensor with few zeros is cheaper without an index: the dense layout stores a symbol
for every element (0 for zero, 1 + k for codebook entry k), and `Layout.AUTO` keeps whichever
layout is smaller.

Zeros come back as +0.0: a stored -0.0 is a pruned weight like any other zero, and the two
compare equal. Every other value comes back with its exact bits (NaN payloads included when no
codebook is used).

Example:
    >>> weight = np.array([[0.0, 0.5, 0.0], [-1.0, 0.0, 0.5]], dtype=np.float32)
    >>> encoded = encode_tensor(weight, codebook=np.array([-1.0, 0.5], dtype=np.float32))
    >>> encoded.meta["nnz"], np.array_equal(decode_tensor(encoded.meta, encoded.streams), weight)
    (3, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from torchslim.encoding.codebook import check_codebook, codes_for
from torchslim.encoding.coders import Coder, decode_symbols, encode_symbols, parse_coder
from torchslim.encoding.meta import MAX_ELEMENTS, Layout, TensorMeta, code_bits_for
from torchslim.encoding.sparse_index import (
    MAX_INDEX_BITS,
    best_index_bits,
    encode_gaps,
    positions_from_gaps,
)
from torchslim.errors import ArtifactError, ConfigError

__all__ = ["EncodedTensor", "decode_tensor", "encode_tensor", "stream_bytes"]

_SEARCH_BELOW, _SEARCH_ABOVE = 2, 3  # index_bits tried around the fixed-width optimum (entropy coders)


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as JSON-able metadata plus named byte streams (see `TensorMeta.to_dict`)."""

    meta: dict[str, Any]
    streams: dict[str, bytes]

    @property
    def total_bytes(self) -> int:
        """Bytes of all streams together (the metadata excluded)."""
        return sum(len(data) for data in self.streams.values())


def stream_bytes(encoded: EncodedTensor) -> dict[str, int]:
    """Bytes per stream, for size reports."""
    return {name: len(data) for name, data in encoded.streams.items()}


def _check_weight(weight: np.ndarray) -> np.ndarray:
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32:
        kind = weight.dtype if isinstance(weight, np.ndarray) else type(weight).__name__
        raise ConfigError(f"encode_tensor needs a float32 numpy array, got {kind}; pass "
                          "tensor.detach().cpu().numpy().astype(np.float32)")
    if weight.size > MAX_ELEMENTS:
        raise ConfigError(f"encode_tensor handles at most {MAX_ELEMENTS} elements, got {weight.size}; "
                          "split the tensor")
    flat = weight.reshape(-1)  # (N,)
    return np.where(flat != 0, flat, np.float32(0))  # -0.0 -> +0.0, bits otherwise kept


def _sparse_index(mask: np.ndarray, index_bits: int | None, coder: Coder) -> tuple[int, int, bytes, str]:
    """The smallest index stream -> (index_bits, entries, data, coder used)."""
    if index_bits is not None:
        candidates = [index_bits]
    else:
        best = best_index_bits(mask)  # exact for fixed width; entropy coders may prefer a neighbour
        search = coder is not Coder.RAW
        first = max(1, best - _SEARCH_BELOW) if search else best
        last = min(MAX_INDEX_BITS, best + _SEARCH_ABOVE) if search else best
        candidates = list(range(first, last + 1))
    options = []
    for bits in candidates:
        gaps, _ = encode_gaps(mask, index_bits=bits)  # (entries,)
        options.append((bits, gaps.size, *encode_symbols(gaps, bits=bits, coder=coder)))
    return min(options, key=lambda option: len(option[2]))


def _layout(flat: np.ndarray, mask: np.ndarray, codes: np.ndarray | None, book: np.ndarray | None,
            layout: Layout, index_bits: int | None, coder: Coder) -> tuple[TensorMeta, dict[str, bytes]]:
    """Encode `flat` (N,) in one layout; `codes` (nnz,) index `book` when there is one."""
    streams: dict[str, bytes] = {}
    coders: dict[str, str] = {}
    bits, count = None, None
    if layout is Layout.SPARSE:
        bits, count, streams["index"], coders["index"] = _sparse_index(mask, index_bits, coder)
    code_bits = None
    if book is not None and codes is not None:
        code_bits = code_bits_for(book.size, layout)
        symbols = codes
        if layout is Layout.DENSE:
            symbols = np.zeros(flat.size, dtype=np.int64)  # (N,) 0 marks a zero
            symbols[mask] = codes + 1
        streams["codes"], coders["codes"] = encode_symbols(symbols, bits=code_bits, coder=coder)
        streams["codebook"] = book.astype("<f4").tobytes()
    else:
        streams["values"] = (flat[mask] if layout is Layout.SPARSE else flat).astype("<f4").tobytes()
    meta = TensorMeta(shape=(), nnz=int(mask.sum()), layout=layout, index_bits=bits, index_count=count,
                      codebook_size=None if book is None else book.size, code_bits=code_bits,
                      coders=coders, stream_bytes={name: len(data) for name, data in streams.items()})
    return meta, streams


def encode_tensor(weight: np.ndarray, *, codebook: np.ndarray | None, index_bits: int | None = None,
                  coder: str = "auto", layout: str = "auto") -> EncodedTensor:
    """Encode a float32 tensor of any shape; `decode_tensor` gives its exact bits back.

    Args:
        weight: the (pruned) tensor; its zeros are the pruned weights.
        codebook: the shared weights (k,) when the tensor is clustered, else None to store
            the non-zeros as raw float32. Cast to float32.
        index_bits: width of a gap in the sparse index, 1..16; None picks the width giving the
            smallest index stream. Only the sparse layout has an index (meta "index_bits" is
            null when the dense layout wins).
        coder: a `Coder` name for the index and code streams; "auto" keeps the smallest.
        layout: a `Layout` name; "auto" keeps the smaller of sparse and dense.

    Raises:
        ConfigError: a non-float32 weight, a bad codebook, a non-zero weight missing from the
            codebook, index_bits outside 1..16, or an unknown coder or layout.
    """
    choice = parse_coder(coder)
    if layout not in {item.value for item in Layout}:
        raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(item.value for item in Layout)}")
    is_int = isinstance(index_bits, int | np.integer) and not isinstance(index_bits, bool)
    if index_bits is not None and (not is_int or not 1 <= index_bits <= MAX_INDEX_BITS):
        raise ConfigError(f"index_bits must be an int in 1..{MAX_INDEX_BITS} or None, got {index_bits!r}")
    flat = _check_weight(weight)  # (N,)
    mask = flat != 0  # (N,)
    book = None if codebook is None else check_codebook(codebook)  # (k,)
    codes = None if book is None else codes_for(flat[mask], book)  # (nnz,)
    wanted = [Layout(layout)] if layout != Layout.AUTO else [Layout.SPARSE, Layout.DENSE]
    bits = None if index_bits is None else int(index_bits)
    options = [_layout(flat, mask, codes, book, item, bits, choice) for item in wanted]
    meta, streams = min(options, key=lambda option: sum(option[0].stream_bytes.values()))
    return EncodedTensor(meta=replace(meta, shape=tuple(weight.shape)).to_dict(), streams=streams)


def _stream(spec: TensorMeta, streams: Any, name: str) -> bytes:
    """Stream `name`, checked against the length the metadata recorded (catches truncation)."""
    data = streams.get(name) if isinstance(streams, Mapping) else None
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ArtifactError(f"encoded tensor lacks its {name!r} stream (got {type(data).__name__}); "
                            "the file is incomplete, re-encode the tensor")
    data = bytes(data)
    if len(data) != spec.stream_bytes[name]:
        raise ArtifactError(f"encoded tensor stream {name!r} holds {len(data)} bytes but its metadata "
                            f"says {spec.stream_bytes[name]}: it is truncated or altered; re-encode it")
    return data


def _values(spec: TensorMeta, streams: Any, count: int) -> np.ndarray:
    """The stored non-zeros (sparse, count = nnz) or elements (dense, count = N) -> (count,)."""
    if spec.codebook_size is None:
        data = _stream(spec, streams, "values")
        if len(data) != 4 * count:
            raise ArtifactError(f"'values' stream holds {len(data)} bytes, not 4 x {count}; re-encode it")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    book_bytes = _stream(spec, streams, "codebook")
    if len(book_bytes) != 4 * spec.codebook_size:
        raise ArtifactError(f"'codebook' stream holds {len(book_bytes)} bytes, not 4 x "
                            f"{spec.codebook_size}; re-encode it")
    book = np.frombuffer(book_bytes, dtype="<f4").astype(np.float32)  # (k,)
    codes = decode_symbols(_stream(spec, streams, "codes"), coder_name=spec.coders["codes"],
                           bits=code_bits_for(spec.codebook_size, spec.layout), count=count)  # (count,)
    if spec.layout is Layout.DENSE:
        book = np.concatenate([np.zeros(1, np.float32), book])  # (k + 1,) symbol 0 is a zero
    if codes.size and codes.max() >= book.size:
        raise ArtifactError(f"'codes' stream refers to codebook entry {int(codes.max())} of {book.size}; "
                            "it is corrupt, re-encode the tensor")
    return book[codes]


def decode_tensor(meta: dict[str, Any], streams: dict[str, bytes]) -> np.ndarray:
    """Rebuild the exact float32 tensor from `encode_tensor`'s metadata and streams.

    Raises:
        ArtifactError: malformed metadata, a missing, truncated or altered stream.
    """
    spec = TensorMeta.from_dict(meta)
    if spec.layout is Layout.DENSE:
        flat = _values(spec, streams, spec.size)  # (N,)
        if int(np.count_nonzero(flat)) != spec.nnz:
            raise ArtifactError(f"decoded tensor has {int(np.count_nonzero(flat))} non-zeros where the "
                                f"metadata says {spec.nnz}; it is corrupt, re-encode the tensor")
        return flat.reshape(spec.shape)
    index_bits, entries = spec.index_bits or 0, spec.index_count or 0  # both set when sparse
    gaps = decode_symbols(_stream(spec, streams, "index"), coder_name=spec.coders["index"],
                          bits=index_bits, count=entries)  # (entries,)
    positions = positions_from_gaps(gaps, index_bits=index_bits, size=spec.size)  # (nnz',)
    if positions.size != spec.nnz:
        raise ArtifactError(f"index stream holds {positions.size} non-zeros where the metadata says "
                            f"{spec.nnz}; it is corrupt, re-encode the tensor")
    values = _values(spec, streams, spec.nnz)  # (nnz,)
    flat = np.zeros(spec.size, dtype=np.float32)  # (N,)
    flat[positions] = values
    return flat.reshape(spec.shape)
