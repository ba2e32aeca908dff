import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.data import TensorLoader
from torchslim.measure import evaluate
from torchslim.models import ModelSpec, create_model
from torchslim.quantization import LowBit, finalize_lowbit_
from torchslim.quantization.lowbit import LowBitConv2d, LowBitLinear, lowbit_codes
from torchslim.testing import TinyConvNet, assert_same_outputs
from torchslim.training import Trainer, make_train_config


def test_binary_and_ternary_codes_follow_bwn_and_twn() -> None:
    w = torch.tensor([[0.9, -0.1, 0.05, -0.8], [0.2, 0.2, -0.2, 0.0]])
    codes, scale = lowbit_codes(w, "binary")
    assert codes.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]
    assert torch.allclose(scale, w.abs().mean(1))  # α = mean|W| per output channel
    codes, scale = lowbit_codes(w, "ternary")
    # Δ = 0.7·mean|W|: row 0: Δ = 0.32 keeps ±0.9, ±0.8; row 1: Δ = 0.105 keeps the 0.2s.
    assert codes.tolist() == [[1, 0, 0, -1], [1, 1, -1, 0]]
    assert torch.allclose(scale, torch.tensor([0.85, 0.2]))


def test_training_sees_lowbit_weights_and_latent_weights_get_gradients() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    ts.apply_(model, LowBit(mode="binary"))
    weight = model[0].weight
    rows = weight.detach()
    magnitudes = rows.abs()
    assert torch.allclose(magnitudes, magnitudes[:, :1].expand_as(magnitudes))  # ±α per row
    model(torch.randn(3, 6)).sum().backward()
    latent = model[0].parametrizations.weight.original
    assert latent.grad is not None and float(latent.grad.abs().sum()) > 0


def test_finalized_layers_store_codes_and_load_packed(tmp_path: Path) -> None:
    model = TinyConvNet().eval()
    ts.apply_(model, LowBit(mode="ternary"), targets=ts.Select(types=("Conv2d", "Linear")))
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    result = finalize_lowbit_(model)
    assert set(result["replaced"]) == {"conv1", "conv2", "point", "grouped", "fc"}
    assert isinstance(model.conv2, LowBitConv2d) and isinstance(model.fc, LowBitLinear)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert set(model.fc.codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    spec = ModelSpec(name="tiny-conv-net", input_shape=(1, 8, 8), num_classes=10)
    path = ts.save(model, tmp_path / "t.slim", spec=spec, encoding=ts.Encoding())
    assert_same_outputs(model, ts.load(path, model=TinyConvNet()), x)  # edits replayed on it


def test_binary_lenet300_trains_and_packs_near_one_bit_per_weight(digits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8), num_classes=10)
    ts.apply_(model, LowBit(mode="binary"))
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=8, optimizer="adam", lr=0.003, batch_size=64),
            progress=False).fit()
    finalize_lowbit_(model)
    assert evaluate(model, TensorLoader(digits.test, batch_size=500))["accuracy"] > 0.85
    weights = sum(m.codes.numel() for m in model.modules() if isinstance(m, LowBitLinear))
    size = ts.save(model, tmp_path / "b.slim", encoding=ts.Encoding()).stat().st_size
    assert size * 8 / weights < 2.5  # codes ~1 bit each; scales, biases and header on top


def test_quantize_cli_binary_writes_a_packed_artifact(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300", pretrained=False, input_shape=(1, 8, 8), num_classes=10)
    source = ts.save(model, tmp_path / "fp32.slim")
    out = tmp_path / "binary"
    assert main(["quantize", str(source), "--method", "binary", "--calibration", "digits",
                 "--epochs", "2", "--lr", "0.003", "--no-distill", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["comparison"]["bytes_ratio"] > 12  # 32-bit floats -> ~1-2 bits
    assert "binary layers: fc1, fc2, fc3" in capsys.readouterr().out
    reloaded = ts.load(out / "model.slim")
    assert isinstance(reloaded.fc1, LowBitLinear)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_binary_activations_feed_signs(mode: str) -> None:
    model = nn.Sequential(nn.Linear(5, 3))
    ts.apply_(model, LowBit(mode=mode, activations=True))
    x = torch.randn(4, 5)
    out = model(x)
    finalize_lowbit_(model)
    assert torch.allclose(model(x), out, atol=1e-6)
    assert torch.allclose(model(x), model(torch.sign(x)), atol=1e-6)
