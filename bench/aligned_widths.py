"""Structured pruning at a MAC target: does the measured speedup follow the MAC cut?

A CPU's conv and matmul kernels compute channels a vector register at a time (16 fp32 values
with AVX-512) and pad any other width up to the next multiple, so a model pruned to widths
such as 11 or 25 does the MACs of 16 and 32. `ChannelPruning(target="macs")` rounds kept widths
to the vector width by default (`round_to="auto"`); this prints, for the default and for exact
widths (`round_to=1`), the MAC ratio, the measured speedup (eager torch, interleaved with the
unpruned model: median over rounds of the paired per-round ratio, with min-max) and their
quotient, the share of the MAC cut that became speed (goal: >= 0.85). Each model is timed in
eager PyTorch and, with `--runtime onnxruntime` or `both` (the default), as the fp32 onnxruntime
program a user deploys (BatchNorm folded into the convolutions, activations fused), where the
convolutions are a larger part of the time than in eager, which also runs BatchNorm, ReLU and the
residual adds one by one.

    python bench/aligned_widths.py [--threads 2] [--rounds 7] [--runtime eager|onnxruntime|both] [--json]

Models: resnet-small (random weights: the widths, not the accuracy, are measured here; batch
1, 32 and 64 at 28x28) and the pretrained MobileNetV2 (batch 1 and 32 at 224x224), MACs cut 2x
and 1.5x respectively; importance L2, every other option at its default. Run it on a quiet
machine: with 2 threads, another busy process makes the threads wait on each other and every
model looks equally slow.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from typing import Any

import torch
from torch import nn

from torchslim import apply_
from torchslim.measure import count_flops, time_interleaved
from torchslim.models import create_model, example_inputs, spec_of
from torchslim.pruning import ChannelPruning
from torchslim.pruning.structured import vector_lanes

CASES = {  # model: (pretrained, MAC ratio removed, batch sizes)
    "resnet-small": (False, 0.5, (1, 32, 64)),
    "mobilenet-v2": (True, 1 / 3, (1, 32)),
}


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    pretrained, ratio, batches = CASES[name]
    base = create_model(name, pretrained=pretrained).eval()
    probe = example_inputs(spec_of(base), 2)
    variants: dict[str, nn.Module] = {}
    widths: dict[str, list[int]] = {}
    for label, round_to in (("default (round_to auto)", "auto"), ("exact widths (round_to 1)", 1)):
        model = copy.deepcopy(base)
        apply_(model, ChannelPruning(ratio=ratio, target="macs", round_to=round_to), example_inputs=probe)
        variants[label] = model.eval()
        widths[label] = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    runtimes = ("eager", "onnxruntime") if args.runtime == "both" else (args.runtime,)
    programs: dict[str, list[nn.Module]] = {}
    if "onnxruntime" in runtimes:
        from torchslim.quantization.ptq import float_program

        programs["onnxruntime"] = [float_program(m, probe) for m in (base, *variants.values())]
        for program in programs["onnxruntime"]:  # sessions taking turns: idle pools must sleep
            program.spin_wait = False
    rows = []
    for runtime, batch_size in ((r, b) for r in runtimes for b in batches):
        x = example_inputs(spec_of(base), batch_size)
        models = programs.get(runtime, [base, *variants.values()])
        with torch.no_grad():
            timed = time_interleaved(models, [x] * len(models), rounds=args.rounds, repeats=4,
                                     threads=args.threads)
        for (label, model), result in zip(variants.items(), timed[1:], strict=True):
            paired = [b / m for b, m in zip(timed[0]["round_medians_ms"], result["round_medians_ms"],
                                            strict=True)]
            mac_ratio = count_flops(base, x[:1]) / count_flops(model, x[:1])
            speedup = statistics.median(paired)
            rows.append({"model": name, "runtime": runtime, "variant": label, "batch": batch_size,
                         "threads": args.threads,
                         "mac_ratio": round(mac_ratio, 3), "speedup": round(speedup, 3),
                         "speedup_spread": [round(min(paired), 3), round(max(paired), 3)],
                         "share_of_mac_cut": round(speedup / mac_ratio, 3),
                         "baseline_ms": round(timed[0]["median_ms"], 2),
                         "pruned_ms": round(result["median_ms"], 2), "noisy": result["noisy"],
                         "widths": widths[label][:12]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--runtime", choices=("eager", "onnxruntime", "both"), default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {vector_lanes()} fp32 lanes; "
          f"{args.threads} threads, {args.rounds} interleaved rounds x 4 runs")
    for name in args.models.split(","):
        for row in measure(name, args):
            low, high = row["speedup_spread"]
            print(json.dumps(row) if args.json else
                  f"{row['model']:13s} {row['runtime']:11s} b={row['batch']:<3d} {row['variant']:27s} "
                  f"MACs /{row['mac_ratio']:.2f}  speedup {row['speedup']:.2f}x [{low:.2f}-{high:.2f}]"
                  f"  share {row['share_of_mac_cut']:.2f}{'  (noisy)' if row['noisy'] else ''}"
                  f"  widths {row['widths']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
