"""Structured pruning, measured: channels, neurons and heads physically removed.

Sections (run all, or pick with `--only`):
- `resnet`: the small ResNet on Fashion-MNIST, MACs cut 2x (torchslim's MAC target), importance
  criterion chosen on the validation split, distillation fine-tune; the same MAC target and
  fine-tuning budget with Torch-Pruning (DepGraph, `MetaPruner`, group L2) side by side.
- `mobilenet`: pretrained MobileNetV2, 30% of the channels of every prunable group removed
  (torchslim and Torch-Pruning, exactly and with the kept widths rounded to multiples of
  `--mobilenet-round-to`); params, MACs, latency at batch 1 and 32 (224x224) eager and on
  onnxruntime fp32, and top-1 agreement / KL divergence with the unpruned model on
  `--mobilenet-eval-crops` crops of the two sample photos
  (no ImageNet here), before and after re-estimating BatchNorm statistics on other crops, and
  after a short logit distillation on fresh crops of the same photos (optimistic: the crops
  differ, the photos do not).
- `minilm`: all-MiniLM-L6-v2 without 50% of every FFN's neurons and 1/3 of the attention heads,
  then a short MSE-to-teacher-embedding distillation on the UCI sentences; UCI probe accuracy,
  held-out cosine, latency at batch 32 / seq 128 and batch 1; the same with Torch-Pruning
  (whole heads, group L2) and the same distillation budget.
- `latency`: re-times the pruned artifacts the sections above saved in `--out` against their
  unpruned models; CNNs eager, as frozen TorchScript and on onnxruntime fp32.

Latency: every model of a section is timed in the same process, interleaved over `--rounds`
rounds, `--threads` threads (2); a speedup is the median over rounds of the baseline's time / the model's time
in that round (paired: the machine's speed drifts over minutes). Model choices use validation data only. Run:
`python bench/structured.py --out runs/bench-structured [--only resnet mobilenet minilm latency]`
Torch-Pruning rows need `pip install -c constraints.txt torch-pruning` (skipped without it).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from distill_lowrank import SECTIONS, SentenceData, distil_embeddings, run_sections, section, trained_artifact
from quantization import photo_crops

import torchslim as ts
from torchslim.data import TensorLoader, load_dataset
from torchslim.distillation import DistillationLoss
from torchslim.measure import count_flops, evaluate, measure_latency
from torchslim.pruning import ChannelPruning
from torchslim.runtime.onnx_program import OrtModule, export_onnx
from torchslim.training import Trainer, make_train_config

SECTIONS.clear()  # this file's sections only


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def interleaved_latency(models: dict[str, nn.Module], inputs: dict[str, Any], *, rounds: int,
                        repeats: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per model and input: (median latency ms, median speedup vs the first model).

    The models take turns within each round, and each round's speedup compares timings taken
    seconds apart: this machine's speed drifts by up to 2x over minutes (shared host), which
    would bias a ratio of timings taken far apart.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {label: [] for label in inputs} for name in models}
    for _ in range(rounds):
        for label, x in inputs.items():
            for name, model in models.items():
                samples[name][label].append(measure_latency(model, x, repeats=repeats, warmup=3).median_ms)
    base = next(iter(samples.values()))
    return {name: {label: (statistics.median(times),
                           statistics.median(b / t for b, t in zip(base[label], times, strict=True)))
                   for label, times in by_label.items()}
            for name, by_label in samples.items()}


def add_latency(rows: list[dict[str, Any]], models: dict[str, nn.Module], inputs: dict[str, Any],
                args: argparse.Namespace) -> None:
    """Time every model (interleaved) and put latency and speedup vs the first one in its row
    (rows of models not given are left untimed)."""
    timings = interleaved_latency(models, inputs, rounds=args.rounds, repeats=args.repeats)
    for row in rows:
        if row["model"] not in timings:
            continue
        for label in inputs:
            ms, speedup = timings[row["model"]][label]
            row[f"latency_{label}_ms"] = round(ms, 3)
            row[f"speedup_{label}"] = round(speedup, 2)
        print(json.dumps(row), flush=True)


class Frozen(nn.Module):
    """`torch.jit.freeze` + `optimize_for_inference`: PyTorch's own CPU deployment path.

    The frozen program is held outside the module tree (it has no `training` flag to set).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), example)
            program = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        object.__setattr__(self, "program", program)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def head_ffn_shape(model: nn.Module) -> str:
    """'8 heads, FFN 768': a MiniLM's first-layer width after pruning (every layer is pruned alike)."""
    layer = model.bert.encoder.layer[0]
    return f"{layer.attention.self.num_attention_heads} heads, FFN {layer.intermediate.dense.out_features}"


def has_torch_pruning() -> bool:
    return importlib.util.find_spec("torch_pruning") is not None


def torch_pruning_prune(model: nn.Module, example: torch.Tensor, ratio: float,
                        ignored: list[nn.Module], *, global_pruning: bool = False,
                        round_to: int | None = None) -> nn.Module:
    """Torch-Pruning's DepGraph pruner at a channel ratio, group L2 magnitude."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored,
                                  global_pruning=global_pruning, round_to=round_to)
    pruner.step()
    return model


def torch_pruning_minilm(model: nn.Module, example: torch.Tensor, *, heads: float,
                         ffn: float) -> nn.Module:
    """Torch-Pruning on the MiniLM encoder: whole heads (q/k/v together) and FFN neurons.

    Group L2 magnitude, as for the CNNs. The hidden size stays (the layers writing the residual
    stream are ignored), as in torchslim's run; HF attention keeps its head count in attributes
    Torch-Pruning does not know, so they are set from the pruned layers afterwards.
    """
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    num_heads = {linear: a.num_attention_heads for a in attentions for linear in (a.query, a.key, a.value)}
    layers = model.bert.encoder.layer
    ignored = [layer.attention.output.dense for layer in layers] + [layer.output.dense for layer in layers]
    if model.bert.pooler is not None:
        ignored.append(model.bert.pooler.dense)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ffn, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=heads)
    pruner.step()
    for attention in attentions:
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.all_head_size = attention.query.out_features
    return model


def torch_pruning_for_macs(model: nn.Module, example: torch.Tensor, goal: float,
                           ignored: str, round_to: int | None = None) -> tuple[nn.Module, float] | None:
    """Bisect Torch-Pruning's channel ratio to the same MAC target as ours (it has no MAC target)."""
    full = count_flops(model, example)
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        trial = copy.deepcopy(model)
        torch_pruning_prune(trial, example, ratio, [trial.get_submodule(ignored)], global_pruning=True,
                            round_to=round_to)
        if count_flops(trial, example) <= (1 - goal) * full:
            high, best = ratio, (trial, ratio)
        else:
            low = ratio
    return best  # None: no ratio below 0.95 reaches the target (e.g. with round_to)


# ----------------------------------------------------------------------------- ResNet
@section("resnet")
def resnet(args: argparse.Namespace) -> list[dict[str, Any]]:
    source = trained_artifact(args.resnet, "resnet-small", "fashion-mnist")
    data = load_dataset("fashion-mnist", seed=0)
    teacher = ts.load(source).eval()
    x1, x64 = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28)
    test, val = TensorLoader(data.test, batch_size=500), TensorLoader(data.val, batch_size=500)
    calibration = [b for _, b in zip(range(4), TensorLoader(data.train, batch_size=128, shuffle=True, seed=0),
                                     strict=False)]
    models: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []

    def row(name: str, model: nn.Module, **extra: Any) -> dict[str, Any]:
        model.eval()
        models[name] = model
        result = {"section": "resnet", "model": name, "params": params(model),
                  "mmacs": round(count_flops(model, x1) / 2e6, 2),
                  "test_accuracy": round(evaluate(model, test)["accuracy"], 4),
                  "val_accuracy": round(evaluate(model, val)["accuracy"], 4), **extra}
        rows.append(result)
        print(json.dumps(result), flush=True)
        return result

    def fine_tune(student: nn.Module) -> float:
        config = make_train_config(epochs=args.resnet_epochs, batch_size=128, lr=0.01, momentum=0.9,
                                   weight_decay=5e-4, schedule="cosine", seed=0,
                                   early_stopping_patience=args.resnet_patience)
        start = time.perf_counter()
        history = Trainer(student, TensorLoader(data.train, batch_size=128, shuffle=True, seed=0),
                          config=config, val_loader=val,
                          loss=DistillationLoss(teacher, temperature=4.0, alpha=0.5), progress=False).fit()
        if args.resnet_patience is not None:
            best = max(range(len(history)), key=lambda i: history[i].val_accuracy or 0.0)
            print(f"kept epoch {best + 1} of {len(history)} run (best validation accuracy)", flush=True)
        return round((time.perf_counter() - start) / 60, 2)

    budget = f"{args.resnet_epochs} ep" + (f", best val epoch (patience {args.resnet_patience})"
                                           if args.resnet_patience is not None else "")

    row("resnet-small (fp32)", teacher)
    # Global ranking (scores normalised per group): at the same MACs it ran faster than a uniform
    # ratio (1.62-1.73x vs 1.51x at batch 64 in a probe). The criterion: chosen by validation
    # accuracy right after pruning (no test data).
    candidates = {}
    for criterion in args.criteria:
        student = copy.deepcopy(teacher)
        ts.apply_(student, ChannelPruning(ratio=0.5, target="macs", scope="global", importance=criterion,
                                          round_to=args.round_to), calibration=calibration)
        candidates[criterion] = (evaluate(student, val)["accuracy"], student)
    criterion = max(candidates, key=lambda c: candidates[c][0])
    student = candidates[criterion][1]
    tag = f", round_to {args.round_to}" if args.round_to > 1 else ""
    row(f"torchslim, MACs/2, {criterion}{tag}, no fine-tune", student,
        val_by_criterion={c: round(v[0], 4) for c, v in candidates.items()})
    minutes = fine_tune(student)
    row(f"torchslim, MACs/2, {criterion}{tag}, distilled {budget}", student,
        train_minutes=minutes)
    ts.save(student, Path(args.out) / "resnet-structured.slim")
    found = torch_pruning_for_macs(copy.deepcopy(teacher), x1, 0.5, "fc",
                                   args.round_to if args.round_to > 1 else None) \
        if has_torch_pruning() else None
    if found is None:
        print("Torch-Pruning cannot reach the MAC target with these options; no rival rows", flush=True)
    else:
        rival, ratio = found
        row(f"Torch-Pruning, MACs/2 (global ratio {ratio:.3f}){tag}, group L2, no fine-tune", rival)
        minutes = fine_tune(rival)
        row(f"Torch-Pruning, MACs/2, distilled {budget}", rival, train_minutes=minutes)
    add_latency(rows, models, {"b1": x1, "b64": x64}, args)
    return rows


# --------------------------------------------------------------------------- MobileNetV2
@section("mobilenet")
def mobilenet(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchslim.models import create_model

    model = create_model("mobilenet-v2").eval()
    evaluation, recalibration = photo_crops(args.mobilenet_eval_crops, seed=1), photo_crops(256, seed=2)
    with torch.no_grad():
        reference = model(evaluation)
    x1 = evaluation[:1]
    models: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []

    def row(name: str, candidate: nn.Module, **extra: Any) -> None:
        candidate.eval()
        with torch.no_grad():
            logits = torch.cat([candidate(x) for x in evaluation.split(16)])
        kl = nn.functional.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True,
                                  reduction="batchmean")
        result = {"section": "mobilenet", "model": name, "params": params(candidate),
                  "mmacs": round(count_flops(candidate, x1) / 2e6, 1),
                  "top1_agreement": round(float((logits.argmax(1) == reference.argmax(1)).float().mean()), 4),
                  "kl_to_unpruned": round(float(kl), 4), **extra}
        rows.append(result)
        print(json.dumps(result), flush=True)

    def recalibrate(candidate: nn.Module) -> nn.Module:
        """Re-estimate BatchNorm running statistics on unlabeled crops (no gradients)."""
        tuned = copy.deepcopy(candidate)
        for module in tuned.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average
        tuned.train()
        with torch.no_grad():
            for x in recalibration.split(32):
                tuned(x)
        return tuned.eval()

    def distil(student: nn.Module) -> nn.Module:
        """Match the unpruned logits (KL, T=1) on fresh random crops, in place; BN statistics
        (re-estimated before) frozen."""
        optimizer = torch.optim.AdamW(student.parameters(), lr=args.mobilenet_lr, weight_decay=0.0)
        start = time.perf_counter()
        for step in range(args.mobilenet_steps):
            x = photo_crops(16, seed=1000 + step)  # never the evaluation crops (seed 1)
            with torch.no_grad():
                target = model(x).log_softmax(1)
            loss = nn.functional.kl_div(student(x).log_softmax(1), target, log_target=True,
                                        reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"distilled {args.mobilenet_steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        return student.eval()

    def method(name: str, pruned: nn.Module, first: str, **extra: Any) -> None:
        """Rows for a pruned model as cut, after BN re-estimation and after distillation; the
        last one is timed (the three share one architecture)."""
        row(first, pruned, **extra)
        final = recalibrate(pruned)
        row(f"{name}, BN statistics re-estimated", final)
        if args.mobilenet_steps:
            final = distil(final)
            row(f"{name}, distilled {args.mobilenet_steps} steps on photo crops", final)
        models[rows[-1]["model"]] = final

    row("mobilenet-v2 (fp32)", model)
    models["mobilenet-v2 (fp32)"] = model
    for round_to, rounding in mobilenet_cuts(args.mobilenet_round_to):
        name = "torchslim, 30%" + ("" if round_to == 1 else f" rounded {rounding} to {round_to}s")
        ours = copy.deepcopy(model)
        result = ts.apply_(ours, ChannelPruning(ratio=0.3, round_to=round_to, rounding=rounding),
                           example_inputs=x1)
        method(name, ours, f"{name} channels per group" if round_to == 1 else name, groups=result["groups"])
        ts.save(ours, Path(args.out) / mobilenet_artifact(round_to, rounding))
    for round_to in sorted({1, args.mobilenet_round_to}) if has_torch_pruning() else []:
        # Torch-Pruning rounds kept widths *down* (at least 30% removed per group)
        name = "Torch-Pruning, 30%" + ("" if round_to == 1 else f" rounded down to {round_to}s")
        rival = copy.deepcopy(model)
        head = [m for m in rival.modules() if isinstance(m, nn.Linear)][-1]  # keeps its 1000 classes
        torch_pruning_prune(rival, x1, 0.3, [head], round_to=None if round_to == 1 else round_to)
        method(name, rival, f"{name} channels, group L2" if round_to == 1 else f"{name}, group L2")
    batches = {"b1": x1, "b32": evaluation[:32]}
    add_latency(rows, models, batches, args)
    programs = {name: OrtModule(export_onnx(candidate, x1), spin_wait=False)
                for name, candidate in models.items()}
    add_latency(rows, programs, {f"{label}_onnxruntime": x for label, x in batches.items()}, args)
    return rows


def mobilenet_cuts(step: int) -> list[tuple[int, str]]:
    """(round_to, rounding) of each torchslim MobileNetV2 cut: exact, then, with `step` > 1, kept
    widths rounded up (at most 30% removed per group) and down (at least 30%, as Torch-Pruning)
    to multiples of `step`, the widths SIMD kernels run without padding (onnxruntime's NCHWc
    blocks, oneDNN's)."""
    return [(1, "up")] + ([(step, "up"), (step, "down")] if step > 1 else [])


def mobilenet_artifact(round_to: int, rounding: str = "up") -> str:
    """The file name the `mobilenet` section saves a pruned model under (and `latency` reads)."""
    if round_to == 1:
        return "mobilenet-v2-structured.slim"
    return f"mobilenet-v2-structured-r{round_to}{'' if rounding == 'up' else '-' + rounding}.slim"


# ------------------------------------------------------------------------------ MiniLM
@section("minilm")
def minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchslim.measure import probe_accuracy
    from torchslim.models import create_model, example_inputs, spec_of
    from torchslim.models.minilm import embed_texts

    data = SentenceData(args.seq_train)
    teacher = create_model("minilm").eval()
    teacher_val = embed_texts(teacher, data.val_texts)
    models: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []

    def row(name: str, model: nn.Module, **extra: Any) -> None:
        model.eval()
        models[name] = model
        val = embed_texts(model, data.val_texts)
        result = {"section": "minilm", "model": name, "params": params(model),
                  "probe_accuracy": round(probe_accuracy(embed_texts(model, data.texts), data.labels), 4),
                  "cosine_to_fp32_heldout": round(float(nn.functional.cosine_similarity(val, teacher_val)
                                                        .mean()), 4), **extra}
        rows.append(result)
        print(json.dumps(result), flush=True)

    row("minilm (fp32)", teacher)
    student = copy.deepcopy(teacher)
    config = ChannelPruning(ratio=0.0, per_layer={"*.attention.self": 1 / 3, "*.intermediate.dense": 0.5})
    result = ts.apply_(student, config, example_inputs=example_inputs(spec_of(student), 2))
    shape = head_ffn_shape(student)
    row(f"torchslim, {shape}, no fine-tune", student, mmacs_ratio=round(
        result["macs_before"] / result["macs_after"], 2))
    minutes = distil_embeddings(student, teacher, data, epochs=args.minilm_epochs, lr=args.minilm_lr)
    row(f"torchslim, {shape}, distilled {args.minilm_epochs} ep", student, train_minutes=minutes)
    ts.save(student, Path(args.out) / "minilm-structured.slim")
    if has_torch_pruning():  # same heads / FFN ratios, same distillation budget
        rival = torch_pruning_minilm(copy.deepcopy(teacher), example_inputs(spec_of(teacher), 2),
                                     heads=1 / 3, ffn=0.5)
        shape = head_ffn_shape(rival)
        row(f"Torch-Pruning, {shape}, no fine-tune", rival)
        minutes = distil_embeddings(rival, teacher, data, epochs=args.minilm_epochs, lr=args.minilm_lr)
        row(f"Torch-Pruning, {shape}, distilled {args.minilm_epochs} ep", rival, train_minutes=minutes)
    add_latency(rows, models, {"b1": example_inputs(spec_of(teacher), 1),
                               "b32": example_inputs(spec_of(teacher), 32)}, args)
    return rows


@section("latency")
def latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Re-time the artifacts earlier sections saved in `--out` against their unpruned models.

    A CNN is timed three ways, each against the unpruned model run the same way: eager PyTorch,
    frozen TorchScript (BN folded, weights prepacked: PyTorch's CPU deployment path) and
    onnxruntime fp32 (the ONNX program of `export_onnx`; NCHWc kernels). onnxruntime's
    sessions do not spin-wait here: several take turns on the same cores.
    """
    from torchslim.models import create_model, example_inputs, spec_of

    out = Path(args.out)
    mobilenets = [out / mobilenet_artifact(*cut) for cut in mobilenet_cuts(args.mobilenet_round_to)]
    pairs = [("resnet", lambda: ts.load(args.resnet), [out / "resnet-structured.slim"], (1, 64)),
             ("mobilenet", lambda: create_model("mobilenet-v2"), mobilenets, (1, 32)),
             ("minilm", lambda: create_model("minilm"), [out / "minilm-structured.slim"], (1, 32))]
    rows: list[dict[str, Any]] = []
    for name, original, paths, batches in pairs:
        paths = [path for path in paths if path.is_file()]
        if not paths:
            continue
        base = original().eval()
        eager = {f"{name} (unpruned)": base,
                 **{f"{name}: {path.name}": ts.load(path).eval() for path in paths}}
        variants = [eager]
        if name != "minilm":
            example = example_inputs(spec_of(base), 1)
            variants.append({f"{label}, TorchScript frozen": Frozen(model, example)
                             for label, model in eager.items()})
            variants.append({f"{label}, onnxruntime fp32":
                             OrtModule(export_onnx(model, example), spin_wait=False)
                             for label, model in eager.items()})
        for models in variants:  # each speedup against the unpruned model run the same way
            part = [{"section": "latency", "model": label, "params": params(model)}
                    for label, model in zip(models, eager.values(), strict=True)]
            add_latency(part, models, {f"b{b}": example_inputs(spec_of(base), b) for b in batches}, args)
            rows += part
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-structured")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per round")
    parser.add_argument("--resnet", default="runs/bench-foundation/resnet-small/model.slim",
                        help="trained resnet-small artifact (trained here if missing)")
    parser.add_argument("--resnet-epochs", type=int, default=3)
    parser.add_argument("--resnet-patience", type=int, default=None,
                        help="resnet: stop after N epochs without a validation gain and keep the best "
                             "validation epoch (the epoch count is then chosen on validation)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="resnet: kept widths multiple of N (16 = one AVX-512 register of fp32)")
    parser.add_argument("--criteria", nargs="+", default=["l1", "l2", "taylor", "bn_scale"])
    parser.add_argument("--mobilenet-steps", type=int, default=150, help="distillation steps on crops")
    parser.add_argument("--mobilenet-eval-crops", type=int, default=256,
                        help="crops the agreement and KL are measured on (one crop = 1/N of agreement)")
    parser.add_argument("--mobilenet-round-to", type=int, default=8,
                        help="mobilenet: also prune with kept widths rounded up and down to multiples of N")
    parser.add_argument("--mobilenet-lr", type=float, default=1e-4)
    parser.add_argument("--seq-train", type=int, default=48, help="token cap when distilling")
    parser.add_argument("--minilm-epochs", type=int, default=3)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    run_sections(parser.parse_args())


if __name__ == "__main__":
    main()
