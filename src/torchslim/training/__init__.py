"""One trainer for every technique: optimizers, LR schedules, regularisation, checkpoints."""

from torchslim.training.callbacks import Callback, CrossEntropy, Loss
from torchslim.training.config import OptimizerName, ScheduleName, TrainConfig, make_train_config
from torchslim.training.trainer import EpochRecord, Trainer

__all__ = [
    "Callback",
    "CrossEntropy",
    "EpochRecord",
    "Loss",
    "OptimizerName",
    "ScheduleName",
    "TrainConfig",
    "Trainer",
    "make_train_config",
]
