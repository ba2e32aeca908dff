import json
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.encoding import (
    Coder,
    EncodedTensor,
    best_index_bits,
    decode_symbols,
    decode_tensor,
    encode_gaps,
    encode_symbols,
    encode_tensor,
    huffman_decode,
    huffman_encode,
    pack_bits,
    positions_from_gaps,
    stream_bytes,
    unpack_bits,
)
from torchslim.errors import ArtifactError, ConfigError

CODERS = [c.value for c in Coder]


def _entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _clustered(shape: tuple[int, ...], sparsity: float, centroids: int, seed: int,
               skewed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A pruned, weight-shared float32 tensor and its codebook (codes from a discretised normal)."""
    rng = np.random.default_rng(seed)
    book = np.sort(rng.normal(0, 0.05, centroids)).astype(np.float32)
    book[book == 0] = 1e-3
    normal = np.clip(np.round(rng.normal(centroids / 2, centroids / 8, shape)), 0, centroids - 1)
    codes = normal.astype(np.int64) if skewed else rng.integers(0, centroids, shape)
    mask = rng.random(shape) >= sparsity
    return np.where(mask, book[codes], 0).astype(np.float32), book


def _assert_bit_exact(encoded: EncodedTensor, weight: np.ndarray) -> None:
    decoded = decode_tensor(json.loads(json.dumps(encoded.meta)), encoded.streams)
    assert decoded.dtype == np.float32 and decoded.shape == weight.shape
    assert np.array_equal(decoded.view(np.uint32), weight.view(np.uint32))


# --- bit packing -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_bits_round_trips_every_width_including_the_extremes(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, 1001, dtype=np.uint64).astype(np.int64)
    values[:2] = [0, (1 << bits) - 1]
    data = pack_bits(values, bits)
    assert len(data) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, 1001), values)
    assert unpack_bits(pack_bits(np.zeros(0, np.int64), bits), bits, 0).size == 0


def test_pack_bits_rejects_values_too_wide_and_unpack_rejects_truncation() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match=r"1\.\.32"):
        pack_bits(np.array([1]), 33)
    with pytest.raises(ArtifactError, match="truncated"):
        unpack_bits(pack_bits(np.arange(8), 3)[:-1], 3, 8)


# --- sparse index ------------------------------------------------------------------------------

@pytest.mark.parametrize("index_bits", [1, 2, 3, 5, 8, 16])
def test_gaps_round_trip_with_fillers_for_long_runs_of_zeros(index_bits: int) -> None:
    mask = np.zeros(100_000, dtype=bool)
    mask[[0, 1, 5, 300, 301, 70_000, 99_999]] = True  # gaps of 0, 3, 294, 69_698, 29_998
    gaps, fillers = encode_gaps(mask, index_bits=index_bits)
    top = (1 << index_bits) - 1
    assert gaps.max() <= top and np.array_equal(fillers, gaps == top)
    assert (~fillers).sum() == 7
    assert np.array_equal(positions_from_gaps(gaps, index_bits=index_bits, size=mask.size),
                          np.flatnonzero(mask))


@pytest.mark.parametrize("mask", [np.zeros(0, bool), np.zeros(50, bool), np.ones(50, bool)],
                         ids=["empty", "all-zero", "all-dense"])
def test_gaps_handle_empty_all_zero_and_all_dense_masks(mask: np.ndarray) -> None:
    gaps, fillers = encode_gaps(mask, index_bits=4)
    assert gaps.size == mask.sum() and not fillers.any()
    assert np.array_equal(positions_from_gaps(gaps, index_bits=4, size=mask.size), np.flatnonzero(mask))


def test_best_index_bits_minimises_fixed_width_bits() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random(200_000) >= 0.92
    costs = {b: encode_gaps(mask, index_bits=b)[0].size * b for b in range(1, 17)}
    assert best_index_bits(mask) == min(costs, key=lambda b: (costs[b], b))
    assert best_index_bits(np.ones(10, bool)) == 1


def test_positions_from_gaps_rejects_positions_past_the_tensor() -> None:
    with pytest.raises(ArtifactError, match="position"):
        positions_from_gaps(np.array([5]), index_bits=3, size=4)


# --- Huffman and the coders ----------------------------------------------------------------------

def test_huffman_codes_a_skewed_source_within_one_bit_of_its_entropy() -> None:
    rng = np.random.default_rng(1)
    symbols = np.clip(np.round(rng.normal(32, 5, 300_000)), 0, 63).astype(np.int64)
    data = huffman_encode(symbols)
    bits_per_symbol = 8 * len(data) / symbols.size
    entropy = _entropy_bits(symbols)
    assert entropy <= bits_per_symbol < entropy + 1 and bits_per_symbol < 6
    started = time.perf_counter()
    assert np.array_equal(huffman_decode(data), symbols)
    assert time.perf_counter() - started < 1.5


@pytest.mark.parametrize("symbols", [[], [7], [7] * 1000, [0, 1], [3, 3, 3, 9, 1 << 40]],
                         ids=["empty", "one", "single-symbol", "two", "huge-symbol"])
def test_huffman_handles_tiny_alphabets(symbols: list[int]) -> None:
    array = np.array(symbols, dtype=np.int64)
    assert np.array_equal(huffman_decode(huffman_encode(array)), array)


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("bits", [1, 5, 8, 12, 16, 32])
def test_every_coder_round_trips_every_width(coder: str, bits: int) -> None:
    rng = np.random.default_rng(bits)
    symbols = np.minimum(rng.geometric(0.3, 5000) - 1, (1 << bits) - 1)
    data, used = encode_symbols(symbols, bits=bits, coder=coder)
    assert used != "auto" and (coder == "auto" or used == coder)
    assert np.array_equal(decode_symbols(data, coder_name=used, bits=bits, count=symbols.size), symbols)


def test_auto_keeps_the_smallest_coder() -> None:
    symbols = np.random.default_rng(2).geometric(0.5, 20_000) - 1
    sizes = {c: len(encode_symbols(symbols, bits=8, coder=c)[0]) for c in ("raw", "huffman", "zstd", "ans")}
    data, used = encode_symbols(symbols, bits=8, coder="auto")
    assert len(data) == min(sizes.values()) and sizes[used] == len(data)


def test_unknown_coder_is_a_config_error_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="huffman"):
        encode_symbols(np.arange(3), bits=2, coder="lzma")
    with pytest.raises(ArtifactError, match="coder"):
        decode_symbols(b"", coder_name="lzma", bits=2, count=0)


# --- tensors ---------------------------------------------------------------------------------------

def test_sparse_clustered_layer_round_trips_bit_exactly() -> None:
    weight, book = _clustered((300, 784), sparsity=0.9, centroids=32, seed=3)
    encoded = encode_tensor(weight, codebook=book)
    assert encoded.meta["nnz"] == np.count_nonzero(weight) and encoded.meta["code_bits"] in (5, 6)
    _assert_bit_exact(encoded, weight)


def test_92_percent_sparse_5_bit_layer_is_far_below_a_twentieth_of_float32() -> None:
    weight, book = _clustered((300, 784), sparsity=0.92, centroids=32, seed=4, skewed=False)
    encoded = encode_tensor(weight, codebook=book)
    assert encoded.total_bytes == sum(stream_bytes(encoded).values())
    assert encoded.total_bytes < weight.nbytes / 30
    _assert_bit_exact(encoded, weight)


def test_auto_layout_keeps_the_smaller_of_sparse_and_dense() -> None:
    weight, book = _clustered((40, 50), sparsity=0.5, centroids=16, seed=5)
    sizes = {layout: encode_tensor(weight, codebook=book, layout=layout).total_bytes
             for layout in ("sparse", "dense")}
    assert encode_tensor(weight, codebook=book).total_bytes == min(sizes.values())


def test_a_dense_unclustered_tensor_skips_the_index_and_keeps_every_bit() -> None:
    weight = np.random.default_rng(6).normal(size=(33, 7)).astype(np.float32)
    weight[0, :3] = [np.nan, np.inf, -np.inf]
    encoded = encode_tensor(weight, codebook=None)
    assert encoded.meta["layout"] == "dense" and "index" not in encoded.streams
    _assert_bit_exact(encoded, weight)


def test_negative_zero_comes_back_as_positive_zero() -> None:
    weight = np.array([-0.0, 1.0, 0.0, -0.0], dtype=np.float32)
    for layout in ("sparse", "dense"):
        encoded = encode_tensor(weight, codebook=None, layout=layout)
        decoded = decode_tensor(encoded.meta, encoded.streams)
        assert decoded.view(np.uint32).tolist() == [0, np.float32(1).view(np.uint32), 0, 0]


def test_weights_off_the_codebook_raise_config_error_with_count_and_fix() -> None:
    weight, book = _clustered((20, 30), sparsity=0.5, centroids=8, seed=7)
    weight[0, :2] = [0.123, 0.456]
    with pytest.raises(ConfigError, match=r"2 of \d+ non-zero weights .*cluster the tensor first"):
        encode_tensor(weight, codebook=book)


def test_bad_options_raise_config_error() -> None:
    weight = np.ones((2, 2), dtype=np.float32)
    with pytest.raises(ConfigError, match="float32"):
        encode_tensor(weight.astype(np.float64), codebook=None)
    with pytest.raises(ConfigError, match="index_bits"):
        encode_tensor(weight, codebook=None, index_bits=17)
    with pytest.raises(ConfigError, match="layout"):
        encode_tensor(weight, codebook=None, layout="csr")
    with pytest.raises(ConfigError, match="codebook"):
        encode_tensor(weight, codebook=np.zeros((2, 2)))


# --- properties --------------------------------------------------------------------------------------

@st.composite
def _tensors(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None]:
    seed = draw(st.integers(0, 2**32 - 1))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    rng = np.random.default_rng(seed)
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.9, 0.99, 1.0]))
    mask = rng.random(shape) >= sparsity
    if draw(st.booleans()):
        book = rng.normal(size=draw(st.integers(1, 300))).astype(np.float32)
        book[book == 0] = 1.0
        values = book[rng.integers(0, book.size, shape)]
    else:
        book, values = None, rng.normal(size=shape).astype(np.float32)
    return np.where(mask, values, np.float32(0)).astype(np.float32).reshape(shape), book


@settings(max_examples=200, deadline=None)
@given(tensor=_tensors(), index_bits=st.none() | st.integers(1, 16), coder=st.sampled_from(CODERS),
       layout=st.sampled_from(["auto", "sparse", "dense"]))
def test_random_sparse_tensors_round_trip_exactly(tensor: tuple[np.ndarray, np.ndarray | None],
                                                   index_bits: int | None, coder: str, layout: str) -> None:
    weight, book = tensor
    encoded = encode_tensor(weight, codebook=book, index_bits=index_bits, coder=coder, layout=layout)
    if index_bits is not None and encoded.meta["layout"] == "sparse":
        assert encoded.meta["index_bits"] == index_bits
    _assert_bit_exact(encoded, weight)


def _sample(seed: int, sparsity: float, centroids: int, coder: str, layout: str) -> EncodedTensor:
    weight, book = _clustered((30, 40), sparsity=sparsity, centroids=centroids, seed=seed)
    return encode_tensor(weight, codebook=book, coder=coder, layout=layout)


_ENCODED = [_sample(i, *case) for i, case in enumerate([
    (0.9, 16, "raw", "sparse"), (0.8, 32, "huffman", "sparse"), (0.9, 8, "ans", "sparse"),
    (0.7, 64, "zstd", "sparse"), (0.2, 4, "huffman", "dense"), (0.1, 4, "ans", "dense"),
    (0.5, 200, "zstd", "dense")])]
_UNCLUSTERED = np.random.default_rng(9).normal(size=(20, 5)).astype(np.float32)
_ENCODED.append(encode_tensor(_UNCLUSTERED * (np.arange(100).reshape(20, 5) % 3 == 0), codebook=None,
                              layout="sparse"))
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False),
                  st.text(max_size=5), st.lists(st.integers(-2, 300), max_size=4),
                  st.sampled_from(["raw", "huffman", "zstd", "ans", "sparse", "dense", "float32"]))


def _corrupt(data: st.DataObject, encoded: EncodedTensor) -> tuple[Any, dict[str, Any]]:
    meta: Any = json.loads(json.dumps(encoded.meta))
    streams: dict[str, Any] = dict(encoded.streams)
    action = data.draw(st.sampled_from(["truncate", "flip", "replace", "drop", "meta", "nested", "lengths"]))
    name = data.draw(st.sampled_from(sorted(streams)))
    stream = streams[name]
    if action == "truncate":
        streams[name] = stream[:data.draw(st.integers(0, max(0, len(stream) - 1)))]
    elif action == "flip" and stream:
        at, mask = data.draw(st.integers(0, len(stream) - 1)), data.draw(st.integers(1, 255))
        streams[name] = stream[:at] + bytes([stream[at] ^ mask]) + stream[at + 1:]
    elif action == "replace":
        streams[name] = data.draw(st.binary(max_size=64))
    elif action == "drop":
        del streams[name]
    elif action == "meta":
        key = data.draw(st.sampled_from(sorted(meta)))
        if data.draw(st.booleans()):
            del meta[key]
        else:
            meta[key] = data.draw(_JUNK)
    elif action == "nested":
        part = data.draw(st.sampled_from(["coders", "stream_bytes"]))
        meta[part][data.draw(st.sampled_from([*sorted(meta[part]), "index"]))] = data.draw(_JUNK)
    elif action == "lengths":  # a consistent lie: truncated stream and matching metadata
        streams[name] = stream[:len(stream) // 2]
        meta["stream_bytes"][name] = len(streams[name])
    return meta, streams


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(_ENCODED) - 1), data=st.data())
def test_corrupt_input_either_decodes_or_raises_artifact_error(which: int, data: st.DataObject) -> None:
    meta, streams = _corrupt(data, _ENCODED[which])
    try:
        decoded = decode_tensor(meta, streams)
    except ArtifactError:
        return
    assert isinstance(decoded, np.ndarray) and decoded.dtype == np.float32


def test_decode_rejects_garbage_containers() -> None:
    encoded = _ENCODED[0]
    for meta, streams in [(None, encoded.streams), ([], encoded.streams), (encoded.meta, None),
                          (encoded.meta, {}), ({**encoded.meta, "format": 2}, encoded.streams)]:
        with pytest.raises(ArtifactError):
            decode_tensor(meta, streams)
