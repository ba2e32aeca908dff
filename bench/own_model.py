"""Every technique on models torchslim did not write: one table per model.

The models are the conformance suite's (tests/user_zoo.py: a TF-"SAME" Conv2d subclass, GroupNorm,
a residual net returning a tuple, a 2-layer LSTM, keyword inputs, nn.MultiheadAttention), trained
for a few epochs on scikit-learn's 8x8 digits with plain DataLoaders. Each row is one technique
applied to a copy of the trained model (pruning and low-rank followed by one distilled epoch):
whether it works (or why not), params, MACs, bytes of the real .slim file (entropy-coded), test accuracy, and
the batch-64 latency ratio against the unchanged model, both timed interleaved in this run
(medians over rounds, min-max of the ratio across rounds). Torch-Pruning (DepGraph, group L2)
gets the same structured cases when it is installed:
`pip install -c constraints.txt torch-pruning`.

    python bench/own_model.py [--epochs 10] [--rounds 5] [--only same_conv,lstm]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import user_zoo as zoo
from torchslim import apply_, artifact, finalize_
from torchslim.calibration import first_samples
from torchslim.distillation import DistillationLoss
from torchslim.errors import SlimError
from torchslim.lowrank import LowRank
from torchslim.measure import count_flops, count_params, evaluate, measure_latency
from torchslim.pruning import ChannelPruning, WeightPruning
from torchslim.quantization import Quantization, quantize_model
from torchslim.training import Trainer, make_train_config


def train(model: nn.Module, data: dict[str, Any], epochs: int, teacher: nn.Module | None = None) -> None:
    """Adam; lr 0.01 for the baseline, 0.002 for the distilled epoch after a technique."""
    loss = DistillationLoss(teacher, temperature=4, alpha=0.5) if teacher is not None else None
    lr = 0.01 if teacher is None else 0.002
    Trainer(model, data["train"], val_loader=data["val"], loss=loss, progress=False,
            config=make_train_config(epochs=epochs, lr=lr, optimizer="adam", seed=0)).fit()
    model.eval()


def file_bytes(model: nn.Module) -> int:
    """Bytes of the model's compressed .slim file (sparse, entropy-coded; int8 programs zstd)."""
    with tempfile.TemporaryDirectory() as folder:
        return artifact.save(model, Path(folder) / "m.slim", encoding=artifact.Encoding()).stat().st_size


def positional(x: Any) -> tuple[Any, ...]:
    return tuple(x.values()) if isinstance(x, dict) else (x,)


def macs(model: nn.Module, x: Any) -> int:
    return count_flops(model, first_samples(x, 1)) // 2


def latency_ratio(base: nn.Module, other: nn.Module, x: Any, rounds: int) -> tuple[float, float, float]:
    """Median and min/max over rounds of base/other batch latency, the two timed in turn."""
    ratios = []
    for _ in range(rounds):
        before = measure_latency(base, x, repeats=10).median_ms
        ratios.append(before / measure_latency(other, x, repeats=10).median_ms)
    return statistics.median(ratios), min(ratios), max(ratios)


def techniques(name: str, trained: nn.Module, data: dict[str, Any], x: Any) -> dict[str, Any]:
    """Technique label -> function(copy of the trained model) -> the compressed model."""
    def unstructured(model: nn.Module) -> nn.Module:
        apply_(model, WeightPruning(sparsity=0.5))
        train(model, data, 1, teacher=trained)  # masks stay while training
        return finalize_(model)

    def structured(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=positional(x))
        if result["params_after"] == result["params_before"]:
            raise SlimError("; ".join(str(w.message) for w in caught)[:120])
        train(model, data, 1, teacher=trained)
        return model

    def lowrank(model: nn.Module) -> nn.Module:
        apply_(model, LowRank(param_ratio=0.5))
        train(model, data, 1, teacher=trained)
        return model

    def int8(method: str) -> Any:
        def run(model: nn.Module) -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return quantize_model(model, Quantization(method=method), example_inputs=x,
                                      calibration=data["train"])
        return run

    chosen: dict[str, Any] = {"prune 50% (unstructured)": unstructured,
                              "channels 50% (torchslim)": structured, "low-rank 50%": lowrank,
                              "int8 dynamic": int8("dynamic"), "int8 static": int8("static")}
    if importlib.util.find_spec("torch_pruning") is not None:
        chosen["channels 50% (Torch-Pruning)"] = torch_pruning(trained, data, x)
    return chosen


def torch_pruning(trained: nn.Module, data: dict[str, Any], x: Any) -> Any:
    def run(model: nn.Module) -> nn.Module:
        import torch_pruning as tp

        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        example = x if isinstance(x, torch.Tensor) else positional(x)
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=[head])
        pruner.step()
        train(model, data, 1, teacher=trained)
        return model
    return run


def bench_model(name: str, args: argparse.Namespace) -> None:
    data = zoo.loaders(name)
    trained = zoo.build(name).train()
    train(trained, data, args.epochs)
    x = zoo.example(name, 64)
    base_acc = evaluate(trained, data["test"])["accuracy"]
    rows = [("baseline", "yes", count_params(trained)[0], macs(trained, x), file_bytes(trained),
             base_acc, "1.00")]
    for label, technique in techniques(name, trained, data, x).items():
        torch.manual_seed(0)
        try:
            model = technique(copy.deepcopy(trained))
        except Exception as exc:  # a refusal is a row too: what the user would read
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            rows.append((label, f"no: {reason[:90]}", "", "", "", "", ""))
            continue
        median, low, high = latency_ratio(trained, model, x, args.rounds)
        params = getattr(model, "weight_count", 0) or count_params(model)[0]
        rows.append((label, "yes", params, macs(model, x), file_bytes(model),
                     evaluate(model, data["test"])["accuracy"], f"{median:.2f} ({low:.2f}-{high:.2f})"))
    print(f"\n### {name} ({type(trained).__name__})\n")
    print("| technique | works | params | MACs | bytes | test accuracy | latency ratio b=64 |")
    print("|---|---|---|---|---|---|---|")
    for label, works, params, macs_, size, acc, ratio in rows:
        accuracy = f"{100 * acc:.1f}%" if isinstance(acc, float) else acc
        print(f"| {label} | {works} | {params if params == '' else f'{params:,}'} | "
              f"{macs_ if macs_ == '' else f'{macs_:,}'} | {size if size == '' else f'{size:,}'} | "
              f"{accuracy} | {ratio} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--only", default=",".join(sorted(zoo.MODELS)), help="comma-separated model names")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.only.split(","):
        bench_model(name, args)


if __name__ == "__main__":
    main()
