"""Plots a user can put in a slide: no overlapping labels at any number of stages or layers,
the baseline drawn, and an accuracy axis that does not blow noise up into a cliff."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from torchslim.apps.compress import plot_frontier
from torchslim.pruning.sensitivity import plot_sensitivity
from torchslim.report import accuracy_axis_, format_table, new_figure, table_notes, text_overlaps


def _stages(count: int) -> list[dict]:
    rows = [{"name": "baseline", "bytes": 1_070_000, "test_accuracy": 0.9830, "samples": 10_000,
             "latency_batch_ms": 2.1, "latency_batch": 256, "threads": 2}]
    size = 1_070_000.0
    for index in range(1, count + 1):
        size /= 1.7 if index % 2 else 1.0  # fine-tuning stages keep the size: points coincide
        rows.append({"name": f"{index}. {'prune' if index % 2 else 'fine_tune'}", "bytes": size,
                     "test_accuracy": 0.9830 - 0.0002 * (index % 3), "samples": 10_000})
    rows[-1]["latency_batch_ms"] = 1.3
    return rows


def test_the_overlap_check_finds_colliding_labels() -> None:
    fig, axis = new_figure()
    axis.annotate("1. fine_tune", (1, 1))
    axis.annotate("2. fine_tune", (1, 1))
    assert ("1. fine_tune", "2. fine_tune") in text_overlaps(fig)


@pytest.mark.parametrize("stages", [3, 12, 30])
def test_stage_plots_have_no_overlapping_labels(stages: int, tmp_path: Path, caplog) -> None:
    rows = _stages(stages)
    with caplog.at_level(logging.WARNING, logger="torchslim.report"):
        plot_frontier(rows, tmp_path / "size.png", x="bytes", title="lenet300 on mnist")
        plot_frontier(rows, tmp_path / "latency.png", x="latency_batch_ms", title="lenet300 on mnist")
    assert "overlapping labels" not in caplog.text
    assert (tmp_path / "size.png").stat().st_size > 10_000


def test_sensitivity_plot_of_many_layers_has_no_overlapping_labels(tmp_path: Path, caplog) -> None:
    layers = {f"features.{i}.conv.{j}": [0.98, 0.97 - 0.001 * i, 0.9 - 0.01 * j]
              for i in range(17) for j in range(3)}
    scan = {"baseline": 0.98, "sparsities": [0.5, 0.9, 0.98], "layers": layers, "samples": 5000}
    with caplog.at_level(logging.WARNING, logger="torchslim.report"):
        plot_sensitivity(scan, tmp_path / "sensitivity.png")
    assert "overlapping labels" not in caplog.text


def test_accuracy_axis_spans_at_least_a_point_and_shows_the_baseline() -> None:
    _, axis = new_figure()
    axis.scatter([1, 2], [98.30, 98.26])
    accuracy_axis_(axis, [98.30, 98.26], baseline=98.30, samples=10_000)
    low, high = axis.get_ylim()
    assert high - low >= 1.0  # a 0.04-point difference stays a small one
    labels = axis.get_legend_handles_labels()[1]
    assert "baseline accuracy" in labels
    assert any("sampling noise" in label and "n=10,000" in label for label in labels)


def test_table_titles_say_batch_threads_and_split_and_flag_noisy_latency() -> None:
    timed = {"b1": {"noisy": False, "p90_ms": 0.3, "samples_ms": [0.29] * 20},
             "batch": {"noisy": True, "p90_ms": 276.0, "samples_ms": [0.29] * 20}}
    rows = [{"name": "baseline", "accuracy": 0.98, "split": "test", "latency_b1_ms": 0.29,
             "latency_batch_ms": 0.29, "latency_batch": 256, "threads": 2, "latency": timed},
            {"name": "1. prune", "accuracy": 0.97, "split": "test"}]
    table = format_table(rows)
    assert "accuracy (test split)" in table
    assert "latency b=256 (ms, 2 threads)" in table and "latency b=1 (ms, 2 threads)" in table
    assert "⚠ p90 276" in table
    notes = " ".join(table_notes(rows))
    assert "interleaved" in notes and "⚠" in notes and "time_stages" in notes
