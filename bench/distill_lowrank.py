"""Distillation, low-rank factorization and conv decomposition, measured.

Sections (run all, or pick with `--only`):
- `hinton`: Hinton et al.'s MNIST experiment. A 784-1200-1200-10 teacher with dropout; students
  784-800-800-10 and 784-30-10 trained on hard labels vs distilled (T=20). Errors out of 10,000.
- `minilm-student`: a 3-layer MiniLM initialised from every other teacher layer, distilled on the
  UCI sentences (unlabeled); probe accuracy, embedding cosine, latency ratio at batch 32 / seq 128.
- `minilm-lowrank`: MiniLM's FFN and attention projections at ~50% of their weights, distilled.
- `resnet-decompose`: the small ResNet on Fashion-MNIST with Tucker-2 convs (>= 2x fewer MACs),
  distillation fine-tune; accuracy and latency ratio at batch 64.

Every latency ratio compares against the baseline measured in the same run (medians, fixed
threads); all choices use the validation split. Run:
`python bench/distill_lowrank.py --out runs/bench-distill-lowrank [--only hinton ...]`
The MiniLM sections need `pip install 'torchslim[text]'` and the UCI sentences
(`npm install --ignore-scripts sentiment@5.0.2` in the working directory).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.data import TensorLoader, load_dataset
from torchslim.distillation import DistillationLoss
from torchslim.measure import evaluate
from torchslim.training import Trainer, make_train_config

SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {}


def section(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        SECTIONS[name] = function
        return function
    return register


def trained_artifact(path: str | Path, model_name: str, dataset: str) -> Path:
    """`path`, after training `model_name` on `dataset` into its folder if it is not there yet."""
    from torchslim.apps.workflows import train_config_for, train_model

    path = Path(path)
    if not path.is_file():
        train_model(model_name, dataset=dataset, out=path.parent, config=train_config_for(model_name),
                    progress=False)
    return path


def mlp(hidden: tuple[int, ...], *, dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
    width = 784
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ----------------------------------------------------------------------------- hinton
class JitteredLoader:
    """A `TensorLoader` whose images are shifted by up to `pixels` in x and y, per sample
    (Hinton et al. trained the MNIST teacher on such jittered digits; the students see none)."""

    def __init__(self, loader: TensorLoader, pixels: int = 2) -> None:
        self.loader, self.pixels = loader, pixels

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        p = self.pixels
        generator = torch.Generator().manual_seed(1000 + self.loader.epoch)
        for images, labels in self.loader:
            # (B, 1, 28+2p, 28+2p), padded with the normalised black
            padded = nn.functional.pad(images, (p, p, p, p), value=float(images.amin()))
            shifts = torch.randint(0, 2 * p + 1, (images.shape[0], 2), generator=generator)
            yield torch.stack([padded[i, :, dy:dy + 28, dx:dx + 28]
                               for i, (dy, dx) in enumerate(shifts.tolist())]), labels


@section("hinton")
def hinton(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchslim.models import create_model

    data = load_dataset("mnist", seed=0)
    train = TensorLoader(data.train, batch_size=128, shuffle=True, seed=0)
    val, test = (TensorLoader(s, batch_size=1000) for s in (data.val, data.test))
    # The students all use Adam: its steps do not depend on the gradient's scale, so the
    # hard-label and the T²-scaled soft-target runs share one learning rate (SGD at the
    # hard-label rate diverges at T=20, where the soft term's logit gradients are up to T
    # times larger). The teacher is trained longer, with SGD and jitter, to be a good teacher.
    config = make_train_config(epochs=args.hinton_epochs, batch_size=128, optimizer="adam",
                               lr=1e-3, schedule="cosine", weight_decay=0.0, seed=0)
    teacher_config = make_train_config(epochs=args.teacher_epochs, batch_size=128, lr=0.05,
                                       momentum=0.9, schedule="cosine", weight_decay=0.0, seed=0)

    def fit(model: nn.Module, loss: Any = None, *, teacher: bool = False) -> tuple[nn.Module, float]:
        torch.manual_seed(0)
        start = time.perf_counter()
        Trainer(model, JitteredLoader(train) if teacher else train,  # type: ignore[arg-type]
                config=teacher_config if teacher else config, val_loader=val, loss=loss,
                progress=False).fit()
        return model.eval(), time.perf_counter() - start

    def row(name: str, model: nn.Module, seconds: float, **extra: Any) -> dict[str, Any]:
        test_acc = evaluate(model, test)["accuracy"]
        result = {"section": "hinton", "model": name,
                  "params": sum(p.numel() for p in model.parameters()),
                  "val_errors": round((1 - evaluate(model, val)["accuracy"]) * len(data.val)),
                  "test_errors": round((1 - test_acc) * len(data.test)),
                  "train_minutes": round(seconds / 60, 2), **extra}
        print(json.dumps(result), flush=True)
        return result

    rows = []
    teachers: list[tuple[str, nn.Module]] = []
    if args.hinton_teachers in ("mlp", "both"):
        torch.manual_seed(0)
        teacher, seconds = fit(mlp((1200, 1200), dropout=0.5, input_dropout=0.2), teacher=True)
        rows.append(row("teacher 784-1200-1200-10 (dropout, jitter)", teacher, seconds))
        teachers.append(("MLP teacher", teacher))
    if args.hinton_teachers in ("cnn", "both"):
        cnn = create_model("mnist-cnn").eval()
        rows.append(row("teacher mnist-cnn (pretrained, shipped)", cnn, 0.0))
        teachers.append(("CNN teacher", cnn))
    # Hinton: above ~300 units all T > 8 do about equally; with 30 units, T of 2.5-4 works
    # best. The small student's T is picked on the validation split.
    students = [((800, 800), (args.temperature,))]
    if args.hinton_small:
        students.append(((30,), (2.5, 4.0, 8.0)))
    for hidden, temperatures in students:
        shape = "784-" + "-".join(map(str, hidden)) + "-10"
        student, seconds = fit(mlp(hidden))
        rows.append(row(f"student {shape}, hard labels", student, seconds))
        for teacher_name, chosen_teacher in teachers:
            candidates = []
            for temperature in temperatures:
                loss = DistillationLoss(chosen_teacher, temperature=temperature, alpha=args.alpha,
                                        cache_teacher=True)
                student, seconds = fit(mlp(hidden), loss)
                val_errors = round((1 - evaluate(student, val)["accuracy"]) * len(data.val))
                candidates.append((val_errors, temperature, student, seconds))
            val_errors, temperature, student, seconds = min(candidates, key=lambda c: c[0])
            rows.append(row(f"student {shape}, distilled from {teacher_name} T={temperature:g} "
                            f"alpha={args.alpha:g}", student, seconds,
                            val_errors_by_T={str(c[1]): c[0] for c in candidates}))
    return rows


# ----------------------------------------------------------------------------- MiniLM
MINILM_PROJECTIONS = ("bert.encoder.layer.*.attention.self.query",
                      "bert.encoder.layer.*.attention.self.key",
                      "bert.encoder.layer.*.attention.self.value",
                      "bert.encoder.layer.*.attention.output.dense",
                      "bert.encoder.layer.*.intermediate.dense",
                      "bert.encoder.layer.*.output.dense")


class SentenceData:
    """UCI sentences: token ids for distillation (unlabeled), held-out texts, probe labels."""

    def __init__(self, max_length: int, held_out: int = 500) -> None:
        from torchslim.data import Split
        from torchslim.data.sentences import read_uci_sentences
        from torchslim.models.minilm import tokenize

        self.texts, labels = read_uci_sentences()
        self.labels = torch.from_numpy(labels)
        order = torch.randperm(len(self.texts), generator=torch.Generator().manual_seed(0)).tolist()
        self.val_texts = [self.texts[i] for i in order[:held_out]]
        train_texts = [self.texts[i] for i in order[held_out:]]
        ids = tokenize(train_texts, max_length=max_length)["input_ids"]  # (N, T), pad id 0
        self.train = Split(images=ids, labels=torch.zeros(len(train_texts), dtype=torch.long))


def embedding_report(name: str, model: nn.Module, teacher_val: torch.Tensor,
                     data: SentenceData, baseline_ms: dict[int, float], section_name: str,
                     **extra: Any) -> dict[str, Any]:
    from torchslim.measure import measure_latency, probe_accuracy
    from torchslim.models import example_inputs, spec_of
    from torchslim.models.minilm import embed_texts

    model.eval()
    val = embed_texts(model, data.val_texts)
    cosine = float(torch.nn.functional.cosine_similarity(val, teacher_val).mean())
    probe = probe_accuracy(embed_texts(model, data.texts), data.labels)
    row = {"section": section_name, "model": name,
           "params": sum(p.numel() for p in model.parameters()),
           "probe_accuracy": round(probe, 4), "cosine_to_fp32_heldout": round(cosine, 4), **extra}
    for batch in (1, 32):
        latency = measure_latency(model, example_inputs(spec_of(model), batch), repeats=20, warmup=5)
        row[f"latency_b{batch}_ms"] = round(latency.median_ms, 2)
        baseline_ms.setdefault(batch, latency.median_ms)
        row[f"speedup_b{batch}"] = round(baseline_ms[batch] / latency.median_ms, 2)
    print(json.dumps(row), flush=True)
    return row


def distil_embeddings(student: nn.Module, teacher: nn.Module, data: SentenceData, *,
                      epochs: int, lr: float) -> float:
    config = make_train_config(epochs=epochs, batch_size=32, optimizer="adamw", lr=lr,
                               weight_decay=0.01, schedule="cosine", warmup_epochs=0.2, seed=0)
    loss = DistillationLoss(teacher, alpha=0.0, output="mse", cache_teacher=True)
    start = time.perf_counter()
    Trainer(student, TensorLoader(data.train, batch_size=32, shuffle=True, seed=0),
            config=config, loss=loss, progress=False).fit()
    return round((time.perf_counter() - start) / 60, 2)


def _minilm_setup(args: argparse.Namespace) -> tuple[nn.Module, SentenceData, torch.Tensor,
                                                     dict[int, float], list[dict[str, Any]], str]:
    from torchslim.models import create_model
    from torchslim.models.minilm import embed_texts

    data = SentenceData(args.seq_train)
    teacher = create_model("minilm").eval()
    teacher_val = embed_texts(teacher, data.val_texts)
    baseline_ms: dict[int, float] = {}
    name = "minilm (fp32, 6 layers)"
    return teacher, data, teacher_val, baseline_ms, [], name


@section("minilm-student")
def minilm_student(args: argparse.Namespace) -> list[dict[str, Any]]:
    import copy

    import torchslim as ts
    from torchslim.depth import LayerDropping

    teacher, data, teacher_val, baseline_ms, rows, name = _minilm_setup(args)
    rows.append(embedding_report(name, teacher, teacher_val, data, baseline_ms, "minilm-student"))
    # Which layers to keep: chosen by held-out cosine before training (validation only).
    candidates = {}
    for keep in ((0, 2, 4), (1, 3, 5)):
        student = copy.deepcopy(teacher)
        ts.apply_(student, LayerDropping(stack="bert.encoder.layer", keep=keep))
        from torchslim.models.minilm import embed_texts
        candidates[keep] = (float(torch.nn.functional.cosine_similarity(
            embed_texts(student, data.val_texts), teacher_val).mean()), student)
    keep = max(candidates, key=lambda k: candidates[k][0])
    student = candidates[keep][1]
    rows.append(embedding_report(f"3-layer student {list(keep)}, before distillation", student,
                                 teacher_val, data, baseline_ms, "minilm-student",
                                 heldout_cosines={str(list(k)): round(v[0], 4)
                                                  for k, v in candidates.items()}))
    minutes = distil_embeddings(student, teacher, data, epochs=args.minilm_epochs, lr=args.minilm_lr)
    rows.append(embedding_report(f"3-layer student {list(keep)}, distilled", student, teacher_val,
                                 data, baseline_ms, "minilm-student", train_minutes=minutes))
    ts.save(student, Path(args.out) / "minilm-3layer.slim")
    return rows


@section("minilm-lowrank")
def minilm_lowrank(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torchslim as ts
    from torchslim.lowrank import LowRank
    from torchslim.models import create_model

    teacher, data, teacher_val, baseline_ms, rows, name = _minilm_setup(args)
    rows.append(embedding_report(name, teacher, teacher_val, data, baseline_ms, "minilm-lowrank"))
    student = create_model("minilm")
    result = ts.apply_(student, LowRank(param_ratio=0.5),
                       targets=ts.Select(patterns=MINILM_PROJECTIONS))
    rows.append(embedding_report("FFN + attention at 50% params (SVD), before distillation",
                                 student, teacher_val, data, baseline_ms, "minilm-lowrank",
                                 layers=len(result["ranks"])))
    minutes = distil_embeddings(student, teacher, data, epochs=args.minilm_epochs, lr=args.minilm_lr)
    rows.append(embedding_report("FFN + attention at 50% params (SVD), distilled", student,
                                 teacher_val, data, baseline_ms, "minilm-lowrank",
                                 train_minutes=minutes))
    ts.save(student, Path(args.out) / "minilm-lowrank.slim")
    return rows


# ----------------------------------------------------------------------------- ResNet
@section("resnet-decompose")
def resnet_decompose(args: argparse.Namespace) -> list[dict[str, Any]]:
    import copy

    import torchslim as ts
    from torchslim.lowrank import ConvDecomposition
    from torchslim.measure import count_flops, measure_latency

    source = trained_artifact(args.resnet, "resnet-small", "fashion-mnist")
    data = load_dataset("fashion-mnist", seed=0)
    teacher = ts.load(source)
    x1, x64 = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28)
    test, val = TensorLoader(data.test, batch_size=500), TensorLoader(data.val, batch_size=500)
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}

    def row(name: str, model: nn.Module, **extra: Any) -> dict[str, Any]:
        model.eval()
        result = {"section": "resnet-decompose", "model": name,
                  "params": sum(p.numel() for p in model.parameters()),
                  "mflops": round(count_flops(model, x1) / 1e6, 2),
                  "test_accuracy": round(evaluate(model, test)["accuracy"], 4),
                  "val_accuracy": round(evaluate(model, val)["accuracy"], 4), **extra}
        for label, x in (("b1", x1), ("b64", x64)):
            ms = measure_latency(model, x, repeats=30, warmup=5).median_ms
            base.setdefault(label, ms)
            result[f"latency_{label}_ms"] = round(ms, 3)
            result[f"speedup_{label}"] = round(base[label] / ms, 2)
        base.setdefault("mflops", result["mflops"])
        result["macs_ratio"] = round(base["mflops"] / result["mflops"], 2)
        print(json.dumps(result), flush=True)
        return result

    rows.append(row("resnet-small (fp32)", teacher))
    student = copy.deepcopy(teacher)
    decomposition = ConvDecomposition(method="depthwise") if args.conv_method == "depthwise" \
        else ConvDecomposition(method=args.conv_method, param_ratio=args.conv_ratio)
    result = ts.apply_(student, decomposition, targets=ts.Select(types=("Conv2d",),
                                                                 exclude=("stem.*",)))
    rows.append(row(f"{args.conv_method} convs ({decomposition.to_dict()}), no fine-tune",
                    student, decomposed=len(result["ranks"])))
    config = make_train_config(epochs=args.resnet_epochs, batch_size=128, lr=0.01, momentum=0.9,
                               weight_decay=5e-4, schedule="cosine", seed=0)
    loss = DistillationLoss(teacher, temperature=4.0, alpha=0.5)
    start = time.perf_counter()
    Trainer(student, TensorLoader(data.train, batch_size=128, shuffle=True, seed=0), config=config,
            val_loader=val, loss=loss, progress=False).fit()
    rows.append(row(f"{args.conv_method} convs, distilled {args.resnet_epochs} epochs", student,
                    train_minutes=round((time.perf_counter() - start) / 60, 2)))
    ts.save(student, Path(args.out) / "resnet-decomposed.slim")
    return rows


# ------------------------------------------------------------------------------ main
def print_table(rows: list[dict[str, Any]]) -> None:
    keys = sorted({key for row in rows for key in row} - {"section"})
    keys = ["model"] + [k for k in keys if k != "model"]
    print("| section | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        cells = [row["section"]] + [_fmt(row.get(k)) for k in keys]
        print("| " + " | ".join(cells) + " |")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-distill-lowrank")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hinton-epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=40, help="MLP teacher epochs")
    parser.add_argument("--hinton-teachers", default="both", choices=["mlp", "cnn", "both"])
    parser.add_argument("--hinton-small", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the 784-30-10 student")
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="hard-label weight (hinton)")
    parser.add_argument("--seq-train", type=int, default=48, help="token cap when distilling")
    parser.add_argument("--minilm-epochs", type=int, default=4)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument("--resnet", default="runs/bench-foundation/resnet-small/model.slim",
                        help="trained resnet-small artifact (trained here if missing)")
    # depthwise: chosen by measured latency (tucker at 0.3 of the weights: 1.24x at batch 64,
    # spatial at 0.3: 1.35x, depthwise: 1.59x; see the note of the issue).
    parser.add_argument("--conv-method", default="depthwise", choices=["tucker", "spatial", "depthwise"])
    parser.add_argument("--conv-ratio", type=float, default=0.4, help="param_ratio (tucker, spatial)")
    parser.add_argument("--resnet-epochs", type=int, default=3)
    run_sections(parser.parse_args())


def run_sections(args: argparse.Namespace) -> None:
    """Run the chosen sections (all by default), saving OUT/results.json after each; print the table."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.only or sorted(SECTIONS):
        rows += SECTIONS[name](args)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
