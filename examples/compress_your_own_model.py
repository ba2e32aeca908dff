"""Compress your own model: prune channels, fine-tune, save, reload, quantize to int8, compare.

Any `nn.Module` and any iterable of batches work (here plain torch DataLoaders of `(x, y)`);
nothing about the model needs registering. Files go to `runs/` in the current folder.
Run: `python examples/compress_your_own_model.py` (about 15 s on 2 cores).
"""

# --8<-- [start:example]
import copy

from own_model import SmallNet, loaders, trained_model

import torchslim as ts
from torchslim.pruning import ChannelPruning
from torchslim.quantization import Quantization, quantize_model

model, data = trained_model(), loaders()         # your trained model, {"train": DataLoader, "val": ...}
x = next(iter(data["train"]))[0]
original = copy.deepcopy(model)
changes = ts.apply_(model, ChannelPruning(ratio=0.5), example_inputs=x[:2])   # channels removed, not masked
print(changes.summary())                         # per layer: what changed, what was skipped and why
ts.training.Trainer(model, data["train"], val_loader=data["val"],
                    config=ts.training.make_train_config(epochs=3, optimizer="adam", lr=0.01)).fit()
ts.save(model, "runs/pruned.slim")               # any module; its input signature is recorded
model = ts.load("runs/pruned.slim", model=SmallNet())   # edits replayed on your fresh instance
int8 = quantize_model(model, Quantization(method="static"), example_inputs=x[:2],
                      calibration=ts.Calibration(data["train"], num_samples=512))   # int8 onnxruntime program
print(ts.measure.compare(original, model, data["test"], example_inputs=x)["comparison"])
# --8<-- [end:example]
print("int8 test accuracy:", round(ts.measure.evaluate(int8, data["test"])["accuracy"], 4))
