"""A decoder language model (Llama architecture built from a config in code, random weights,
nothing downloaded) against its compressed versions: int8 dynamic on the torch backend and
structured pruning of half the heads (key/value groups kept whole) and half of every MLP.

For each model: parameters, prefill latency (batch 8 x 128 tokens, no cache) and greedy decoding
speed (batch 1, a 16-token prompt, 32 new tokens with the key/value cache) in tokens/s. The models
are timed interleaved in this one process, `--rounds` rounds, medians with the min-max.

    python bench/decoder_lm.py [--rounds 5] [--threads 2] [--layers 4] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from torchslim import apply_
from torchslim.pruning import ChannelPruning
from torchslim.quantization import Quantization, quantize_model


def build(layers: int, hidden: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                      num_key_value_heads=hidden // 96 or 1, vocab_size=8192)
    return transformers.LlamaForCausalLM(config).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state dict, tied ones counted once (int8 weights are buffers
    or packed objects, not parameters, so a parameter count would not see them)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        tensors = [value] if isinstance(value, torch.Tensor) else [
            t for t in getattr(value, "__obj_flatten__", lambda: [])() if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    generator = torch.Generator().manual_seed(0)
    prompt = {"input_ids": torch.randint(0, 8192, (1, 16), generator=generator)}
    prefill = {"input_ids": torch.randint(0, 8192, (8, 128), generator=generator)}
    new_tokens = 32

    dense = build(args.layers, args.hidden)
    int8 = quantize_model(dense, Quantization(method="dynamic", backend="torch"), example_inputs=prompt)
    pruned = build(args.layers, args.hidden)
    apply_(pruned, ChannelPruning(ratio=0.5), example_inputs=prompt)
    models = {"fp32": dense, "int8 dynamic (torch)": int8, "pruned 50% heads+MLP": pruned.eval()}

    reference = dense.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    for name, model in models.items():
        tokens = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
        same = int((tokens[0, 16:] == reference[0, 16:]).cumprod(0).sum())
        print(f"{name:22s} {weight_bytes(model) / 1e6:6.1f} MB of weights; first {same}/{new_tokens} "
              "greedy tokens equal fp32's")

    prefill_s: dict[str, list[float]] = {name: [] for name in models}
    decode_s: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in models.items():
                prefill_s[name].append(timed(lambda m=model: m(**prefill, use_cache=False)))
                decode_s[name].append(timed(lambda m=model: m.generate(
                    **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)))
    base_prefill, base_decode = prefill_s["fp32"], decode_s["fp32"]
    print(f"\n{args.threads} threads, {args.rounds} interleaved rounds (median, min-max of per-round ratios)")
    for name in models:
        ratio_p = [b / o for b, o in zip(base_prefill, prefill_s[name], strict=True)]
        ratio_d = [b / o for b, o in zip(base_decode, decode_s[name], strict=True)]
        print(f"{name:22s} prefill b8x128 {1000 * statistics.median(prefill_s[name]):7.1f} ms "
              f"({statistics.median(ratio_p):.2f}x, {min(ratio_p):.2f}-{max(ratio_p):.2f}); "
              f"decode b1 {new_tokens / statistics.median(decode_s[name]):6.1f} tokens/s "
              f"({statistics.median(ratio_d):.2f}x, {min(ratio_d):.2f}-{max(ratio_d):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
