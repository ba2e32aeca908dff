"""Unstructured pruning: zero 80% of the conv and linear weights while training, then store them sparse.

`GradualPruning` raises the sparsity along Zhu & Gupta's cubic ramp during fine-tuning (masks,
reversible until `finalize_`); a one-shot `apply_(model, WeightPruning(...))` is the same
technique without the schedule. Run: `python examples/unstructured_pruning.py` (about 5 s).
"""

from pathlib import Path

from own_model import loaders, trained_model

import torchslim as ts
from torchslim.pruning import GradualPruning, WeightPruning, sparsity_of
from torchslim.training import Trainer, make_train_config

out = Path("runs/examples/unstructured_pruning")  # relative to the current folder
model, data = trained_model(), loaders()
before = ts.measure.evaluate(model, data["test"])["accuracy"]

# --8<-- [start:prune]
steps_per_epoch = len(data["train"])
schedule = GradualPruning(WeightPruning(sparsity=0.8, scope="global"),  # 80% of all weights, ranked together
                          start=0, end=2 * steps_per_epoch, every=5)    # ramp over 2 of the 3 epochs
Trainer(model, data["train"], val_loader=data["val"], callbacks=[schedule], progress=False,
        config=make_train_config(epochs=3, optimizer="adam", lr=0.003)).fit()
ts.finalize_(model)                                   # masks -> plain tensors with zeros
for name in ("features.0", "features.3", "head"):
    print(f"{name}: {sparsity_of(model.get_submodule(name)):.0%} zeros")
dense = ts.save(model, out / "dense.slim")
sparse = ts.save(model, out / "sparse.slim", encoding=ts.Encoding(coder="auto"))  # sparse index, coded
# --8<-- [end:prune]
after = ts.measure.evaluate(model, data["test"])["accuracy"]
print(f"test accuracy {before:.1%} -> {after:.1%}")
print(f"file: {dense.stat().st_size:,} B dense, {sparse.stat().st_size:,} B sparse "
      f"({dense.stat().st_size / sparse.stat().st_size:.1f}x smaller)")
