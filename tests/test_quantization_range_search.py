"""Output-aware activation ranges for static int8 (`range_search`), on a user-style module."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.quantization import Quantization, quantize_model, sqnr_db
from torchslim.quantization.layer_reconstruction import program_grids
from torchslim.quantization.range_search import output_aware_ranges


class ScaledConv(nn.Conv2d):
    """A user's Conv2d subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class OutlierNet(nn.Module):
    """One stem channel fires rarely but 100x larger than the others, and the layer reading it
    barely uses it: a range that covers it wastes the grid on values the output ignores. Dict
    output, as Hugging Face models return."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledConv(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.mix(self.act(self.stem(x)))
        return {"logits": self.head(self.pool(features).flatten(1)), "features": features}


@pytest.fixture(scope="module")
def outlier_net() -> nn.Module:
    torch.manual_seed(0)
    model = OutlierNet()
    with torch.no_grad():
        model.stem.weight[0].mul_(300.0)  # channel 0: large where it fires ...
        model.stem.bias[0] = -300.0  # ... which is rarely
        model.mix.weight[:, 0].mul_(0.002)  # and the next layer hardly reads it
    return model.eval()


def _images(seed: int, count: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _sqnr(model: nn.Module, int8: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return sqnr_db(model(images)["logits"], int8(images)["logits"])


def test_range_search_clips_what_the_output_ignores_and_int8_gains(outlier_net: nn.Module) -> None:
    calibration, evaluation = list(_images(0).split(8)), _images(1)
    before = {k: v.clone() for k, v in outlier_net.state_dict().items()}
    ranges, outputs, report = output_aware_ranges(outlier_net, calibration)
    # the model is left as it was: no weight changed, no gradient left behind
    assert all(torch.equal(before[k], v) for k, v in outlier_net.state_dict().items())
    assert all(p.grad is None for p in outlier_net.parameters())
    assert set(ranges) == set(outputs) == {"stem", "mix", "head"} and not report["skipped"]
    observed_high = report["layers"]["mix"]["observed"][1]
    assert observed_high > 250  # the rare channel is there ...
    assert ranges["mix"][1] < 0.2 * observed_high  # ... and clipped
    assert report["layers"]["mix"]["error_vs_observed_range"] < 0.5

    plain = quantize_model(outlier_net, Quantization(method="static"), example_inputs=evaluation[:2],
                           calibration=calibration)
    searched = quantize_model(outlier_net, Quantization(method="static", range_search=True),
                              example_inputs=evaluation[:2], calibration=calibration)
    assert searched.report["input_ranges"] == {"applied": 3, "not_applied": {}}
    assert searched.report["range_search"]["layers"]["mix"]["range"][1] == pytest.approx(ranges["mix"][1])
    assert _sqnr(outlier_net, searched, evaluation) > _sqnr(outlier_net, plain, evaluation) + 6
    # the stem's output goes through a ReLU: its range is the mix layer's input; mix's output is
    # quantized as it is (into the pooling), on its searched grid
    kept = searched.report["output_ranges"]["not_applied"]
    assert "activation" in kept["stem"] and "mix" not in kept
    scale, _ = program_grids(searched.program).outputs["mix"]
    low, high = outputs["mix"]
    assert scale == pytest.approx((max(high, 0.0) - min(low, 0.0)) / 255, rel=1e-4)


def test_range_search_with_adaround_fits_the_weights_on_the_searched_grids(outlier_net: nn.Module) -> None:
    calibration, evaluation = list(_images(0).split(8)), _images(1)
    both = quantize_model(outlier_net, Quantization(method="static", range_search=True, adaround=True,
                                                    adaround_iterations=30),
                          example_inputs=evaluation[:2], calibration=calibration)
    assert both.report["input_ranges"]["applied"] == 3
    searched = quantize_model(outlier_net, Quantization(method="static", range_search=True),
                              example_inputs=evaluation[:2], calibration=calibration)
    assert _sqnr(outlier_net, both, evaluation) > _sqnr(outlier_net, searched, evaluation) - 1.0


def test_range_search_names_a_layer_the_calibration_never_calls() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    ranges, outputs, report = output_aware_ranges(Unused(), [torch.randn(8, 4)])
    assert set(ranges) == set(outputs) == {"used"}
    assert "not called" in report["skipped"]["spare"] and "not called" in report["skipped"]["spare (output)"]


class ConvThenNorm(nn.Module):
    """A conv whose BatchNorm torch.fx cannot fold (the forward branches on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.detach().mean()) > 1e9:  # data-dependent control flow: not traceable
            y = y * 0
        return self.head(y.mean((2, 3)))


def test_an_output_that_feeds_an_unfolded_batchnorm_is_not_searched() -> None:
    _, outputs, report = output_aware_ranges(ConvThenNorm().eval(), [torch.randn(4, 3, 8, 8)])
    assert "conv" not in outputs and "BatchNorm" in report["skipped"]["conv (output)"]
    assert "head" in outputs


def test_range_search_is_an_option_of_static_quantization() -> None:
    with pytest.raises(ConfigError, match="range_search"):
        Quantization(method="dynamic", range_search=True)


def test_quantize_cli_searches_ranges_and_reports_them(tmp_path: Path, capsys) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * 64, 10)).eval()\n")
    source, out = str(tmp_path / "net.py:model"), tmp_path / "q"
    dynamic = ["quantize", "--model", source, "--method", "dynamic", "--range-search", "--out", str(out)]
    assert main(dynamic) == 2
    assert "--range-search: options of --method static" in capsys.readouterr().err
    assert not out.exists()
    assert main(["quantize", "--model", source, "--method", "static", "--calibration", "digits",
                 "--batches", "1", "--range-search", "--threads", "1", "--out", str(out)]) == 0
    quantization = json.loads((out / "report.json").read_text())["quantization"]
    assert set(quantization["range_search"]["layers"]) == {"0", "3"}
    assert quantization["input_ranges"] == {"applied": 2, "not_applied": {}}
