"""Weight sharing and the Deep Compression file: prune, cluster into 32 shared values, entropy code.

`WeightSharing(bits=5)` replaces each layer's non-zero weights by at most 2**5 centroids
(k-means, linear initialisation); fine-tuning then trains the centroids while every weight keeps
its cluster and every pruned weight stays zero. `save(..., encoding=Encoding())` writes the
sparse index and the codebook indices, entropy coded. Run: `python examples/weight_sharing.py`
(about 10 s).
"""

from pathlib import Path

from own_model import build_model, loaders, trained_model

import torchslim as ts
from torchslim.clustering import WeightSharing
from torchslim.pruning import WeightPruning
from torchslim.training import Trainer, make_train_config

out = Path("runs/examples/weight_sharing")  # relative to the current folder
model, data = trained_model(), loaders()
baseline = ts.save(model, out / "baseline.slim")
before = ts.measure.evaluate(model, data["test"])["accuracy"]

# --8<-- [start:deep_compression]
fine_tune = make_train_config(epochs=2, optimizer="adam", lr=0.002)
ts.apply_(model, WeightPruning(sparsity=0.6, per_layer={"features.0": 0.3, "head": 0.3}))  # masks
Trainer(model, data["train"], val_loader=data["val"], config=fine_tune, progress=False).fit()
ts.apply_(model, WeightSharing(bits=5))          # codebook of 32 values per layer + fixed indices
Trainer(model, data["train"], val_loader=data["val"], config=fine_tune, progress=False).fit()
ts.finalize_(model)                              # bake masks and codebooks into plain tensors
compressed = ts.save(model, out / "compressed.slim", encoding=ts.Encoding(coder="auto"))
# --8<-- [end:deep_compression]

after = ts.measure.evaluate(model, data["test"])["accuracy"]
reloaded = ts.measure.evaluate(ts.load(compressed, model=build_model()), data["test"])["accuracy"]
assert reloaded == after, "the compressed file loads back to the same model"
distinct = len(model.features[3].weight.unique())
print(f"features.3 holds {distinct} distinct values (at most 32 centroids, and zero)")
print(f"file {baseline.stat().st_size:,} B -> {compressed.stat().st_size:,} B "
      f"({baseline.stat().st_size / compressed.stat().st_size:.1f}x smaller), "
      f"test accuracy {before:.1%} -> {after:.1%}")
