"""Asymmetric numeral systems (ANS) coding with constriction, frequencies in the header.

ANS spends fractional bits per symbol, so it tracks the entropy more closely than Huffman when
one symbol dominates (a 0.9-probable symbol costs 0.15 bits, not 1). The model is a categorical
distribution over the symbols that occur, built from their exact counts, which the header stores:

    varint count · alphabet (varint size, varint gaps) · varint count per symbol · uint32 LE words

Encoder and decoder build the same `Categorical(counts, perfect=False)`, so the quantised model is
identical on both sides.

Example:
    >>> data = ans_encode(np.array([3, 3, 3, 0, 3, 8]))
    >>> ans_decode(data).tolist()
    [3, 3, 3, 0, 3, 8]
"""

from __future__ import annotations

import constriction
import numpy as np

from torchslim.encoding._wire import Reader, read_alphabet, symbol_table, write_varint
from torchslim.errors import ArtifactError

__all__ = ["ans_decode", "ans_encode"]

_MAX_SINGLE = 1 << 32  # count limit when one symbol makes the payload empty


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def ans_encode(symbols: np.ndarray) -> bytes:
    """Encode non-negative integers (any shape, read flat) into a self-describing byte string.

    Raises:
        ValueError: a negative or non-integer symbol.
    """
    inverse, counts, header = symbol_table(symbols, "ANS")
    if counts.size < 2:
        return header  # zero or one symbol: the count says it all
    header += b"".join(write_varint(int(c)) for c in counts)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(inverse.reshape(-1).astype(np.int32), _model(counts))  # reversed: decodes forward
    return header + coder.get_compressed().astype("<u4").tobytes()


def _read_header(data: bytes, count: int | None) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    reader = Reader(data, "ANS stream")
    total = reader.varint()
    if count is not None and total != count:
        raise reader.fail(f"it holds {total} symbols where {count} were expected")
    if total > _MAX_SINGLE:
        raise reader.fail(f"{total} symbols is beyond any tensor")
    alphabet = read_alphabet(reader, limit=total)
    if (total == 0) != (alphabet.size == 0):
        raise reader.fail(f"{total} symbols with an alphabet of {alphabet.size}")
    if alphabet.size < 2:
        return total, alphabet, np.zeros(alphabet.size, np.int64), b""
    counts = np.array([reader.varint() for _ in range(alphabet.size)], dtype=np.int64)  # (m,)
    if counts.min() < 1 or int(counts.sum()) != total:
        raise reader.fail(f"its symbol counts sum to {int(counts.sum())}, not {total}, or include 0")
    payload = reader.rest()
    if len(payload) % 4:
        raise reader.fail(f"its payload of {len(payload)} bytes is not whole 32-bit words (truncated)")
    return total, alphabet, counts, payload


def ans_decode(data: bytes, *, count: int | None = None) -> np.ndarray:
    """Inverse of `ans_encode` -> (n,) int64.

    Args:
        data: bytes from `ans_encode`.
        count: the number of symbols expected, checked before any allocation when given.

    Raises:
        ArtifactError: truncated, altered or not an ANS stream.
    """
    total, alphabet, counts, payload = _read_header(data, count)
    if alphabet.size < 2:
        return np.full(total, alphabet[0] if alphabet.size else 0, dtype=np.int64)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)  # (words,) native order
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        ranks = coder.decode(_model(counts), total)  # (n,) int32 index into the alphabet
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ArtifactError(f"ANS stream is corrupt: constriction rejected it ({exc}); "
                            "re-encode the tensor") from exc
    if not coder.is_empty():
        raise ArtifactError("ANS stream is corrupt: data is left over after the last symbol "
                            "(altered or mislabelled); re-encode the tensor")
    return alphabet[np.asarray(ranks, dtype=np.int64)]
