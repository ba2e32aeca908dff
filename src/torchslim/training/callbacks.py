"""Hooks through which techniques join training without editing the trainer.

Gradual pruning re-applies masks `on_after_optimizer_step`, QAT swaps modules `on_fit_start`,
network slimming adds gradients `on_before_optimizer_step`. A callback with state (a schedule
position, say) returns it from `state_dict` so that a resumed run continues where it stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torchslim.training.trainer import EpochRecord, Trainer

__all__ = ["Callback", "CrossEntropy", "Loss"]


class Callback:
    """Base class: override the hooks you need; all default to doing nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (also after a resume)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the batches of `epoch` (0-based)."""

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After backward, before clipping and `optimizer.step()`: gradients may be edited."""

    def on_after_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """After `optimizer.step()`: weights may be edited (e.g. masks re-applied)."""

    def on_step(self, trainer: Trainer, step: int, loss: float) -> None:
        """At the end of every training step, with the batch loss."""

    def on_epoch_end(self, trainer: Trainer, record: EpochRecord) -> None:
        """After validation of an epoch, before its checkpoint is written."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch (or early stop)."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class Loss:
    """A training objective: `loss(outputs, labels, inputs) -> scalar tensor`.

    `inputs` is passed so that objectives such as distillation can run a teacher on the batch.
    A loss with its own trainable parts (distillation adapters) returns them from `bind`, and
    its state from `state_dict`, so the trainer optimises and checkpoints them with the model.
    """

    def bind(self, model: torch.nn.Module, example_inputs: torch.Tensor) -> list[torch.nn.Parameter]:
        """Called once by the trainer with the model and one input batch; returns extra
        parameters to optimise (default: none)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(Loss):
    """Plain cross-entropy on labels, optionally with label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        from torchslim.calibration import logits_of, token_cross_entropy

        return token_cross_entropy(logits_of(outputs), labels, label_smoothing=self.label_smoothing)
