"""SmolLM2-135M compressed one-shot: perplexity of every method against the dense model, same run.

Loads `smollm2-135m` once, draws the calibration windows from the `python-docs` calibration
split (standard-library docstrings) and scores perplexity on the held-out split (the Language
Reference topics), non-overlapping 512-token windows. Every method starts from a fresh copy of
the dense model; the dense perplexity is measured in the same run. lm_head is tied to the
embeddings and stays dense (said per method). Wall time of each method's calibration is printed,
with the memory it added on top of the model copy (peak resident memory while it ran, minus
before), also as a multiple of the fp32 model's bytes.

    python bench/llm.py [--sequences 128] [--length 512] [--eval-tokens 0 (all)] [--methods a,b]
                        [--file-bytes]

Methods: magnitude, wanda, sparsegpt, wanda-2:4, sparsegpt-2:4 (50%); rtn4, rtn4-asym, rtn4-emb
(+ the tied embedding and head as one int4 table), rtn4-emb8 (that table in 8 bits), gptq4,
gptq4-act, gptq4-asym-act (GPTQ's grids clipped by their output error, its default),
gptq4-noclip, gptq4-act-noclip (full-range grids, as the paper's code), awq4, awq4-sym (int4,
group 64; symmetric grids use all 16 codes, AWQ is asymmetric unless -sym); rtn3-asym,
gptq3-asym, gptq3-asym-act, awq3 (int3, group 64); w8a8, smoothquant
(int8 weights and per-token int8 activations on torch._int_mm, without / with smoothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from torchslim import Encoding, apply_, save
from torchslim.changes import Changes
from torchslim.data.text import calibration_text, evaluation_text, token_windows, tokenize_text
from torchslim.measure import perplexity
from torchslim.models.language import load_language_model, tokenizer_for
from torchslim.pruning import SparseGPT, Wanda, WeightPruning
from torchslim.quantization import AWQ, GPTQ, SmoothQuant, WeightOnly
from torchslim.quantization.torch_int8 import quantize_linears_int8_
from torchslim.select import Select

METHODS: dict[str, Any] = {
    "magnitude": WeightPruning(sparsity=0.5),
    "wanda": Wanda(sparsity=0.5),
    "sparsegpt": SparseGPT(sparsity=0.5),
    "wanda-2:4": Wanda(pattern="2:4"),
    "sparsegpt-2:4": SparseGPT(pattern="2:4"),
    "rtn4": WeightOnly(bits=4, group_size=64),
    "rtn4-asym": WeightOnly(bits=4, group_size=64, symmetric=False),
    "rtn4-emb": WeightOnly(bits=4, group_size=64, embeddings=True),  # + the tied embedding / head
    "rtn4-emb8": WeightOnly(bits=4, group_size=64, embeddings=True, embedding_bits=8),
    "gptq4": GPTQ(bits=4, group_size=64),
    "gptq4-asym-act": GPTQ(bits=4, group_size=64, symmetric=False, act_order=True),
    "awq4": AWQ(bits=4, group_size=64),
    "awq4-sym": AWQ(bits=4, group_size=64, symmetric=True),
    "gptq4-act": GPTQ(bits=4, group_size=64, act_order=True),
    "gptq4-noclip": GPTQ(bits=4, group_size=64, clip=False),
    "gptq4-act-noclip": GPTQ(bits=4, group_size=64, act_order=True, clip=False),
    "gptq3-asym-act": GPTQ(bits=3, group_size=64, symmetric=False, act_order=True),
    "rtn3-asym": WeightOnly(bits=3, group_size=64, symmetric=False),
    "awq3": AWQ(bits=3, group_size=64),
    "gptq3-asym": GPTQ(bits=3, group_size=64, symmetric=False),
    "w8a8": "w8a8",  # int8 weights per row, int8 activations per token, no smoothing
    "smoothquant": SmoothQuant(alpha=0.5),
}


class PeakMemory:
    """The highest resident memory of this process while the block runs (sampled every 10 ms
    from /proc/self/statm, so a method's peak is its own, not the run's so far)."""

    def __enter__(self) -> PeakMemory:
        self.before = self._rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=0, help="0: the whole held-out split")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object per method")
    parser.add_argument("--file-bytes", action="store_true",
                        help="also save each model entropy-coded (coder ans; minutes each) and report "
                             "its bytes and bits per weight")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dense = load_language_model("smollm2-135m")
    tokenizer = tokenizer_for(dense)
    evaluation = tokenize_text(tokenizer, evaluation_text())
    windows = token_windows(tokenize_text(tokenizer, calibration_text()), count=args.sequences,
                            length=args.length)
    batches = [windows[i:i + 8] for i in range(0, args.sequences, 8)]
    budget = args.eval_tokens or None
    base = perplexity(dense, evaluation, max_tokens=budget)
    fp32_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    print(f"dense: perplexity {base['perplexity']:.3f} on {base['tokens']:,} held-out tokens; "
          f"calibration {args.sequences} x {args.length} tokens")
    for name in args.methods.split(","):
        config = METHODS[name]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        with PeakMemory() as memory:
            if config == "w8a8":
                layers = [n for n, _ in Select(types=("Linear",), exclude=("lm_head",)).resolve(model)]
                replaced = quantize_linears_int8_(model, targets=Select(names=tuple(layers)))["replaced"]
                changes = Changes({"changed": dict.fromkeys(replaced, "int8")})
            else:
                head = Select() if getattr(config, "embeddings", False) else Select(exclude=("lm_head",))
                changes = apply_(model, config, calibration=batches, targets=head)  # tied head: + table
        seconds = time.perf_counter() - start
        result = perplexity(model, evaluation, max_tokens=budget)
        row = {"method": name, "perplexity": result["perplexity"], "dense": base["perplexity"],
               "ratio": result["perplexity"] / base["perplexity"], "tokens": result["tokens"],
               "seconds": round(seconds, 1), "layers": len(changes.changed),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "calibration_extra_mb": round((memory.peak - memory.before) / 2**20),
               "extra_over_fp32_model": round((memory.peak - memory.before) / fp32_bytes, 2)}
        if args.file_bytes:
            with tempfile.TemporaryDirectory() as folder:
                path = save(model, Path(folder) / "model.slim", encoding=Encoding(coder="ans"))
                row["file_bytes"] = path.stat().st_size
            row["bits_per_weight"] = round(8 * row["file_bytes"] / (fp32_bytes / 4), 2)
        size = (f"; {row['file_bytes']:,} B on disk, {row['bits_per_weight']:.2f} bits/weight"
                if args.file_bytes else "")
        print(json.dumps(row) if args.json else
              f"{name:15s} perplexity {row['perplexity']:8.3f}  {row['ratio']:6.3f}x dense  "
              f"({row['layers']} layers, {row['seconds']:.0f} s, +{row['calibration_extra_mb']} MB "
              f"= {row['extra_over_fp32_model']:.2f}x the fp32 model while calibrating{size})", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
