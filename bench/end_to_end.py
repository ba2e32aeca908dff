"""Composition, automatic policy search and scaling out, measured end to end.

Sections (run all, or pick with `--only`):
- `minilm`: all-MiniLM-L6-v2 through structured pruning + distillation + int8; latency at batch 32 /
  seq 128 against fp32 eager, bytes on disk, UCI probe accuracy.
- `auto-lenet5`: `torchslim auto` on LeNet-5 with `--target size=50 --max-drop 0.2`.
- `auto-latency`: `torchslim auto` on the small ResNet (Fashion-MNIST) with `--target latency=2
  --max-drop 0.5`: int8 and structured-pruning candidates, latency measured per trial.
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

from distill_lowrank import SECTIONS, SentenceData, distil_embeddings, run_sections, section, trained_artifact
from structured import add_latency, head_ffn_shape, params

SECTIONS.clear()  # this file's sections only (the modules imported above registered theirs)
PROBE_SPLITS = 10  # the MiniLM probe is also averaged over this many splits into folds

# --------------------------------------------------------------------------- minilm
@section("minilm")
def minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    """all-MiniLM-L6-v2 -> half of the heads and 3/4 of every FFN's neurons removed
    (`--minilm-head-sparsity`, `--minilm-ffn-sparsity`) -> MSE distillation to the fp32 sentence
    embeddings -> int8 dynamic on onnxruntime -> saved with the program zstd-coded.

    One row per stage, each measured on the .slim file it saved, loaded back: bytes on disk and
    their ratio to fp32, UCI probe accuracy (5-fold over all 3000 sentences; on the first split, as
    before, and the mean over 10 splits) and its drop in points,
    cosine to fp32 on the 500 sentences distillation never sees, latency at batch 32 and 1 (seq 128)
    timed interleaved with fp32 eager. The learning rate is chosen among `--minilm-lr` by that
    held-out cosine, never by the probe. The last row says which of the issue's goals it meets.
    """
    import copy
    import time

    from torch import nn

    import torchslim as ts
    from torchslim.measure import probe_accuracy
    from torchslim.models import create_model, example_inputs, spec_of
    from torchslim.models.minilm import embed_texts
    from torchslim.pruning import ChannelPruning
    from torchslim.quantization import Quantization, quantize_model

    out = Path(args.out) / "minilm"
    data = SentenceData(args.minilm_seq_train)
    teacher = create_model("minilm").eval()
    teacher_val = embed_texts(teacher, data.val_texts)

    def heldout_cosine(model: nn.Module) -> float:
        return float(nn.functional.cosine_similarity(embed_texts(model, data.val_texts), teacher_val).mean())

    models: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []

    def stage(name: str, model: nn.Module, file: str, *, encoding: ts.Encoding | None = None,
              **extra: Any) -> None:
        path = ts.save(model, out / file, encoding=encoding)
        saved = models[name] = ts.load(path)
        embeddings = embed_texts(saved, data.texts)
        size, probe = path.stat().st_size, probe_accuracy(embeddings, data.labels)
        splits = probe_accuracy(embeddings, data.labels, repeats=PROBE_SPLITS)
        base = rows[0] if rows else {"bytes": size, "probe_accuracy": probe,
                                     f"probe_accuracy_{PROBE_SPLITS}_splits": splits}
        rows.append({"section": "minilm", "model": name, "file": path.name,
                     "params": getattr(saved, "weight_count", 0) or params(saved),
                     "bytes": size, "size_ratio": round(base["bytes"] / size, 2),
                     "probe_accuracy": round(probe, 4),
                     "probe_drop_pt": round(100 * (base["probe_accuracy"] - probe), 2),
                     f"probe_accuracy_{PROBE_SPLITS}_splits": round(splits, 4),
                     f"probe_drop_pt_{PROBE_SPLITS}_splits": round(
                         100 * (base[f"probe_accuracy_{PROBE_SPLITS}_splits"] - splits), 2),
                     "cosine_to_fp32_heldout": round(heldout_cosine(saved), 4), **extra})
        print(json.dumps(rows[-1]), flush=True)  # again with its latency at the end

    stage("minilm (fp32 eager)", teacher, "minilm-fp32.slim")
    pruned = copy.deepcopy(teacher)
    ts.apply_(pruned, ChannelPruning(ratio=0.0, per_layer={"*.attention.self": args.minilm_head_sparsity,
                                                           "*.intermediate.dense": args.minilm_ffn_sparsity}),
              example_inputs=example_inputs(spec_of(pruned), 2))
    shape = head_ffn_shape(pruned)
    trained: dict[float, tuple[float, nn.Module, float]] = {}
    for lr in args.minilm_lr:  # held-out cosine picks the learning rate
        student = copy.deepcopy(pruned)
        minutes = distil_embeddings(student, teacher, data, epochs=args.minilm_epochs, lr=lr)
        trained[lr] = (heldout_cosine(student), student, minutes)
    lr = max(trained, key=lambda key: trained[key][0])
    _, student, minutes = trained[lr]
    stage(f"pruned ({shape}) + distilled {args.minilm_epochs} ep, lr {lr:g}", student,
          "minilm-pruned-distilled.slim", train_minutes=minutes,
          heldout_cosine_by_lr={f"{key:g}": round(value[0], 4) for key, value in trained.items()})
    start = time.perf_counter()
    int8 = quantize_model(student, Quantization(method="dynamic"),
                          example_inputs=example_inputs(spec_of(student), 2))
    convert_s = round(time.perf_counter() - start, 1)
    stage("+ int8 dynamic (onnxruntime)", int8, "minilm-pruned-int8.slim", convert_s=convert_s,
          int8_ops=int8.report["int8_ops"], float_ops=len(int8.report["float_ops"]))
    stage("+ int8, saved encoded (zstd program)", int8, "minilm-pruned-int8-encoded.slim",
          encoding=ts.Encoding())
    spec = spec_of(teacher)
    add_latency(rows, models, {"b1": example_inputs(spec, 1), "b32": example_inputs(spec, 32)},
                argparse.Namespace(rounds=args.minilm_rounds, repeats=args.minilm_repeats))
    final = rows[-1]
    goals = {"speedup_b32_at_least_4x": final["speedup_b32"] >= 4,
             "size_ratio_at_least_6x": final["size_ratio"] >= 6,
             "probe_drop_at_most_1.5pt": final["probe_drop_pt"] <= 1.5}
    final.update(goals)
    print(json.dumps({"section": "minilm", "goals": goals}), flush=True)
    return rows


# --------------------------------------------------------------------------- auto-lenet5
def auto_rows(report: dict[str, Any], name: str, epochs: int) -> list[dict[str, Any]]:
    """One row per trial and one for the chosen policy's final run, on the report's target."""
    kind = report["target"]["kind"]
    rows = []
    for index, trial in enumerate(report["trials"]):
        rows.append({"section": name, "model": f"trial {index}, {epochs} ep", "predicted": trial["predicted"],
                     f"{kind}_ratio": round(trial["ratios"][kind], 2), "bytes": trial["bytes"],
                     "val_drop_pt": round(100 * (trial["baseline_val_accuracy"] - trial["val_accuracy"]), 2),
                     "on_front": index in report["front"], "chosen": index == report["chosen"],
                     "seconds": round(trial["seconds"])})
    final = report["final"]
    rows.append({"section": name, "model": f"chosen policy, {report['final_epochs']} ep",
                 f"{kind}_ratio": round(final["ratios"][kind], 2), "bytes": final["bytes"],
                 "val_drop_pt": round(final["val_drop_points"], 2),
                 "test_accuracy": final["test_accuracy"], "test_drop_pt": round(final["test_drop_points"], 2),
                 "baseline_test_accuracy": final["baseline_test_accuracy"],
                 "meets_target": final["meets_target"], "meets_max_drop_val": final["meets_max_drop"],
                 "search_seconds": round(report["total_seconds"]), **report["search"]})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


@section("auto-latency")
def auto_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`torchslim auto --target latency=R` on the small ResNet (Fashion-MNIST): int8 and pruning."""
    from torchslim.apps.auto import Target, auto_compress

    source = trained_artifact(args.auto_latency_model, "resnet-small", "fashion-mnist")
    report = auto_compress(str(source), target=Target.parse(args.auto_latency_target),
                           max_drop=args.auto_latency_max_drop / 100, out=Path(args.out) / "auto-latency",
                           trials=args.auto_trials, epochs=args.auto_latency_epochs,
                           final_epochs=args.auto_latency_final_epochs, progress=False)
    return auto_rows(report, "auto-latency", args.auto_latency_epochs)


@section("auto-lenet5")
def auto_lenet5(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`torchslim auto` on the trained LeNet-5: every trial, then the chosen policy's final run."""
    from torchslim.apps.auto import Target, auto_compress

    source = trained_artifact(args.lenet5, "lenet5", "mnist")
    target = Target.parse(args.auto_target)
    report = auto_compress(str(source), target=target, max_drop=args.auto_max_drop / 100,
                           out=Path(args.out) / "auto-lenet5", trials=args.auto_trials,
                           epochs=args.auto_epochs, final_epochs=args.auto_final_epochs,
                           workers=args.auto_workers, progress=False)
    return auto_rows(report, "auto-lenet5", args.auto_epochs)



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

    source = trained_artifact(args.ray_model, "lenet5", "mnist")
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
    parser.add_argument("--auto-trials", type=int, default=2)
    parser.add_argument("--auto-epochs", type=int, default=2, help="training epochs per trial")
    parser.add_argument("--auto-final-epochs", type=int, default=None,
                        help="epochs for the chosen policy's final run (default: keep the trial)")
    parser.add_argument("--auto-latency-model", default="runs/bench-foundation/resnet-small/model.slim",
                        help="auto-latency: trained resnet-small artifact (trained here if missing)")
    parser.add_argument("--auto-latency-target", default="latency=2")
    parser.add_argument("--auto-latency-max-drop", type=float, default=0.5, help="points")
    parser.add_argument("--auto-latency-epochs", type=int, default=1, help="training epochs per trial")
    parser.add_argument("--auto-latency-final-epochs", type=int, default=3)
    parser.add_argument("--auto-workers", type=int, default=None, help="Ray workers for the trials")
    parser.add_argument("--ray-model", default="runs/bench-foundation/lenet5/model.slim",
                        help="ray-scan: trained LeNet-5 artifact (trained here if missing)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="ray-scan: CPUs of the local Ray")
    parser.add_argument("--ray-repeats", type=int, default=3, help="ray-scan: timed rounds")
    # 10 epochs at 3e-4, chosen by held-out cosine: 0.884 after 10 epochs (0.875 after 5, the last
    # 3 epochs adding 0.003), against 0.873 for 1e-3 after 7 of 10 and 0.819 for 3 epochs at 1e-4.
    parser.add_argument("--minilm-epochs", type=int, default=10, help="minilm: distillation epochs")
    parser.add_argument("--minilm-lr", type=float, nargs="+", default=[3e-4],
                        help="minilm: learning rates tried; held-out cosine picks one")
    parser.add_argument("--minilm-seq-train", type=int, default=48, help="minilm: token cap when distilling")
    # The structured-pruning issue's cut (1/3 of the heads, half of each FFN) gives 3.3x at batch 32
    # after int8, short of this goal's 4x; of the two cuts timed, half of the heads and 3/4 of each
    # FFN is the one that reaches it (5.2x). Chosen on latency, the goal it serves, not on the probe.
    parser.add_argument("--minilm-head-sparsity", type=float, default=0.5,
                        help="minilm: fraction of every layer's attention heads removed")
    parser.add_argument("--minilm-ffn-sparsity", type=float, default=0.75,
                        help="minilm: fraction of every FFN's neurons removed")
    parser.add_argument("--minilm-rounds", type=int, default=9, help="minilm: interleaved latency rounds")
    parser.add_argument("--minilm-repeats", type=int, default=5, help="minilm: timed runs per round")
    run_sections(parser.parse_args())


if __name__ == "__main__":
    main()
