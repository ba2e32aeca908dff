"""`torchslim sensitivity`: the per-layer scan on a model's validation split, with its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchslim.pruning import plot_sensitivity, scan_sensitivity, sparsities_for_drop
from torchslim.report import environment
from torchslim.safefile import write_atomic

__all__ = ["run_sensitivity", "sensitivity_table"]


def sensitivity_table(scan: dict[str, Any]) -> str:
    """Markdown: one row per layer, validation accuracy at each sparsity."""
    header = "| layer | " + " | ".join(f"{100 * s:g}%" for s in scan["sparsities"]) + " |"
    lines = [f"unpruned validation accuracy: {100 * scan['baseline']:.2f}%", "", header,
             "|---|" + "---|" * len(scan["sparsities"])]
    for name, accuracies in scan["layers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in accuracies) + " |")
    return "\n".join(lines)


def run_sensitivity(source: str, *, dataset: str | None, out: str | Path,
                    sparsities: tuple[float, ...], max_drop: float, progress: bool = True,
                    workers: int | None = None, ray_address: str | None = None,
                    factory: str | None = None) -> dict[str, Any]:
    """Scan `source` (artifact, registered name or the user's `FILE.py:FUNCTION`) on the
    validation split of `dataset` (a built-in name or the user's data factory) and write
    sensitivity.{json,md,png}.

    `workers` > 1 or a `ray_address` runs the trials as Ray tasks (same numbers); the JSON
    records the backend, workers and wall-clock seconds under `execution`.
    """
    from torchslim.apps.run_data import resolve_run_data
    from torchslim.apps.workflows import load_model_or_artifact

    model, _ = load_model_or_artifact(source, factory=factory)
    spec = getattr(model, "torchslim_spec", None)
    data, dataset = resolve_run_data(dataset, spec.name if spec is not None else None, required=True)
    assert data is not None
    scan = scan_sensitivity(model, data.val_loader(),
                            sparsities=sparsities, progress=progress, workers=workers,
                            ray_address=ray_address)
    suggested = sparsities_for_drop(scan, max_drop)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**scan, "suggested": suggested, "max_drop": max_drop, "model": source,
              "dataset": dataset, "split": "val", "environment": environment()}
    text = json.dumps(result, indent=2, sort_keys=True)
    write_atomic(out / "sensitivity.json", lambda tmp: tmp.write_text(text + "\n"))
    table = sensitivity_table(scan)
    write_atomic(out / "sensitivity.md", lambda tmp: tmp.write_text(
        f"# Sensitivity of {source} on {dataset} (validation split)\n\n{table}\n\n"
        f"Suggested per-layer sparsities (drop <= {max_drop}): `{json.dumps(suggested)}`\n\n"
        "![sensitivity](sensitivity.png)\n"))
    plot_sensitivity(scan, out / "sensitivity.png")
    return {**result, "table": table}
