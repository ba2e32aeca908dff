"""Distillation: train a small student to match a larger teacher's soft targets.

`DistillationLoss` is a loss, not a trainer, so it plugs into `Trainer` next to any callback
(gradual pruning, quantization-aware training, ...). Run: `python examples/distillation.py`
(about 10 s).
"""

import torch
from own_model import SmallNet, loaders

import torchslim as ts
from torchslim.distillation import DistillationLoss
from torchslim.training import Trainer, make_train_config

data = loaders()
torch.manual_seed(0)
teacher = SmallNet(width=64)
Trainer(teacher, data["train"], val_loader=data["val"], progress=False,
        config=make_train_config(epochs=4, optimizer="adam", lr=0.01)).fit()
config = make_train_config(epochs=6, optimizer="adam", lr=0.02)

# --8<-- [start:distill]
torch.manual_seed(1)
student = SmallNet(width=16)                     # 1/4 of the teacher's width, ~1/13 of its weights
loss = DistillationLoss(teacher, temperature=4.0, alpha=0.5)   # 0.5 * CE(labels) + 0.5 * T² * KL(teacher)
Trainer(student, data["train"], val_loader=data["val"], loss=loss, config=config, progress=False).fit()
# --8<-- [end:distill]

torch.manual_seed(1)
plain = SmallNet(width=16)                       # the same student on hard labels only
Trainer(plain, data["train"], val_loader=data["val"], config=config, progress=False).fit()
for name, model in (("teacher", teacher), ("student, labels only", plain), ("student, distilled", student)):
    params, accuracy = sum(p.numel() for p in model.parameters()), ts.measure.evaluate(model, data["test"])
    print(f"{name}: {params:,} params, test accuracy {accuracy['accuracy']:.1%}")
