"""AdaRound and bias correction for static int8: on user-style modules, through onnxruntime."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import torchslim as ts
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.quantization import Quantization, quantize_model, sqnr_db
from torchslim.runtime.onnx_program import OrtModule


class ScaledConv(nn.Conv2d):
    """A user's Conv2d subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledConv(3, 16, 3, padding=1)
        self.block = Block(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def user_net() -> nn.Module:
    torch.manual_seed(0)
    model = UserNet()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        model.block.bn.running_mean.uniform_(-0.5, 0.5)
        model.block.bn.running_var.uniform_(0.5, 2.0)
        model.block.bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def _images(seed: int, count: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 12, 12, generator=generator) + 0.5  # a positive mean, as photos


def _int8_weights(model: OrtModule) -> dict[tuple[int, ...], np.ndarray]:
    """The program's int8 weights by shape (names change with the fusions onnxruntime makes:
    ScaledConv's "* 0.5" and BatchNorm go into the conv weights)."""
    program = onnx.load_from_string(model.program)
    weights = [numpy_helper.to_array(init) for init in program.graph.initializer
               if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2]
    return {tuple(w.shape): w for w in weights}


def test_adaround_learns_roundings_that_onnxruntime_keeps(user_net) -> None:
    calibration = [_images(0)]
    config = Quantization(method="static", adaround=True, adaround_iterations=200)
    int8 = quantize_model(user_net, config, example_inputs=calibration[0][:2], calibration=calibration)
    report = int8.report["reconstruction"]
    layers = report["layers"]
    assert set(layers) == {"stem", "block.conv", "head"} and not report["skipped"]
    assert report["folded_batchnorm"] == ["block.conv"]
    assert report["quantized_sums"] == 1  # the residual sum is requantized, as in the program
    assert layers["block.conv"]["measured_after"] == "ReLU"  # found through the folded BatchNorm
    assert layers["stem"]["measured_after"] == "the layer"  # torch.relu is no module
    assert 10 < report["simulated_sqnr_db"] < 60
    # The simulation quantizes on the program's own activation grids, read from it.
    assert report["program_grids"] == {"inputs": 3, "outputs": 3, "sums": 1}
    for name, row in layers.items():
        assert 0 < row["rounded_other_way"] < 0.5, name  # learned, not nearest, not arbitrary
        assert row["error"] < row["error_nearest"], name  # on the calibration data
    # The program's int8 weights are the learned codes: the scales did not move.
    plain = quantize_model(user_net, Quantization(method="static"), example_inputs=calibration[0][:2],
                           calibration=calibration)
    learned, nearest = _int8_weights(int8), _int8_weights(plain)
    names = {(16, 3, 3, 3): "stem", (16, 16, 3, 3): "block.conv", (10, 16): "head"}
    assert set(learned) == set(nearest) == set(names)
    for shape, codes in learned.items():
        changed = float((codes != nearest[shape]).mean())
        assert changed == pytest.approx(layers[names[shape]]["rounded_other_way"], abs=0.02), names[shape]


def test_adaround_keeps_pruned_weights_at_zero() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.5)  # half the weights pruned
    data = [torch.randn(64, 16)]
    int8 = quantize_model(model, Quantization(method="static", adaround=True, adaround_iterations=100),
                          example_inputs=data[0][:2], calibration=data)
    assert all(row["rounded_other_way"] > 0 for row in int8.report["reconstruction"]["layers"].values())
    codes = _int8_weights(int8)
    for layer in (model[0], model[2]):
        pruned = (layer.weight == 0).numpy()
        assert pruned.mean() > 0.4 and (codes[tuple(layer.weight.shape)][pruned] == 0).all()


def test_bias_correction_removes_the_mean_error_of_coarse_weights() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 10 * 10, 4)).eval()
    with torch.no_grad():  # one outlier per output channel: a coarse grid for all the others
        model[0].weight[:, 0, 0, 0] = 3.0
        model[2].weight[:, 0] = 2.0
    calibration, held_out = [_images(0, 64)], _images(1, 64)
    results = {}
    for corrected in (False, True):
        int8 = quantize_model(model, Quantization(method="static", bias_correction=corrected),
                              example_inputs=held_out[:2], calibration=calibration)
        with torch.no_grad():
            results[corrected] = sqnr_db(model(held_out), int8(held_out))
        if corrected:
            rows = int8.report["reconstruction"]["layers"]
            assert all(row["bias_shift"] > 0 for row in rows.values())
            assert int8.report["reconstruction"]["iterations"] == 0  # no AdaRound asked for
    assert results[True] > results[False] + 1.0, results


def test_shared_and_excluded_layers_are_named_with_the_reason() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(6, 6)
            self.kept = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.kept(self.shared(torch.relu(self.shared(x)))))

    model = Twice().eval()
    data = [torch.randn(32, 6)]
    int8 = quantize_model(model, Quantization(method="static", bias_correction=True, exclude=("kept",)),
                          example_inputs=data[0][:2], calibration=data)
    report = int8.report["reconstruction"]
    assert "called 2 times" in report["skipped"]["shared"]
    assert set(report["layers"]) == {"out"}  # "kept" stays float: neither corrected nor skipped
    assert "kept" not in report["skipped"]


def test_bad_requests_fail_before_any_work(user_net, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="method='static'"):
        Quantization(method="dynamic", adaround=True)
    source = ts.save(user_net, tmp_path / "net.slim", example_inputs=_images(0, 2))
    assert main(["quantize", str(source), "--method", "dynamic", "--bias-correction",
                 "--out", str(tmp_path / "q")]) == 2
    assert "options of --method static" in capsys.readouterr().err
    assert main(["quantize", str(source), "--method", "static", "--adaround-iterations", "5",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--adaround only" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_keyword_input_models_are_refused_before_any_work() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    batch = {"input_ids": torch.randint(100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    with pytest.raises(ConfigError, match="one input tensor"):
        quantize_model(model, Quantization(method="static", adaround=True), example_inputs=batch,
                       calibration=[batch])


def test_quantize_cli_runs_adaround_with_bias_correction(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * 64, 10)).eval()\n")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "net.py:model"), "--method", "static",
                 "--calibration", "digits",
                 "--batches", "1", "--adaround", "--adaround-iterations", "20", "--bias-correction",
                 "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    reconstruction = report["quantization"]["reconstruction"]
    assert reconstruction["adaround"] and reconstruction["bias_correction"]
    assert reconstruction["iterations"] == 20 and len(reconstruction["layers"]) == 3
    assert report["config"]["adaround"] is True
    assert report["after"]["backend"] == "onnxruntime"
