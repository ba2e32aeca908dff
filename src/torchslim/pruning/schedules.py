"""When to prune: one-shot, iterative prune -> fine-tune (Han 2015), gradual (Zhu & Gupta 2017).

Gradual pruning is a trainer `Callback`: the sparsity follows the cubic ramp
`s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))³` and masks only ever grow, so the optimizer
keeps its parameters and a resumed run continues the ramp where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchslim.api import apply_
from torchslim.errors import ConfigError
from torchslim.parametrized import original_weight, weight_of, weight_parametrizations
from torchslim.pruning.masks import check_sparsity
from torchslim.pruning.unstructured import WeightPruning, prune_weights_, set_mask_
from torchslim.select import Select
from torchslim.training.callbacks import Callback

if TYPE_CHECKING:
    from torchslim.training.trainer import Trainer

__all__ = ["GradualPruning", "cubic_sparsity", "iterative_prune_", "iterative_sparsities", "rewind_"]


def cubic_sparsity(step: int, *, final: float, initial: float = 0.0, start: int = 0,
                   end: int) -> float:
    """Zhu & Gupta's target sparsity at `step` (constant before `start` and after `end`).

    Example:
        >>> [round(cubic_sparsity(t, final=0.9, end=100), 4) for t in (0, 50, 100, 200)]
        [0.0, 0.7875, 0.9, 0.9]
    """
    if end <= start:
        raise ConfigError(f"gradual pruning needs end > start, got start={start}, end={end}")
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def iterative_sparsities(final: float, rounds: int) -> list[float]:
    """Per-round targets removing the same fraction of the survivors each round (Han 2015)."""
    check_sparsity(final)
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    return [1.0 - (1.0 - final) ** ((k + 1) / rounds) for k in range(rounds)]


class GradualPruning(Callback):
    """Prune the `targets` every `every` steps along the cubic ramp from `start` to `end` step."""

    def __init__(self, config: WeightPruning, *, targets: Select | None = None, start: int = 0,
                 end: int, every: int = 50) -> None:
        if config.sparsity is None:
            raise ConfigError("gradual pruning needs a final `sparsity`")
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        cubic_sparsity(start, final=config.sparsity, start=start, end=end)  # validates range
        self.config, self.targets = config, targets or Select()
        self.start, self.end, self.every = start, end, every
        self.current = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        # All-ones masks up front: the optimizer already holds the very same parameter objects.
        for _, module in self.targets.resolve(trainer.model):
            set_mask_(module, torch.ones_like(weight_of(module), dtype=torch.bool))

    def on_after_optimizer_step(self, trainer: Trainer, step: int) -> None:
        if step < self.start or ((step - self.start) % self.every and step != self.end):
            return
        final = self.config.sparsity or 0.0
        target = cubic_sparsity(step, final=final, start=self.start, end=self.end)
        if target > self.current:
            # per-layer finals follow the same ramp, scaled to their own end point
            per_layer = {name: value * target / final for name, value in self.config.per_layer.items()}
            # The handler, not apply_: targets were resolved in on_fit_start, and apply_'s
            # rollback snapshot would write the model to a temporary file at every pruning step.
            prune_weights_(trainer.model, replace(self.config, sparsity=target, per_layer=per_layer),
                           targets=self.targets)
            self.current = target

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])


def iterative_prune_(model: nn.Module, config: WeightPruning, *, rounds: int,
                     fine_tune: Callable[[nn.Module, int], None],
                     targets: Select | None = None) -> list[float]:
    """Prune to `config.sparsity` in `rounds` prune -> `fine_tune(model, round)` cycles."""
    if config.sparsity is None:
        raise ConfigError("iterative pruning needs a final `sparsity`")
    reached = []
    for round_index, sparsity in enumerate(iterative_sparsities(config.sparsity, rounds)):
        apply_(model, replace(config, sparsity=sparsity), targets=targets)
        fine_tune(model, round_index)
        reached.append(sparsity)
    return reached


def rewind_(model: nn.Module, initial_state: dict[str, torch.Tensor]) -> int:
    """Reset surviving weights to an earlier state, keeping masks (lottery-ticket rewinding).

    `initial_state` is a plain `state_dict` of the unpruned architecture (e.g. its
    initialisation). Returns the number of tensors rewound.
    """
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                key = f"{name}.{param_name}" if name else param_name
                if key in initial_state:
                    param.copy_(initial_state[key])
                    count += 1
            key = f"{name}.weight"
            if weight_parametrizations(module) and key in initial_state:
                original_weight(module).copy_(initial_state[key])
                count += 1
    return count
