import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchslim.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--model", "lenet300", "--dataset", "digits", "--epochs", "3",
                 "--optimizer", "adamw", "--lr", "0.003", "--schedule", "cosine",
                 "--warmup-epochs", "0.5", "--no-progress", "--threads", "1", "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_artifact_report_and_plot(trained: Path) -> None:
    report = json.loads((trained / "report.json").read_text())
    assert 0.85 < report["test_accuracy"] <= 1.0
    assert report["config"]["optimizer"] == "adamw" and report["config"]["epochs"] == 3
    assert report["environment"]["command"] and report["seed"] == 0
    assert len(report["history"]) == 3
    assert (trained / "model.slim").stat().st_size == report["metrics"]["bytes"]
    assert (trained / "training_curves.png").is_file()
    assert "| lenet300 trained (3 epochs) |" in (trained / "report.md").read_text()


def test_evaluate_json_has_the_documented_keys(trained: Path, capsys) -> None:
    assert main(["evaluate", str(trained / "model.slim"), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((trained / "report.json").read_text())
    assert result["accuracy"] == report["test_accuracy"]
    assert result["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert result["bytes"] == (trained / "model.slim").stat().st_size
    assert result["flops"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)


def test_bench_json_reports_latency_for_artifacts_and_names(trained: Path, capsys) -> None:
    for source in (str(trained / "model.slim"), "lenet5"):
        assert main(["bench", source, "--batch", "4", "--threads", "1", "--repeats", "5",
                     "--warmup", "1", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["batch_size"] == 4 and result["threads"] == 1
        assert 0 < result["median_ms"] <= result["p90_ms"] and result["throughput"] > 0


def test_bench_runs_a_float_artifact_on_onnxruntime(trained: Path, capsys) -> None:
    source = str(trained / "model.slim")
    for flags, backend in (([], "torch"), (["--onnxruntime"], "onnxruntime")):
        assert main(["bench", source, "--batch", "2", "--threads", "1", "--repeats", "3",
                     "--warmup", "1", "--json", *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["backend"] == backend and result["median_ms"] > 0


def test_bad_input_is_one_line_not_a_traceback(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "no-such-model"]) == 2
    assert "known models" in capsys.readouterr().err
    broken = tmp_path / "broken.slim"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["evaluate", str(broken), "--json"]) == 2
    err = capsys.readouterr().err
    assert "not a readable torchslim file" in err and "Traceback" not in err
    assert main(["evaluate", "lenet5", "--dataset", "digits"]) == 2
    assert "expects (1, 28, 28)" in capsys.readouterr().err
    assert main(["train", "--model", "lenet300", "--dataset", "digits", "--epochs", "1",
                 "--lr", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "lr: Input should be greater than 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: usage and the reason, exit status 2
        main(["prune", "--model", "lenet300", "--structured", "--ratio", "0.5", "--round-to", "sixteen",
              "--out", str(tmp_path / "y")])
    assert "'sixteen' is not a positive integer or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_console_script_help_lists_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "torchslim", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "evaluate", "bench", "demo"):
        assert command in result.stdout
