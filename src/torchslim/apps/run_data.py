"""The data a recipe run trains, calibrates and measures on: a built-in dataset or the user's loaders.

A run needs the same five things from either: training batches, validation batches, the split
its accuracy is reported on, a few training batches for data-driven criteria, and a name for
the report. `BuiltinData` serves them from an in-memory `Dataset` (our fast `TensorLoader`);
`UserData` from the mapping a data factory returns (`train`, `val`, optional `test` loaders),
whose own batch size and shuffling are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from torchslim.calibration import take_pairs
from torchslim.data import Dataset, TensorLoader, dataset_names, load_dataset
from torchslim.data.loader import Split
from torchslim.errors import ConfigError

__all__ = ["BuiltinData", "RunData", "TextData", "UserData", "learn_inputs_", "resolve_run_data"]


class RunData:
    """What a run reads (see the module docstring)."""

    name: str

    def train_loader(self, batch_size: int, seed: int) -> Any:
        raise NotImplementedError

    def val_loader(self) -> Any:
        raise NotImplementedError

    def measured(self) -> tuple[Any, str]:
        """(data for `measure_model`, the split accuracy is reported on)."""
        raise NotImplementedError

    def calibration(self, batches: int, seed: int) -> list[tuple[Any, Any]]:
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        raise NotImplementedError


@dataclass
class BuiltinData(RunData):
    data: Dataset

    def __post_init__(self) -> None:
        self.name = self.data.name

    def train_loader(self, batch_size: int, seed: int) -> Any:
        return TensorLoader(self.data.train, batch_size=batch_size, shuffle=True, seed=seed)

    def val_loader(self) -> Any:
        return TensorLoader(self.data.val, batch_size=1000)

    def measured(self) -> tuple[Any, str]:
        return self.data, "test"

    def calibration(self, batches: int, seed: int) -> list[tuple[Any, Any]]:
        return TensorLoader(self.data.train, batch_size=128, shuffle=True, seed=seed).take(batches)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.data.train) // batch_size)


@dataclass
class UserData(RunData):
    loaders: dict[str, Any]
    name: str = "user data"

    def train_loader(self, batch_size: int, seed: int) -> Any:
        return self.loaders["train"]  # the user's own batch size and sampler

    def val_loader(self) -> Any:
        return self.loaders["val"]

    def measured(self) -> tuple[Any, str]:
        return self.loaders, "test" if "test" in self.loaders else "val"

    def calibration(self, batches: int, seed: int) -> list[tuple[Any, Any]]:
        return take_pairs(self.loaders["train"], batches)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.loaders["train"])


ONE_SHOT_STAGES = "wanda, sparsegpt, gptq, awq, smoothquant, weight_only, int4_kernel, prune, cluster, encode"
TEXT_TRAINING_STAGES = ("fine_tune", "distill")  # the training stages that train a language model


@dataclass
class TextData(RunData):
    """A text dataset for a causal language model: calibration windows drawn from its
    calibration split, perplexity on its held-out split. It is tokenized by the model's own
    tokenizer, so the run binds it to the model first (`bind_`).

    The training stages that fit a language model (`fine_tune`, `distill`) read the calibration
    split cut into consecutive windows of `sequence_length` + 1 tokens (inputs, and the same
    tokens one later as labels): the last twentieth of the windows is their validation split, the
    rest (the first `train_tokens` of it, if set) one epoch of training. The held-out split is
    only ever measured.
    """

    name: str
    sequence_length: int = 512
    eval_tokens: int | None = 16384
    train_tokens: int | None = None
    calibration_tokens: Any = None
    evaluation_tokens: Any = None
    source: str = ""

    def bind_(self, model: nn.Module) -> None:
        """Tokenize both splits with `model`'s tokenizer (once)."""
        from torchslim.apps.language import text_tokens

        if self.calibration_tokens is None:
            self.calibration_tokens, self.evaluation_tokens, self.source = text_tokens(self.name, model)

    def _bound(self) -> Any:
        if self.calibration_tokens is None:
            raise ConfigError(f"text dataset {self.name!r} is not bound to a model's tokenizer yet")
        return self.calibration_tokens

    def _windows(self) -> tuple[Split, Split]:
        """(training, validation) windows of the calibration split, as (inputs, next tokens)."""
        tokens, length = self._bound(), self.sequence_length + 1
        count = len(tokens) // length
        held = max(1, count // 20)
        if count - held < 1:
            raise ConfigError(f"text dataset {self.name!r}: its calibration split ({len(tokens):,} tokens) "
                              f"holds fewer than two windows of {length} tokens to train on; lower "
                              "text: sequence_length")
        windows = tokens[:count * length].reshape(count, length)
        train = windows[:count - held]
        if self.train_tokens is not None:
            train = train[:max(1, self.train_tokens // length)]
        val = windows[count - held:]
        return Split(train[:, :-1], train[:, 1:]), Split(val[:, :-1], val[:, 1:])

    def train_loader(self, batch_size: int, seed: int) -> Any:
        return TensorLoader(self._windows()[0], batch_size=batch_size, shuffle=True, seed=seed)

    def val_loader(self) -> Any:
        return TensorLoader(self._windows()[1], batch_size=8)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self._windows()[0]) // batch_size)

    def measured(self) -> tuple[Any, str]:
        return self.evaluation_tokens, "held-out"

    def calibration(self, batches: int, seed: int) -> list[tuple[Any, Any]]:
        """`batches` windows of `sequence_length` tokens, one per batch (no labels)."""
        from torchslim.data.text import token_windows

        windows = token_windows(self._bound(), count=batches, length=self.sequence_length,
                                seed=seed)
        return [(window.unsqueeze(0), None) for window in windows]


def resolve_run_data(dataset: str | None, model_name: str | None, *, seed: int = 0,
                     required: bool = False) -> tuple[RunData | None, str | None]:
    """(data, the string recipes name it by) for a `--dataset` / `dataset:` value: the user's
    data factory, a built-in name, or (None) the registered model's own dataset.

    Raises:
        ConfigError: `required` and there is neither (a model of the user's own needs data).
    """
    from torchslim.factories import is_factory, load_data_factory
    from torchslim.models import get_entry

    if dataset is not None and dataset not in dataset_names() and is_factory(dataset):
        return UserData(load_data_factory(dataset)), dataset
    from torchslim.apps.language import TEXT_DATASETS

    if dataset in TEXT_DATASETS:
        return TextData(dataset), dataset
    name = dataset or (get_entry(model_name).default_dataset if model_name else None)
    if name is None:
        if required:
            whose = f"model {model_name!r} has no default dataset" if model_name else \
                "your own model needs your own data"
            raise ConfigError(f"{whose}: pass --dataset FILE.py:FUNCTION (returning {{'train': loader, "
                              "'val': loader, 'test': loader}) or a built-in dataset name")
        return None, None
    return BuiltinData(load_dataset(name, seed=seed)), name


def learn_inputs_(model: nn.Module, data: RunData, *, seed: int = 0) -> None:
    """A model of the user's own has no registered input shape: record it from a training batch."""
    from torchslim.models.registry import SPEC_ATTRIBUTE
    from torchslim.signature import record_signature_, signature_of

    if getattr(model, SPEC_ATTRIBUTE, None) is None and signature_of(model) is None:
        first = data.calibration(1, seed)
        if first:
            record_signature_(model, first[0][0])
