"""Deep Compression on LeNet-300-100 and LeNet-5, reported like Table 1 of Han et al. 2016.

Runs the shipped recipes end to end (baseline training included), then re-encodes the stage
results to show what each stage buys on disk: pruning only (sparse index + float32 values),
+ weight sharing (bit-packed codebook indices), + entropy coding (Huffman, zstd, ANS, best of
all). Beside it, the same trained baseline pruned with `torch.nn.utils.prune` and saved with
`torch.save`, the route users know. Every size is a real file on disk.

Run: `python bench/deep_compression.py [--only lenet300] [--out runs/bench-deep-compression]`
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from torchslim import artifact
from torchslim.apps.compress import CompressionRun
from torchslim.apps.recipe import load_recipe

RECIPES = {"lenet300": "examples/recipes/lenet300_deep_compression.yaml",
           "lenet5": "examples/recipes/lenet5_deep_compression.yaml"}
PAPER = {"lenet300": "40x, 1.64% -> 1.58%", "lenet5": "39x, 0.80% -> 0.74%"}


def file_size(model: nn.Module, encoding: artifact.Encoding | None) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return artifact.save(model, Path(folder) / "m.slim", encoding=encoding).stat().st_size


def torch_prune_size(baseline: nn.Module, sparsity: dict[str, float]) -> tuple[int, int]:
    """torch.nn.utils.prune with the same per-layer amounts, saved by torch.save (masked, removed)."""
    modules = dict(baseline.named_modules())
    for name, amount in sparsity.items():
        torch_prune.l1_unstructured(modules[name], "weight", amount=amount)
    masked = io.BytesIO()
    torch.save(baseline.state_dict(), masked)
    for name in sparsity:
        torch_prune.remove(modules[name], "weight")
    removed = io.BytesIO()
    torch.save(baseline.state_dict(), removed)
    return masked.getbuffer().nbytes, removed.getbuffer().nbytes


def bench(name: str, out: Path) -> list[dict[str, Any]]:
    started = time.perf_counter()
    report = CompressionRun(load_recipe(RECIPES[name]), out / name, progress=False).run()
    stages = out / name / "stages"
    baseline = artifact.load(stages / "00-baseline.slim")
    pruned = artifact.load(sorted(stages.glob("01-*.slim"))[0])
    final = artifact.load(out / name / "model.slim")
    weights = {n: m for n, m in final.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    sparsity = {n: float((m.weight == 0).float().mean()) for n, m in weights.items()}
    dense = file_size(baseline, None)
    paper_dense = 4 * sum(m.weight.numel() for m in weights.values())
    base_err, final_err = 1 - report["baseline"]["test_accuracy"], 1 - report["final"]["test_accuracy"]
    rows = [("dense fp32 (torchslim v0 artifact)", dense, base_err)]
    masked, removed = torch_prune_size(baseline, sparsity)
    rows += [("torch.nn.utils.prune + torch.save (mask kept)", masked, None),
             ("torch.nn.utils.prune + torch.save (prune.remove)", removed, None),
             ("pruning only (sparse index + fp32 values)", file_size(pruned, artifact.Encoding(
                 coder="raw")), 1 - report["rows"][1]["test_accuracy"]),
             ("+ weight sharing (bit-packed indices)", file_size(final, artifact.Encoding(coder="raw")),
              final_err)]
    for coder in ("huffman", "zstd", "ans"):
        rows.append((f"+ entropy coding: {coder}", file_size(final, artifact.Encoding(coder=coder)),
                     final_err))
    rows.append(("+ entropy coding: best per stream (shipped model.slim)",
                 (out / name / "model.slim").stat().st_size, final_err))
    print(f"\n## {name}: paper {PAPER[name]}; dense fp32 weights alone {paper_dense:,} B; "
          f"{time.perf_counter() - started:.0f} s for the whole run\n")
    print("| stage | bytes on disk | ratio vs dense file | ratio vs fp32 weights | test error |")
    print("|---|---|---|---|---|")
    for label, size, err in rows:
        error = f"{100 * err:.2f}%" if err is not None else "– (same sparsity per layer, one-shot)"
        print(f"| {label} | {size:,} | {dense / size:.1f}x | {paper_dense / size:.1f}x | {error} |")
    layer_text = ", ".join(f"{n} {100 * (1 - s):.1f}% kept" for n, s in sparsity.items())
    print(f"\nweights kept per layer: {layer_text}")
    print(f"baseline test error {100 * base_err:.2f}% -> compressed {100 * final_err:.2f}% "
          f"(model selection on the validation split only)")
    return [{"model": name, "stage": label, "bytes": size} for label, size, _ in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench-deep-compression")
    parser.add_argument("--only", nargs="*", choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for name in args.only or sorted(RECIPES):
        bench(name, Path(args.out))
    print(f"\ntotal wall-clock: {(time.perf_counter() - started) / 60:.1f} min on "
          f"{args.threads} threads")


if __name__ == "__main__":
    main()
