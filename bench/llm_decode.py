"""Decoding speed of SmolLM2-135M with int4 weights on a real kernel against fp32, same run.

The int4 model is round-to-nearest int4 (group 64, symmetric; the codes GPTQ or AWQ would choose
run at the same speed) on onnxruntime's `MatMulNBits` (`Int4Kernel`), with the tied lm_head and
the embedding in fp32; "int4 + head4" / "head8" also quantize that pair as one table of 4- or
8-bit codes (`WeightOnly(embeddings=True, embedding_bits=)`), the head then running on
`MatMulNBits` too. Layers reading one input (q/k/v, gate/up) run as one stacked call, as
`Int4Kernel` groups them. Greedy decoding at
batch 1 (16-token prompt, 32 new tokens, key/value cache)
and prefill at batch 8 x 128 tokens, fp32 and int4 timed interleaved, `--rounds` rounds, medians
with the min-max of the per-round ratios.

`--genai` adds each model exported whole (`torchslim export --format genai`: the decoding step
with its key/value cache in one onnxruntime program, the same codes on `MatMulNBits`) and decoded
by onnxruntime-genai, timed in the same rounds (decoding only; its ratios are given against
both fp32 rows: torch's and the fp32 model exported the same way).

    python bench/llm_decode.py [--rounds 5] [--threads 2] [--genai]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from torchslim import apply_
from torchslim.models.language import load_language_model
from torchslim.quantization import Int4Kernel, WeightOnly
from torchslim.select import Select


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai", action="store_true", help="also the models exported for onnxruntime-genai")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dense = load_language_model("smollm2-135m")
    int4 = copy.deepcopy(dense)
    apply_(int4, WeightOnly(bits=4, group_size=64), targets=Select(exclude=("lm_head",)))
    changes = apply_(int4, Int4Kernel())
    print(f"int4 kernel layers: {len(changes.changed)}; left in float: {changes.skipped or 'none'}")
    heads = {}
    for bits in (4, 8):  # + the tied embedding / lm_head as one table of 4- or 8-bit codes
        heads[bits] = copy.deepcopy(dense)
        apply_(heads[bits], WeightOnly(bits=4, group_size=64, embeddings=True, embedding_bits=bits))
        changes = apply_(heads[bits], Int4Kernel())
        print(f"int4 + head{bits}: {len(changes.changed)} kernel layers; {changes['copied']}")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, 16), generator=generator)
    prefill = torch.randint(0, 49152, (8, 128), generator=generator)
    models = {"fp32": dense, "int4 (MatMulNBits)": int4, "int4 + head4": heads[4], "int4 + head8": heads[8]}
    decode: dict[str, list[float]] = {name: [] for name in models}
    fill: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(input_ids=prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                decode[name].append(32 / (time.perf_counter() - start))
                start = time.perf_counter()
                model(input_ids=prefill, use_cache=False)
                fill[name].append(time.perf_counter() - start)
    exported = _genai_rows(models, args) if args.genai else {}
    for name in models:
        print(f"{name:20s} decode b1 {statistics.median(decode[name]):6.1f} tokens/s, "
              f"prefill b8x128 {1000 * statistics.median(fill[name]):7.1f} ms")
    for name in list(models)[1:]:
        speed = [i / d for i, d in zip(decode[name], decode["fp32"], strict=True)]
        prefill_ratio = [d / i for d, i in zip(fill["fp32"], fill[name], strict=True)]
        print(f"{name} / fp32: decode {statistics.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f}), "
              f"prefill {statistics.median(prefill_ratio):.2f}x "
              f"({min(prefill_ratio):.2f}-{max(prefill_ratio):.2f}); "
              f"{args.threads} threads, {args.rounds} interleaved rounds")
    for name, speeds in exported.items():
        print(f"{name:28s} decode b1 {statistics.median(speeds):6.1f} tokens/s")
        for base in ("fp32", "fp32 (genai)") if name not in ("fp32", "fp32 (genai)") else ():
            reference = exported[base]
            ratio = [i / d for i, d in zip(speeds, reference, strict=True)]
            print(f"    / {base}: {statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})")
    return 0


def _genai_rows(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, list[float]]:
    """Each model exported whole and decoded by onnxruntime-genai; these rounds are timed after
    the torch rounds (torch's rows are re-timed in them: `fp32` below is from the same rounds)."""
    from torchslim.apps.language import decode_speed, genai_decode_speed
    from torchslim.export import export_model
    from torchslim.models.language import tokenizer_for

    folder = Path(tempfile.mkdtemp(prefix="llm-genai-"))
    names = {"fp32": "fp32 (genai)", "int4 (MatMulNBits)": "int4 (genai)",
             "int4 + head4": "int4 + head4 (genai)", "int4 + head8": "int4 + head8 (genai)"}
    paths = {}
    for name, model in models.items():
        target = folder / names[name].replace(" ", "_").replace("(", "").replace(")", "")
        result = export_model(model, target, format="genai", tokenizer=tokenizer_for(model),
                              example_inputs={"input_ids": torch.randint(0, 49152, (1, 8))})
        print(f"{names[name]}: {len(result['int4_nodes'])} nodes on codes (MatMulNBits, "
              f"GatherBlockQuantized), float: "
              f"{sorted(result['float_matmuls']) or 'none'}, {result['bytes']:,} bytes, "
              f"logits within {result['max_relative_difference']:.2g}")
        paths[names[name]] = target
    speeds: dict[str, list[float]] = {"fp32": [], **{n: [] for n in paths}}
    for _ in range(args.rounds):
        speeds["fp32"].append(decode_speed(models["fp32"], repeats=1))
        for name, path in paths.items():
            speeds[name].append(genai_decode_speed(path, repeats=1, threads=args.threads))
    print(f"onnxruntime-genai rounds ({args.rounds}, interleaved with torch fp32 at "
          f"{statistics.median(speeds['fp32']):.1f} tokens/s):")
    return speeds


if __name__ == "__main__":
    raise SystemExit(main())
