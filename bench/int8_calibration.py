"""MobileNetV2 static int8: how each choice of activation ranges and weights keeps the fp32 model's answers.

The calibration and evaluation crops are those of `bench/quantization.py` (64 crops of
scikit-learn's two sample photos each, seeds 0 and 1; no ImageNet here), so the rows compare
with its `mobilenet` section. Per choice: top-1 agreement with fp32, SQNR of the logits (dB) and
KL divergence to fp32, and the conversion's wall time. Quality only: the int8 graph, and so
its speed, is the same for every choice (only the activation scales, the weights' roundings and
the biases differ). The last rows add bias correction and AdaRound (`--bias-correction`,
`--adaround`) to the best range choice; with them, `simulated_sqnr_db` is what the torch
simulation the weights were fitted in predicts on the calibration crops.

    python bench/int8_calibration.py [--json] [--only NAME ...] [--latency] [--activation-errors]

`--activation-errors` asks where the activations' rounding costs: in a torch simulation of the
p99.99 program, each Conv/Linear input is put on the uint8 grid that program gives it (weights
and everything else float), all at once and then one at a time, and the output SQNR is printed
for all, for the worst few alone, and the share of the summed error power those few carry.

Rows with `sensitivity` keep their most int8-sensitive layers in float: a different program,
so `--latency` times it against the plain p99.99 program (interleaved, batch 1 and 32).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from torchslim.models import create_model
from torchslim.quantization import Quantization, quantize_model, sqnr_db

sys.path.insert(0, str(Path(__file__).parent))
from quantization import photo_crops  # the crops of the sibling benchmark

CHOICES = {
    "minmax": {"calibrate": "minmax"},
    "entropy (KL, 2048 bins)": {"calibrate": "entropy"},
    "percentile 99.999": {"calibrate": "percentile"},
    "percentile 99.99": {"calibrate": "percentile", "percentile": 99.99},
    "percentile 99.9": {"calibrate": "percentile", "percentile": 99.9},
    "minmax + equalize": {"calibrate": "minmax", "equalize": True},
    "minmax + AdaRound": {"calibrate": "minmax", "adaround": True},
    "p99.99 + equalize": {"calibrate": "percentile", "percentile": 99.99, "equalize": True},
    "p99.99 + bias correction": {"calibrate": "percentile", "percentile": 99.99, "bias_correction": True},
    "p99.99 + AdaRound": {"calibrate": "percentile", "percentile": 99.99, "adaround": True},
    "p99.99 + AdaRound + bias corr.": {"calibrate": "percentile", "percentile": 99.99, "adaround": True,
                                       "bias_correction": True},
    "p99.99 + equalize + AdaRound": {"calibrate": "percentile", "percentile": 99.99, "equalize": True,
                                     "adaround": True},
    "p99.99 + range search": {"calibrate": "percentile", "percentile": 99.99, "range_search": True},
    "p99.99 + range search + AdaRound": {"calibrate": "percentile", "percentile": 99.99, "range_search": True,
                                         "adaround": True},
    "p99.99 + equalize + range search + AdaRound": {"calibrate": "percentile", "percentile": 99.99,
                                                    "equalize": True, "range_search": True, "adaround": True},
    "p99.99 + equalize + range search + AdaRound + sens. 0.05": {
        "calibrate": "percentile", "percentile": 99.99, "equalize": True, "range_search": True,
        "adaround": True, "sensitivity": 0.05},
    "p99.99 + sensitivity 0.05": {"calibrate": "percentile", "percentile": 99.99, "sensitivity": 0.05},
    "p99.99 + sensitivity 0.1": {"calibrate": "percentile", "percentile": 99.99, "sensitivity": 0.1},
    "p99.99 + AdaRound + sens. 0.05": {"calibrate": "percentile", "percentile": 99.99, "adaround": True,
                                       "sensitivity": 0.05},
    "p99.99 + equalize + AdaRound + sens. 0.05": {"calibrate": "percentile", "percentile": 99.99,
                                                  "equalize": True, "adaround": True, "sensitivity": 0.05},
    "p99.99 + equalize + AdaRound + sens. 0.1": {"calibrate": "percentile", "percentile": 99.99,
                                                 "equalize": True, "adaround": True, "sensitivity": 0.1},
}
LATENCY_BATCHES = (1, 32)  # --latency: batch sizes timed (224 x 224 crops, 2 threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(CHOICES), metavar="NAME",
                        help=f"rows to run (default all): {', '.join(CHOICES)}")
    parser.add_argument("--activation-errors", action="store_true",
                        help="only simulate the p99.99 program's activation grids, all and each alone")
    parser.add_argument("--latency", action="store_true",
                        help="rows whose program keeps layers in float (sensitivity): time it against "
                             "the plain p99.99 program, interleaved, at batch 1 and 32")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = create_model("mobilenet-v2").eval()
    calibration = list(photo_crops(64, seed=0).split(16))
    evaluation = photo_crops(64, seed=1)
    with torch.no_grad():
        reference = model(evaluation)
    if args.activation_errors:
        return activation_errors(model, calibration, evaluation, reference)
    baseline = None
    for name, options in CHOICES.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        int8 = quantize_model(model, Quantization(method="static", **options),
                              example_inputs=evaluation[:2], calibration=calibration)
        converted = time.perf_counter() - started
        with torch.no_grad():
            logits = torch.cat([int8(x) for x in evaluation.split(16)])
        kl = torch.nn.functional.kl_div(logits.log_softmax(1), reference.log_softmax(1),
                                        log_target=True, reduction="batchmean")
        row = {"calibration": name, "top1_agreement": round(float((logits.argmax(1) == reference.argmax(1))
                                                                 .float().mean()), 4),
               "sqnr_db": round(sqnr_db(reference, logits), 2), "kl_to_fp32": round(float(kl), 4),
               "convert_s": round(converted, 1)}
        report = getattr(int8, "report", {})
        simulated = report.get("reconstruction", {}).get("simulated_sqnr_db")
        if simulated is not None:
            row["simulated_sqnr_db"] = simulated
        if "sensitivity" in report:
            row["kept_float"] = report["sensitivity"]["kept_float"]
            if args.latency:
                if baseline is None:
                    plain = Quantization(method="static", **CHOICES["percentile 99.99"])
                    baseline = quantize_model(model, plain, example_inputs=evaluation[:2],
                                              calibration=calibration)
                row["latency_ratio"] = _latency_ratios(baseline, int8, evaluation)
        print(json.dumps(row) if args.json else
              f"{name:31s} top-1 agreement {row['top1_agreement']:.3f}  SQNR {row['sqnr_db']:5.2f} dB  "
              f"KL {row['kl_to_fp32']:.4f}  {row['convert_s']:6.1f} s"
              + (f"  (simulated {simulated:.2f} dB)" if simulated is not None else "")
              + (f"  float: {', '.join(row['kept_float'])}" if "kept_float" in row else "")
              + (f"  latency vs plain int8: {row['latency_ratio']}" if "latency_ratio" in row else ""),
              flush=True)
    return 0


def activation_errors(model: torch.nn.Module, calibration: list[torch.Tensor],
                      evaluation: torch.Tensor, reference: torch.Tensor, worst: int = 8) -> int:
    """Print the output SQNR with the p99.99 program's activation grids on every Conv/Linear
    input (weights float), and with each input alone on its grid, worst first."""
    from torchslim.quantization.layer_reconstruction import ACTIVATION_SPEC, program_grids
    from torchslim.quantization.primitives import fake_quantize

    int8 = quantize_model(model, Quantization(method="static", **CHOICES["percentile 99.99"]),
                          example_inputs=evaluation[:2], calibration=calibration)
    grids = program_grids(int8.program).inputs
    layers = {name: m for name, m in model.named_modules() if name in grids}

    def simulated(names: list[str]) -> float:
        def on_grid(name: str) -> Any:
            scale, zero = grids[name]
            return lambda _, args: (fake_quantize(args[0], torch.tensor(scale), torch.tensor(float(zero)),
                                                  ACTIVATION_SPEC), *args[1:])
        handles = [layers[n].register_forward_pre_hook(on_grid(n)) for n in names]
        try:
            with torch.no_grad():
                return sqnr_db(reference, model(evaluation))
        finally:
            for handle in handles:
                handle.remove()

    every = simulated(list(layers))
    alone = sorted((simulated([name]), name) for name in layers)
    power = sum(10 ** (-db / 10) for db, _ in alone)
    print(f"{len(layers)} Conv/Linear inputs on the program's grids, weights float: {every:.2f} dB "
          f"(the sum of each alone's error power: {-10 * math.log10(power):.2f} dB)")
    for db, name in alone[:worst]:
        print(f"  {name:28s} alone {db:6.2f} dB  ({10 ** (-db / 10) / power:5.1%} of the error power)")
    share = sum(10 ** (-db / 10) for db, _ in alone[:worst]) / power
    print(f"the {worst} worst carry {share:.0%} of it; all but them on their grids: "
          f"{simulated([name for _, name in alone[worst:]]):.2f} dB")
    return 0


def _latency_ratios(baseline: torch.nn.Module, candidate: torch.nn.Module,
                    crops: torch.Tensor) -> dict[str, str]:
    """Per batch size: the candidate's median latency over the plain int8 program's, timed in
    turns (7 rounds of 5), with the spread of the per-round ratios."""
    from torchslim.measure import time_interleaved

    ratios = {}
    for batch in LATENCY_BATCHES:
        inputs = crops[:1].expand(batch, -1, -1, -1).contiguous()
        base, cand = time_interleaved([baseline, candidate], [inputs, inputs], rounds=7, repeats=5, threads=2)
        rounds = sorted(c / b for b, c in zip(base["round_medians_ms"], cand["round_medians_ms"],
                                              strict=True))
        ratios[f"batch {batch}"] = (f"{cand['median_ms'] / base['median_ms']:.3f}x "
                                    f"[{rounds[0]:.3f}-{rounds[-1]:.3f}] ({base['median_ms']:.1f} ms plain)")
    return ratios


if __name__ == "__main__":
    raise SystemExit(main())
