"""A copy of a model kept for rollback, whose tensors wait in a temporary file, not in memory.

`apply_` must leave the model exactly as it was when a technique fails, and it reports what
changed by comparing the model before with after. A deep copy did both but doubled the memory a
technique needs: for a language model, more than its whole calibration. The snapshot keeps the
model's structure (modules, parametrizations, attributes) with each parameter and buffer replaced
by a meta tensor of the same shape, and writes the values to an anonymous temporary file (in
`TMPDIR`), read back one module at a time. Tensors it cannot write as plain bytes (quantized,
sparse, subclasses, views sharing storage with another tensor) stay in the copy, in memory.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from typing import IO, Any

import torch
from torch import nn

__all__ = ["ModelSnapshot"]


class ModelSnapshot:
    """`model` as it is now: `structure` (meta tensors), `materialize` one module of it, or
    `restore` the whole model. Close it (or use it as a context manager) to delete the file.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> with ModelSnapshot(model) as before:
        ...     _ = model[0].weight.data.zero_()
        ...     restored = before.restore()
        >>> bool(restored[0].weight.abs().sum() > 0), restored[0].weight.device.type
        (True, 'cpu')
    """

    def __init__(self, model: nn.Module) -> None:
        # id(meta twin) -> (the twin, its offset in the file, its device)
        self._places: dict[int, tuple[torch.Tensor, int, torch.device]] = {}
        spilled = _spillable_tensors(model)
        memo: dict[int, Any] = {}
        offset = 0
        try:
            self._file: IO[bytes] = tempfile.TemporaryFile(prefix="torchslim-snapshot-")  # noqa: SIM115 (close())
        except OSError as error:
            raise _no_room(spilled, error) from error
        try:
            for tensor in spilled:
                twin = _meta_twin(tensor)
                memo[id(tensor)] = twin
                self._places[id(twin)] = (twin, offset, tensor.device)
                offset += _write(self._file, tensor)
            self._file.flush()
            self.structure: nn.Module = copy.deepcopy(model, memo)
        except BaseException as error:
            self._file.close()
            if isinstance(error, OSError):  # a full temporary folder: say which, before any work
                raise _no_room(spilled, error) from error
            raise

    def __enter__(self) -> ModelSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def value(self, twin: torch.Tensor) -> torch.Tensor:
        """The value `twin` (a tensor of `structure`) stood for; tensors kept in memory as they are."""
        place = self._places.get(id(twin))
        if place is None:
            return twin
        _, offset, device = place
        tensor = torch.empty(twin.shape, dtype=twin.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self._file.seek(offset)
            read = self._file.readinto(memoryview(_bytes_of(tensor)))  # type: ignore[attr-defined]
            if read != nbytes:
                raise OSError(f"torchslim: the rollback snapshot's file is short ({read} of {nbytes} bytes)")
        tensor = tensor.to(device)
        if isinstance(twin, nn.Parameter):
            real = nn.Parameter(tensor, requires_grad=twin.requires_grad)
            real.__dict__.update(copy.deepcopy(twin.__dict__))
            return real
        return tensor

    def materialize(self, module: nn.Module) -> nn.Module:
        """A shallow copy of `module` (of `structure`) with its own parameters and buffers read back."""
        clone = type(module).__new__(type(module))  # not copy.copy: parametrized modules refuse it
        clone.__dict__.update(module.__dict__)
        clone._parameters = {k: None if v is None else self.value(v)  # type: ignore[misc]
                             for k, v in module._parameters.items()}
        clone._buffers = {k: None if v is None else self.value(v) for k, v in module._buffers.items()}
        return clone

    def restore(self) -> nn.Module:
        """A new model equal to the one the snapshot was taken of (tensors, structure, attributes)."""
        memo = {key: self.value(twin) for key, (twin, _, _) in self._places.items()}
        return copy.deepcopy(self.structure, memo)


def _no_room(spilled: list[torch.Tensor], error: OSError) -> OSError:
    size = sum(t.numel() * t.element_size() for t in spilled) / 2**20
    return OSError(f"torchslim: could not write the model's rollback copy ({size:,.1f} MB) to "
                   f"{tempfile.gettempdir()}: {error}. Set TMPDIR to a folder with room for it")


def _state_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """Every parameter and buffer of every module, tied ones once."""
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                found.setdefault(id(tensor), tensor)
    return found


def _spillable_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The state tensors written to the file: plain dense tensors owning their whole storage
    alone, so that reading them back separately keeps every aliasing the model had."""
    stored = [t for t in _state_tensors(model).values()
              if t.layout == torch.strided and not t.is_quantized and t.device.type != "meta"]
    owners = Counter(_storage_of(t) for t in stored)
    return [t for t in stored if type(t) in (torch.Tensor, nn.Parameter) and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size() and owners[_storage_of(t)] == 1]


def _storage_of(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _meta_twin(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s shape, dtype and kind (parameter or not) on the meta device."""
    twin = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
        twin.__dict__.update(copy.deepcopy(tensor.__dict__))
    return twin


def _bytes_of(tensor: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor, as a numpy view (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _write(file: IO[bytes], tensor: torch.Tensor) -> int:
    """Append `tensor`'s bytes to `file`; returns how many."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    if data.numel():
        file.write(memoryview(_bytes_of(data)))
    return data.numel() * data.element_size()
