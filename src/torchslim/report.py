"""Reports of a run: JSON for machines, Markdown for people, PNG plots, all reproducible.

Every report records how it was made (command, config, seed) and where (versions, CPU model,
thread count), so a number in it can be traced and re-run.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchslim import __version__
from torchslim.safefile import write_atomic

__all__ = [
    "accuracy_axis_",
    "environment",
    "format_table",
    "legend_outside_",
    "log_axis_",
    "new_figure",
    "plot_training_curves",
    "save_figure",
    "table_notes",
    "text_overlaps",
    "write_report",
]

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("accuracy", "accuracy", lambda v: f"{100 * v:.2f}%"),
    ("val_accuracy", "accuracy (val split)", lambda v: f"{100 * v:.2f}%"),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("params", "params", lambda v: f"{int(v):,}"),
    ("nonzero_params", "non-zero", lambda v: f"{int(v):,}"),
    ("bytes", "bytes on disk", lambda v: f"{int(v):,}"),
    ("bits_per_weight", "bits/weight", lambda v: f"{v:.2f}"),
    ("latency_b1_ms", "latency b=1 (ms)", lambda v: f"{v:.3f}"),
    ("latency_batch_ms", "latency batch (ms)", lambda v: f"{v:.2f}"),
    ("throughput", "samples/s", lambda v: f"{v:,.0f}"),
    ("tokens_per_s", "decode tokens/s (b=1)", lambda v: f"{v:.1f}"),
    ("flops", "MFLOPs", lambda v: f"{v / 1e6:.2f}"),
)
NOISY = "⚠"  # marks a latency whose p90 / median exceeds measure.NOISY_P90_RATIO


def _shared(rows: Sequence[dict[str, Any]], key: str) -> Any:
    """The value of `key` that every row carrying it shares, else None."""
    values = {row[key] for row in rows if row.get(key) is not None}
    return values.pop() if len(values) == 1 else None


def _titles(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Column titles that say what the numbers were measured on: the accuracy's split, the
    latency's batch size and thread count."""
    titles = {key: title for key, title, _ in TABLE_COLUMNS}
    split, batch, threads = _shared(rows, "split"), _shared(rows, "latency_batch"), _shared(rows, "threads")
    if split:
        titles["accuracy"] = f"accuracy ({split} split)"
        titles["perplexity"] = f"perplexity ({split} split)"
    on = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    titles["latency_b1_ms"] = f"latency b=1 (ms{on})"
    if batch:
        titles["latency_batch_ms"] = f"latency b={batch} (ms{on})"
        titles["throughput"] = f"samples/s at b={batch}"
    return titles


def _cell(row: dict[str, Any], key: str, fmt: Any) -> str:
    if row.get(key) is None:
        return "–"
    text = str(fmt(row[key]))
    timed = (row.get("latency") or {}).get({"latency_b1_ms": "b1", "latency_batch_ms": "batch"}.get(key, ""))
    if isinstance(timed, dict) and timed.get("noisy"):
        text += f" {NOISY} p90 {timed['p90_ms']:.3g}"
    return text


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
    """A Markdown table of the metrics the rows share, one row per model.

    Titles carry the accuracy's split and the latency's batch size and threads; a latency whose
    runs spread widely (p90 / median > 1.5) is flagged with ⚠ and its p90.
    """
    columns = [c for c in TABLE_COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    titles = _titles(rows)
    header = f"| {label} | " + " | ".join(titles[key] for key, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [_cell(row, key, fmt) for key, _, fmt in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader must know to trust the table: where latency was timed, and which numbers
    are noisy."""
    from torchslim.measure import NOISY_P90_RATIO

    timed = [row for row in rows if row.get("latency")]
    notes = []
    if timed:
        runs = {len(t["samples_ms"]) for row in timed for t in row["latency"].values()}
        notes.append(f"Latency: {', '.join(row['name'] for row in timed)} timed together at the end, "
                     f"interleaved ({'/'.join(map(str, sorted(runs)))} runs each), median shown; "
                     "every run is in report.json under `latency`."
                     + (" Rows with – were not timed (recipe key `time_stages` adds them)."
                        if len(timed) < len(rows) else ""))
    if any(isinstance(t, dict) and t.get("noisy") for row in timed for t in row["latency"].values()):
        notes.append(f"{NOISY}: p90 / median > {NOISY_P90_RATIO}: the machine was busy while this "
                     "was timed; do not read a speed-up from it (rerun `torchslim bench` on a "
                     "quiet machine).")
    return notes


def new_figure(columns: int = 1, *, size: tuple[float, float] = (7, 4.5)) -> tuple[Any, Any]:
    """A headless (Agg) matplotlib figure and its axes; matplotlib is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


MIN_ACCURACY_SPAN = 1.0  # percentage points: a narrower axis makes noise look like a cliff
MARKERS = "osD^vP*Xph<>"


def sampling_noise(accuracy: float, samples: int | None) -> float | None:
    """The standard error of an accuracy measured on `samples` examples, in percentage points."""
    if not samples:
        return None
    return 100 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / samples)


def accuracy_axis_(axis: Any, accuracies: Sequence[float], *, baseline: float | None = None,
                   samples: int | None = None, label: str = "accuracy (%)") -> None:
    """An accuracy axis (values in %) that cannot exaggerate noise: it spans at least 1 point
    (or 6 standard errors of the evaluation, if wider), shows the baseline as a dashed line and,
    when the evaluation's size is known, its 95% sampling-noise band as a shaded strip."""
    values = [*accuracies, *([] if baseline is None else [baseline])]
    noise = sampling_noise(baseline / 100, samples) if baseline is not None else None
    span = max(MIN_ACCURACY_SPAN, 6 * noise if noise else 0.0)
    low, high = min(values), max(values)
    if high - low < span:
        middle = (high + low) / 2
        low, high = middle - span / 2, middle + span / 2
    pad = 0.08 * (high - low)
    axis.set_ylim(max(low - pad, -1.0), min(high + pad, 101.0))
    if baseline is not None:
        axis.axhline(baseline, color="0.35", linestyle="--", linewidth=1, label="baseline accuracy")
        if noise:
            axis.axhspan(baseline - 1.96 * noise, baseline + 1.96 * noise, color="0.85", alpha=0.6,
                         label=f"baseline ± sampling noise (95%, n={samples:,})")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    axis.tick_params(axis="x", pad=8)  # a y label at the bottom edge must not touch the x labels


def legend_outside_(axis: Any) -> None:
    """The legend to the right of the axes: entries never cover points or each other, however
    many there are (a column per 20 entries, the figure widened for each)."""
    handles, labels = axis.get_legend_handles_labels()
    columns = max(1, math.ceil(len(labels) / 20))
    if columns > 1:  # widen the figure rather than squeeze the axes
        width, height = axis.figure.get_size_inches()
        axis.figure.set_size_inches(width + 2.8 * (columns - 1), height)
    axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                fontsize=8, ncol=columns, frameon=False)


def _drawn_texts(fig: Any) -> list[Any]:
    """The texts of `fig` a reader sees: titles, axis labels, legend entries, annotations, and
    the tick labels whose ticks lie inside the axes' view (matplotlib keeps the others
    "visible" but does not draw them)."""
    from matplotlib.text import Text

    ticks = set()
    drawn = []
    for axes in fig.axes:
        for axis, position in ((axes.xaxis, 0), (axes.yaxis, 1)):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-9
            for label in axis.get_ticklabels(which="both"):
                ticks.add(id(label))
                if low - span <= label.get_position()[position] <= high + span:
                    drawn.append(label)
    seen = set(ticks)
    for artist in fig.findobj(Text):
        if id(artist) not in seen:  # some are reachable through more than one parent
            seen.add(id(artist))
            drawn.append(artist)
    return [text for text in drawn if text.get_visible() and str(text.get_text()).strip()]


def text_overlaps(fig: Any) -> list[tuple[str, str]]:
    """Pairs of drawn texts of `fig` whose boxes overlap (titles, axis and tick labels, legend
    entries, annotations): a plot a user can read has none."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(str(text.get_text()), text.get_window_extent(renderer)) for text in _drawn_texts(fig)]
    boxes = [(text, box) for text, box in boxes if box.width > 0 and box.height > 0]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a.overlaps(box_b)]


def log_axis_(axis: Any, which: str = "x") -> None:
    """A log scale labelled in plain numbers at 1, 2 and 5 of every decade (`20`, `50`, `100`,
    not `2x10^1`), so that a range of one decade still has labels and they never collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = axis.xaxis if which == "x" else axis.yaxis
    (axis.set_xscale if which == "x" else axis.set_yscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG atomically and release it; warns when labels overlap."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    overlapping = text_overlaps(fig)
    if overlapping:  # a plot whose labels collide is not one to put in a slide: say so
        log.warning("%s: %d overlapping labels, e.g. %r and %r", path.name, len(overlapping),
                    *overlapping[0])
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
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
                 rows: Sequence[dict[str, Any]] = (), settings: Sequence[str] = ()) -> dict[str, Path]:
    """Write `report.json`, `report.md` and (if there is a history) `training_curves.png`.

    `report` is any JSON-able dict; `environment()` is added under "environment" and the
    comparison `rows` are rendered as the Markdown table and stored under "rows". `title` says
    what was compressed and how; `settings` are Markdown lines for the choices that shaped the
    result (the recipe's stages, the method's options).
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
        lines += [f"{note}\n" for note in table_notes(rows)]
    if "curves" in paths:
        lines += ["![training curves](training_curves.png)", ""]
    if settings:
        lines += ["## Settings", "", *settings, ""]
    env = report["environment"]
    lines += ["## How this was made", "",
              f"- command: `{env['command']}`",
              f"- seed: {report.get('seed', '–')}"]
    if report.get("config"):
        lines.append(f"- config: `{json.dumps(report['config'], sort_keys=True)}`")
    lines += [f"- torchslim {env['torchslim']}, torch {env['torch']}, Python {env['python']}",
              f"- CPU: {env['cpu']}, {env['threads']} threads", ""]
    markdown = "\n".join(lines)
    write_atomic(paths["markdown"], lambda tmp: tmp.write_text(markdown))
    return paths
