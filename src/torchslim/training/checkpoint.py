"""Training checkpoints: everything needed to continue a run exactly, stored without pickle."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchslim.safefile import flatten_state, read_checked, unflatten_state, write_checked

__all__ = ["capture_rng", "read_checkpoint", "restore_rng", "write_checkpoint"]

CHECKPOINT_FORMAT = "torchslim.checkpoint"


def capture_rng() -> dict[str, Any]:
    """The state of every random generator training draws from."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a nested training state atomically (tensors in safetensors, the rest in JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    write_checked(path, tensors, {"format": CHECKPOINT_FORMAT, "state": skeleton})


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `write_checkpoint` (checksum verified)."""
    tensors, document = read_checked(path)
    if document.get("format") != CHECKPOINT_FORMAT:
        from torchslim.errors import ArtifactError

        raise ArtifactError(f"{path} is not a training checkpoint (format "
                            f"{document.get('format')!r})")
    state: dict[str, Any] = unflatten_state(document["state"], tensors)
    return state
