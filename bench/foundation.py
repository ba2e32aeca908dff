"""Reference accuracies and training throughput of the foundation models.

Trains LeNet-300-100 and LeNet-5 on MNIST and the small ResNet on Fashion-MNIST with their
tuned defaults (model selection on the validation split only), evaluates the pretrained MNIST
CNN, and prints one table. Run: `python bench/foundation.py [--out runs/bench-foundation]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from torchslim.apps.workflows import train_config_for, train_model
from torchslim.data import TensorLoader, load_dataset
from torchslim.measure import evaluate
from torchslim.models import create_model
from torchslim.report import environment

TARGETS = {"lenet300": 0.982, "lenet5": 0.991, "resnet-small": 0.91, "mnist-cnn": 0.9906}
RUNS = (("lenet300", "mnist"), ("lenet5", "mnist"), ("resnet-small", "fashion-mnist"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench-foundation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--epochs", type=int, help="override the tuned epochs (throughput checks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model_name, dataset in RUNS:
        if args.only and model_name not in args.only:
            continue
        report = train_model(model_name, dataset=dataset, out=Path(args.out) / model_name,
                             config=train_config_for(model_name, epochs=args.epochs),
                             progress=False)
        rows.append({"model": model_name, "dataset": dataset, "epochs": report["config"]["epochs"],
                     "test_accuracy": report["test_accuracy"], "val_accuracy": report["val_accuracy"],
                     "target": TARGETS[model_name], "params": report["metrics"]["params"],
                     "train_samples_per_s": report["train_samples_per_second"],
                     "train_minutes": sum(r["seconds"] for r in report["history"]) / 60})
        print(json.dumps(rows[-1]), flush=True)
    if not args.only or "mnist-cnn" in args.only:
        test = load_dataset("mnist").test
        accuracy = evaluate(create_model("mnist-cnn"), TensorLoader(test, batch_size=1000))["accuracy"]
        rows.append({"model": "mnist-cnn (pretrained)", "dataset": "mnist", "epochs": 0,
                     "test_accuracy": accuracy, "val_accuracy": None, "target": TARGETS["mnist-cnn"],
                     "params": 390_410, "train_samples_per_s": None, "train_minutes": 0.0})
    env = environment()
    print(f"\n{env['cpu']}, {args.threads} threads, torch {env['torch']}\n")
    print("| model | dataset | epochs | test acc | target | val acc | params | train samples/s | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        val = f"{100 * r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else "–"
        speed = f"{r['train_samples_per_s']:,.0f}" if r["train_samples_per_s"] else "–"
        print(f"| {r['model']} | {r['dataset']} | {r['epochs']} | {100 * r['test_accuracy']:.2f}% | "
              f"≥{100 * r['target']:.2f}% | {val} | {r['params']:,} | {speed} | {r['train_minutes']:.1f} |")


if __name__ == "__main__":
    main()
