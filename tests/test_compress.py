import json
from pathlib import Path

import pytest
import torch
import yaml

from torchslim import artifact
from torchslim.cli import main
from torchslim.errors import SelectionError
from torchslim.recipe import parse_recipe

RECIPE = {
    "version": 1, "model": "lenet300", "dataset": "digits", "seed": 0,
    "baseline": {"epochs": 3, "lr": 0.1},
    "stages": [
        {"prune": {"per_layer": {"fc1": 0.8, "fc2": 0.7, "fc3": 0.5}}},
        {"fine_tune": {"epochs": 1, "lr": 0.02}},
        {"cluster": {"bits": 4}},
        {"fine_tune": {"epochs": 1, "lr": 0.001}},
        {"encode": {"coder": "auto"}},
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compress")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    assert main(["compress", str(folder / "recipe.yaml"), "--out", str(folder / "out"),
                 "--no-progress"]) == 0
    return folder


def test_compress_writes_a_smaller_artifact_that_evaluates(run: Path, capsys) -> None:
    report = json.loads((run / "out" / "report.json").read_text())
    final = run / "out" / "model.slim"
    assert report["final"]["bytes"] == final.stat().st_size
    assert report["comparison"]["bytes_ratio"] > 5
    assert [s["stage"] for s in report["stages"]] == ["prune", "fine_tune", "cluster",
                                                      "fine_tune", "encode"]
    assert report["final"]["test_accuracy"] > 0.8
    assert (run / "out" / "accuracy_vs_size.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(final), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == final.stat().st_size
    assert result["accuracy"] == report["final"]["test_accuracy"]


def test_final_artifact_holds_exactly_the_fine_tuned_weights(run: Path) -> None:
    tuned = artifact.load(run / "out" / "stages" / "04-fine_tune.slim").state_dict()
    final = artifact.load(run / "out" / "model.slim").state_dict()
    for name, tensor in tuned.items():
        assert torch.equal(tensor.view(torch.uint8), final[name].view(torch.uint8)), name
    weight = final["fc1.weight"]
    assert torch.unique(weight[weight != 0]).numel() <= 16
    assert float((weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


def test_inspect_reports_streams_per_layer(run: Path, capsys) -> None:
    assert main(["inspect", str(run / "out" / "model.slim"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    fc1 = next(t for t in result["tensors"] if t["name"] == "fc1.weight")
    assert fc1["bits"] == 4 and fc1["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["tensor_bytes"] + result["header_bytes"] == result["bytes"]
    assert main(["inspect", str(run / "out" / "model.slim")]) == 0
    assert "| fc1.weight | 300x64 | 80.0% | 4 |" in capsys.readouterr().out


def test_resume_reuses_finished_stages_and_gives_the_same_model(run: Path) -> None:
    out = run / "out"
    stages = out / "stages"
    kept = stages / "02-fine_tune.slim"
    mtime = kept.stat().st_mtime_ns
    first = (out / "model.slim").read_bytes()
    for name in ("03-cluster.slim", "04-fine_tune.slim", "05-encode.slim"):
        (stages / name).unlink()
    assert main(["compress", str(run / "recipe.yaml"), "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    assert kept.stat().st_mtime_ns == mtime
    again = artifact.load(out / "model.slim").state_dict()
    (run / "first.slim").write_bytes(first)
    reference = artifact.load(run / "first.slim").state_dict()
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_a_selector_matching_nothing_fails_before_any_work(tmp_path: Path) -> None:
    from torchslim.compress import CompressionRun

    recipe = parse_recipe({**RECIPE, "stages": [
        {"prune": {"sparsity": 0.5, "targets": {"names": ["fc9"]}}}, {"encode": {}}]})
    with pytest.raises(SelectionError, match="'fc9' matched no"):
        CompressionRun(recipe, tmp_path / "o", progress=False).run()
    assert not (tmp_path / "o" / "model.slim").exists()


def test_sensitivity_cli_writes_table_plot_and_suggestions(run: Path, capsys) -> None:
    out = run / "sens"
    assert main(["sensitivity", "--model", str(run / "out" / "stages" / "00-baseline.slim"),
                 "--dataset", "digits", "--sparsities", "0.5", "0.95", "--max-drop", "0.5",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["split"] == "val" and set(result["layers"]) == {"fc1", "fc2", "fc3"}
    assert result["suggested"] == {"fc1": 0.95, "fc2": 0.95, "fc3": 0.95}
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| fc1 |" in capsys.readouterr().out


def test_an_untrained_model_without_baseline_is_refused(tmp_path: Path) -> None:
    from torchslim.compress import CompressionRun
    from torchslim.errors import ConfigError

    recipe = parse_recipe({key: value for key, value in RECIPE.items() if key != "baseline"})
    with pytest.raises(ConfigError, match="add a `baseline:` block"):
        CompressionRun(recipe, tmp_path / "o", progress=False).run()
