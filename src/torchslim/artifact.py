"""Save and load models as `.slim` artifacts: safetensors + a JSON spec, no pickle on load.

An artifact records which registered architecture to rebuild (the record a model registry
attached to it; see `register_architectures`: the zoo registers itself, storage imports no
model), or for any other module its class path as information only, the structural
edits made to it (factorized or decomposed layers, as JSON; see `torchslim.structure`) and every
tensor of its state_dict; `load` rebuilds the architecture, replays the edits and fills it in,
so loading a file from anywhere never runs code from that file.

Version 2 holds an int8 model converted for onnxruntime: the ONNX program's bytes as one uint8
tensor, with the quantization report and the counts of the float model in the JSON spec; it
loads as an `OrtModule`. ONNX protobufs are parsed, never executed as code.

Version 0 stores every tensor dense. Version 1 (`save(..., encode=Encoding())`) is the Deep
Compression file: each weight matrix/kernel is stored as its sparse index plus codebook indices
(or raw values), entropy coded by `torchslim.encoding`, in one byte payload whose layout the
JSON spec describes; other tensors (biases, norms) are stored raw. Both load bit-exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

import torchslim
from torchslim import __version__
from torchslim.artifact_checks import (
    CODED_DTYPES,
    Declared,
    as_dtype,
    check_finite,
    check_fits,
    declared_raw,
    float_codes_of_older_files,
    meta_copy,
    meta_skeleton,
)
from torchslim.encoding import EncodedTensor, decode_tensor, encode_tensor
from torchslim.encoding.meta import TensorMeta
from torchslim.errors import ArtifactError, ConfigError
from torchslim.progress import ProgressLines
from torchslim.safefile import decompress_bounded, parse_document, read_checked, write_checked
from torchslim.signature import (
    SIGNATURE_ATTRIBUTE,
    record_signature_,
    signature_from_dict,
    signature_of,
)
from torchslim.structure import edits_of, replay_edits_

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "SPEC_ATTRIBUTE", "Architectures", "Encoding", "load",
           "read_metadata", "register_architectures", "save", "source_class"]

SPEC_ATTRIBUTE = "torchslim_spec"  # a registry's record of how it built a model (has `to_dict()`)


@dataclass(frozen=True)
class Architectures:
    """A source of architectures that files can name (under `key`) and `load` can rebuild.

    `describe(model)` is the record to write for a model of this source (None: not one of
    its models); `parse(record)` validates a record read from a file into a spec (types and
    bounds only); `resolve(spec)` returns a function building that architecture, or raises
    `ConfigError` for one it does not know. The model zoo (`model`) and Hugging Face
    (`hf`, rebuilt from the recorded config) register themselves; storage imports neither.
    """

    key: str
    describe: Callable[[nn.Module], dict[str, Any] | None]
    parse: Callable[[Any], Any]
    resolve: Callable[[Any], Callable[[], nn.Module]]


_ARCHITECTURES: dict[str, Architectures] = {}


def register_architectures(architectures: Architectures) -> None:
    """Let files name (and `load` rebuild) the models of a source; the last one for a key wins."""
    _ARCHITECTURES[architectures.key] = architectures


def _architectures() -> dict[str, Architectures]:
    """Every registered source of architectures (the public modules register theirs as they load)."""
    torchslim.load_public_surface()
    return _ARCHITECTURES


ARTIFACT_FORMAT = "torchslim.artifact"
ARTIFACT_VERSION = 0  # dense tensors
ENCODED_VERSION = 1  # Deep Compression payload
PROGRAM_VERSION = 2  # an ONNX program run by onnxruntime (int8 models)
READABLE_VERSIONS = (ARTIFACT_VERSION, ENCODED_VERSION, PROGRAM_VERSION)
PAYLOAD = "payload"
PROGRAM = "onnx"
SOURCE_CLASS_ATTRIBUTE = "torchslim_source_class"  # kept through int8 conversion and reloads
LAYOUT_LIMIT = 1 << 26  # bytes of the JSON tensor layout (~200 bytes a tensor)
# An int8 program compresses ~1.3x (sparse ones more); a file may not claim more than this.
PROGRAM_LIMIT = 1 << 31  # protobuf's own 2 GiB ceiling
PROGRAM_EXPANSION = 64


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """How `save` codes weight tensors: the entropy coder and the sparse-index width.

    Attributes:
        coder: raw | huffman | zstd | ans | auto (smallest per stream).
        index_bits: gap width of the sparse index (None: the best per tensor).
        max_codebook: tensors with at most this many distinct non-zeros are stored as a codebook
            plus indices; others store their non-zeros as float32.
    """

    coder: str = "auto"
    index_bits: int | None = None
    max_codebook: int = 256


def _codebook(weight: np.ndarray, limit: int) -> np.ndarray | None:
    values = np.unique(weight[weight != 0])
    return values if 0 < values.size <= limit else None


PROGRESS_ELEMENTS = 20_000_000  # coded weights from which encoding reports per tensor


def _coded(tensor: torch.Tensor, encoding: Encoding) -> EncodedTensor | None:
    """`tensor` entropy-coded, or None for integer codes that take no fewer bytes coded than
    raw (8-bit codes spread over the whole range)."""
    array = tensor.numpy().astype(np.float32, copy=False)  # integer codes: exact in float32
    encoded = encode_tensor(array, codebook=_codebook(array, encoding.max_codebook),
                            index_bits=encoding.index_bits, coder=encoding.coder)
    if tensor.dtype != torch.float32 and encoded.total_bytes >= tensor.numel() * tensor.element_size():
        return None
    return encoded


def _encode_state(state: dict[str, torch.Tensor], encoding: Encoding
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """All tensors into one uint8 payload (1-D) and a JSON layout of it."""
    chunks: list[bytes] = []
    layout: dict[str, Any] = {}
    offset = 0
    coded = {name for name, t in state.items()  # entropy-coded: float weights and integer codes
             if t.dtype in CODED_DTYPES.values() and t.dim() >= 2}
    # a language model's tensors take minutes to code (every coder is tried): say how far it is
    progress = ProgressLines("encode tensor", len(coded),
                             enabled=sum(state[n].numel() for n in coded) >= PROGRESS_ELEMENTS)
    finished = 0
    for name in sorted(state):  # byte-identical files whatever the module order
        tensor = state[name].detach().cpu().contiguous()
        encoded = _coded(tensor, encoding) if name in coded else None
        if name in coded:
            finished += 1
            progress.update(finished, name)
        if encoded is not None:
            spans = {}
            for stream, data in encoded.streams.items():
                spans[stream] = [offset, len(data)]
                chunks.append(data)
                offset += len(data)
            layout[name] = {"meta": encoded.meta, "streams": spans}
            if tensor.dtype != torch.float32:
                layout[name]["dtype"] = str(tensor.dtype).removeprefix("torch.")
        else:
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            layout[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": list(tensor.shape), "span": [offset, len(data)]}
            chunks.append(data)
            offset += len(data)
    # The layout (per-tensor codec metadata) is zstd-compressed JSON at the end of the payload:
    # as plain header JSON it would cost ~10% of a LeNet-sized compressed file.
    packed = zstandard.ZstdCompressor(level=19).compress(
        json.dumps(layout, sort_keys=True, separators=(",", ":")).encode())
    chunks.append(packed)
    payload = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()
    return payload, {"layout_span": [offset, len(packed)]}


def _check_span(span: Any, size: int, path: Path, name: str) -> int:
    """The length of a valid [offset, length] span of a `size`-byte payload."""
    if (not isinstance(span, list) or len(span) != 2 or not all(type(v) is int for v in span)
            or span[0] < 0 or span[1] < 0 or span[0] + span[1] > size):
        raise ArtifactError(f"{path}: tensor {name!r} points outside the payload ({str(span)[:60]}); "
                            "the file is corrupt")
    return int(span[1])


def _slice(payload: bytes, span: Any, path: Path, name: str) -> bytes:
    _check_span(span, len(payload), path, name)
    return payload[span[0]:span[0] + span[1]]


def _read_layout(data: bytes, spans: Any, path: Path) -> Any:
    packed = _slice(data, spans.get("layout_span") if isinstance(spans, dict) else None, path,
                    "(layout)")
    text = decompress_bounded(packed, LAYOUT_LIMIT, what=f"{path}: the tensor layout")
    return parse_document(text, what=f"{path}: the tensor layout")


def _declare_layout(layout: Any, path: Path, size: int) -> dict[str, Declared]:
    """What each tensor of an encoded file's layout declares (validated metadata and spans of a
    `size`-byte payload, nothing decoded)."""
    if not layout:
        raise ArtifactError(f"{path}: the tensor layout is empty; the file is corrupt")
    declared: dict[str, Declared] = {}
    for name, entry in layout.items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: entry of tensor {name!r} is malformed; the file is corrupt")
        if "meta" in entry:
            streams = entry.get("streams")
            if not isinstance(streams, dict):
                raise ArtifactError(f"{path}: tensor {name!r} has no stream table; the file is corrupt")
            try:
                meta = TensorMeta.from_dict(entry["meta"])
            except ArtifactError as exc:
                raise ArtifactError(f"{path}: tensor {name!r}: {exc}") from None
            if set(streams) != set(meta.streams):
                raise ArtifactError(f"{path}: tensor {name!r} has streams {sorted(streams)[:8]}, "
                                    f"its metadata needs {list(meta.streams)}; the file is corrupt")
            for span in streams.values():
                _check_span(span, size, path, name)
            dtype = CODED_DTYPES.get(str(entry.get("dtype", "float32")))  # any JSON value: str first
            if dtype is None:
                raise ArtifactError(f"{path}: tensor {name!r} declares coded dtype {entry.get('dtype')!r} "
                                    f"(valid: {sorted(CODED_DTYPES)}); the file is corrupt")
            declared[name] = Declared(meta.shape, dtype)
        else:
            _check_span(entry.get("span"), size, path, name)
            declared[name] = declared_raw(entry, name, path)
    return declared


def _decode_layout(data: bytes, layout: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Decode every tensor of a layout already checked against the architecture."""
    state: dict[str, torch.Tensor] = {}
    for name, entry in layout.items():
        if "meta" in entry:
            streams = {s: _slice(data, span, path, name) for s, span in entry["streams"].items()}
            values = torch.from_numpy(decode_tensor(entry["meta"], streams).copy())
            state[name] = as_dtype(values, CODED_DTYPES[str(entry.get("dtype", "float32"))], path, name)
            continue
        declared = declared_raw(entry, name, path)
        raw = bytearray(_slice(data, entry.get("span"), path, name))
        if len(raw) != math.prod(declared.shape) * declared.dtype.itemsize:
            raise ArtifactError(f"{path}: tensor {name!r} holds {len(raw)} bytes, not the "
                                f"{math.prod(declared.shape)} {declared.dtype} its shape needs; "
                                "the file is corrupt")
        tensor = torch.frombuffer(raw, dtype=declared.dtype) if raw else torch.empty(0, dtype=declared.dtype)
        state[name] = tensor.reshape(declared.shape).clone()
    return state


def save(model: nn.Module, path: str | Path, *, spec: Any = None,
         metadata: dict[str, Any] | None = None, encoding: Encoding | None = None,
         example_inputs: Any = None) -> Path:
    """Write any `model` to `path` atomically; returns the path.

    The file holds the state, the structural edits torchslim made (replayed by `load`), the
    input signature (from `example_inputs`, or recorded by `apply_`), and, for a model not built
    by `torchslim.models`, its class's import path as information only: `load` never imports it.

    Args:
        model: any module (a registered model is rebuilt by `load` on its own).
        path: destination file, conventionally `*.slim`.
        spec: the registered architecture to record (a `ModelSpec`); default: the one
            attached to the model.
        metadata: JSON-able facts to keep with the weights (training config, metrics, ...).
        encoding: write the compressed (version 1) file with these options; default: dense.
        example_inputs: a batch the model takes, to record its input signature.

    Example:
        >>> import tempfile, torchslim.models as models
        >>> model = models.create_model("lenet300", pretrained=False)
        >>> path = save(model, tempfile.mkdtemp() + "/model.slim")
        >>> reloaded = load(path)
        >>> x = torch.randn(2, 1, 28, 28)
        >>> bool(torch.equal(model(x), reloaded(x)))
        True
    """
    spec = spec or getattr(model, SPEC_ATTRIBUTE, None)
    if example_inputs is not None:
        record_signature_(model, example_inputs)
    program = getattr(model, "program", None)
    if isinstance(program, bytes):
        return _save_program(model, program, Path(path), spec, metadata, encoding)
    document: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION if encoding is None else ENCODED_VERSION,
        "torchslim_version": __version__,
        "torch_version": torch.__version__,
        "metadata": metadata or {},
        **_identity(model, spec),
    }
    edits = edits_of(model)
    if edits:  # layers changed in shape (factorized, decomposed): replayed by `load`
        document["edits"] = edits
    tensors = computed_state(model)
    for name in tied_names(model):  # stored once, under the first name
        tensors.pop(name, None)
    if encoding is not None:
        payload, document["payload"] = _encode_state(tensors, encoding)
        tensors = {PAYLOAD: payload}
    write_checked(Path(path), tensors, document)
    return Path(path)


def tied_names(model: nn.Module) -> dict[str, str]:
    """{name: the first name of the same tensor} for the tensors a model shares between modules
    (an embedding tied to the `lm_head`): the file stores each once, and `load` puts it back
    under every name (the architecture ties them again when it is built)."""
    first: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def computed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every parametrized tensor (a pruning mask, a weight-sharing codebook)
    stored as the value the model computes with, under its plain name: the file describes the
    model's weights, and `load` rebuilds the architecture without the parametrizations (as
    `finalize_` would leave it)."""
    from torch.nn.utils import parametrize

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{name}." if name else ""
        for tensor_name in list(getattr(module, "parametrizations", {})):
            inner = f"{prefix}parametrizations.{tensor_name}."
            for key in [k for k in state if k.startswith(inner)]:
                del state[key]
            state[f"{prefix}{tensor_name}"] = getattr(module, tensor_name).detach()
    return state


PROGRAM_ZSTD_LEVEL = 9  # 1.3x on an int8 MiniLM in about a second; level 19 takes minutes


def _identity(model: nn.Module, spec: Any) -> dict[str, Any]:
    """What the file says about where the model comes from: the registered spec (rebuilt by
    `load`) or, for any other module, its class's import path (shown, never imported); and
    its input signature when known."""
    records = {"model": spec.to_dict()} if hasattr(spec, "to_dict") else {
        key: record for key, source in _architectures().items()
        if (record := source.describe(model)) is not None}
    found: dict[str, Any] = dict(list(records.items())[:1]) or {
        "module": {"class": getattr(model, SOURCE_CLASS_ATTRIBUTE, None)
                   or f"{type(model).__module__}.{type(model).__qualname__}"}}
    signature = signature_of(model)
    if signature is not None:
        found["inputs"] = signature
    return found


def _save_program(model: nn.Module, program: bytes, path: Path, spec: Any,
                  metadata: dict[str, Any] | None, encoding: Encoding | None) -> Path:
    coding = "raw"
    if encoding is not None and encoding.coder != "raw":  # int8 weights still carry ~1.3x of entropy
        program, coding = zstandard.ZstdCompressor(level=PROGRAM_ZSTD_LEVEL).compress(program), "zstd"
    document = {
        "format": ARTIFACT_FORMAT, "version": PROGRAM_VERSION, **_identity(model, spec),
        "torchslim_version": __version__, "torch_version": torch.__version__,
        "metadata": metadata or {},
        "runtime": {"backend": "onnxruntime", "weight_count": getattr(model, "weight_count", 0),
                    "flops_per_sample": getattr(model, "flops_per_sample", 0),
                    "report": getattr(model, "report", {}), "program_coding": coding,
                    **({"input_keys": model.input_keys} if getattr(model, "input_keys", None) else {})},
    }
    tensor = torch.frombuffer(bytearray(program), dtype=torch.uint8).clone()
    write_checked(path, {PROGRAM: tensor}, document)
    return path


def _program_bytes(path: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> bytes:
    """The ONNX program of a version-2 file, decompressed within bounds and checked safe."""
    from torchslim.runtime import check_program

    runtime = document.get("runtime")
    if set(tensors) != {PROGRAM} or not isinstance(runtime, dict):
        raise ArtifactError(f"{path} is an int8 program artifact without its program; it is corrupt")
    program = tensors[PROGRAM].numpy().tobytes()
    coding = runtime.get("program_coding", "raw")
    if coding not in ("raw", "zstd"):
        raise ArtifactError(f"{path}: unknown program coding {coding!r}; upgrade torchslim")
    if coding == "zstd":
        limit = min(PROGRAM_LIMIT, PROGRAM_EXPANSION * len(program) + (1 << 26))
        program = decompress_bounded(program, limit, what=f"{path}: the int8 program")
    check_program(program)  # no external data, known operators, our signature: before onnxruntime
    return program


def _input_keys(value: Any) -> list[str] | None:
    """The keyword inputs a program packs (see `PackedInputs`): a short list of names, or None."""
    if value is None:
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= 16
            or not all(isinstance(k, str) and k.isidentifier() and len(k) <= 64 for k in value)):
        raise ConfigError(f"input_keys must be 1 to 16 names, got {str(value)[:80]}")
    return list(value)


def _load_program(path: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> nn.Module:
    from torchslim.runtime.onnx_program import OrtModule

    program = _program_bytes(path, tensors, document)
    runtime = document["runtime"]
    try:
        model = OrtModule(program,
                          weight_count=int(runtime.get("weight_count", 0)),
                          flops=int(runtime.get("flops_per_sample", 0)),
                          input_keys=_input_keys(runtime.get("input_keys")))
        report = runtime.get("report") or {}
        model.report = dict(report) if isinstance(report, dict) else {}
        if "model" in document:
            setattr(model, SPEC_ATTRIBUTE, _architectures()["model"].parse(document["model"]))
        _restore_identity(model, document)
        model.session()  # parse now: a damaged program fails here, not on first use
    except (ConfigError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"{path}: the int8 program cannot be loaded ({exc})") from exc
    except Exception as exc:  # onnxruntime's own errors (invalid protobuf, ...)
        raise ArtifactError(f"{path}: onnxruntime rejects the program ({str(exc)[:200]}); the "
                            "file is corrupt or needs a newer onnxruntime") from exc
    return model.eval()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON document of an artifact (checksum verified); encoded files add "layout"."""
    path = Path(path)
    tensors, document = _read(path)
    if document["version"] == ENCODED_VERSION:
        document["layout"] = _read_layout(tensors[PAYLOAD].numpy().tobytes(), document.get("payload"), path)
    return document


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's raw tensors and its document, format and version checked (nothing decoded)."""
    tensors, document = read_checked(path)
    if document.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is a torchslim file but not a model artifact "
                            f"(format {str(document.get('format'))[:80]!r}); pass a .slim model file")
    version = document.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has artifact version {str(version)[:40]}; this "
                            f"torchslim ({__version__}) reads versions {list(READABLE_VERSIONS)}: "
                            "upgrade torchslim or re-save the model")
    if version == ENCODED_VERSION and set(tensors) != {PAYLOAD}:
        raise ArtifactError(f"{path} is an encoded artifact without its payload; it is corrupt")
    return tensors, document


def _declarations(path: Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]
                  ) -> tuple[dict[str, Declared], dict[str, Any] | None]:
    """Every tensor the file declares, and (encoded files) the layout to decode them from."""
    if document["version"] == ARTIFACT_VERSION:
        return {n: Declared(tuple(t.shape), t.dtype) for n, t in tensors.items()}, None
    data = tensors[PAYLOAD].numpy().tobytes()
    layout = _read_layout(data, document.get("payload"), path)
    return _declare_layout(layout, path, len(data)), layout


def _restore_identity(model: nn.Module, document: dict[str, Any]) -> None:
    """Put the recorded input signature and source class back on a loaded model."""
    if "inputs" in document:
        setattr(model, SIGNATURE_ATTRIBUTE, signature_from_dict(document["inputs"]))
    source = document.get("module")
    if isinstance(source, dict) and isinstance(source.get("class"), str):
        setattr(model, SOURCE_CLASS_ATTRIBUTE, source["class"][:300])


def source_class(document: dict[str, Any]) -> str | None:
    """The import path of the class a non-registered model was saved from (information only)."""
    source = document.get("module")
    return str(source.get("class"))[:300] if isinstance(source, dict) else None


def _builder(path: Path, document: dict[str, Any], model: nn.Module | None) -> Any:
    """A function building the recorded architecture (or copying the given `model`)."""
    if model is not None:
        return lambda: meta_copy(model)
    keys = [key for key in _architectures() if key in document]
    if not keys:
        raise ArtifactError(f"{path} holds a {source_class(document) or 'model'} that is not a "
                            "torchslim reference model; loading never imports code, so build it "
                            "yourself and pass it: load(PATH, model=YourClass(...)) (on the command "
                            "line: --model FILE.py:FUNCTION)")
    try:
        source = _architectures()[keys[0]]
        return source.resolve(source.parse(document[keys[0]]))
    except ConfigError as exc:
        raise ArtifactError(f"{path} names an architecture this torchslim cannot build "
                            f"({exc}); pass model= with the architecture") from None


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at `path`, in eval mode.

    Safe for any bytes: nothing in the file is executed or imported, no file besides it is
    read, and nothing it declares is allocated before it is checked against the architecture
    (see `torchslim.artifact_checks`); whatever is wrong ends in an `ArtifactError`.

    Args:
        path: a file written by `save`.
        model: an already built module to fill instead of rebuilding from the recorded spec
            (for architectures that are not registered), as it was before compression: the
            recorded structural edits are replayed on it.

    Raises:
        ArtifactError: the file is missing, truncated, altered, forged, of another version, or
            its tensors do not fit the architecture.
    """
    path = Path(path)
    tensors, document = _read(path)
    if document["version"] == PROGRAM_VERSION:
        return _load_program(path, tensors, document)
    declared, layout = _declarations(path, tensors, document)
    build = _builder(path, document, model)
    edits = document.get("edits", [])
    skeleton = meta_skeleton(build, lambda m: replay_edits_(m, edits, source=str(path)), path)
    # (a given model's ties are read from it: its meta copy has them undone)
    ties = {**(tied_names(model) if model is not None else {}), **tied_names(skeleton)}
    tied = {name: first for name, first in ties.items() if name not in declared}
    expected = {name: t for name, t in skeleton.state_dict().items() if name not in tied}
    older = float_codes_of_older_files(expected, declared)
    check_fits(expected, declared, path, type(skeleton).__name__)
    if model is None:
        model = build()
    replay_edits_(model, edits, source=str(path))
    if layout is not None:
        tensors = _decode_layout(tensors[PAYLOAD].numpy().tobytes(), layout, path)
    check_finite(tensors, path)
    tensors.update({name: as_dtype(tensors[name], dtype, path, name) for name, dtype in older.items()})
    tensors.update({name: tensors[first] for name, first in tied.items()})
    model.load_state_dict(tensors)
    _restore_identity(model, document)
    return model.eval()
