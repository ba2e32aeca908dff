"""What `artifact.load` checks before it allocates or trusts anything a file declares.

A `.slim` file is untrusted input: its SHA-256 only detects accidents, since anyone can
recompute it. So the loader works in two passes. First it rebuilds the architecture on the
`meta` device (shapes without memory), replays the recorded edits there, and compares every
tensor the file *declares* (name, shape, dtype; encoded tensors by their metadata, before a
byte is decoded) with what that architecture holds, within an element budget tied to the
file's size. Only a file that fits is then built for real and decoded, and its float tensors
must be free of NaN.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ArtifactError

__all__ = ["CODED_DTYPES", "Declared", "as_dtype", "check_finite", "check_fits", "declared_raw",
           "element_budget", "float_codes_of_older_files", "meta_copy", "meta_skeleton"]

MIN_ELEMENTS, ELEMENTS_PER_BYTE = 1 << 24, 1024
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}

# Tensors the encoder entropy-codes (with 2+ dimensions): float weights and the integer codes of
# quantized layers (decoded as float32, then checked and cast back).
CODED_DTYPES = {"float32": torch.float32, "int8": torch.int8, "uint8": torch.uint8}


@dataclass(frozen=True)
class Declared:
    """A tensor as a file declares it: enough to compare with the architecture, no data."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def element_budget(file_bytes: int) -> int:
    """How many tensor elements a file of `file_bytes` may make `load` allocate.

    Why: entropy coding lets a tiny stream stand for a large tensor, so the declared shapes
    alone do not bound memory. ~1,000 elements a byte is 10x beyond the sparsest real file.
    """
    return max(MIN_ELEMENTS, ELEMENTS_PER_BYTE * file_bytes)


def declared_raw(entry: Any, name: str, path: Path) -> Declared:
    """The declaration of a raw (not entropy-coded) tensor of an encoded file's layout."""
    shape, dtype = entry.get("shape"), _DTYPES.get(str(entry.get("dtype")))
    if (dtype is None or not isinstance(shape, list) or len(shape) > 32
            or any(type(d) is not int or d < 0 for d in shape)):
        raise ArtifactError(f"{path}: tensor {name!r} declares dtype {entry.get('dtype')!r} and "
                            f"shape {shape!r}; the file is corrupt")
    return Declared(tuple(shape), dtype)


def meta_skeleton(build: Callable[[], nn.Module], replay: Callable[[nn.Module], Any],
                  path: Path) -> nn.Module:
    """The architecture (`build()`, then `replay` of the edits) on the meta device: shapes only.

    Raises:
        ArtifactError: building or replaying fails (a forged spec or edit).
    """
    try:
        with torch.device("meta"):
            skeleton = build()
            replay(skeleton)
    except ArtifactError:
        raise
    except Exception as exc:  # a forged spec or edit may upset any layer's constructor
        raise ArtifactError(f"{path}: the recorded architecture cannot be rebuilt "
                            f"({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt") from None
    return skeleton


def meta_copy(model: nn.Module) -> nn.Module:
    """A shapes-only copy of a user's module, on which edits can be replayed harmlessly."""
    return copy.deepcopy(model).to("meta")


def check_fits(expected: dict[str, torch.Tensor], declared: dict[str, Declared], path: Path,
               architecture: str) -> None:
    """Every tensor the architecture holds is declared with its shape and dtype, nothing else,
    within the element budget of the file.

    Raises:
        ArtifactError: listing the missing, unexpected and mismatched tensors.
    """
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    wrong = sorted(name for name in set(expected) & set(declared)
                   if tuple(expected[name].shape) != declared[name].shape)
    dtypes = sorted(name for name in set(expected) & set(declared)
                    if name not in wrong and expected[name].dtype != declared[name].dtype)
    if missing or unexpected or wrong or dtypes:
        details = "; ".join(part for part in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {[(n, declared[n].shape, tuple(expected[n].shape)) for n in wrong[:5]]}"
            if wrong else "",
            f"dtype mismatch {[(n, str(declared[n].dtype), str(expected[n].dtype)) for n in dtypes[:5]]}"
            if dtypes else "") if part)
        raise ArtifactError(f"{path} does not fit the {architecture} architecture: {details}")
    total = sum(math.prod(t.shape) for t in expected.values())
    budget = element_budget(path.stat().st_size)
    if total > budget:
        raise ArtifactError(f"{path} describes {total:,} tensor elements, more than a file of "
                            f"{path.stat().st_size:,} bytes can hold ({budget:,}); it is forged or corrupt")


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """No float tensor holds NaN (a diverged or forged model would only fail much later).

    Raises:
        ArtifactError: naming the tensors with NaN.
    """
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and bool(t.isnan().any()))
    if bad:
        raise ArtifactError(f"{path}: tensors {bad[:5]} hold NaN; the model diverged before it was "
                            "saved or the file was altered; re-create it")


def as_dtype(values: torch.Tensor, dtype: torch.dtype, path: Path, name: str) -> torch.Tensor:
    """Decoded float `values` as `dtype`: integer codes must be whole numbers in its range.

    Raises:
        ArtifactError: a value that the integer type cannot hold (a forged or corrupt file).
    """
    if dtype == values.dtype:
        return values
    info = torch.iinfo(dtype)
    if values.numel() and (bool((values != values.round()).any()) or float(values.min()) < info.min
                           or float(values.max()) > info.max):
        raise ArtifactError(f"{path}: tensor {name!r} is declared {str(dtype).removeprefix('torch.')} "
                            "but holds values that type cannot; the file is corrupt")
    return values.to(dtype)


def float_codes_of_older_files(expected: dict[str, torch.Tensor], declared: dict[str, Declared]
                               ) -> dict[str, torch.dtype]:
    """Integer code tensors that a file from an older torchslim stores as float32 (weight-only
    layers held their codes as floats before they were stored as integers): declared here as
    the architecture's integer type, to be converted with `as_dtype` once decoded.

    Returns: {name: integer dtype}.
    """
    older = {name: expected[name].dtype for name, entry in declared.items()
             if name in expected and entry.dtype == torch.float32
             and expected[name].dtype in (torch.int8, torch.uint8)
             and entry.shape == tuple(expected[name].shape)}
    for name, dtype in older.items():
        declared[name] = Declared(declared[name].shape, dtype)
    return older
