"""`torchslim auto`: target parsing, the greedy walk, the front, and real end-to-end searches."""

import json
from pathlib import Path

import pytest
import yaml

from torchslim.apps.auto import SizeModel, Target, auto_compress, greedy_path, pareto_front
from torchslim.apps.auto.search import choose, latency_plan
from torchslim.cli import main
from torchslim.errors import ConfigError


def test_target_parses_kind_and_ratio_and_rejects_bad_text() -> None:
    assert Target.parse("size=50") == Target("size", 50.0)
    assert Target.parse("latency=1.5") == Target("latency", 1.5)
    for bad in ("size", "speed=2", "macs=0.5", "size=fifty"):
        with pytest.raises(ConfigError, match="KIND=RATIO"):
            Target.parse(bad)


def _size_model() -> SizeModel:
    # "big" saves many bytes for little damage; "small" is sensitive and holds few bytes.
    return SizeModel(
        sparsities=[0.0, 0.5, 0.9], bits=[8, 4],
        prune_drop={"big": [0.0, 0.0, 0.002], "small": [0.0, 0.05, 0.2]},
        bits_drop={"big": [0.0, 0.001], "small": [0.0, 0.03]},
        bytes={"big": [[1000, 500], [500, 250], [100, 50]], "small": [[100, 50], [50, 25], [10, 5]]},
        other_bytes=50, dense_bytes=4400, layers=["big", "small"])


def test_greedy_walk_spends_the_drop_budget_on_the_cheapest_bytes_first() -> None:
    path = greedy_path(_size_model(), max_ratio=20)
    ratios = [ratio for ratio, _, _ in path]
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(4400 / 1150)
    first_moves = [p.sparsity["big"] > 0 or p.bits["big"] < 8 for _, _, p in path[1:3]]
    assert all(first_moves)  # the insensitive, heavy layer goes first
    assert path[-1][0] >= 20 or len(path) == 1 + 2 * 2  # reached the goal or ran out of moves
    last = path[-1][2]
    assert last.sparsity["big"] == 0.9 and last.bits["big"] == 4


def test_front_and_choice_use_ratio_and_validation_only() -> None:
    base = {"baseline_val_accuracy": 0.99}
    results = [{**base, "ratios": {"size": 40.0}, "val_accuracy": 0.989},
               {**base, "ratios": {"size": 52.0}, "val_accuracy": 0.988},
               {**base, "ratios": {"size": 51.0}, "val_accuracy": 0.980},  # dominated by 1
               {**base, "ratios": {"size": 60.0}, "val_accuracy": 0.985}]
    assert pareto_front(results, "size") == [0, 1, 3]
    assert choose(results, Target("size", 50), max_drop=0.002) == (1, True)
    assert choose(results, Target("size", 55), max_drop=0.002) == (3, False)  # closest miss
    assert choose(results, Target("size", 70), max_drop=0.002) == (3, False)


def test_latency_plan_lowers_the_int8_cuts_by_the_measured_int8_speedup() -> None:
    plan = latency_plan(2.0, 4, int8_speedup=2.0)
    int8 = [cut for is_int8, cut in plan if is_int8]
    fp32 = [cut for is_int8, cut in plan if not is_int8]
    assert len(int8) == len(fp32) == 2
    assert min(fp32) >= 2.0 * 1.25 * 0.9  # fp32 cuts aim past the target by themselves
    assert sorted(int8) == sorted(round(max(1.0, c / 2.0), 3) for c in fp32)
    assert latency_plan(2.0, 1, int8_speedup=3.0) == [(True, 1.0)]  # int8 alone is enough: no pruning
    assert all(not is_int8 for is_int8, _ in latency_plan(2.0, 3, int8_speedup=1.0))  # int8 no faster
    assert len(latency_plan(2.0, 3, int8_speedup=1.0)) == 3
    assert latency_plan(1.5, 4, int8_speedup=10.0) == [(True, 1.0), (False, 1.931), (False, 2.438)]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("auto")
    assert main(["train", "--model", "lenet300", "--dataset", "digits", "--out", str(folder / "base"),
                 "--epochs", "3", "--lr", "0.1", "--no-progress"]) == 0
    return folder / "base" / "model.slim"


def test_auto_size_search_reaches_its_prediction_and_writes_a_rerunnable_recipe(digits_model: Path,
                                                                                tmp_path: Path) -> None:
    report = auto_compress(str(digits_model), target=Target("size", 12), max_drop=0.05,
                           out=tmp_path / "auto", trials=2, epochs=1, progress=False,
                           sparsity_levels=(0.5, 0.8, 0.9), bit_levels=(6, 4))
    assert len(report["trials"]) == 2
    for trial in report["trials"]:  # the bytes model predicts the real file within 5%
        assert trial["ratios"]["size"] == pytest.approx(trial["predicted"]["size"], rel=0.05)
    assert report["front"] and report["chosen"] in range(2)
    assert report["final"]["meets_target"] and report["final"]["meets_max_drop"]
    assert report["total_seconds"] >= report["trials_seconds"] > 0
    out = tmp_path / "auto"
    for name in ("model.slim", "auto.json", "auto.md", "front.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [next(iter(s)) for s in recipe["stages"]] == ["gradual_prune", "cluster", "fine_tune", "encode"]
    # Rerunning the written recipe reproduces the chosen model's size exactly.
    assert main(["compress", str(out / "recipe.yaml"), "--model", str(digits_model), "--out",
                 str(tmp_path / "rerun"), "--no-progress"]) == 0
    rerun = json.loads((tmp_path / "rerun" / "report.json").read_text())
    assert rerun["final"]["bytes"] == report["final"]["bytes"]
    assert rerun["final"]["val_accuracy"] == pytest.approx(report["final"]["val_accuracy"])


def test_auto_cli_macs_target_prunes_channels(digits_model: Path, tmp_path: Path, capsys) -> None:
    code = main(["auto", "--model", str(digits_model), "--target", "macs=2", "--max-drop", "5",
                 "--out", str(tmp_path / "macs"), "--trials", "1", "--epochs", "1", "--no-progress"])
    report = json.loads((tmp_path / "macs" / "auto.json").read_text())
    final = report["final"]
    assert final["ratios"]["macs"] >= 2
    assert code == (0 if final["meets_max_drop"] else 1)
    assert "chosen: trial 0 of 1" in capsys.readouterr().out


def test_auto_latency_search_measures_int8_and_times_every_trial(digits_model: Path,
                                                                  tmp_path: Path) -> None:
    report = auto_compress(str(digits_model), target=Target("latency", 1.5), max_drop=0.05,
                           out=tmp_path / "latency", trials=2, epochs=1, progress=False)
    speedup = report["search"]["int8_speedup"]
    assert speedup > 0 and "int8_error" not in report["search"]  # LeNet-300 quantizes
    int8_trials = [r for r in report["trials"] if r["predicted"]["int8"]]
    assert len(int8_trials) == (1 if speedup >= 1.05 else 0)
    for r in report["trials"]:
        assert r["ratios"]["latency"] > 0 and 0 < r["val_accuracy"] <= 1
        rows = json.loads((Path(r["out"]) / "report.json").read_text())["rows"]
        assert rows[-1]["name"].endswith("quantize") == r["predicted"]["int8"]
    recipe = yaml.safe_load((tmp_path / "latency" / "recipe.yaml").read_text())
    chosen = report["trials"][report["chosen"]]
    assert (recipe["stages"][-1] == {"quantize": {"method": "static"}}) == chosen["predicted"]["int8"]
    assert (tmp_path / "latency" / "model.slim").is_file()
    text = (tmp_path / "latency" / "auto.md").read_text()
    assert f"{speedup:g}x faster than fp32" in text and "Final run (1 epochs)" not in text


def test_auto_rejects_a_bad_target_before_any_work(digits_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["auto", "--model", str(digits_model), "--target", "size=1", "--max-drop", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--target must be KIND=RATIO" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
