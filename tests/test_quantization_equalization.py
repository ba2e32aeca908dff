"""Channel equalization and the sensitivity mode of static int8, on user-style modules."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.quantization import Quantization, quantize_model, sqnr_db
from torchslim.quantization.equalization import equalize_for_int8_
from torchslim.quantization.sensitivity import LayerSensitivity, int8_sensitivity, keep_most_sensitive


class HalfConv(nn.Conv2d):
    """A user's Conv2d subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class SpreadNet(nn.Module):
    """Stem channels spanning 100x in range (one per-tensor int8 grid serves them badly) that the
    depthwise conv after them scales back, a pointwise conv, and a tuple output that reads the
    pointwise conv's output twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = HalfConv(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.clip = nn.ReLU6(inplace=True)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.act = nn.ReLU()
        self.pw = nn.Conv2d(16, 24, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.pw(self.act(self.dw(self.clip(self.bn(self.stem(x))))))
        return y, self.head(self.flat(self.pool(y)))  # a dense map and a classification


@pytest.fixture(scope="module")
def spread_net() -> nn.Module:
    torch.manual_seed(0)
    model = SpreadNet()
    with torch.no_grad():  # the same function with the stem's channels shrunk and dw enlarging them back
        spread = torch.logspace(-2, 0, 16)
        model.stem.weight.mul_(spread.reshape(-1, 1, 1, 1))
        model.stem.bias.mul_(spread)
        model.dw.weight.div_(spread.reshape(-1, 1, 1, 1))
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _images(seed: int, count: int = 32) -> torch.Tensor:
    return torch.rand(count, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) * 2


def test_equalization_keeps_the_model_and_evens_the_channels(spread_net) -> None:
    model = copy.deepcopy(spread_net)
    calibration = [_images(0)]
    report = equalize_for_int8_(model, calibration)
    pairs = report["pairs"]
    # torch.fx traces into HalfConv's forward, so its BatchNorm stays: the factors go into it.
    assert pairs["dw"]["producer"] == "stem" and pairs["dw"]["through"] == ["BatchNorm2d", "ReLU6"]
    assert pairs["dw"]["scaled"] == "BatchNorm" and pairs["dw"]["strength"] > 0
    # the depthwise output's channels are even enough: no factors simulated better, and it says so
    if "pw" in pairs:
        assert pairs["pw"]["through"] == ["ReLU"]
    else:
        assert "lower" in report["unchanged"]["pw"]["reason"]
    assert pairs["dw"]["spread_after"] < pairs["dw"]["spread_before"] / 3
    assert "used elsewhere" in report["skipped"]["head"]  # pw's output also feeds the second output
    assert report["float_sqnr_db"] > 60
    fresh = _images(1)
    with torch.no_grad():
        for before, after in zip(spread_net(fresh), model(fresh), strict=True):
            assert sqnr_db(before, after) > 40  # ReLU6's clip: exact on the calibration data only


def test_equalization_gains_int8_fidelity_with_the_same_program(spread_net) -> None:
    calibration, held_out = [_images(0)], _images(2)
    results = {}
    for equalize in (False, True):
        int8 = quantize_model(spread_net, Quantization(method="static", equalize=equalize),
                              example_inputs=calibration[0][:2], calibration=calibration)
        with torch.no_grad():  # the dense map
            results[equalize] = (sqnr_db(spread_net(held_out)[0], int8(held_out)[0]), int8.report)
    assert results[True][0] > results[False][0] + 3
    assert results[True][1]["int8_ops"] == results[False][1]["int8_ops"]  # same int8 work
    assert set(results[True][1]["equalization"]["pairs"]) >= {"dw"}


def test_equalization_names_what_it_cannot_rescale() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    with pytest.raises(ConfigError, match="GELU"):
        equalize_for_int8_(model, [torch.randn(8, 8)])
    with pytest.raises(ConfigError, match="method='static'"):
        Quantization(method="dynamic", equalize=True)
    with pytest.raises(ConfigError, match="method='static'"):
        Quantization(method="dynamic", sensitivity=0.1)


class OutlierMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 64)
        self.middle = nn.Linear(64, 64)
        self.last = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.last(torch.relu(self.middle(torch.relu(self.first(x)))))}


@pytest.fixture(scope="module")
def outlier_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = OutlierMLP()
    with torch.no_grad():  # a huge weight in each row, on an input that is always 0: per-channel
        model.middle.weight[:, 0] = 40.0  # int8 rounds the rest of each row away
        model.first.bias[0] = -20.0
    return model.eval()


def test_sensitivity_finds_the_layer_int8_breaks(outlier_mlp) -> None:
    layers = int8_sensitivity(outlier_mlp, [torch.randn(32, 16)])
    assert next(iter(layers)) == "middle"
    assert layers["middle"].sqnr_db < min(layers["first"].sqnr_db, layers["last"].sqnr_db) - 10
    assert abs(sum(layer.macs_share for layer in layers.values()) - 1) < 1e-3
    assert keep_most_sensitive(layers, 0.8) == ["middle"]  # the others' error is negligible
    assert "middle" not in keep_most_sensitive(layers, 0.5)  # too costly for the budget


def test_budget_passes_over_a_costly_layer_for_cheaper_ones() -> None:
    layers = {"big": LayerSensitivity(10.0, 0.4), "small": LayerSensitivity(12.0, 0.1),
              "fine": LayerSensitivity(90.0, 0.1), "early": LayerSensitivity(11.0, 0.01, traffic_share=0.4)}
    assert layers["early"].cost == 0.4  # few multiply-adds, much data moved: costly in float
    assert keep_most_sensitive(layers, 0.3) == ["small"]
    assert keep_most_sensitive(layers, 1.0) == ["big", "early", "small"]  # "fine": speed for nothing


def test_sensitivity_mode_keeps_the_worst_layer_float_in_the_program(outlier_mlp) -> None:
    calibration, held_out = [torch.randn(64, 16)], torch.randn(64, 16)
    with torch.no_grad():
        reference = outlier_mlp(held_out)["logits"]
    plain = quantize_model(outlier_mlp, Quantization(method="static"), example_inputs=calibration[0][:2],
                           calibration=calibration)
    kept = quantize_model(outlier_mlp, Quantization(method="static", sensitivity=0.8),
                          example_inputs=calibration[0][:2], calibration=calibration)
    report = kept.report
    assert report["sensitivity"]["kept_float"] == ["middle"]
    assert report["excluded"] == {"middle": "kept in float by sensitivity="}
    assert report["float_ops"] and not plain.report["float_ops"]
    with torch.no_grad():
        fidelity = {name: sqnr_db(reference, model(held_out)["logits"])  # its dict output, kept
                    for name, model in (("kept", kept), ("plain", plain))}
    assert fidelity["kept"] > fidelity["plain"] + 10


def test_quantize_cli_equalizes_and_keeps_sensitive_layers(tmp_path: Path, capsys) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * 64, 10)).eval()\n")
    source, out = str(tmp_path / "net.py:model"), tmp_path / "q"
    assert main(["quantize", "--model", source, "--method", "dynamic", "--equalize", "--out", str(out)]) == 2
    assert "--equalize: options of --method static" in capsys.readouterr().err
    assert main(["quantize", "--model", source, "--method", "static", "--calibration", "digits",
                 "--batches", "1", "--equalize", "--sensitivity", "0.5", "--threads", "1",
                 "--out", str(out)]) == 0
    quantization = json.loads((out / "report.json").read_text())["quantization"]
    assert set(quantization["equalization"]["pairs"]) == {"3"}
    assert "channels" in quantization["equalization"]["skipped"]["6"]  # 8 channels flattened into 512
    sensitivity = quantization["sensitivity"]
    assert set(sensitivity["layers"]) == {"0", "3", "6"} and sensitivity["budget"] == 0.5
    assert sensitivity["float_macs_share"] <= sensitivity["float_cost"] <= 0.5
