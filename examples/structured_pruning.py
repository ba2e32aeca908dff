"""Structured pruning: physically remove channels from a residual network, then recover accuracy.

The model is traced with torch.fx on example inputs into groups of coupled channels (a conv's
filters, its BatchNorm, both sides of the residual add, the head's inputs), each group is
scored, and the lowest-scoring channels are cut out: the result is a smaller dense model, with
no masks. Run: `python examples/structured_pruning.py` (about 10 s).
"""

import copy

import torch
from own_model import loaders
from torch import nn

import torchslim as ts
from torchslim.distillation import DistillationLoss
from torchslim.pruning import ChannelPruning
from torchslim.training import Trainer, make_train_config


class ResidualNet(nn.Module):
    """stem -> residual block -> head; the block's output is added to its input."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))  # the add couples stem and block output channels
        return self.head(x.mean((2, 3)))   # (B, C, 8, 8) -> (B, C) -> (B, 10)


torch.manual_seed(0)
model, data = ResidualNet(), loaders()
Trainer(model, data["train"], val_loader=data["val"], progress=False,
        config=make_train_config(epochs=3, optimizer="adam", lr=0.01)).fit()
teacher = copy.deepcopy(model)
x = next(iter(data["train"]))[0]

# --8<-- [start:prune]
changes = ts.apply_(model, ChannelPruning(ratio=0.5, target="macs", scope="global", importance="l2"),
                    example_inputs=x[:2])        # half the MACs, channels ranked across all groups
print(changes.summary())
ts.recalibrate_bn_(model, data["train"])        # re-estimate BatchNorm statistics (no labels used)
Trainer(model, data["train"], val_loader=data["val"], progress=False,
        loss=DistillationLoss(teacher, temperature=4.0, alpha=0.5),   # recover from the unpruned model
        config=make_train_config(epochs=2, optimizer="adam", lr=0.003)).fit()
result = ts.measure.compare(teacher, model, data["test"], example_inputs=x)
# --8<-- [end:prune]
before, after = result["before"], result["after"]
print(f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,} "
      f"({result['comparison']['macs_ratio']:.2f}x fewer)")
print(f"test accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}")
