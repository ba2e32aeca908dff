"""BatchNorm re-estimation: exact statistics, no silent no-op, and the recipe stage that rescues a
structurally pruned CNN without labels."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from torchslim import Calibration, recalibrate_bn_
from torchslim.cli import main
from torchslim.errors import ConfigError


def test_statistics_are_those_of_the_new_data_and_dropout_stays_off() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)).eval()
    data = [torch.randn(16, 1, 6, 6) * 2 + 3 for _ in range(3)]
    result = recalibrate_bn_(net, Calibration(data, num_samples=40))  # batches of 16, 16, 8
    assert result == {"layers": 1, "samples": 40}
    with torch.no_grad():  # dropout is off: the BN saw the conv's outputs themselves
        seen = [net[0](x) for x in (data[0], data[1], data[2][:8])]
    # a cumulative average: every batch's statistics weigh the same
    mean = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen]).mean(0)
    var = torch.stack([s.var(dim=(0, 2, 3)) for s in seen]).mean(0)
    assert torch.allclose(net[2].running_mean, mean, atol=1e-4)
    assert torch.allclose(net[2].running_var, var, rtol=1e-3)
    assert net[2].momentum == 0.1 and not net.training


def test_a_model_without_batchnorm_is_an_error_not_a_no_op() -> None:
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        recalibrate_bn_(nn.Linear(2, 2), [torch.randn(4, 2)])


def test_the_recipe_stage_recovers_a_pruned_cnn_without_labels(tmp_path: Path) -> None:
    recipe = {"version": 1, "model": "resnet-small", "dataset": "digits", "seed": 0,
              "baseline": {"epochs": 1, "lr": 0.05, "batch_size": 64},
              "stages": [{"structured_prune": {"ratio": 0.3}},
                         {"recalibrate_bn": {"calibration_batches": 4}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    pruned, recalibrated = rows[1]["val_accuracy"], rows[2]["val_accuracy"]
    assert recalibrated > pruned + 0.2, (pruned, recalibrated)
