"""One data contract for every technique that looks at data: `Calibration(data, transform=, num_samples=)`.

`data` is any iterable of batches, read lazily and only as far as needed (a DataLoader is never
turned into a list). A batch is understood as:

- a tensor: the model's input, no labels;
- a tuple/list `(inputs, labels, ...)`: a `(x, y)` pair as a `TensorDataset` DataLoader yields;
- a dict (Hugging Face style): the model's keyword inputs, labels under `labels`/`label`.

`transform(batch) -> inputs` (or `-> (inputs, labels)`) adapts anything else. Pruning criteria
read `pairs()` (inputs with labels), quantizers read `inputs()`; plain lists of tensors or of
`(x, y)` pairs, as torchslim took before, work unchanged.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.randn(10, 4), torch.zeros(10).long()), batch_size=4)
    >>> [tuple(x.shape) for x in Calibration(loader, num_samples=6).inputs()]
    [(4, 4), (2, 4)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F

from torchslim.errors import ConfigError

__all__ = ["Calibration", "as_calibration", "batch_size_of", "call_model", "correct_predictions",
           "first_samples", "logits_of", "move_inputs", "output_tensors", "split_batch", "take_inputs",
           "take_pairs", "token_cross_entropy"]

LABEL_KEYS = ("labels", "label")


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, dict) and inputs:
        return batch_size_of(next(iter(inputs.values())))
    if isinstance(inputs, tuple | list) and inputs:
        return batch_size_of(inputs[0])
    return 1


def first_samples(inputs: Any, count: int) -> Any:
    """The first `count` samples of a batch (tensor, tuple or dict of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:count]
    if isinstance(inputs, dict):
        return {k: first_samples(v, count) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(first_samples(v, count) for v in inputs)
    return inputs


def call_model(model: Any, inputs: Any) -> Any:
    """`model(inputs)`, or `model(**inputs)` for a dict of keyword inputs (Hugging Face style)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def call_uncached(model: Any, inputs: Any) -> Any:
    """`call_model`, telling a Hugging Face model (one whose config has `use_cache`) not to build
    a key-value cache: a calibration pass only reads activations, and a block or attention layer
    run again on inputs captured from it must not find the first run's keys in the cache (its
    attention would then read twice as many keys as there are tokens)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return call_model(model, inputs)
    if isinstance(inputs, dict):
        return model(**{**inputs, "use_cache": False})
    return model(input_ids=inputs, use_cache=False)


def logits_of(outputs: Any) -> torch.Tensor:
    """The scores a classification loss or accuracy reads from a model's outputs: the tensor
    itself, the first of a tuple/list, or `logits` (else the first value) of a dict-like output.

    Raises:
        ConfigError: nothing tensor-like to read (pass your own loss / metric).
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, tuple | list) and outputs:
        return logits_of(outputs[0])
    if hasattr(outputs, "keys") and hasattr(outputs, "__getitem__"):
        keys = list(outputs.keys())
        if "logits" in keys:
            return logits_of(outputs["logits"])
        if keys:
            return logits_of(outputs[keys[0]])
    raise ConfigError(f"cannot read scores from a model output of type {type(outputs).__name__}; "
                      "pass a loss (and metric) that reads it")


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in a model's outputs (a tensor, tuples, lists, dicts, a Hugging Face output),
    detached, as float, in order: what comparing two models' outputs reads."""
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().float()]
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in output_tensors(v)]
    if isinstance(outputs, tuple | list):
        return [t for v in outputs for t in output_tensors(v)]
    return []


def move_inputs(inputs: Any, device: Any) -> Any:
    """Inputs (tensor, tuple or dict of tensors) on `device`."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: move_inputs(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(move_inputs(v, device) for v in inputs)
    return inputs


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
                        ) -> torch.Tensor:
    """Cross-entropy of class scores (N, C) against labels (N,), or of a language model's
    (N, T, V) against (N, T) token labels, averaged per token (-100 labels are ignored)."""
    if logits.dim() > 2 and labels.dim() == logits.dim() - 1:
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Samples classified right (argmax of (N, C) scores); for a language model's (N, T, V)
    scores, each sample counts its fraction of tokens predicted right (-100 labels ignored)."""
    if logits.dim() > 2 and labels.dim() == logits.dim() - 1:
        kept = labels != -100
        hits = ((logits.argmax(dim=-1) == labels) & kept).sum(dim=-1).float()
        return float((hits / kept.sum(dim=-1).clamp(min=1)).sum())
    return float((logits.argmax(dim=1) == labels).sum())


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(model inputs, labels or None) of one batch; see the module docstring for the forms.

    Raises:
        ConfigError: a batch of another kind (pass `transform=`).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor | dict):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels
    raise ConfigError(f"cannot read a calibration batch of type {type(batch).__name__}: batches must "
                      "be tensors, (inputs, labels) tuples or dicts; pass Calibration(data, "
                      "transform=lambda batch: model_inputs)")


@dataclass(frozen=True)
class Calibration:
    """Batches for techniques that look at data (see the module docstring).

    Attributes:
        data: any iterable of batches (a DataLoader, a list, a generator function's result).
        transform: batch -> model inputs, or -> (inputs, labels); default: `split_batch`.
        num_samples: stop after this many samples (the last batch is cut to fit).
    """

    data: Iterable[Any]
    transform: Callable[[Any], Any] | None = None
    num_samples: int | None = None

    def __post_init__(self) -> None:
        if not hasattr(self.data, "__iter__"):
            raise ConfigError(f"Calibration needs an iterable of batches, got {type(self.data).__name__}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")

    def pairs(self) -> Iterator[tuple[Any, Any]]:
        """(inputs, labels or None) per batch, lazily, up to `num_samples`."""
        seen = 0
        for batch in self.data:
            if self.transform is not None:
                batch = self.transform(batch)
            inputs, labels = split_batch(batch) if self.transform is None or isinstance(batch, tuple) \
                else (batch, None)
            size = batch_size_of(inputs)
            if self.num_samples is not None and seen + size > self.num_samples:
                keep = self.num_samples - seen
                inputs = first_samples(inputs, keep)
                labels = first_samples(labels, keep) if labels is not None else None
                size = keep
            yield inputs, labels
            seen += size
            if self.num_samples is not None and seen >= self.num_samples:
                return

    def inputs(self) -> Iterator[Any]:
        """The model inputs of each batch, lazily."""
        for inputs, _ in self.pairs():
            yield inputs


def as_calibration(data: Any) -> Calibration:
    """`data` as a `Calibration` (itself if it already is one)."""
    return data if isinstance(data, Calibration) else Calibration(data)


def take_pairs(data: Any, batches: int) -> list[tuple[Any, Any]]:
    """At most `batches` (inputs, labels) pairs, reading no further than that."""
    return [] if data is None else list(islice(as_calibration(data).pairs(), batches))


def take_inputs(data: Any, batches: int) -> list[Any]:
    """At most `batches` model-input batches, reading no further than that."""
    return [] if data is None else list(islice(as_calibration(data).inputs(), batches))
