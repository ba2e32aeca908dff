"""Map the non-zeros of a weight-shared tensor to indices into its codebook.

After clustering (Deep Compression's second stage) every non-zero weight is one of k shared
values, so it can be stored as a log2(k)-bit index. The match is exact float32 equality: an
index must give back the very same bits, so a weight that is merely close to a centroid is an
error that points at the missing clustering step rather than a silent rounding.

Example:
    >>> codes_for(np.array([0.5, -1.0, 0.5], dtype=np.float32), np.array([-1.0, 0.5])).tolist()
    [1, 0, 1]
"""

from __future__ import annotations

import numpy as np

from torchslim.encoding.meta import MAX_CODEBOOK
from torchslim.errors import ConfigError

__all__ = ["check_codebook", "codes_for"]


def check_codebook(codebook: np.ndarray) -> np.ndarray:
    """`codebook` as a (k,) float32 array.

    Raises:
        ConfigError: not 1-D, not floating point, or not 1..65536 entries.
    """
    book = np.asarray(codebook)
    if book.ndim != 1 or not 1 <= book.size <= MAX_CODEBOOK or not np.issubdtype(book.dtype, np.floating):
        raise ConfigError(f"codebook must be a 1-D float array of 1..{MAX_CODEBOOK} entries, got dtype "
                          f"{book.dtype} and shape {book.shape}; pass the centroids of the clustering")
    return book.astype(np.float32)


def codes_for(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of each of `values` (nnz,) in `codebook` (its first equal entry) -> (nnz,) int64.

    Raises:
        ConfigError: a bad codebook (see `check_codebook`) or values that are not entries of it,
            with how many and a few examples.
    """
    book = check_codebook(codebook)  # (k,)
    flat = np.asarray(values, dtype=np.float32).reshape(-1)  # (nnz,)
    order = np.argsort(book, kind="stable")  # (k,) ties keep the lowest index first
    slot = np.searchsorted(book[order], flat).clip(max=book.size - 1)  # (nnz,)
    missing = book[order][slot] != flat  # (nnz,)
    if missing.any():
        examples = ", ".join(f"{v:g}" for v in flat[missing][:3])
        raise ConfigError(f"{int(missing.sum())} of {flat.size} non-zero weights are not codebook entries "
                          f"(e.g. {examples}); cluster the tensor first so that every non-zero weight "
                          f"equals one of the {book.size} codebook values")
    return order[slot].astype(np.int64)
