"""Reports of a run: JSON for machines, Markdown for people, PNG plots, all reproducible.

Every report records how it was made (command, config, seed) and where (versions, CPU model,
thread count), so a number in it can be traced and re-run.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchslim import __version__
from torchslim.safefile import write_atomic

__all__ = [
    "environment",
    "format_table",
    "new_figure",
    "plot_training_curves",
    "save_figure",
    "write_report",
]

TABLE_COLUMNS = (
    ("accuracy", "accuracy", lambda v: f"{100 * v:.2f}%"),
    ("params", "params", lambda v: f"{int(v):,}"),
    ("nonzero_params", "non-zero", lambda v: f"{int(v):,}"),
    ("bytes", "bytes on disk", lambda v: f"{int(v):,}"),
    ("latency_b1_ms", "latency b=1 (ms)", lambda v: f"{v:.3f}"),
    ("latency_batch_ms", "latency batch (ms)", lambda v: f"{v:.2f}"),
    ("throughput", "samples/s", lambda v: f"{v:,.0f}"),
    ("flops", "MFLOPs", lambda v: f"{v / 1e6:.2f}"),
)


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and machine facts that a number depends on."""
    import numpy

    return {
        "torchslim": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(sys.argv),
    }


def format_table(rows: Sequence[dict[str, Any]], *, label: str = "model") -> str:
    """A Markdown table of the metrics the rows share, one row per model."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in row for row in rows)]
    header = f"| {label} | " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [fmt(row[key]) if row.get(key) is not None else "–" for key, _, fmt in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def new_figure(columns: int = 1, *, size: tuple[float, float] = (7, 4.5)) -> tuple[Any, Any]:
    """A headless (Agg) matplotlib figure and its axes; matplotlib is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG atomically and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch (train and validation) as a PNG."""
    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = new_figure(2, size=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    for axis, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    return save_figure(fig, path)


def write_report(out_dir: str | Path, report: dict[str, Any], *, title: str,
                 rows: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """Write `report.json`, `report.md` and (if there is a history) `training_curves.png`.

    `report` is any JSON-able dict; `environment()` is added under "environment" and the
    comparison `rows` are rendered as the Markdown table and stored under "rows".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "rows": list(rows), "environment": environment()}
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    history = report.get("history") or []
    if history:
        paths["curves"] = plot_training_curves(history, out / "training_curves.png")
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    write_atomic(paths["json"], lambda tmp: tmp.write_text(text + "\n"))
    lines = [f"# {title}", ""]
    if rows:
        lines += [format_table(rows), ""]
    if "curves" in paths:
        lines += ["![training curves](training_curves.png)", ""]
    env = report["environment"]
    lines += ["## How this was made", "",
              f"- command: `{env['command']}`",
              f"- seed: {report.get('seed', '–')}",
              f"- config: `{json.dumps(report.get('config', {}), sort_keys=True)}`",
              f"- torchslim {env['torchslim']}, torch {env['torch']}, Python {env['python']}",
              f"- CPU: {env['cpu']}, {env['threads']} threads", ""]
    markdown = "\n".join(lines)
    write_atomic(paths["markdown"], lambda tmp: tmp.write_text(markdown))
    return paths
