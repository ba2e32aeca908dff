"""Little byte-level helpers shared by the stream headers: varints and a checked reader.

Headers are tiny next to the payloads they describe, so they use LEB128 varints (7 bits per
byte) for counts and sorted alphabets stored as gaps. Every read goes through `Reader`, which
turns a short or malformed buffer into an `ArtifactError` instead of an IndexError deep inside.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from torchslim.errors import ArtifactError

__all__ = ["Reader", "read_alphabet", "write_alphabet", "write_varint"]

_MAX_VARINT_BYTES = 9  # 63 bits: every value fits a signed int64 once decoded


def write_varint(value: int) -> bytes:
    """LEB128-encode a non-negative int below 2**63."""
    if not 0 <= value < 1 << 63:
        raise ValueError(f"varint out of range: {value}; expected 0 <= value < 2**63")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Reader:
    """Sequential reader over a header; every overrun is an `ArtifactError` naming `what`."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def fail(self, problem: str) -> ArtifactError:
        """An error naming the stream and the problem; the caller raises it."""
        return ArtifactError(f"{self.what} is corrupt: {problem}; re-encode the tensor")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
            if self._pos >= len(self._data):
                raise self.fail("header ends in the middle of a number (truncated)")
            byte = self._data[self._pos]
            self._pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise self.fail(f"a header number is longer than {_MAX_VARINT_BYTES} bytes")

    def take(self, size: int) -> bytes:
        if size < 0 or size > self.remaining:
            raise self.fail(f"needs {size} more bytes but only {self.remaining} remain (truncated)")
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += size
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining)


def write_alphabet(alphabet: np.ndarray) -> bytes:
    """Sorted distinct symbols as a count and varint gaps (first absolute, then gap - 1)."""
    values = [int(v) for v in alphabet]
    gaps = [values[0]] + [b - a - 1 for a, b in pairwise(values)] if values else []
    return write_varint(len(values)) + b"".join(write_varint(g) for g in gaps)


def read_alphabet(reader: Reader, limit: int) -> np.ndarray:
    """Inverse of `write_alphabet`; at most `limit` symbols, each below 2**63 -> (m,) int64."""
    size = reader.varint()
    if size > min(limit, reader.remaining):
        raise reader.fail(f"alphabet of {size} symbols is larger than the data allows")
    values: list[int] = []
    current = -1
    for _ in range(size):
        current += reader.varint() + 1
        values.append(current)
    if values and values[-1] >= 1 << 63:
        raise reader.fail("a symbol exceeds 63 bits")
    return np.array(values, dtype=np.int64)


def symbol_table(symbols: np.ndarray, coder: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Validate a symbol array for an entropy coder; return (inverse, counts, header).

    `inverse` maps each symbol (flattened) to its rank in the sorted alphabet, `counts` is the
    frequency of each alphabet entry, and `header` (count + alphabet) starts the coded stream.

    Raises:
        ValueError: a negative or non-integer symbol.
    """
    flat = np.asarray(symbols).reshape(-1)  # (n,)
    if flat.size and (not np.issubdtype(flat.dtype, np.integer) or int(flat.min()) < 0):
        raise ValueError(f"{coder} symbols must be non-negative integers, got dtype {flat.dtype}")
    alphabet, inverse, counts = np.unique(flat.astype(np.int64), return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts, write_varint(flat.size) + write_alphabet(alphabet)
