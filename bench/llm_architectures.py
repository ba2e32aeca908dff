"""The one-shot language-model methods on Hugging Face decoders we did not write.

Each architecture is built from a small config (2 blocks, width 64, random weights: nothing is
downloaded), so what is measured is whether each method handles the architecture, not how good
the compressed model is. Per method it prints the logits' mean squared change relative to their
variance on held-out token ids, how many layers changed, and how many selected layers were left
with a reason. Two 8-bit rows check that AWQ's and SmoothQuant's scales keep the model's
function: they must stay near their plain baselines (8-bit round-to-nearest, plain W8A8); a
scale folded where it changes the model (a Gemma norm computing n(x)·(1 + w), a post-norm
LayerNorm whose output is also the residual) shows as an error 10-100,000x larger. The
mixture-of-experts decoders (Qwen3-MoE, Mixtral, OLMoE, GPT-OSS) hold their experts as 3-D
tensors: every method compresses each expert as a Linear of its own, so a row's changed layers
count 2 per expert and block. The last column, `prune`, is structured pruning at ratio 0.5
(attention heads and MLP or expert neurons): the parameters kept, and how many attentions or
MLPs were named as kept whole (a fused q/k/v projection torchslim cannot split, norms across
heads).

    python bench/llm_architectures.py [--archs llama,gemma,...] [--methods rtn4,gptq4,...]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch
from torch import nn

from torchslim import apply_
from torchslim.pruning import ChannelPruning, SparseGPT, Wanda
from torchslim.quantization import AWQ, GPTQ, SmoothQuant, WeightOnly
from torchslim.quantization.torch_int8 import quantize_linears_int8_
from torchslim.select import Select

VOCAB = 128
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
SIZES = dict(hidden_size=64, intermediate_size=128, **LAYERS)
GQA = dict(SIZES, num_key_value_heads=2)
OPT = dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64, **LAYERS)


def architectures(transformers: Any) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """name: (config class, model class, config arguments)."""
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, GQA),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, {**GQA, "head_dim": 16}),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {**GQA, "head_dim": 16}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, GQA),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {**GQA, "head_dim": 16}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, GQA),
        "phi": (t.PhiConfig, t.PhiForCausalLM, SIZES),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {**GQA, "pad_token_id": 0}),
        "gpt2": (t.GPT2Config, t.GPT2LMHeadModel, dict(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                      vocab_size=VOCAB)),
        "opt": (t.OPTConfig, t.OPTForCausalLM, OPT),
        "opt-post-norm": (t.OPTConfig, t.OPTForCausalLM, {**OPT, "do_layer_norm_before": False}),
        "gpt-neox": (t.GPTNeoXConfig, t.GPTNeoXForCausalLM, {**SIZES, "max_position_embeddings": 64}),
        "falcon": (t.FalconConfig, t.FalconForCausalLM, dict(hidden_size=64, **LAYERS)),
        "bloom": (t.BloomConfig, t.BloomForCausalLM, dict(hidden_size=64, n_layer=2, n_head=4,
                                                          vocab_size=VOCAB)),
        "stablelm": (t.StableLmConfig, t.StableLmForCausalLM, GQA),
        "olmo2": (t.Olmo2Config, t.Olmo2ForCausalLM, GQA),
        "cohere": (t.CohereConfig, t.CohereForCausalLM, GQA),
        "qwen3-moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      {**GQA, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                       "num_experts_per_tok": 2}),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    {**GQA, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2}),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM,
                  {**GQA, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}),
        "gpt-oss": (t.GptOssConfig, t.GptOssForCausalLM,
                    {**GQA, "intermediate_size": 32, "head_dim": 16, "num_local_experts": 4,
                     "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]}),
    }


def build(spec: tuple[Any, Any, dict[str, Any]]) -> nn.Module:
    config_class, model_class, arguments = spec
    torch.manual_seed(0)
    model = model_class(config_class(**arguments)).eval()
    with torch.no_grad():  # trained norms are not all ones (or, in Gemma, all zeros)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in name.rsplit(".", 1)[-1] and isinstance(weight, nn.Parameter) and weight.dim() == 1:
                weight.uniform_(0.5, 1.5)
    return model


METHODS = {
    "rtn4": (lambda: WeightOnly(bits=4, group_size=32, symmetric=False), False),
    "gptq4": (lambda: GPTQ(bits=4, group_size=32), True),
    "awq4": (lambda: AWQ(bits=4, group_size=32), True),
    "rtn8": (lambda: WeightOnly(bits=8, group_size=32, symmetric=False), False),
    "awq8": (lambda: AWQ(bits=8, group_size=32), True),
    "w8a8": (None, False),
    "smoothquant": (lambda: SmoothQuant(alpha=0.5), True),
    "wanda": (lambda: Wanda(sparsity=0.5), True),
    "sparsegpt": (lambda: SparseGPT(sparsity=0.5), True),
    "prune": (lambda: ChannelPruning(ratio=0.5), False),  # structured: heads and MLP / expert neurons
}


def main() -> int:
    import transformers

    specs = architectures(transformers)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(specs))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(3)
    calibration = [torch.randint(0, VOCAB, (4, 32), generator=generator) for _ in range(4)]
    held_out = torch.randint(0, VOCAB, (2, 32), generator=generator)
    not_head = Select(exclude=("lm_head",))
    print(f"relative logits error (changed layers / selected layers left with a reason); "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for arch in args.archs.split(","):
        dense_model = build(specs[arch])
        with torch.no_grad():
            dense = dense_model(input_ids=held_out).logits
        cells = []
        for method in args.methods.split(","):
            model = copy.deepcopy(dense_model)
            make, calibrated = METHODS[method]
            start = time.perf_counter()
            try:
                if make is None:  # plain W8A8 on torch._int_mm, SmoothQuant's baseline
                    names = tuple(n for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear) and n != "lm_head")
                    result: Any = quantize_linears_int8_(model, targets=Select(names=names))
                    changed, left = len(result["replaced"]), len(result["skipped"])
                elif method == "prune":  # the parameters kept, and the attentions / MLPs named as kept
                    before = sum(p.numel() for p in model.parameters())
                    result = apply_(model, make(), example_inputs={"input_ids": held_out})
                    kept = sum(p.numel() for p in model.parameters()) / before
                    named = [r for r in result.get("excluded", []) if "hidden size" not in r]
                    cells.append(f"prune {kept:.2f}x params ({len(named)} named)")
                    continue
                else:
                    result = apply_(model, make(), calibration=calibration if calibrated else None,
                                    targets=not_head)
                    changed, left = len(result.changed), len(result.get("skipped", {}))
                with torch.no_grad():
                    change = model(input_ids=held_out).logits - dense
                error = float(change.pow(2).mean() / dense.var())
                cells.append(f"{method} {error:.1e} ({changed}/{left}, {time.perf_counter() - start:.1f} s)")
            except Exception as exc:  # a row names what failed and goes on
                cells.append(f"{method} FAILED {type(exc).__name__}: {str(exc)[:120]}")
        print(f"{arch:14s} " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
