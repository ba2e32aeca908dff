"""Layer dropping: keep every other block of a stack, then distil from the full model.

The usual way to build a transformer student (DistilBERT): the kept blocks keep their trained
weights, so the shallower model starts close to its teacher. Run:
`python examples/layer_dropping.py` (about 10 s).
"""

import copy
from pathlib import Path

import torch
from own_model import loaders
from torch import nn

import torchslim as ts
from torchslim.depth import LayerDropping
from torchslim.distillation import DistillationLoss
from torchslim.training import Trainer, make_train_config


class Block(nn.Module):
    """A residual MLP block: width -> width, so any subset of blocks composes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class DeepMLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))  # (B, 1, 8, 8) -> (B, 64) -> (B, width)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


out = Path("runs/examples/layer_dropping")  # relative to the current folder
torch.manual_seed(0)
model, data = DeepMLP(), loaders()
Trainer(model, data["train"], val_loader=data["val"], progress=False,
        config=make_train_config(epochs=4, optimizer="adam", lr=0.003)).fit()
teacher = copy.deepcopy(model)

# --8<-- [start:drop]
changes = ts.apply_(model, LayerDropping(stack="blocks", keep=(0, 2, 4)))   # 6 blocks -> 3
print(changes.summary())
Trainer(model, data["train"], val_loader=data["val"], progress=False,
        loss=DistillationLoss(teacher, temperature=4.0, alpha=0.5),
        config=make_train_config(epochs=2, optimizer="adam", lr=0.001)).fit()
path = ts.save(model, out / "shallow.slim")
reloaded = ts.load(path, model=DeepMLP())       # the dropped blocks are dropped again on load
# --8<-- [end:drop]
print(f"blocks {len(teacher.blocks)} -> {len(reloaded.blocks)}; test accuracy "
      f"{ts.measure.evaluate(teacher, data['test'])['accuracy']:.1%} -> "
      f"{ts.measure.evaluate(reloaded, data['test'])['accuracy']:.1%}")
