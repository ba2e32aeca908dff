import json
from pathlib import Path

import pytest
import torch
import yaml

from torchslim import artifact
from torchslim.apps.recipe import parse_recipe
from torchslim.cli import main
from torchslim.errors import SelectionError

RECIPE = {
    "version": 1, "name": "Deep Compression, small", "model": "lenet300", "dataset": "digits",
    "seed": 0, "baseline": {"epochs": 3, "lr": 0.1}, "time_stages": [1],
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
    assert (run / "out" / "accuracy_vs_latency.png").is_file()
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["baseline", "1. prune", "2. fine_tune", "3. cluster",
                                         "4. fine_tune", "5. encode"]
    for row in rows:  # every stage measured: accuracy on a named split, params, bytes, MACs
        assert {"test_accuracy", "val_accuracy", "params", "bytes", "flops"} <= row.keys(), row["name"]
        assert row["split"] == "test"
    # latency: the baseline, the final model and the asked-for stage 1, timed together at the end
    timed = [r["name"] for r in rows if r.get("latency_batch_ms")]
    assert timed == ["baseline", "1. prune", "5. encode"]
    for row in (rows[0], rows[1], rows[-1]):
        runs = row["latency"]["batch"]
        assert len(runs["samples_ms"]) == 20 and runs["median_ms"] > 0
        assert runs["spread_ms"][0] <= runs["spread_ms"][1]
    markdown = (run / "out" / "report.md").read_text()
    assert markdown.startswith("# lenet300 on digits: Deep Compression, small (prune → fine_tune → "
                               "cluster → fine_tune → encode)")
    assert "latency b=256 (ms, " in markdown and "accuracy (test split)" in markdown
    assert "timed together at the end, interleaved" in markdown
    assert '1. `prune`: `{"per_layer": {"fc1": 0.8' in markdown
    assert rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
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
    from torchslim.apps.compress import CompressionRun

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
    from torchslim.apps.compress import CompressionRun
    from torchslim.errors import ConfigError

    recipe = parse_recipe({key: value for key, value in RECIPE.items() if key != "baseline"})
    with pytest.raises(ConfigError, match="add a `baseline:` block"):
        CompressionRun(recipe, tmp_path / "o", progress=False).run()


def test_factorize_cli_distils_from_the_original_and_writes_a_loadable_model(
        run: Path, tmp_path: Path, capsys) -> None:
    baseline = run / "out" / "stages" / "00-baseline.slim"
    out = tmp_path / "factorized"
    assert main(["factorize", str(baseline), "--dataset", "digits", "--linear-param-ratio", "0.4",
                 "--exclude", "fc3", "--epochs", "8", "--lr", "0.05", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["low_rank", "fine_tune"]
    assert report["stages"][1]["distill"]["teacher"] == "original"
    assert report["comparison"]["params_ratio"] > 2
    assert report["final"]["test_accuracy"] > report["baseline"]["test_accuracy"] - 0.03
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["low_rank"] == {
        "param_ratio": 0.4, "targets": {"exclude": ["fc3"], "types": ["Linear"]}}
    model = artifact.load(out / "model.slim")
    assert type(model.fc1).__name__ == "FactorizedLinear"
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.slim"), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["final"]["test_accuracy"]
    assert main(["bench", str(out / "model.slim"), "--batch", "8", "--repeats", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["median_ms"] > 0


def test_recipe_stages_select_layers_created_by_a_structural_stage(tmp_path: Path) -> None:
    recipe = {**RECIPE, "stages": [
        {"low_rank": {"rank": 8, "targets": {"names": ["fc1"]}}},
        {"prune": {"sparsity": 0.5, "targets": {"names": ["fc1.1"]}}},
        {"distill": {"epochs": 1, "lr": 0.01, "distill": {"alpha": 0.0, "temperature": 2}}},
    ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    model = artifact.load(tmp_path / "out" / "model.slim")
    weight = model.fc1[1].weight
    assert weight.shape == (300, 8)
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # kept while distilling


def test_quantize_and_qat_stages_end_in_an_int8_program(run: Path, tmp_path: Path, capsys) -> None:
    baseline = run / "out" / "stages" / "00-baseline.slim"
    recipe = {"version": 1, "dataset": "digits", "stages": [
        {"prune": {"sparsity": 0.5}},
        {"qat": {"epochs": 2, "lr": 0.01, "distill": {"alpha": 0.5}}}]}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(tmp_path / "q.yaml"), "--model", str(baseline),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["final"]["backend"] == "onnxruntime"
    assert report["stages"][-1]["qat"] and report["stages"][-1]["int8_ops"]
    assert report["final"]["test_accuracy"] > report["baseline"]["test_accuracy"] - 0.03
    assert report["comparison"]["bytes_ratio"] > 3
    capsys.readouterr()
    assert main(["quantize", str(baseline), "--method", "qat", "--calibration", "digits",
                 "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "int8 ops" in capsys.readouterr().out
    assert artifact.read_metadata(tmp_path / "cli" / "model.slim")["version"] == 2
    bad = {**recipe, "stages": [{"qat": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}]}
    with pytest.raises(Exception, match="must come last"):
        parse_recipe(bad)


def test_every_technique_chains_in_one_compress_call(run: Path, tmp_path: Path, capsys) -> None:
    """structured prune -> distilled fine-tune -> weight prune -> cluster -> quantize -> encode."""
    baseline = run / "out" / "stages" / "00-baseline.slim"
    stages = [{"structured_prune": {"ratio": 0.5}},
              {"fine_tune": {"epochs": 2, "lr": 0.05, "distill": {"teacher": "original"}}},
              {"prune": {"sparsity": 0.6}},
              {"cluster": {"bits": 5}},
              {"quantize": {"method": "static", "calibration_batches": 2}},
              {"encode": {"coder": "auto"}}]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump({"version": 1, "dataset": "digits",
                                                       "stages": stages}))
    assert main(["compress", str(tmp_path / "all.yaml"), "--model", str(baseline),
                 "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["baseline"] + [f"{i}. {next(iter(s))}"
                                                        for i, s in enumerate(stages, 1)]
    assert rows[1]["flops"] < 0.6 * rows[0]["flops"]  # channels really removed
    assert rows[3]["nonzero_params"] < 0.5 * rows[2]["nonzero_params"]
    assert rows[0]["latency_batch_ms"] > 0 and rows[-1]["latency_batch_ms"] > 0
    assert report["final"]["backend"] == "onnxruntime"
    assert report["final"]["test_accuracy"] > report["baseline"]["test_accuracy"] - 0.05
    final = tmp_path / "all" / "model.slim"
    runtime = artifact.read_metadata(final)["runtime"]
    assert runtime["program_coding"] == "zstd"
    plain = artifact.save(artifact.load(final), tmp_path / "plain.slim")  # the same program, uncoded
    assert final.stat().st_size < 0.8 * plain.stat().st_size
    capsys.readouterr()
    assert main(["evaluate", str(final), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["final"]["test_accuracy"]


def test_structured_prune_cli_removes_neurons_in_steps_and_writes_a_loadable_model(
        run: Path, tmp_path: Path, capsys) -> None:
    baseline = run / "out" / "stages" / "00-baseline.slim"
    out = tmp_path / "pruned"
    assert main(["prune", str(baseline), "--structured", "--ratio", "0.75", "--steps", "2",
                 "--dataset", "digits", "--epochs", "3", "--lr", "0.05", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["structured_prune", "fine_tune"] * 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["structured_prune"]["ratio"] == 0.5
    model = artifact.load(out / "model.slim")
    assert (model.fc1.out_features, model.fc2.in_features) == (75, 75)  # 300 -> 150 -> 75
    assert (model.fc2.out_features, model.fc3.in_features) == (25, 25)  # 100 -> 50 -> 25
    assert report["comparison"]["params_ratio"] > 3
    assert report["final"]["test_accuracy"] > report["baseline"]["test_accuracy"] - 0.05
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.slim"), "--dataset", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["final"]["test_accuracy"]
    assert main(["bench", str(out / "model.slim"), "--batch", "8", "--repeats", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "torch"


def test_structured_prune_stage_with_a_selection_matching_nothing_lists_the_prunable_layers(
        run: Path, tmp_path: Path) -> None:
    from torchslim.apps.compress import CompressionRun

    recipe = {**RECIPE, "stages": [{"structured_prune": {"ratio": 0.5, "targets": {"exclude": ["nope*"]}}}]}
    source = str(run / "out" / "stages" / "00-baseline.slim")
    with pytest.raises(SelectionError, match=r"\['nope\*'\] match no layer.*prunable layers: fc1"):
        CompressionRun(parse_recipe(recipe), tmp_path / "o", model_source=source, progress=False).run()
