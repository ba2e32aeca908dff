"""Deep Compression's storage stage: one pruned, weight-shared tensor as a few compact streams.

Han et al. (2016) shrink a network in three stages: prune, share weights (cluster them into a
k-entry codebook), then code what is left. This package is the third stage, in pure numpy:

1. where the non-zeros are: gaps between them in `index_bits` bits, with fillers for gaps too
   long for that width (`sparse_index`);
2. what they are: a ceil(log2 k)-bit index into the float32 codebook per non-zero (`codebook`),
   or the raw float32 values when the tensor is not clustered;
3. each symbol stream stored by the smallest of bit packing (`bitpack`), canonical Huffman
   (`huffman`), zstd, or ANS (`ans`), chosen per stream (`coders`).

`encode_tensor` does all three and also tries a dense layout (a code for every element, no
index) for tensors with few zeros, keeping the smaller; `decode_tensor` returns the exact bits,
and raises `ArtifactError` on any damaged input.

Example:
    >>> import numpy as np
    >>> from torchslim.encoding import decode_tensor, encode_tensor, stream_bytes
    >>> weight = np.zeros((4, 50), dtype=np.float32)
    >>> weight[:, ::10] = 0.25
    >>> encoded = encode_tensor(weight, codebook=np.array([0.25], dtype=np.float32), coder="raw")
    >>> sorted(stream_bytes(encoded)), encoded.meta["layout"]
    (['codebook', 'codes', 'index'], 'sparse')
    >>> np.array_equal(decode_tensor(encoded.meta, encoded.streams), weight)
    True
"""

from __future__ import annotations

from torchslim.encoding.ans import ans_decode, ans_encode
from torchslim.encoding.bitpack import pack_bits, unpack_bits
from torchslim.encoding.codebook import codes_for
from torchslim.encoding.coders import Coder, decode_symbols, encode_symbols
from torchslim.encoding.huffman import huffman_decode, huffman_encode
from torchslim.encoding.meta import Layout, TensorMeta
from torchslim.encoding.sparse_index import best_index_bits, encode_gaps, positions_from_gaps
from torchslim.encoding.tensor_codec import EncodedTensor, decode_tensor, encode_tensor, stream_bytes

__all__ = [
    "Coder",
    "EncodedTensor",
    "Layout",
    "TensorMeta",
    "ans_decode",
    "ans_encode",
    "best_index_bits",
    "codes_for",
    "decode_symbols",
    "decode_tensor",
    "encode_gaps",
    "encode_symbols",
    "encode_tensor",
    "huffman_decode",
    "huffman_encode",
    "pack_bits",
    "positions_from_gaps",
    "stream_bytes",
    "unpack_bits",
]
