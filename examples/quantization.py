"""Quantization: int8 programs on onnxruntime's integer kernels (post-training and QAT), and
4-bit weight-only storage.

`quantize_model` converts a float model into an `OrtModule`: an ONNX program whose Linear and
Conv layers run on int8 kernels (`dynamic`: int8 weights, activations quantized on the fly;
`static`: activation ranges calibrated on a few batches). QAT trains through fake int8 first,
then converts to the same program. Run: `python examples/quantization.py` (about 15 s).
"""

import copy
from pathlib import Path

import torch
from own_model import loaders, trained_model
from torch import nn

import torchslim as ts
from torchslim.quantization import Quantization, WeightOnly, quantize_model
from torchslim.quantization.qat import convert_qat, prepare_qat_
from torchslim.training import Trainer, make_train_config

out = Path("runs/examples/quantization")  # relative to the current folder
model, data = trained_model(), loaders()
x = next(iter(data["train"]))[0]


def accuracy(m: nn.Module) -> float:
    return ts.measure.evaluate(m, data["test"])["accuracy"]


# --8<-- [start:static]
calibration = [images for images, _ in data["train"]][:8]            # 8 batches, labels unused
int8 = quantize_model(model, Quantization(method="static", calibrate="minmax"),
                      example_inputs=x[:2], calibration=calibration)  # an OrtModule
print(int8.report["int8_ops"], "int8 ops;", "float ops:", int8.report["float_ops"])
path = ts.save(int8, out / "int8.slim")                               # loads on its own, no model= needed
reloaded = ts.load(path)
# --8<-- [end:static]
print(f"static int8: test accuracy {accuracy(model):.1%} -> {accuracy(reloaded):.1%}")

# --8<-- [start:qat]
qat = copy.deepcopy(model)
prepare_qat_(qat)                     # fold BatchNorm, fake-quantize weights and layer inputs
Trainer(qat, data["train"], val_loader=data["val"], progress=False,
        config=make_train_config(epochs=1, optimizer="adam", lr=0.001)).fit()
qat_int8 = convert_qat(qat, example_inputs=x[:2], calibration=calibration)
# --8<-- [end:qat]
print(f"QAT int8: test accuracy {accuracy(qat_int8):.1%}")

# --8<-- [start:weight_only]
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
dense = ts.save(mlp, out / "mlp.slim")
ts.apply_(mlp, WeightOnly(bits=4, group_size=32))   # 4-bit codes, one scale per 32 weights of a row
packed = ts.save(mlp, out / "mlp-int4.slim", encoding=ts.Encoding())   # codes stored at ~4 bits each
# --8<-- [end:weight_only]
print(f"weight-only int4: {dense.stat().st_size:,} B -> {packed.stat().st_size:,} B")
