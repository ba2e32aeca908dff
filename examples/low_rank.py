"""Low-rank factorization: split Linear layers by truncated SVD and decompose convolutions.

`LowRank` replaces a Linear (m x n) by two thin ones (r x n, then m x r); `ConvDecomposition`
replaces a k x k conv by a Tucker-2 chain (1x1 -> k x k core -> 1x1), a spatial pair (k x 1,
1 x k) or a depthwise-separable pair. The new shapes are recorded in the artifact, so `load`
rebuilds them. Run: `python examples/low_rank.py` (about 5 s).
"""

from pathlib import Path

import torch
from own_model import SmallNet, loaders, trained_model
from torch import nn

import torchslim as ts
from torchslim.lowrank import ConvDecomposition, LowRank
from torchslim.training import Trainer, make_train_config

out = Path("runs/examples/low_rank")  # relative to the current folder

# --8<-- [start:linear]
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
changes = ts.apply_(mlp, LowRank(param_ratio=0.5))   # each layer keeps at most half its weights
print(changes["ranks"])                               # {'0': 85, '2': 128, '4': 4}
print(f"params {changes['params_before']:,} -> {changes['params_after']:,}")
# --8<-- [end:linear]

model, data = trained_model(), loaders()
before = ts.measure.evaluate(model, data["test"])["accuracy"]

# --8<-- [start:conv]
changes = ts.apply_(model, ConvDecomposition(method="tucker", param_ratio=0.4),
                    targets=ts.Select(types=("Conv2d",), exclude=("features.0",)))  # keep the 1-channel stem
print(changes.summary())
Trainer(model, data["train"], val_loader=data["val"], progress=False,
        config=make_train_config(epochs=2, optimizer="adam", lr=0.003)).fit()
path = ts.save(model, out / "tucker.slim")
reloaded = ts.load(path, model=SmallNet())           # the decomposition is replayed on a fresh SmallNet
# --8<-- [end:conv]
x = next(iter(data["test"]))[0]
assert torch.equal(reloaded(x), model.eval()(x))
after = ts.measure.evaluate(model, data["test"])["accuracy"]
print(f"test accuracy {before:.1%} -> {after:.1%}; reloaded outputs identical")
