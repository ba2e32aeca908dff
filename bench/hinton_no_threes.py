"""Hinton et al. 2015, MNIST: a student that never sees a 3 still learns 3s from soft targets.

The 784-800-800-10 student is distilled (T = 20) from the recipe's teacher
(`examples/recipes/hinton_mnist_distill.yaml` writes it to runs/hinton-lenet5-teacher/model.slim) on a
transfer set with every 3 removed. Its errors on the test 3s are counted before and after
raising the bias of class 3, the paper's fix for the class's missing prior; the bias is chosen
on the validation split (which keeps its 3s), never on the test set. Paper: 206 errors, 133 of
them on the 1010 threes; with the bias raised by 3.5, 109 errors, 14 on threes.

`python bench/hinton_no_threes.py [--teacher runs/hinton-lenet5-teacher/model.slim] [--epochs 20]`
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from torchslim import artifact
from torchslim.data import Split, TensorLoader, load_dataset
from torchslim.distillation import DistillationLoss
from torchslim.models import create_model
from torchslim.training import Trainer, make_train_config


@torch.no_grad()
def logits(model: torch.nn.Module, split: Split) -> torch.Tensor:
    """The model's logits on a whole split, (N, 10)."""
    model.eval()
    return torch.cat([model(x) for x, _ in TensorLoader(split, batch_size=1000)])


def errors(scores: torch.Tensor, labels: torch.Tensor, shift: float, digit: int = 3) -> tuple[int, int]:
    """(all errors, errors on `digit`) once `shift` is added to that class's logit."""
    scores = scores.clone()
    scores[:, digit] += shift
    wrong = scores.argmax(1) != labels
    return int(wrong.sum()), int(wrong[labels == digit].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/hinton-lenet5-teacher/model.slim")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", seed=0)
    keep = data.train.labels != 3
    transfer = Split(data.train.images[keep], data.train.labels[keep])
    teacher = artifact.load(args.teacher).eval()
    torch.manual_seed(0)
    student = create_model("mlp-800-800", pretrained=False)
    config = make_train_config(epochs=args.epochs, optimizer="adam", lr=1e-3, schedule="cosine",
                               shift=2, seed=0)
    started = time.perf_counter()
    Trainer(student, TensorLoader(transfer, batch_size=128, shuffle=True, seed=0), config=config,
            loss=DistillationLoss(teacher, temperature=args.temperature, alpha=args.alpha),
            progress=False).fit()
    minutes = (time.perf_counter() - started) / 60
    val, test = logits(student, data.val), logits(student, data.test)
    shifts = [s / 2 for s in range(0, 21)]  # 0 .. 10 in steps of 0.5
    chosen = min(shifts, key=lambda s: errors(val, data.val.labels, s)[0])
    rows = []
    for name, shift in (("no bias change", 0.0), (f"bias of 3 raised by {chosen:g} (validation)", chosen)):
        total, threes = errors(test, data.test.labels, shift)
        val_total, _ = errors(val, data.val.labels, shift)
        rows.append({"student": name, "test_errors": total, "test_errors_on_3": threes,
                     "test_threes": int((data.test.labels == 3).sum()), "val_errors": val_total})
        print(json.dumps(rows[-1]), flush=True)
    total, threes = errors(logits(teacher, data.test), data.test.labels, 0.0)
    print(json.dumps({"teacher_test_errors": total, "teacher_errors_on_3": threes,
                      "transfer_set": len(transfer), "train_minutes": round(minutes, 1)}))
    print("\n| student (no 3s in the transfer set) | test errors | of which 3s | validation errors |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['student']} | {row['test_errors']} | {row['test_errors_on_3']} / "
              f"{row['test_threes']} | {row['val_errors']} |")


if __name__ == "__main__":
    main()
