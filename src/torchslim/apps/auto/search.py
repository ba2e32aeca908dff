"""`torchslim auto`: state a target and an accuracy budget, get a policy, its recipe and the front.

Candidates are recipes. For a size target they come from the greedy walk on measured
sensitivity (`allocation`): per-layer sparsity and codebook bits, pruned gradually while
training, clustered, fine-tuned and entropy coded. For a MAC or latency target they are global
structured pruning at a ladder of MAC cuts, fine-tuned with distillation from the original; for
a latency target, half of them also end in static int8 on onnxruntime, their MAC cut lowered by
the int8 speedup measured on the unpruned model (none when int8 is not faster there).
Each candidate is scored by running its recipe with a short budget (a trial, in-process or a Ray
task); choices use the validation split only. The chosen recipe is then run with the full
budget, and written as YAML the user can rerun with `torchslim compress`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchslim import artifact
from torchslim.apps.run_data import learn_inputs_, resolve_run_data
from torchslim.data import Dataset, TensorLoader
from torchslim.errors import ConfigError
from torchslim.measure import evaluate
from torchslim.safefile import write_atomic

__all__ = ["Target", "auto_compress", "pareto_front", "run_candidate"]

TARGET_KINDS = ("size", "latency", "macs")


@dataclass(frozen=True)
class Target:
    """`size=50`: a 50x smaller file; `macs=2`: half the MACs; `latency=1.5`: 1.5x faster."""

    kind: str
    ratio: float

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, _, value = text.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = float("nan")
        if kind not in TARGET_KINDS or not ratio > 1:
            raise ConfigError(f"--target must be KIND=RATIO with KIND one of {', '.join(TARGET_KINDS)} "
                              f"and RATIO > 1 (e.g. size=50: a 50x smaller file), got {text!r}")
        return cls(kind, ratio)


@dataclass(frozen=True)
class Candidate:
    """One recipe to score: what the search predicted for it, and where its trial runs."""

    recipe: dict[str, Any]
    source: str
    out: str
    timing: bool
    predicted: dict[str, float] = field(default_factory=dict)
    factory: str | None = None  # rebuilds a user's model from its artifacts (see CompressionRun)


def run_candidate(candidate: Candidate) -> dict[str, Any]:
    """Run one candidate's recipe (resuming finished stages) and return its measurements.

    A top-level function of plain data in, plain data out, so it runs as a Ray task too.
    """
    from torchslim.apps.compress import CompressionRun
    from torchslim.apps.recipe import parse_recipe

    started = time.perf_counter()
    run = CompressionRun(parse_recipe(candidate.recipe), candidate.out, model_source=candidate.source,
                         resume=True, progress=False, timing=candidate.timing, factory=candidate.factory)
    report = run.run()
    base, final = report["baseline"], report["final"]
    ratios = {"size": base["dense_bytes"] / final["bytes"], "macs": base["flops"] / final["flops"]}
    if candidate.timing:
        ratios["latency"] = base["latency_batch_ms"] / final["latency_batch_ms"]
    return {"out": candidate.out, "predicted": candidate.predicted, "ratios": ratios,
            "val_accuracy": final["val_accuracy"], "test_accuracy": final["test_accuracy"],
            "baseline_val_accuracy": base["val_accuracy"], "bytes": final["bytes"],
            "params": final["params"], "nonzero_params": final["nonzero_params"],
            "flops": final["flops"], "seconds": time.perf_counter() - started}


def pareto_front(results: list[dict[str, Any]], kind: str) -> list[int]:
    """Indices of the results no other result beats on both ratio and validation accuracy."""
    front = []
    for i, a in enumerate(results):
        dominated = any(b["ratios"][kind] >= a["ratios"][kind] and b["val_accuracy"] >= a["val_accuracy"]
                        and (b["ratios"][kind] > a["ratios"][kind] or b["val_accuracy"] > a["val_accuracy"])
                        for j, b in enumerate(results) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: results[i]["ratios"][kind])


def choose(results: list[dict[str, Any]], target: Target, max_drop: float) -> tuple[int, bool]:
    """The candidate meeting both goals with the smallest validation drop (else the closest)."""
    def drop(r: dict[str, Any]) -> float:
        return r["baseline_val_accuracy"] - r["val_accuracy"]

    reaching = [i for i, r in enumerate(results) if r["ratios"][target.kind] >= target.ratio]
    meeting = [i for i in reaching if drop(results[i]) <= max_drop + 1e-12]
    if meeting:
        return min(meeting, key=lambda i: (drop(results[i]), -results[i]["ratios"][target.kind])), True
    if reaching:
        return min(reaching, key=lambda i: drop(results[i])), False
    return max(range(len(results)), key=lambda i: results[i]["ratios"][target.kind]), False


# ---------------------------------------------------------------- candidate recipes
def _train_options(model_name: str | None, epochs: int) -> dict[str, Any]:
    """Trial training options: the registered model's tuned defaults (generic ones for a model
    of the user's own, `model_name` None), at 0.4x their learning rate."""
    from torchslim.apps.workflows import train_config_for

    defaults = train_config_for(model_name)
    return {"epochs": epochs, "optimizer": defaults.optimizer, "lr": float(f"{defaults.lr * 0.4:.6g}"),
            "weight_decay": defaults.weight_decay, "batch_size": defaults.batch_size,
            "schedule": "cosine"}


def size_recipe(policy: Any, *, model_name: str | None, dataset: str, epochs: int, steps_per_epoch: int,
                seed: int = 0) -> dict[str, Any]:
    """Gradual pruning to the policy's sparsities, clustering to its bits, a short fine-tune, coding."""
    pruned = {n: s for n, s in policy.sparsity.items() if s > 0}
    stages: list[dict[str, Any]] = []
    if pruned:
        train = _train_options(model_name, epochs)
        ramp = 0.6 * epochs * steps_per_epoch  # steps until the final sparsity (end_fraction)
        stages.append({"gradual_prune": {  # `sparsity` is the ramp's reference: the largest
            "sparsity": max(pruned.values()), "per_layer": pruned, "targets": {"names": sorted(pruned)},
            "end_fraction": 0.6, "every": max(1, min(40, int(ramp // 20))), "train": train}})
    bits = dict(policy.bits)
    stages += [{"cluster": {"bits": max(bits.values()), "per_layer": bits}},
               {"fine_tune": {"epochs": 1, "optimizer": "adam", "lr": 1e-5, "schedule": "cosine"}},
               {"encode": {"coder": "auto"}}]
    return {"version": 1, "name": "auto-size", "dataset": dataset, "seed": seed, "stages": stages}


def structured_recipe(mac_cut: float, *, model_name: str | None, dataset: str, epochs: int,
                      seed: int = 0) -> dict[str, Any]:
    """Global structured pruning to `mac_cut` fewer MACs, then a distilled fine-tune."""
    return {"version": 1, "name": "auto-structured", "dataset": dataset, "seed": seed, "stages": [
        {"structured_prune": {"ratio": round(1 - 1 / mac_cut, 4), "target": "macs", "scope": "global",
                              "importance": "l1"}},
        {"fine_tune": {**_train_options(model_name, epochs), "distill": {"teacher": "original"}}}]}


def int8_recipe(mac_cut: float, *, model_name: str | None, dataset: str, epochs: int,
                seed: int = 0) -> dict[str, Any]:
    """Static int8 on onnxruntime, after `structured_recipe(mac_cut)` when `mac_cut` > 1."""
    stages = (structured_recipe(mac_cut, model_name=model_name, dataset=dataset, epochs=epochs,
                                seed=seed)["stages"] if mac_cut > 1 else [])
    return {"version": 1, "name": "auto-structured-int8", "dataset": dataset, "seed": seed,
            "stages": [*stages, {"quantize": {"method": "static"}}]}


def latency_plan(target_ratio: float, trials: int, int8_speedup: float) -> list[tuple[bool, float]]:
    """(int8?, MAC cut) per latency candidate.

    MAC cuts aim 25% past the target (latency falls slower than MACs: memory traffic, fixed
    costs). When int8 makes the unpruned model at least 5% faster, half of the trials (the
    first, with one trial) end in int8, their cut divided by that measured speedup; a cut of
    1 means no pruning at all.
    """
    n_int8 = (trials + 1) // 2 if int8_speedup >= 1.05 else 0
    plan = [(True, round(max(1.0, 1.25 * m * target_ratio / int8_speedup), 3))
            for m in (_multipliers(n_int8) if n_int8 else [])]
    plan += [(False, round(1.25 * m * target_ratio, 3))
             for m in (_multipliers(trials - n_int8) if trials > n_int8 else [])]
    return list(dict.fromkeys(plan))  # several int8 cuts clamped to 1 are one candidate


def measure_int8_speedup(model: Any, data: Any) -> dict[str, Any]:
    """Batched latency of the unpruned model as a static int8 onnxruntime program vs fp32.

    Interleaved over 3 rounds, median ratio. A model that cannot be quantized gets 1.0 and the
    reason (its latency candidates then stay fp32).
    """
    import statistics

    from torchslim.apps.workflows import default_latency_batch, inputs_for
    from torchslim.errors import SlimError
    from torchslim.measure import measure_latency
    from torchslim.quantization import Quantization, QuantMethod, quantize_model

    calibration = [x for x, _ in data.calibration(8, 0)]
    try:
        int8 = quantize_model(model, Quantization(method=QuantMethod.STATIC),
                              example_inputs=inputs_for(model, 2), calibration=calibration)
    except SlimError as exc:
        return {"int8_speedup": 1.0, "int8_error": str(exc)}
    x = inputs_for(model, default_latency_batch(model))
    ratios = [measure_latency(model, x, repeats=10).median_ms / measure_latency(int8, x, repeats=10).median_ms
              for _ in range(3)]
    return {"int8_speedup": round(statistics.median(ratios), 3)}


def _with_epochs(recipe: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The same recipe with the main training stage given `epochs`."""
    recipe = json.loads(json.dumps(recipe))
    for stage in recipe["stages"]:
        if "gradual_prune" in stage:
            stage["gradual_prune"]["train"]["epochs"] = epochs
            break
        if "fine_tune" in stage and "distill" in stage["fine_tune"]:
            stage["fine_tune"]["epochs"] = epochs
            break
    return recipe


def _digest(recipe: dict[str, Any]) -> str:
    """A short name for a recipe: a rerun finds (and resumes) the same trial folder."""
    from torchslim.apps.recipe import parse_recipe

    return parse_recipe(recipe).digest[:8]


def _multipliers(trials: int) -> list[float]:
    """Aim the candidates from just past the target (real sizes land ~1% off the prediction)
    to 30% past it; with 4 or more trials, one aims below it to show the front's other side."""
    if trials == 1:
        return [1.05]
    below = [0.9] if trials >= 4 else []
    rest = trials - len(below)
    return below + [1.03 + 0.27 * k / (rest - 1) for k in range(rest)]


# ----------------------------------------------------------------------- the search
def auto_compress(source: str, *, target: Target, max_drop: float, out: str | Path,
                  dataset: str | None = None, trials: int = 4, epochs: int = 2,
                  final_epochs: int | None = None, workers: int | None = None,
                  ray_address: str | None = None, progress: bool = True,
                  sparsity_levels: Sequence[float] | None = None,
                  bit_levels: Sequence[int] | None = None, factory: str | None = None) -> dict[str, Any]:
    """Find a policy reaching `target` within `max_drop` (accuracy fraction) of validation accuracy.

    `sparsity_levels` / `bit_levels` (size target) are the per-layer steps the greedy walk may
    take; the defaults suit most models, smaller grids make the plan cheaper.

    Writes OUT/recipe.yaml (the chosen policy at `final_epochs`), OUT/model.slim, OUT/auto.json,
    OUT/auto.md and OUT/front.png; trial runs live in OUT/trials (reused when resuming).
    """
    from torchslim.apps.workflows import load_model_or_artifact
    from torchslim.pruning import scan_sensitivity
    from torchslim.trials import run_trials

    if trials < 1 or epochs < 1:
        raise ConfigError(f"--trials and --epochs must be >= 1, got {trials} and {epochs}")
    if max_drop < 0:
        raise ConfigError(f"--max-drop must be >= 0 points, got {100 * max_drop}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load_model_or_artifact(source, factory=factory)
    spec = getattr(model, "torchslim_spec", None)
    name = spec.name if spec is not None else None
    if dataset is None and Path(source).is_file():
        dataset = artifact.read_metadata(source).get("metadata", {}).get("dataset")
    found, data_key = resolve_run_data(dataset, name, required=True)
    assert found is not None and data_key is not None
    data = found
    learn_inputs_(model, data)
    val = data.val_loader()
    timings: dict[str, float] = {}
    search: dict[str, Any] = {}
    candidates: list[Candidate] = []

    tick = time.perf_counter()
    if target.kind == "size":
        batch_size = int(_train_options(name, epochs)["batch_size"])
        from torchslim.apps.auto.allocation import (
            BIT_LEVELS,
            SPARSITY_LEVELS,
            greedy_path,
            measure_size_model,
        )

        levels = [s for s in (sparsity_levels or SPARSITY_LEVELS) if s > 0]
        scan = scan_sensitivity(model, val, sparsities=levels, progress=progress, workers=workers,
                                ray_address=ray_address)
        size_model = measure_size_model(model, val, scan, bits=sorted(bit_levels or BIT_LEVELS, reverse=True))
        path = greedy_path(size_model, max_ratio=1.4 * target.ratio)
        seen: set[str] = set()
        for multiplier in _multipliers(trials):
            goal = multiplier * target.ratio
            ratio, drop, policy = next((p for p in path if p[0] >= goal), path[-1])
            key = json.dumps(asdict(policy), sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            recipe = size_recipe(policy, model_name=name, dataset=data_key, epochs=epochs,
                                 steps_per_epoch=data.steps_per_epoch(batch_size))
            candidates.append(Candidate(recipe, source, "", timing=False, factory=factory,
                                        predicted={"size": round(ratio, 2), "drop": round(drop, 5)}))
        search = {"sensitivity": scan, "size_model": size_model.to_dict(),
                  "greedy_path": [{"ratio": round(r, 2), "drop": round(d, 5)} for r, d, _ in path]}
    elif target.kind == "latency":
        search = measure_int8_speedup(model, data)
        for int8, cut in latency_plan(target.ratio, trials, search["int8_speedup"]):
            build = int8_recipe if int8 else structured_recipe
            candidates.append(Candidate(build(cut, model_name=name, dataset=data_key, epochs=epochs),
                                        source, "", timing=True, factory=factory,
                                        predicted={"macs": cut, "int8": int8}))
    else:
        for multiplier in _multipliers(trials):
            cut = round(target.ratio * multiplier, 3)
            candidates.append(Candidate(structured_recipe(cut, model_name=name, dataset=data_key,
                                                          epochs=epochs),
                                        source, "", timing=False, factory=factory,
                                        predicted={"macs": cut}))
    timings["plan_seconds"] = time.perf_counter() - tick
    candidates = [Candidate(c.recipe, c.source, str(out / "trials" / f"{k:02d}-{_digest(c.recipe)}"),
                            c.timing, c.predicted, factory=factory) for k, c in enumerate(candidates)]

    tick = time.perf_counter()
    results = run_trials(run_candidate, candidates, workers=workers, ray_address=ray_address,
                         progress=progress, desc="candidates")
    timings["trials_seconds"] = time.perf_counter() - tick
    front = pareto_front(results, target.kind)
    chosen, met = choose(results, target, max_drop)

    tick = time.perf_counter()
    final_recipe = _with_epochs(candidates[chosen].recipe, final_epochs or epochs)
    if final_recipe == candidates[chosen].recipe:
        final = results[chosen]
    else:
        final = run_candidate(Candidate(final_recipe, source, str(out / f"final-{_digest(final_recipe)}"),
                                        timing=True, factory=factory))
    timings["final_seconds"] = time.perf_counter() - tick
    shutil.copyfile(Path(final["out"]) / "model.slim", out / "model.slim")
    measured, split = data.measured()
    test = TensorLoader(measured.test, batch_size=1000) if isinstance(measured, Dataset) else measured[split]
    baseline_test = evaluate(model, test)["accuracy"]
    final_drop = final["baseline_val_accuracy"] - final["val_accuracy"]
    timings["total_seconds"] = time.perf_counter() - started

    report = {
        "source": source, "model": name or type(model).__name__, "dataset": data.name,
        "target": {"kind": target.kind, "ratio": target.ratio}, "max_drop_points": 100 * max_drop,
        "trials": results, "front": front, "chosen": chosen, "chosen_met_on_trial": met,
        "final": {**final, "test_drop_points": 100 * (baseline_test - final["test_accuracy"]),
                  "val_drop_points": 100 * final_drop, "baseline_test_accuracy": baseline_test,
                  "meets_target": final["ratios"][target.kind] >= target.ratio,
                  "meets_max_drop": final_drop <= max_drop + 1e-12},
        "search": search, "workers": workers or 1, "ray_address": ray_address,
        "epochs": epochs, "final_epochs": final_epochs or epochs, **timings,
        "rerun": f"torchslim compress {out / 'recipe.yaml'} --model {source} --out OUT",
    }
    text = yaml.safe_dump(final_recipe, sort_keys=False)
    write_atomic(out / "recipe.yaml", lambda tmp: tmp.write_text(
        f"# Chosen by `torchslim auto` ({target.kind}={target.ratio:g}, max drop "
        f"{100 * max_drop:g} pt) for {source}.\n# Rerun: {report['rerun']}\n{text}"))
    write_atomic(out / "auto.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    write_atomic(out / "auto.md", lambda tmp: tmp.write_text(_markdown(report)))
    _plot_front(results, front, chosen, target, out / "front.png")
    return report


def _markdown(report: dict[str, Any]) -> str:
    kind = report["target"]["kind"]
    lines = [f"# torchslim auto: {report['model']} on {report['dataset']}", "",
             f"Target {kind} >= {report['target']['ratio']:g}x, max validation drop "
             f"{report['max_drop_points']:g} pt. Search wall-clock: {report['total_seconds']:.0f} s "
             f"(plan {report['plan_seconds']:.0f} s, {len(report['trials'])} trials "
             f"{report['trials_seconds']:.0f} s with {report['workers']} worker(s), final run "
             f"{report['final_seconds']:.0f} s).", "",
             *([f"Unpruned model as static int8 (onnxruntime): {report['search']['int8_speedup']:g}x "
                "faster than fp32 at the batched latency.", ""]
               if "int8_speedup" in report["search"] else []),
             f"| trial | predicted | {kind} ratio | val accuracy | val drop (pt) | on front |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(report["trials"]):
        mark = "chosen" if i == report["chosen"] else ("yes" if i in report["front"] else "")
        drop = 100 * (r["baseline_val_accuracy"] - r["val_accuracy"])
        lines.append(f"| {i} | {r['predicted']} | {r['ratios'][kind]:.2f} | {100 * r['val_accuracy']:.2f}% "
                     f"| {drop:.2f} | {mark} |")
    final = report["final"]
    reused = final["out"] == report["trials"][report["chosen"]]["out"]
    heading = ("Final: the chosen trial itself (--final-epochs leaves its recipe unchanged)" if reused
               else f"Final run ({report['final_epochs']} epochs)")
    lines += ["", f"{heading}: {kind} {final['ratios'][kind]:.2f}x, "
              f"validation drop {final['val_drop_points']:.2f} pt, test "
              f"{100 * final['baseline_test_accuracy']:.2f}% -> {100 * final['test_accuracy']:.2f}% "
              f"({final['test_drop_points']:.2f} pt). Meets target: {final['meets_target']}; "
              f"meets max drop (validation): {final['meets_max_drop']}.", "",
              f"Rerun: `{report['rerun']}`", "", "![front](front.png)", ""]
    return "\n".join(lines)


def _plot_front(results: list[dict[str, Any]], front: list[int], chosen: int, target: Target,
                path: Path) -> Path:
    """Validation accuracy vs the target's ratio of every trial, the Pareto front and the chosen
    policy; the target ratio and the baseline accuracy as reference lines."""
    from torchslim.report import accuracy_axis_, legend_outside_, new_figure, save_figure

    fig, axis = new_figure(size=(9, 4.8))
    xs = [r["ratios"][target.kind] for r in results]
    ys = [100 * r["val_accuracy"] for r in results]
    axis.scatter(xs, ys, color="0.6", label="trials")
    axis.plot([xs[i] for i in front], [ys[i] for i in front], marker="o", label="Pareto front")
    axis.scatter([xs[chosen]], [ys[chosen]], marker="*", s=200, color="C3", label="chosen", zorder=3)
    axis.axvline(target.ratio, linestyle=":", color="0.4", label=f"target {target.kind} {target.ratio:g}x")
    accuracy_axis_(axis, ys, baseline=100 * results[chosen]["baseline_val_accuracy"],
                   label="validation accuracy (%)")
    axis.set_xlabel(f"{target.kind} ratio vs the baseline (x, higher is smaller/faster)")
    axis.set_title(f"Policy search: validation accuracy vs {target.kind} ratio", fontsize=10)
    legend_outside_(axis)
    return save_figure(fig, path)
