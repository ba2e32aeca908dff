"""Relative (gap) coding of where the non-zeros of a flattened tensor are.

Deep Compression stores each non-zero's distance to the previous one in a few bits instead of
a 32-bit absolute index. Here an entry holds `gap`, the number of zeros skipped since the last
entry, and a gap too long for `index_bits` bits is split with filler entries. Unlike the paper,
whose filler is a stored zero weight, a filler here is the reserved top value
`2**index_bits - 1` meaning "skip that many positions, place nothing": a real entry therefore
has a gap in [0, 2**index_bits - 2], the decoder tells fillers from the gaps alone, and the value
stream holds exactly one entry per real non-zero (no wasted slot per filler, no zero code needed
in the codebook). With one bit, gap 0 is a neighbour and gap 1 skips one zero.

Example:
    >>> gaps, fillers = encode_gaps(np.array([0, 1, 0, 0, 0, 0, 0, 1], dtype=bool), index_bits=2)
    >>> gaps.tolist(), fillers.tolist()
    ([1, 3, 2], [False, True, False])
    >>> positions_from_gaps(gaps, index_bits=2, size=8).tolist()
    [1, 7]
"""

from __future__ import annotations

import numpy as np

from torchslim.errors import ArtifactError

__all__ = ["MAX_INDEX_BITS", "best_index_bits", "encode_gaps", "gap_entries", "positions_from_gaps"]

MAX_INDEX_BITS = 16


def _check_index_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, int | np.integer) \
            or not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be an int in 1..{MAX_INDEX_BITS}, got {index_bits!r}")
    return int(index_bits)


def _skips(mask: np.ndarray) -> np.ndarray:
    """Zeros skipped before each non-zero of the flattened mask -> (nnz,) int64."""
    positions = np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1))  # (nnz,)
    return np.diff(positions, prepend=-1) - 1


def gap_entries(mask: np.ndarray, index_bits: int) -> int:
    """How many entries (real non-zeros + fillers) the gap stream of `mask` has."""
    skips = _skips(mask)
    return int(skips.size + (skips // ((1 << _check_index_bits(index_bits)) - 1)).sum())


def encode_gaps(mask: np.ndarray, *, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gap-code the non-zeros of `mask` (any shape, read flat in C order).

    Returns:
        (gaps, is_filler): two (entries,) arrays, int64 gaps in [0, 2**index_bits) and a bool
        marker that is True exactly where `gaps == 2**index_bits - 1`.
    """
    top = (1 << _check_index_bits(index_bits)) - 1
    skips = _skips(mask)  # (nnz,)
    fillers = skips // top  # (nnz,) fillers inserted before each non-zero
    real_at = np.cumsum(fillers + 1) - 1  # (nnz,) entry index of each real non-zero
    gaps = np.full(int(real_at[-1]) + 1 if real_at.size else 0, top, dtype=np.int64)  # (entries,)
    gaps[real_at] = skips - fillers * top
    return gaps, gaps == top


def positions_from_gaps(gaps: np.ndarray, *, index_bits: int, size: int) -> np.ndarray:
    """Inverse of `encode_gaps`: flat positions (nnz,) int64 of the non-zeros.

    Raises:
        ArtifactError: a gap outside [0, 2**index_bits), a stream ending in a filler, or a
            position beyond `size` (the stream or its metadata is corrupt).
    """
    top = (1 << _check_index_bits(index_bits)) - 1
    gaps = np.asarray(gaps, dtype=np.int64).reshape(-1)  # (entries,)
    if gaps.size and (gaps.min() < 0 or gaps.max() > top):
        raise ArtifactError(f"index stream holds gaps outside [0, {top}] for index_bits={index_bits}; "
                            "it is corrupt, re-encode the tensor")
    is_filler = gaps == top
    if gaps.size and is_filler[-1]:
        raise ArtifactError("index stream ends in a filler entry, which no encoder writes; it is "
                            "corrupt, re-encode the tensor")
    advance = np.where(is_filler, top, gaps + 1)  # (entries,) positions moved by each entry
    positions = (np.cumsum(advance) - 1)[~is_filler]  # (nnz,)
    if positions.size and positions[-1] >= size:
        raise ArtifactError(f"index stream points at position {int(positions[-1])} of a tensor with "
                            f"{size} elements; it is corrupt, re-encode the tensor")
    return positions


def best_index_bits(mask: np.ndarray) -> int:
    """The `index_bits` in 1..16 with the fewest fixed-width bits, entries(b) * b.

    Few bits make long gaps cost fillers, many bits waste width on short gaps; the paper used
    8 bits for conv and 5 for fully connected layers. Ties go to the fewer bits.
    """
    skips = _skips(mask)  # (nnz,)
    costs = [(skips.size + int((skips // ((1 << b) - 1)).sum())) * b for b in range(1, MAX_INDEX_BITS + 1)]
    return int(np.argmin(costs)) + 1
