"""One entry point for every way a stream of small unsigned integers can be stored.

A tensor's gap and code streams go through `encode_symbols` with a `Coder`; `auto` tries every
coder and keeps the smallest, so a stream is never stored larger than its bit-packed form (plus a
few header bytes when an entropy coder wins). The coder actually used is returned so the caller
records it, and `decode_symbols` needs it back with the stream's width and length.

Example:
    >>> data, used = encode_symbols(np.array([0, 0, 0, 5]), bits=3, coder="raw")
    >>> used, decode_symbols(data, coder_name=used, bits=3, count=4).tolist()
    ('raw', [0, 0, 0, 5])
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import zstandard

from torchslim.encoding.ans import ans_decode, ans_encode
from torchslim.encoding.bitpack import check_symbols, pack_bits, packed_size, unpack_bits
from torchslim.encoding.huffman import huffman_decode, huffman_encode
from torchslim.errors import ArtifactError, ConfigError

__all__ = ["Coder", "decode_symbols", "encode_symbols", "parse_coder"]

_ZSTD_LEVEL = 19
_PACKED, _BYTES = 0, 1  # first byte of a zstd stream: which form was compressed


class Coder(StrEnum):
    """How a symbol stream is stored."""

    RAW = "raw"  # fixed width, `bits` per symbol
    HUFFMAN = "huffman"  # canonical Huffman, alphabet + code lengths in the header
    ZSTD = "zstd"  # zstandard level 19 over the packed or byte form, whichever is smaller
    ANS = "ans"  # constriction's ANS coder, alphabet + counts in the header
    AUTO = "auto"  # every coder above; the smallest output wins


_CONCRETE = (Coder.RAW, Coder.HUFFMAN, Coder.ANS, Coder.ZSTD)  # tie order: simplest first


def parse_coder(coder: Coder | str) -> Coder:
    """`coder` as a `Coder`; raises ConfigError listing the valid names."""
    try:
        return Coder(coder)
    except ValueError:
        raise ConfigError(f"unknown coder {coder!r}; valid: {', '.join(c.value for c in Coder)}") from None


def _byte_dtype(bits: int) -> str:
    """The smallest whole little-endian unsigned integer holding `bits` bits."""
    return "<u1" if bits <= 8 else "<u2" if bits <= 16 else "<u4"


def _zstd_encode(symbols: np.ndarray, bits: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    packed = b"%c" % _PACKED + compressor.compress(pack_bits(symbols, bits))
    if bits in (8, 16, 32):
        return packed  # the byte form is the packed form
    whole = b"%c" % _BYTES + compressor.compress(symbols.astype(_byte_dtype(bits)).tobytes())
    return min(packed, whole, key=len)


def _zstd_decode(data: bytes, bits: int, count: int) -> np.ndarray:
    if not data or data[0] not in (_PACKED, _BYTES):
        raise ArtifactError("zstd stream is corrupt: it lacks its form byte; re-encode the tensor")
    packed = data[0] == _PACKED
    expected = packed_size(count, bits) if packed else count * np.dtype(_byte_dtype(bits)).itemsize
    try:
        if zstandard.frame_content_size(data[1:]) != expected:
            raise ArtifactError(f"zstd stream is corrupt: its frame does not hold the {expected} bytes "
                                f"that {count} symbols need; re-encode the tensor")
        raw = zstandard.ZstdDecompressor().decompress(data[1:], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"zstd stream is corrupt ({exc}); re-encode the tensor") from exc
    if packed:
        return unpack_bits(raw, bits, count)
    if len(raw) != expected:
        raise ArtifactError(f"zstd stream is corrupt: {len(raw)} bytes where {expected} were expected")
    return np.frombuffer(raw, dtype=_byte_dtype(bits)).astype(np.int64)


def _encode_one(symbols: np.ndarray, bits: int, coder: Coder) -> bytes:
    if coder is Coder.RAW:
        return pack_bits(symbols, bits)
    if coder is Coder.HUFFMAN:
        return huffman_encode(symbols)
    if coder is Coder.ANS:
        return ans_encode(symbols)
    return _zstd_encode(symbols, bits)


def encode_symbols(symbols: np.ndarray, *, bits: int, coder: Coder | str) -> tuple[bytes, str]:
    """Encode unsigned integers below 2**bits (any shape, read flat).

    Returns:
        (data, coder_name): the stream and the concrete coder that wrote it (never "auto").

    Raises:
        ConfigError: unknown coder.
        ValueError: `bits` outside 1..32 or a symbol outside [0, 2**bits).
    """
    choice = parse_coder(coder)
    flat = check_symbols(symbols, bits)  # (n,) int64
    candidates = _CONCRETE if choice is Coder.AUTO else (choice,)
    results = [(_encode_one(flat, bits, c), c.value) for c in candidates]
    return min(results, key=lambda result: len(result[0]))  # first of equal sizes wins


def decode_symbols(data: bytes, *, coder_name: str, bits: int, count: int) -> np.ndarray:
    """Inverse of `encode_symbols` -> (count,) int64, every value below 2**bits.

    Raises:
        ArtifactError: unknown coder name, or a stream that is truncated, altered or decodes to
            the wrong number of symbols or to symbols wider than `bits`.
    """
    if coder_name not in tuple(c.value for c in _CONCRETE):
        raise ArtifactError(f"unknown stream coder {coder_name!r} in the metadata; valid: "
                            f"{', '.join(c.value for c in _CONCRETE)}; the file is corrupt or newer")
    coder = Coder(coder_name)
    if coder is Coder.RAW:
        symbols = unpack_bits(data, bits, count)
    elif coder is Coder.ZSTD:
        symbols = _zstd_decode(data, bits, count)
    else:
        symbols = (huffman_decode if coder is Coder.HUFFMAN else ans_decode)(data, count=count)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= 1 << bits):
        raise ArtifactError(f"{coder_name} stream decodes to symbols outside [0, 2**{bits}); it is "
                            "corrupt, re-encode the tensor")
    return symbols
