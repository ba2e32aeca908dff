"""Fixed-width bit packing of unsigned integers (1..32 bits each).

The paper stores sparse gaps in a few bits and codebook indices in log2(k) bits; this module is
that fixed-width form, and the baseline every entropy coder has to beat. Bits are LSB-first:
value i occupies stream bits [i*bits, (i+1)*bits), least significant bit first, bytes filled
from their least significant bit. Both directions are vectorised through a (N, 32) bit matrix.

Example:
    >>> data = pack_bits(np.array([1, 2, 3]), 2)
    >>> len(data), unpack_bits(data, 2, 3).tolist()
    (1, [1, 2, 3])
"""

from __future__ import annotations

import numpy as np

from torchslim.errors import ArtifactError

__all__ = ["check_symbols", "pack_bits", "packed_size", "unpack_bits"]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an int in 1..32, got {bits!r}")


def check_symbols(values: np.ndarray, bits: int) -> np.ndarray:
    """Validate unsigned integers that fit `bits` bits; return them flat as int64.

    Raises:
        ValueError: `bits` outside 1..32, a non-integer dtype, or a value outside [0, 2**bits).
    """
    _check_bits(bits)
    array = np.asarray(values)
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got dtype {array.dtype}")
    flat = array.reshape(-1)  # (N,)
    if flat.size:
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= 1 << bits:
            raise ValueError(f"symbols must lie in [0, 2**{bits}) = [0, {1 << bits}), got range "
                             f"[{low}, {high}]; use more bits")
    return flat.astype(np.int64)


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below 2**bits into ceil(N * bits / 8) bytes.

    Raises:
        ValueError: see `check_symbols`.
    """
    flat = check_symbols(values, bits)  # (N,)
    words = flat.astype("<u4").view(np.uint8).reshape(-1, 4)  # (N, 4) little-endian bytes
    matrix = np.unpackbits(words, axis=1, bitorder="little")  # (N, 32) bits, LSB first
    return np.packbits(matrix[:, :bits], bitorder="little").tobytes()  # row-major = value order


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` values as a (count,) int64 array.

    Raises:
        ValueError: `bits` outside 1..32 or a negative `count` (caller bugs).
        ArtifactError: `data` is not exactly ceil(count * bits / 8) bytes long.
    """
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise ArtifactError(f"bit-packed stream holds {len(data)} bytes but {count} values of {bits} "
                            f"bits need exactly {expected}: it is truncated or altered; re-encode it")
    raw = np.frombuffer(data, dtype=np.uint8)  # (expected,)
    stream = np.unpackbits(raw, bitorder="little")[:count * bits]  # (count * bits,)
    matrix = np.zeros((count, 32), dtype=np.uint8)  # (count, 32)
    matrix[:, :bits] = stream.reshape(count, bits)
    words = np.packbits(matrix, axis=1, bitorder="little")  # (count, 4) little-endian bytes
    return words.view("<u4").reshape(count).astype(np.int64)
