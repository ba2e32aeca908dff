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

from torchslim.calibration import take_pairs
from torchslim.data import Dataset, TensorLoader

__all__ = ["BuiltinData", "RunData", "UserData"]


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
