"""Composition, automatic policy search and scaling out, measured end to end.

Sections (run all, or pick with `--only`):
- `minilm`: all-MiniLM-L6-v2 through structured pruning + distillation + int8; latency at batch 32 /
  seq 128 against fp32 eager, bytes on disk, UCI probe accuracy.
- `auto-lenet5`: `torchslim auto` on LeNet-5 with `--target size=50 --max-drop 0.2`.
- `ray-scan`: the sensitivity scan with 1 and 2 Ray workers (wall-clock speedup).

Every ratio compares against a baseline measured in the same run (medians); model choices use
the validation split only. Run:
`python bench/end_to_end.py --out runs/bench-end-to-end [--only minilm auto-lenet5 ray-scan]`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from distill_lowrank import SECTIONS, run_sections, section

# --------------------------------------------------------------------------- minilm

# --------------------------------------------------------------------------- auto-lenet5
@section("auto-lenet5")
def auto_lenet5(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`torchslim auto` on the trained LeNet-5: every trial, then the chosen policy's final run."""
    from torchslim.auto import Target, auto_compress
    from torchslim.workflows import train_config_for, train_model

    source = Path(args.lenet5)
    if not source.is_file():
        train_model("lenet5", dataset="mnist", out=source.parent, config=train_config_for("lenet5"),
                    progress=False)
    target = Target.parse(args.auto_target)
    report = auto_compress(str(source), target=target, max_drop=args.auto_max_drop / 100,
                           out=Path(args.out) / "auto-lenet5", trials=args.auto_trials,
                           epochs=args.auto_epochs, final_epochs=args.auto_final_epochs,
                           workers=args.auto_workers, progress=False)
    rows = []
    for index, trial in enumerate(report["trials"]):
        rows.append({"section": "auto-lenet5", "model": f"trial {index}, {args.auto_epochs} ep",
                     "predicted_ratio": trial["predicted"].get("size"),
                     "size_ratio": round(trial["ratios"]["size"], 2), "bytes": trial["bytes"],
                     "val_drop_pt": round(100 * (trial["baseline_val_accuracy"] - trial["val_accuracy"]), 2),
                     "on_front": index in report["front"], "chosen": index == report["chosen"],
                     "seconds": round(trial["seconds"])})
    final = report["final"]
    rows.append({"section": "auto-lenet5", "model": f"chosen policy, {report['final_epochs']} ep",
                 "size_ratio": round(final["ratios"]["size"], 2), "bytes": final["bytes"],
                 "val_drop_pt": round(final["val_drop_points"], 2),
                 "test_accuracy": final["test_accuracy"], "test_drop_pt": round(final["test_drop_points"], 2),
                 "baseline_test_accuracy": final["baseline_test_accuracy"],
                 "meets_target": final["meets_target"], "meets_max_drop_val": final["meets_max_drop"],
                 "search_seconds": round(report["total_seconds"])})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows



# --------------------------------------------------------------------------- ray-scan
@section("ray-scan")
def ray_scan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """LeNet-5's sensitivity scan (MNIST validation split, 4 layers x 6 sparsities = 24 trials)
    in-process and on one local Ray with `--ray-cpus` CPUs, 1 and 2 tasks in flight.

    Ray starts once, before timing; one warm-up scan per setup (worker start, imports), then
    `--ray-repeats` rounds with the setups interleaved so load from other jobs hits all alike.
    Rows: median wall-clock seconds, speedup against 1 Ray worker and against in-process, and
    whether every accuracy equals the in-process scan's.
    """
    import logging
    import statistics
    import time

    import ray

    import torchslim as ts
    from torchslim.data import TensorLoader, load_dataset
    from torchslim.workflows import train_config_for, train_model

    source = Path(args.ray_model)
    if not source.is_file():
        train_model("lenet5", dataset="mnist", out=source.parent, config=train_config_for("lenet5"),
                    progress=False)
    model = ts.load(source).eval()
    val = TensorLoader(load_dataset("mnist").val, batch_size=1000)
    tick = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - tick
    address = ray.get_runtime_context().gcs_address  # run_trials reuses this live instance
    setups: dict[str, dict[str, Any]] = {
        "in-process": {},
        "ray, 1 worker": {"workers": 1, "ray_address": address},
        "ray, 2 workers": {"workers": 2, "ray_address": address},
    }
    times, scans = _time_scans(model, val, setups, repeats=args.ray_repeats)
    ray.shutdown()
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = scans["in-process"]
    rows = [{"section": "ray-scan", "model": f"lenet5 scan, {name}", "scan_s": round(medians[name], 2),
             "scan_s_all": [round(t, 1) for t in times[name]],
             "speedup_vs_1_worker": round(medians["ray, 1 worker"] / medians[name], 2),
             "speedup_vs_in_process": round(medians["in-process"] / medians[name], 2),
             "identical": (scans[name]["layers"] == reference["layers"]
                           and scans[name]["baseline"] == reference["baseline"]),
             "ray_start_s": round(ray_start, 1), "cpus": args.ray_cpus,
             "trials": sum(len(c) for c in reference["layers"].values())} for name in setups]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _time_scans(model: Any, val: Any, setups: dict[str, dict[str, Any]], *,
                repeats: int) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Wall-clock seconds of each setup's scan over `repeats` interleaved rounds (after one
    untimed warm-up each), and each setup's last scan."""
    from torchslim.pruning import scan_sensitivity

    scans = {name: scan_sensitivity(model, val, progress=False, **options)  # warm-up
             for name, options in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, options in setups.items():
            scans[name] = scan_sensitivity(model, val, progress=False, **options)
            times[name].append(scans[name]["execution"]["seconds"])
    return times, scans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-end-to-end")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lenet5", default="runs/bench-foundation/lenet5/model.slim",
                        help="trained LeNet-5 artifact (trained here if missing)")
    parser.add_argument("--auto-target", default="size=50")
    parser.add_argument("--auto-max-drop", type=float, default=0.2, help="points")
    parser.add_argument("--auto-trials", type=int, default=4)
    parser.add_argument("--auto-epochs", type=int, default=2, help="training epochs per trial")
    parser.add_argument("--auto-final-epochs", type=int, default=10)
    parser.add_argument("--auto-workers", type=int, default=None, help="Ray workers for the trials")
    parser.add_argument("--ray-model", default="runs/bench-foundation/lenet5/model.slim",
                        help="ray-scan: trained LeNet-5 artifact (trained here if missing)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="ray-scan: CPUs of the local Ray")
    parser.add_argument("--ray-repeats", type=int, default=3, help="ray-scan: timed rounds")
    run_sections(parser.parse_args())


if __name__ == "__main__":
    main()
