"""Save and load models as `.slim` artifacts: safetensors + a JSON spec, no pickle on load.

An artifact records which registered architecture to rebuild (`ModelSpec`) and every tensor of
its state_dict; `load` rebuilds the architecture and fills it in, so loading a file from
anywhere never runs code from that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim import __version__
from torchslim.errors import ArtifactError, ConfigError
from torchslim.models import ModelSpec, build_model, spec_of
from torchslim.safefile import read_checked, write_checked

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "load", "read_metadata", "save"]

ARTIFACT_FORMAT = "torchslim.artifact"
ARTIFACT_VERSION = 0


def save(model: nn.Module, path: str | Path, *, spec: ModelSpec | None = None,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` to `path` atomically; returns the path.

    Args:
        model: a model built by `torchslim.models.create_model` (or pass `spec`).
        path: destination file, conventionally `*.slim`.
        spec: the architecture to record; default: the one attached to the model.
        metadata: JSON-able facts to keep with the weights (training config, metrics, ...).

    Example:
        >>> import tempfile, torchslim.models as models
        >>> model = models.create_model("lenet300", pretrained=False)
        >>> path = save(model, tempfile.mkdtemp() + "/model.slim")
        >>> reloaded = load(path)
        >>> x = torch.randn(2, 1, 28, 28)
        >>> bool(torch.equal(model(x), reloaded(x)))
        True
    """
    spec = spec or spec_of(model)
    document = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "model": spec.to_dict(),
        "torchslim_version": __version__,
        "torch_version": torch.__version__,
        "metadata": metadata or {},
    }
    write_checked(Path(path), dict(model.state_dict()), document)
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON document of an artifact (after its checksum is verified)."""
    _, document = _read(Path(path))
    return document


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, document = read_checked(path)
    if document.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is a torchslim file but not a model artifact "
                            f"(format {document.get('format')!r}); pass a .slim model file")
    if document.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path} has artifact version {document.get('version')!r}; this "
                            f"torchslim ({__version__}) reads version {ARTIFACT_VERSION}: upgrade "
                            "torchslim or re-save the model")
    return tensors, document


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at `path`, in eval mode.

    Args:
        path: a file written by `save`.
        model: an already built module to fill instead of rebuilding from the recorded spec
            (for architectures that are not registered).

    Raises:
        ArtifactError: the file is missing, truncated, altered, of another version, or its
            tensors do not fit the architecture.
    """
    path = Path(path)
    tensors, document = _read(path)
    if model is None:
        try:
            model = build_model(ModelSpec.from_dict(document["model"]))
        except (ConfigError, KeyError) as exc:
            raise ArtifactError(f"{path} names an architecture this torchslim cannot build "
                                f"({exc}); pass model= with the architecture") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(name for name in set(expected) & set(tensors)
                   if expected[name].shape != tensors[name].shape)
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {[(n, tuple(tensors[n].shape), tuple(expected[n].shape)) for n in wrong[:5]]}"
            if wrong else "") if part)
        raise ArtifactError(f"{path} does not fit the {type(model).__name__} architecture: "
                            f"{details}")
    model.load_state_dict(tensors)
    return model.eval()
