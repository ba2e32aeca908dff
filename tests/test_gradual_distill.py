"""`gradual_prune` with a `distill:` block trains on the distillation loss from the original model."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from torchslim import artifact
from torchslim.apps.compress import CompressionRun
from torchslim.apps.recipe import parse_recipe
from torchslim.cli import main
from torchslim.errors import ConfigError

RECIPE = {"version": 1, "model": "lenet300", "dataset": "digits", "seed": 0,
          "baseline": {"epochs": 1, "lr": 0.1},
          "stages": [{"gradual_prune": {"sparsity": 0.6, "every": 2, "end_fraction": 0.5,
                                        "train": {"epochs": 2, "lr": 0.02},
                                        "distill": {"teacher": "original", "temperature": 2,
                                                    "alpha": 0.0}}}]}


def test_gradual_prune_distils_from_the_original_model(tmp_path: Path, monkeypatch) -> None:
    asked = []
    real = CompressionRun.distill_loss

    def recording(self, distill):
        asked.append(distill)
        return real(self, distill)

    monkeypatch.setattr(CompressionRun, "distill_loss", recording)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["compress", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    used = [d for d in asked if d is not None]
    assert len(used) == 1 and used[0].alpha == 0.0 and used[0].temperature == 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][0]["distill"]["alpha"] == 0.0
    model = artifact.load(tmp_path / "out" / "model.slim")
    weights = torch.cat([m.weight.flatten() for m in (model.fc1, model.fc2, model.fc3)])
    assert float((weights == 0).float().mean()) == pytest.approx(0.6, abs=0.01)  # still pruned


def test_gradual_prune_refuses_a_bad_distill_block_on_load() -> None:
    stage = RECIPE["stages"][0]["gradual_prune"]
    bad = {**RECIPE, "stages": [{"gradual_prune": {**stage, "distill": {"temperature": 0}}}]}
    with pytest.raises(ConfigError, match="distill"):
        parse_recipe(bad)
