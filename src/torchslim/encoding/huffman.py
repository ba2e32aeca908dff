"""Canonical Huffman coding of non-negative integer symbols, self-describing.

The third stage of Deep Compression: codebook indices and sparse gaps are far from uniform, so
a prefix code gets within one bit per symbol of their entropy. The code is canonical, so the
header only needs the alphabet and each symbol's code length:

    varint count · alphabet (varint size, varint gaps) · code lengths (6 bits each) · payload

The payload is the codes MSB-first. Decoding reads a window of the longest code length at every
bit position at once (numpy), finds each window's code length by comparing it with the canonical
code boundaries, and then only chases `position += length` in a tight loop.

Example:
    >>> data = huffman_encode(np.array([7, 7, 7, 7, 2, 9]))
    >>> huffman_decode(data).tolist()
    [7, 7, 7, 7, 2, 9]
"""

from __future__ import annotations

import heapq

import numpy as np

from torchslim.encoding._wire import Reader, read_alphabet, symbol_table
from torchslim.encoding.bitpack import pack_bits, packed_size, unpack_bits
from torchslim.errors import ArtifactError

__all__ = ["huffman_decode", "huffman_encode"]

_LENGTH_BITS = 6
_MAX_LENGTH = 57  # a window of the longest code plus 7 bit-offset bits fits in 64 bits
_MAX_SINGLE = 1 << 32  # count limit when one symbol makes the payload empty
_CHUNK_BITS = 1 << 20  # bit positions whose code lengths are computed at once


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each of m >= 2 symbols, from their counts -> (m,) int64."""
    size = len(counts)
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = [0] * (2 * size - 1)  # leaves 0..m-1, then internal nodes in creation order
    for node in range(size, 2 * size - 1):
        count_a, a = heapq.heappop(heap)
        count_b, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (count_a + count_b, node))
    depth = [0] * (2 * size - 1)
    for node in range(2 * size - 3, -1, -1):  # a parent is numbered after its children
        depth[node] = depth[parent[node]] + 1
    return np.array(depth[:size], dtype=np.int64)


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Canonical order and left-justified code starts.

    Returns:
        (order, starts, longest): `order` (m,) sorts symbols by (length, symbol); `starts` (m,)
        is each code in that order shifted left to `longest` bits, i.e. the running Kraft sum.
    """
    order = np.lexsort((np.arange(lengths.size), lengths))  # (m,)
    longest = int(lengths.max())
    weights = np.left_shift(np.uint64(1), (longest - lengths[order]).astype(np.uint64))  # (m,)
    starts = np.concatenate([[np.uint64(0)], np.cumsum(weights)[:-1]]).astype(np.uint64)  # (m,)
    return order, starts, longest


def huffman_encode(symbols: np.ndarray) -> bytes:
    """Encode non-negative integers (any shape, read flat) into a self-describing byte string.

    Raises:
        ValueError: a negative or non-integer symbol.
    """
    inverse, counts, header = symbol_table(symbols, "Huffman")
    if counts.size < 2:
        return header  # zero or one symbol: the count says it all
    lengths = _code_lengths(counts)  # (m,)
    if int(lengths.max()) > _MAX_LENGTH:
        raise ValueError(f"Huffman code longer than {_MAX_LENGTH} bits; the input is too large")
    order, starts, longest = _canonical(lengths)
    shifts = np.arange(longest - 1, -1, -1, dtype=np.uint64)  # (L,) MSB first
    rows = ((starts[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)  # (m, L) code bits
    table = np.empty_like(rows)
    table[order] = rows  # (m, L) back in alphabet order
    valid = np.arange(longest) < lengths[:, None]  # (m, L) bits that belong to the code
    inverse = inverse.reshape(-1)
    bits = table[inverse][valid[inverse]]  # (total_bits,) all codes, symbol after symbol
    return header + pack_bits(lengths, _LENGTH_BITS) + np.packbits(bits).tobytes()


def _read_header(data: bytes, count: int | None) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    reader = Reader(data, "Huffman stream")
    total = reader.varint()
    if count is not None and total != count:
        raise reader.fail(f"it holds {total} symbols where {count} were expected")
    alphabet = read_alphabet(reader, limit=max(total, 0))
    if (total == 0) != (alphabet.size == 0):
        raise reader.fail(f"{total} symbols with an alphabet of {alphabet.size}")
    if alphabet.size < 2:
        if total > _MAX_SINGLE:
            raise reader.fail(f"{total} symbols is beyond any tensor")
        return total, alphabet, np.zeros(alphabet.size, np.int64), b""
    lengths = unpack_bits(reader.take(packed_size(alphabet.size, _LENGTH_BITS)), _LENGTH_BITS, alphabet.size)
    if lengths.min() < 1 or lengths.max() > _MAX_LENGTH:
        raise reader.fail(f"code lengths must lie in 1..{_MAX_LENGTH}")
    longest = int(lengths.max())
    if sum(1 << (longest - int(n)) for n in lengths) > 1 << longest:
        raise reader.fail("its code lengths do not form a prefix code")
    payload = reader.rest()
    if total > 8 * len(payload):
        raise reader.fail(f"{total} symbols cannot fit in {len(payload)} payload bytes (truncated)")
    return total, alphabet, lengths, payload


def _windows(padded: np.ndarray, positions: np.ndarray, longest: int) -> np.ndarray:
    """The `longest` bits starting at each bit position -> (P,) uint64, MSB first."""
    first = positions >> 3  # (P,) byte holding each position
    word = np.zeros(positions.size, dtype=np.uint64)  # (P,) 8 bytes big-endian from `first`
    for offset in range(8):
        word = (word << np.uint64(8)) | padded[first + offset].astype(np.uint64)
    word = word << (positions & 7).astype(np.uint64)  # drop the bits before the position
    return word >> np.uint64(64 - longest)


class _LengthLookup:
    """Maps bit positions to the length of the code starting there (canonical boundaries)."""

    def __init__(self, padded: np.ndarray, sorted_lengths: np.ndarray, starts: np.ndarray,
                 longest: int, invalid: int) -> None:
        self.padded, self.longest, self.invalid = padded, longest, invalid
        self.group_lengths = np.unique(sorted_lengths)  # (G,) distinct lengths, ascending
        last = np.searchsorted(sorted_lengths, self.group_lengths, side="right") - 1  # (G,)
        weights = np.left_shift(np.uint64(1), (longest - sorted_lengths).astype(np.uint64))  # (m,)
        self.group_ends = (starts + weights)[last]  # (G,) first window past each length group

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        window = _windows(self.padded, positions, self.longest)  # (P,)
        group = np.searchsorted(self.group_ends, window, side="right")  # (P,)
        lengths = np.full(positions.size, self.invalid, dtype=np.int64)  # (P,) invalid: no code
        known = group < self.group_lengths.size
        lengths[known] = self.group_lengths[group[known]]
        return lengths


def _chase(total: int, bit_count: int, length_at: _LengthLookup) -> list[int]:
    """Start bit of each of `total` codes, following `position += code length`."""
    starts: list[int] = []
    position, found = 0, 0
    for chunk in range(0, bit_count, _CHUNK_BITS):
        stop = min(chunk + _CHUNK_BITS, bit_count)
        if position >= stop:
            continue
        lengths = length_at(np.arange(chunk, stop)).tolist()  # code length at every bit position
        append = starts.append
        while position < stop and found < total:
            append(position)
            position += lengths[position - chunk]
            found += 1
        if found == total:
            break
    if found < total or position > bit_count:
        raise ArtifactError(f"Huffman stream is corrupt: its payload decodes to {found} of {total} "
                            "symbols before running out (truncated or altered); re-encode the tensor")
    return starts


def huffman_decode(data: bytes, *, count: int | None = None) -> np.ndarray:
    """Inverse of `huffman_encode` -> (n,) int64.

    Args:
        data: bytes from `huffman_encode`.
        count: the number of symbols expected, checked before any allocation when given.

    Raises:
        ArtifactError: truncated, altered or not a Huffman stream.
    """
    total, alphabet, lengths, payload = _read_header(data, count)
    if alphabet.size < 2:
        return np.full(total, alphabet[0] if alphabet.size else 0, dtype=np.int64)
    order, starts, longest = _canonical(lengths)
    padded = np.concatenate([np.frombuffer(payload, np.uint8), np.zeros(8, np.uint8)])  # (bytes + 8,)
    bit_count = 8 * len(payload)
    length_at = _LengthLookup(padded, lengths[order], starts, longest, invalid=bit_count + 1)
    positions = np.array(_chase(total, bit_count, length_at), dtype=np.int64)  # (n,)
    window = _windows(padded, positions, longest)  # (n,)
    rank = np.searchsorted(starts, window, side="right") - 1  # (n,) index in canonical order
    return alphabet[order[rank]]
