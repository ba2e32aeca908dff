"""Optimizers and per-step LR schedules built from a `TrainConfig` with `torch.optim`.

Schedules are stepped once per optimizer step so warm-up and cosine decay are smooth; their
epoch-based knobs (`step_epochs`, `milestones`, per-epoch `gamma`) are converted to steps here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

from torchslim.errors import ConfigError
from torchslim.training.config import OptimizerName, ScheduleName, TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, with its learning rate and L2 penalty."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    match config.optimizer:
        case OptimizerName.SGD:
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                   nesterov=config.nesterov and config.momentum > 0,
                                   weight_decay=config.weight_decay)
        case OptimizerName.ADAM:
            return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        case OptimizerName.ADAMW:
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        case OptimizerName.RMSPROP:
            return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}")  # pragma: no cover


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """Linear warm-up (if any) followed by the decay `config.schedule` names, per step."""
    total = config.epochs * steps_per_epoch
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    decay_steps = max(1, total - warmup)
    decay: lr_scheduler.LRScheduler
    match config.schedule:
        case ScheduleName.CONSTANT:
            decay = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        case ScheduleName.STEP:
            decay = lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch,
                                        gamma=config.gamma)
        case ScheduleName.MULTISTEP:
            decay = lr_scheduler.MultiStepLR(
                optimizer, milestones=[m * steps_per_epoch - warmup for m in config.milestones],
                gamma=config.gamma)
        case ScheduleName.EXPONENTIAL:
            decay = lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma ** (1 / steps_per_epoch))
        case ScheduleName.COSINE:
            decay = lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)
    if warmup == 0:
        return decay
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
