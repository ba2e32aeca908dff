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


def mlp(hidden: tuple[int, ...], *, dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
    width = 784
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ----------------------------------------------------------------------------- hinton
@section("hinton")
def hinton(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = load_dataset("mnist", seed=0)
    train = TensorLoader(data.train, batch_size=128, shuffle=True, seed=0)
    val, test = (TensorLoader(s, batch_size=1000) for s in (data.val, data.test))
    config = make_train_config(epochs=args.hinton_epochs, batch_size=128, lr=0.05, momentum=0.9,
                               schedule="cosine", weight_decay=0.0, seed=0)

    def fit(model: nn.Module, loss: Any = None) -> tuple[nn.Module, float]:
        torch.manual_seed(0)
        start = time.perf_counter()
        Trainer(model, train, config=config, val_loader=val, loss=loss, progress=False).fit()
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

    torch.manual_seed(0)
    teacher, seconds = fit(mlp((1200, 1200), dropout=0.5, input_dropout=0.2))
    rows = [row("teacher 784-1200-1200-10 (dropout)", teacher, seconds)]
    for hidden in ((800, 800), (30,)):
        shape = "784-" + "-".join(map(str, hidden)) + "-10"
        torch.manual_seed(0)
        student, seconds = fit(mlp(hidden))
        rows.append(row(f"student {shape}, hard labels", student, seconds))
        torch.manual_seed(0)
        loss = DistillationLoss(teacher, temperature=args.temperature, alpha=args.alpha,
                                cache_teacher=True)
        student, seconds = fit(mlp(hidden), loss)
        rows.append(row(f"student {shape}, distilled T={args.temperature:g} "
                        f"alpha={args.alpha:g}", student, seconds))
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
    parser.add_argument("--hinton-epochs", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="hard-label weight (hinton)")
    args = parser.parse_args()
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
