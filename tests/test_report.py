import json
from pathlib import Path

from torchslim.report import environment, format_table, write_report


def test_report_files_record_environment_rows_and_curves(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_accuracy": 0.5 + e / 10,
                "val_loss": 1.1 / (e + 1), "val_accuracy": 0.5 + e / 11} for e in range(3)]
    rows = [{"name": "before", "accuracy": 0.5, "params": 1000, "bytes": 4000},
            {"name": "after", "accuracy": 0.49, "params": 250, "bytes": 1000}]
    paths = write_report(tmp_path, {"seed": 7, "config": {"lr": 0.1}, "history": history},
                         title="t", rows=rows)
    data = json.loads(paths["json"].read_text())
    assert data["seed"] == 7 and data["rows"] == rows
    assert {"torch", "cpu", "threads", "command", "python"} <= set(data["environment"])
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| after | 49.00% | 250 | 1,000 |" in markdown and "seed: 7" in markdown


def test_table_marks_missing_values() -> None:
    table = format_table([{"name": "a", "accuracy": 0.5}, {"name": "b", "params": 3}])
    assert "| a | 50.00% | – |" in table and "| b | – | 3 |" in table


def test_environment_names_the_cpu() -> None:
    assert environment()["cpu"]
