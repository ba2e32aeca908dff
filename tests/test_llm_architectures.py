"""The one-shot language-model methods on Hugging Face architectures we did not write, built from
configs: scales are folded only where the model's function survives it (Gemma's (1 + w) norms
in their own form, a post-norm block's LayerNorm not at all), and a model with a KV cache is
observed without one."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchslim import apply_, load, save
from torchslim.quantization import AWQ, SmoothQuant, WeightOnly
from torchslim.quantization.torch_int8 import quantize_linears_int8_
from torchslim.select import Select

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB)


def build(arch: str) -> nn.Module:
    configs: dict[str, Any] = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
                  dict(num_key_value_heads=2, head_dim=16)),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   dict(num_key_value_heads=2, head_dim=16)),
        "opt": (transformers.OPTConfig, transformers.OPTForCausalLM,
                dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64)),
        "opt-post-norm": (transformers.OPTConfig, transformers.OPTForCausalLM,
                          dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                               do_layer_norm_before=False)),
        "gpt-neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                     dict(max_position_embeddings=64)),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                 dict(num_key_value_heads=2, pad_token_id=0)),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=2)),
        "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM, {}),
        "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM, {}),
    }
    config_class, model_class, extra = configs[arch]
    torch.manual_seed(0)
    model = model_class(config_class(**SMALL, **extra)).eval()
    if arch.startswith("gemma"):  # trained Gemma norms are not zero: (1 + w) then differs from w
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("norm") and hasattr(module, "weight"):
                    module.weight.uniform_(-0.5, 1.5)
    return model


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (4, 32), generator=generator) for _ in range(2)]


IDS = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))


def error(model: nn.Module, dense: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(input_ids=IDS).logits - dense).pow(2).mean() / dense.var())


def dense_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


NOT_HEAD = Select(exclude=("lm_head",))


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "opt", "opt-post-norm", "gpt-neox", "phi3"])
def test_awq_and_smoothquant_keep_the_function_of_every_architecture(arch: str) -> None:
    """At 8 bits, AWQ and SmoothQuant must be as close to the dense model as their plain
    baselines: a scale folded where it changes the model (Gemma's norm as if it were y = n(x)·w,
    a post-norm LayerNorm whose output is also the residual) makes them 10-10,000x worse."""
    model = build(arch)
    dense = dense_logits(model)
    rtn, awq, plain, smooth = (copy.deepcopy(model) for _ in range(4))
    apply_(rtn, WeightOnly(bits=8, group_size=32, symmetric=False), targets=NOT_HEAD)
    awq_changes = apply_(awq, AWQ(bits=8, group_size=32), calibration=calibration(), targets=NOT_HEAD)
    quantize_linears_int8_(plain, targets=Select(names=tuple(
        n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")))
    smooth_changes = apply_(smooth, SmoothQuant(alpha=0.5), calibration=calibration(), targets=NOT_HEAD)
    assert awq_changes["alpha"] and awq_changes.changed
    assert error(awq, dense) < 3 * error(rtn, dense) + 1e-7
    assert error(smooth, dense) < 3 * error(plain, dense) + 1e-7
    if arch.startswith("gemma"):  # folded in (1 + w) form rather than refused
        assert len(smooth_changes["smoothed"]) == 4


def test_a_post_norm_layernorm_is_left_unscaled_with_the_reason() -> None:
    changes = apply_(build("opt-post-norm"), SmoothQuant(alpha=0.5), calibration=calibration(),
                     targets=NOT_HEAD)
    assert not changes["smoothed"]
    reason = changes["unsmoothed"]["model.decoder.layers.1.self_attn.q_proj"]  # its input is the residual
    assert "model.decoder.layers.0.final_layer_norm" in reason and "post-norm" in reason


def test_a_norm_read_by_a_layer_outside_the_targets_is_not_scaled() -> None:
    """k_proj is excluded, so it would read the norm's rescaled output uncompensated."""
    model = build("llama")
    dense = dense_logits(model)
    changes = apply_(model, SmoothQuant(alpha=0.5), calibration=calibration(),
                     targets=Select(exclude=("lm_head", "*.k_proj")))
    assert "model.layers.0.input_layernorm" not in changes["smoothed"]
    assert "model.layers.0.post_attention_layernorm" in changes["smoothed"]
    assert "reads it" in changes["unsmoothed"]["model.layers.0.self_attn.q_proj"]
    assert error(model, dense) < 1e-3


def test_attention_pairs_are_found_in_a_model_that_builds_a_kv_cache() -> None:
    """OPT's v_proj -> out_proj pair (full multi-head attention) is checked by running the
    attention again on its captured inputs, which must not hold the first run's cache."""
    changes = apply_(build("opt"), AWQ(bits=4, group_size=32), calibration=calibration(),
                     targets=NOT_HEAD)
    assert changes["scaled_through"]["model.decoder.layers.0.self_attn.out_proj"] == \
        "model.decoder.layers.0.self_attn.v_proj"


def test_falcons_linear_subclass_restating_the_linear_forward_is_compressed() -> None:
    """FalconLinear overrides forward with x @ W.T + b: the same function, found by running it."""
    from torchslim.quantization import GPTQ

    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       vocab_size=VOCAB)
    model = transformers.FalconForCausalLM(config).eval()
    dense = dense_logits(model)
    changes = apply_(model, GPTQ(bits=4, group_size=32), calibration=calibration(), targets=NOT_HEAD)
    assert "transformer.h.0.self_attention.query_key_value" in changes.changed
    assert not changes["skipped"]
    assert 0 < error(model, dense) < 0.05


class ScaledOutput(nn.Linear):
    """A user's Linear whose forward adds something: it must be left, with the reason."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class RestatedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def test_only_a_linear_subclass_whose_forward_adds_something_is_left() -> None:
    model = nn.Sequential(RestatedLinear(32, 32), nn.ReLU(), ScaledOutput(32, 32))
    changes = apply_(model, WeightOnly(bits=4, group_size=32))
    assert "0" in changes.changed
    assert "ScaledOutput replaces Linear's forward" in changes["skipped"]["2"]


def test_blocks_with_their_own_attention_mask_are_calibrated_on_their_own_inputs() -> None:
    """Gemma 2 alternates sliding-window and full attention, each block given its own mask: the
    statistics gathered block by block must be those of the model's own forward (with the first
    block's mask reused, the full-attention block's o_proj inputs were 89% off)."""
    from torchslim.layerwise import compress_layerwise

    torch.manual_seed(0)
    config = transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8)
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert config.layer_types == ["sliding_attention", "full_attention"]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    batches = calibration()
    sequential: dict[str, torch.Tensor] = {}
    compress_layerwise(model, layers, batches, lambda name, _layer, stats: sequential.update(
        {name: stats.sq_norm.clone()}), hessian=False, label="check")
    whole: dict[str, torch.Tensor] = {}

    def add(_module: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        whole[name] = whole.get(name, 0) + args[0].flatten(0, -2).double().pow(2).sum(0)

    handles = [layer.register_forward_pre_hook(partial(add, name=name)) for name, layer in layers]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    for name, _ in layers:
        assert torch.allclose(sequential[name], whole[name], rtol=1e-4), name


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_a_layer_whose_weight_its_parent_reads_is_named_not_counted_as_replaced(method: str) -> None:
    """Bloom's attention reads `self.dense.weight` itself, so `dense` cannot become a module
    without one: it is listed under skipped (its weights rounded in place, stored in float)."""
    from torchslim.quantization import GPTQ

    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4,
                                                                   vocab_size=VOCAB)).eval()
    config = {"gptq": GPTQ(bits=4, group_size=32), "awq": AWQ(bits=4, group_size=32),
              "smoothquant": SmoothQuant(alpha=0.5)}[method]
    changes = apply_(model, config, calibration=calibration(), targets=NOT_HEAD)
    name = "transformer.h.0.self_attention.dense"
    assert name not in changes["replaced"] and "read by BloomAttention.forward" in changes["skipped"][name]
    assert "transformer.h.0.self_attention.query_key_value" in changes["replaced"]
    if method != "smoothquant":
        assert "rounded to the 4-bit grid" in changes["skipped"][name]


def test_structured_pruning_of_a_model_fx_cannot_evaluate_fails_at_once_with_the_reason() -> None:
    """A user's model around Phi-3's decoder layer is traced with fx; the attention iterates over
    a shape whose evaluation gave back another traced value, and each len() evaluated again
    (minutes and gigabytes, then the OS killed it). Now a GraphError says which value."""
    from transformers.models.phi3 import modeling_phi3

    from torchslim.errors import GraphError
    from torchslim.pruning import ChannelPruning

    config = transformers.Phi3Config(**{**SMALL, "num_hidden_layers": 1}, num_key_value_heads=2,
                                     pad_token_id=0)

    class UserLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 64)
            self.rotary = modeling_phi3.Phi3RotaryEmbedding(config)
            self.layer = modeling_phi3.Phi3DecoderLayer(config, 0)
            self.head = nn.Linear(64, VOCAB)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.embed(ids)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            out = self.layer(hidden, position_embeddings=self.rotary(hidden, positions), attention_mask=None)
            return self.head(out[0] if isinstance(out, tuple) else out)

    torch.manual_seed(0)
    with pytest.raises(GraphError, match="cannot be evaluated on the example inputs"):
        apply_(UserLM().eval(), ChannelPruning(ratio=0.5), example_inputs=IDS)


@pytest.mark.parametrize("arch", ["olmo2", "falcon", "bloom"])
def test_structured_pruning_cuts_the_mlp_neurons_where_heads_cannot_go(arch: str) -> None:
    """OLMo 2 normalises q and k across all heads at once (q_norm over 64 values); Falcon and
    Bloom hold q, k and v in one projection whose heads their attention splits its own way
    (Bloom's ALiBi slopes follow the head count): their MLP neurons are cut, the heads kept, and
    the reason named (before, OLMo 2's k/v rows were cut alone and the model broke)."""
    from torchslim.pruning import ChannelPruning

    torch.manual_seed(0)
    if arch == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL, num_key_value_heads=2))
        mlp, attention, why, down_name, inner = "model.layers.1.mlp", "model.layers.1.self_attn", "q_norm", \
            "down_proj", 128
    else:
        model = build(arch)
        mlp, attention = "transformer.h.1.mlp", "transformer.h.1.self_attention"
        why, down_name, inner = "q, k and v in one projection", "dense_4h_to_h", 256
    model.eval()
    changes = apply_(model, ChannelPruning(ratio=0.5), example_inputs={"input_ids": IDS})
    down = model.get_submodule(f"{mlp}.{down_name}")
    assert down.in_features == inner // 2 and not any(name.startswith(attention) for name in changes["sizes"])
    assert any(why in reason and "heads are kept" in reason for reason in changes["excluded"])
    with torch.no_grad():
        assert model(input_ids=IDS).logits.shape == (2, 32, VOCAB)


def _kill_heads_(model: nn.Module, arch: str) -> None:
    """Zero the q/k/v rows and output columns of half the heads: Phi-3's second key/value group
    (query heads 2 and 3 with key/value head 1, in [q; k; v] order), GPT-NeoX's heads 1 and 3
    (each head's q, k and v rows next to each other)."""
    d = 16
    with torch.no_grad():
        if arch == "phi3":
            for layer in model.model.layers:
                qkv, out = layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight
                qkv[2 * d:4 * d] = 0
                qkv[4 * d + d:4 * d + 2 * d] = 0
                qkv[6 * d + d:6 * d + 2 * d] = 0
                out[:, 2 * d:4 * d] = 0
            return
        for layer in model.gpt_neox.layers:
            qkv, bias, out = (layer.attention.query_key_value.weight, layer.attention.query_key_value.bias,
                              layer.attention.dense.weight)
            for head in (1, 3):
                qkv[head * 3 * d:(head + 1) * 3 * d] = 0
                bias[head * 3 * d:(head + 1) * 3 * d] = 0
                out[:, head * d:(head + 1) * d] = 0


@pytest.mark.parametrize("arch", ["phi3", "gpt-neox"])
def test_heads_of_a_fused_qkv_projection_are_pruned_exactly(arch: str, tmp_path: Path) -> None:
    """Phi-3's qkv_proj holds [q heads; k heads; v heads] (grouped-query), GPT-NeoX's
    query_key_value each head's q, k and v in turn: with half the heads zeroed, pruning half by
    magnitude removes exactly those (the logits do not move), the model generates, reloads from
    its file, and Phi-3's folder (its config given head_dim) reloads in transformers."""
    from torchslim.huggingface import save_hf_folder
    from torchslim.pruning import ChannelPruning

    model = build(arch)
    _kill_heads_(model, arch)
    dense = dense_logits(model)
    attention = "*.self_attn.*" if arch == "phi3" else "*.attention.*"
    changes = apply_(model, ChannelPruning(ratio=0.5, importance="l1"), targets=Select(patterns=(attention,)),
                     example_inputs={"input_ids": IDS})
    assert not any("one projection" in reason for reason in changes["excluded"])
    assert model.config.num_attention_heads == 2
    assert torch.allclose(dense_logits(model), dense, atol=1e-5)
    assert model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    save(model, tmp_path / "m.slim")
    assert torch.equal(dense_logits(load(tmp_path / "m.slim")), dense_logits(model))
    if arch == "phi3":
        save_hf_folder(model, tmp_path / "hf")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert torch.allclose(dense_logits(reloaded), dense, atol=1e-5)


def test_an_attention_whose_projections_cannot_be_paired_into_heads_is_named() -> None:
    """T5's attention (q, k, v, o, with a position bias shared by all layers) and DeepSeek's latent
    attention kept their heads without a word; the MLP neurons are cut and the attention named."""
    from torchslim.pruning import ChannelPruning

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)).eval()
    changes = apply_(model, ChannelPruning(ratio=0.5),
                     example_inputs={"input_ids": IDS, "decoder_input_ids": IDS})
    assert model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").in_features == 64
    named = "encoder.block.0.layer.0.SelfAttention: T5Attention's projections (q, k, v, o)"
    assert any(reason.startswith(named) and "heads are kept" in reason for reason in changes["excluded"])


def test_embedding_like_parameters_are_not_listed_as_left_weights() -> None:
    """A ViT's cls_token and position embeddings, a Swin's position-bias table: embeddings,
    kept by convention, not weights a technique left behind."""
    from torchslim.pruning import WeightPruning

    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8)).eval()
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        embed_dim=16, depths=[1], num_heads=[2], image_size=32, patch_size=4, window_size=4)).eval()
    for model in (vit, swin):
        assert not apply_(model, WeightPruning(sparsity=0.5)).get("skipped")


def test_t5s_mlp_output_layer_is_compressed_where_the_replacement_has_a_weight() -> None:
    """T5's MLP reads `self.wo.weight` only to cast its input to that weight's dtype (guarded by
    `isinstance(..., torch.Tensor)`): a quarter of its Linears were left float by every method. A
    replacement with a `weight` (our compressed layers' `weight()` method) now takes its place;
    one without (a low-rank pair) is still left, with the reason."""
    from torchslim.lowrank import LowRank
    from torchslim.quantization import GPTQ, Int4Kernel

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    model = transformers.T5ForConditionalGeneration(config).eval()
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :8]}
    with torch.no_grad():
        dense = model(**inputs).logits
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    changes = apply_(model, GPTQ(bits=4, group_size=32), calibration=[inputs], targets=NOT_HEAD)
    assert wo in changes.changed and wo not in changes["skipped"]
    apply_(model, Int4Kernel(), example_inputs=inputs)
    assert type(model.get_submodule(wo)).__name__ == "Int4Linear"
    with torch.no_grad():
        out = model(**inputs).logits
    assert float((out - dense).pow(2).mean() / dense.var()) < 0.05
    factored = transformers.T5ForConditionalGeneration(config).eval()
    changes = apply_(factored, LowRank(param_ratio=0.5), targets=Select(names=(wo,)))
    assert "has none" in changes["skipped"][wo]


def test_phi3_heads_pruned_unevenly_are_refused_with_the_fix_and_the_model_kept() -> None:
    """Phi-3's attention reads its head count from the shared config: layers left with different
    counts cannot run. A global ranking that would do that used to end in "the pruned model no
    longer runs ... a layer or op is mapped wrongly"; now the error says why and what to do, and
    the model is as it was."""
    from torchslim.errors import GraphError
    from torchslim.pruning import ChannelPruning

    model = build("phi3")
    dense = dense_logits(model)
    with pytest.raises(GraphError, match=r"Phi3Attention reads its head count from the model's config.*"
                                         r"scope uniform"):
        apply_(model, ChannelPruning(ratio=0.25, scope="global", importance="l1"),
               targets=Select(patterns=("*.self_attn.*",)), example_inputs={"input_ids": IDS})
    assert model.config.num_attention_heads == 4
    assert torch.equal(dense_logits(model), dense)
