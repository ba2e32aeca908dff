"""Pickle-free, checksummed, atomically written files: safetensors + a JSON document.

Both model artifacts and training checkpoints are one safetensors file whose header metadata
holds a JSON document and a SHA-256 over that document and every tensor (name, dtype, shape,
bytes). Loading never unpickles anything, and any truncation or altered byte is an
`ArtifactError` that says what is wrong instead of a crash deep inside a reader.

Nested Python state (optimizer and scheduler `state_dict`s, RNG states) goes through
`flatten_state`/`unflatten_state`: tensors move to the tensor table, the rest becomes JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from torchslim.errors import ArtifactError

__all__ = ["MAX_JSON_DEPTH", "TMP_SUFFIX", "decompress_bounded", "flatten_state", "parse_document",
           "read_checked", "remove_leftovers", "unflatten_state", "write_atomic", "write_checked"]

_DOC_KEY = "torchslim"
_SUM_KEY = "sha256"
TMP_SUFFIX = ".tmp"
MAX_JSON_DEPTH = 64  # our documents nest ~8 deep; deeper is forged (and would exhaust the stack)


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Move every tensor of a nested structure into `tensors`; return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten_state(v, tensors, f"{prefix}.{k}")
                                 for k, v in obj.items()}}
        return {"__pairs__": [[flatten_state(k, tensors, f"{prefix}.k{i}"),
                               flatten_state(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} without pickle; "
                    "convert it to tensors, numbers, strings, lists or dicts")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__pairs__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                    for k, v in obj["__pairs__"]}
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"].items()}
    return obj


def _checksum(document: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(document.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        # mkstemp makes 0600 files, and writers may re-create the file: set the usual
        # permissions (0666 less the umask) on what was written, before it takes the name.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files `write_atomic` leaves when a process is killed mid-write.

    Only names of its own pattern (`.NAME.XXXX.tmp`) are touched, anywhere under `folder`.
    Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(f".*{TMP_SUFFIX}")):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def decompress_bounded(data: bytes, limit: int, *, what: str) -> bytes:
    """zstd-decompress `data`, refusing output beyond `limit` bytes before allocating it.

    Why: `ZstdDecompressor.decompress(max_output_size=...)` trusts a frame that declares its
    content size, so a 131 KB forged frame can demand gigabytes. Streaming in bounded reads
    never holds more than `limit` + one chunk.

    Raises:
        ArtifactError: the data is not zstd, is corrupt, or would exceed `limit`.
    """
    import io

    import zstandard

    chunks: list[bytes] = []
    total = 0
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(
            io.BytesIO(data), read_across_frames=True)
        with reader:
            while chunk := reader.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise ArtifactError(f"{what} decompresses to more than {limit:,} bytes, beyond "
                                        "what this file can hold; the file is forged or corrupt")
                chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"{what} does not decompress ({exc}); the file is corrupt") from exc
    return b"".join(chunks)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_document(text: str | bytes, *, what: str) -> dict[str, Any]:
    """Parse untrusted JSON that must be an object, of bounded nesting.

    Raises:
        ArtifactError: malformed JSON, not an object, or nested deeper than `MAX_JSON_DEPTH`.
    """
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ArtifactError(f"{what} holds malformed JSON ({str(exc)[:120]}); the file is corrupt") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{what} holds a JSON {type(document).__name__} where an object is "
                            "expected; the file is corrupt or not a torchslim file")
    if _depth(document) > MAX_JSON_DEPTH:
        raise ArtifactError(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels; the file is "
                            "forged or corrupt")
    return document


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                       torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header of `tensors` stored in name order, byte-for-byte deterministic.

    Why our own framing: the library writes its `__metadata__` from a hash map, so the same
    tensors and document come out in a different byte order from run to run, and a resumed
    run could never reproduce an uninterrupted run's file exactly. The layout is the format's
    own: an 8-byte little-endian header length, the JSON header (padded with spaces to 8
    bytes), then the tensors' bytes back to back.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store {tensor.dtype} tensor {name!r}; convert it to one of "
                            f"{sorted(str(d) for d in _SAFETENSORS_DTYPES)}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_checked(path: Path | str, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
    """Write tensors + a JSON document + their checksum, atomically; the same inputs always
    give the same bytes."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    header = _safetensors_header(tensors, {_DOC_KEY: text, _SUM_KEY: _checksum(text, tensors)})

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(header)
            for name in sorted(tensors):
                if tensors[name].numel():
                    handle.write(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())

    write_atomic(Path(path), write)


def read_checked(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `write_checked`, verifying its checksum.

    Raises:
        ArtifactError: missing, truncated, altered, or not a torchslim file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist (or is not a file); check the path")
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable torchslim file: it is truncated, "
                            f"altered or of another format ({exc}); re-create it") from exc
    if not isinstance(metadata.get(_DOC_KEY), str) or not isinstance(metadata.get(_SUM_KEY), str):
        raise ArtifactError(f"{path} is a safetensors file but not a torchslim file (no "
                            "torchslim metadata); save it with torchslim.save")
    if _checksum(metadata[_DOC_KEY], tensors) != metadata[_SUM_KEY]:
        raise ArtifactError(f"{path} failed its checksum: its contents were altered or "
                            "damaged after it was written; re-create it")
    return tensors, parse_document(metadata[_DOC_KEY], what=str(path))
