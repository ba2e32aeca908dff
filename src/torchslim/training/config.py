"""`TrainConfig`: every knob of the trainer in one frozen, validated dataclass.

Validated by pydantic so a bad value fails at construction with the field, the value and the
valid range, and so the same names work from the CLI, from YAML and from Python.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from torchslim.config import to_jsonable, validated
from torchslim.errors import ConfigError  # noqa: F401  (doctest)

__all__ = ["OptimizerName", "ScheduleName", "TrainConfig", "make_train_config"]


class OptimizerName(StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"


class ScheduleName(StrEnum):
    CONSTANT = "constant"
    STEP = "step"
    MULTISTEP = "multistep"
    EXPONENTIAL = "exponential"
    COSINE = "cosine"


@validated
@dataclass(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per optimizer step.
        optimizer: sgd (with `momentum`, `nesterov`), adam, adamw or rmsprop.
        lr: peak learning rate (after warm-up).
        momentum: SGD/RMSprop momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty (decoupled for AdamW, as in its paper).
        l1: L1 penalty on every weight matrix/kernel, added to the loss.
        dropout: if set, the rate of every `nn.Dropout` in the model (except those that keep
            their own rate, such as an MLP's input dropout).
        shift: augmentation: move every training image by a random -shift..shift pixels in x
            and in y (Hinton et al.'s "jitter"), on (B, C, H, W) image batches.
        schedule: LR decay after warm-up: constant, step, multistep, exponential or cosine.
        step_epochs: epochs between decays for `step`.
        milestones: epochs at which `multistep` decays.
        gamma: decay factor of step/multistep (per decay) and exponential (per epoch).
        warmup_epochs: epochs of linear warm-up from lr/100 to lr (may be fractional).
        grad_clip: clip the global gradient norm to this value.
        early_stopping_patience: stop after this many epochs without a better validation
            accuracy, and restore the best weights.
        seed: seeds weights' dropout masks and the shuffle order.
        device: "cpu", "cuda", "cuda:1", ...
    """

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: OptimizerName = OptimizerName.SGD
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    l1: float = Field(default=0.0, ge=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    shift: int = Field(default=0, ge=0)
    schedule: ScheduleName = ScheduleName.COSINE
    step_epochs: int = Field(default=5, ge=1)
    milestones: tuple[int, ...] = ()
    gamma: float = Field(default=0.1, gt=0, le=1)
    warmup_epochs: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: str = "cpu"

    what: ClassVar[str] = "training config"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (enums as their names)."""
        return {name: to_jsonable(value) for name, value in self.__dict__.items()}


def make_train_config(**values: Any) -> TrainConfig:
    """Build a `TrainConfig`, turning validation failures into one `ConfigError` listing all.

    Example:
        >>> try:
        ...     make_train_config(lr=-1, optimizer="sgdd")
        ... except ConfigError as exc:
        ...     print(exc)  # doctest: +ELLIPSIS
        invalid training config: lr: Input should be greater than 0 (got -1); optimizer: ... (got 'sgdd')...
    """
    return TrainConfig(**values)
