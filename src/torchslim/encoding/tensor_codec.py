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

from dataclasses import dataclass
from typing import Any

import numpy as np

from torchslim.encoding.coders import Coder, decode_symbols, encode_symbols, parse_coder
from torchslim.encoding.meta import MAX_CODEBOOK, Layout, TensorMeta, code_bits_for
from torchslim.encoding.sparse_index import (
    MAX_INDEX_BITS,
    best_index_bits,
    encode_gaps,
    positions_from_gaps,
)
from torchslim.errors import ArtifactError, ConfigError

__all__ = ["EncodedTensor", "decode_tensor", "encode_tensor", "stream_bytes"]

_EXTRA_INDEX_BITS = 3  # entropy coders often prefer a few more index bits than fixed width does


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
    if weight.size > 1 << 31:
        raise ConfigError(f"encode_tensor handles at most 2**31 elements, got {weight.size}; split the tensor")
    flat = weight.reshape(-1)  # (N,)
    return np.where(flat != 0, flat, np.float32(0))  # -0.0 -> +0.0, bits otherwise kept


def _check_codebook(codebook: np.ndarray) -> np.ndarray:
    book = np.asarray(codebook)
    if book.ndim != 1 or not 1 <= book.size <= MAX_CODEBOOK or not np.issubdtype(book.dtype, np.floating):
        raise ConfigError(f"codebook must be a 1-D float array of 1..{MAX_CODEBOOK} entries, got dtype "
                          f"{book.dtype} and shape {book.shape}")
    return book.astype(np.float32)


def _codes_for(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of each value in `book` (first match) -> (nnz,) int64; every value must be in it."""
    order = np.argsort(book, kind="stable")  # (k,)
    slot = np.searchsorted(book[order], values).clip(max=book.size - 1)  # (nnz,)
    missing = book[order][slot] != values  # (nnz,)
    if missing.any():
        examples = ", ".join(f"{v:g}" for v in values[missing][:3])
        raise ConfigError(f"{int(missing.sum())} of {values.size} non-zero weights are not codebook entries "
                          f"(e.g. {examples}); cluster the tensor first so that every non-zero weight "
                          f"equals one of the {book.size} codebook values")
    return order[slot].astype(np.int64)


def _sparse_index(mask: np.ndarray, index_bits: int | None, coder: Coder) -> tuple[int, int, bytes, str]:
    """The smallest index stream -> (index_bits, entries, data, coder used)."""
    if index_bits is not None:
        candidates = [index_bits]
    else:
        best = best_index_bits(mask)
        last = best if coder is Coder.RAW else min(MAX_INDEX_BITS, best + _EXTRA_INDEX_BITS)
        candidates = list(range(best, last + 1))
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
