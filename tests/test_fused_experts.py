"""Mixture-of-experts decoders whose experts are 3-D tensors (Hugging Face's Qwen3-MoE, Mixtral,
OLMoE, GPT-OSS): every Linear technique compresses each expert, calibrated on the tokens routed
to it, and the model saves, loads, generates and exports as before."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchslim import apply_, finalize_, load, save
from torchslim.fused_experts import UnfusedExperts, fused_experts, unfuse_experts_
from torchslim.layerwise import repeated_blocks
from torchslim.pruning import SparseGPT, Wanda
from torchslim.quantization import AWQ, GPTQ, Int4Kernel, SmoothQuant, WeightOnly
from torchslim.select import Select

transformers = pytest.importorskip("transformers")

VOCAB = 128
NOT_HEAD = Select(exclude=("lm_head",))
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def build(arch: str, experts: int = 4, top_k: int = 2) -> nn.Module:
    configs: dict[str, Any] = {
        "qwen3-moe": (transformers.Qwen3MoeConfig, dict(intermediate_size=128, moe_intermediate_size=32,
                                                         num_experts=experts, head_dim=16)),
        "mixtral": (transformers.MixtralConfig, dict(intermediate_size=32, num_local_experts=experts)),
        "olmoe": (transformers.OlmoeConfig, dict(intermediate_size=32, num_experts=experts)),
        "gpt-oss": (transformers.GptOssConfig, dict(intermediate_size=32, num_local_experts=experts,
                                                    head_dim=16,
                                                    layer_types=["sliding_attention", "full_attention"])),
    }
    config_class, extra = configs[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**COMMON, **extra, num_experts_per_tok=top_k)).eval()
    with torch.no_grad():  # weights of trained size, so that quantization errors show
        for parameter in model.parameters():
            if parameter.dim() == 3:
                parameter.normal_(0, 0.1)
    return model


def calibration(sequences: int = 4, length: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (1, length), generator=generator) for _ in range(sequences)]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def error(model: nn.Module, dense: torch.Tensor) -> float:
    return float((logits(model) - dense).pow(2).mean() / dense.var())


@pytest.mark.parametrize("arch", ["qwen3-moe", "mixtral", "olmoe", "gpt-oss"])
def test_unfused_experts_compute_what_the_fused_ones_did(arch: str) -> None:
    """GPT-OSS stores its experts transposed, with biases, gate and up interleaved and a clamped
    gate of its own; the others [gate; up] halves (experts, out, in)."""
    model = build(arch)
    dense = logits(model)
    names = fused_experts(model)
    assert list(names) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert unfuse_experts_(model, list(names)) == {}
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert isinstance(experts, UnfusedExperts) and len(experts.first) == 4
    assert not [n for n, p in experts.named_parameters() if p.dim() == 3]
    assert torch.allclose(logits(model), dense, atol=1e-5 * float(dense.abs().max()))


@pytest.mark.parametrize("arch", ["qwen3-moe", "gpt-oss"])
def test_gptq_compresses_every_expert_and_names_the_router(arch: str) -> None:
    model = build(arch)
    dense = logits(model)
    changes = apply_(model, GPTQ(bits=4, group_size=16), calibration=calibration(), targets=NOT_HEAD)
    for e in range(4):
        assert f"model.layers.1.mlp.experts.first.{e}" in changes.changed
        assert f"model.layers.1.mlp.experts.down.{e}" in changes.changed
    router = "model.layers.1.mlp.router" if arch == "gpt-oss" else "model.layers.1.mlp.gate"
    assert router in changes["skipped"]
    assert not any(".experts" in name for name in changes["skipped"])
    assert 0 < error(model, dense) < 0.5  # a random model's router flips with its attention's codes


def test_gptq_on_the_experts_beats_rounding_them_to_nearest() -> None:
    """Each expert's Hessian comes from its routed tokens: GPTQ's codes change the model less
    than round-to-nearest ones (measured 0.064 against 0.102)."""
    experts_only = Select(patterns=("*.experts.*",))
    errors = {}
    for technique in (GPTQ(bits=4, group_size=16), WeightOnly(bits=4, group_size=16)):
        model = build("qwen3-moe")
        dense = logits(model)
        apply_(model, technique, targets=experts_only, calibration=calibration(16, 64))
        errors[technique.kind] = error(model, dense)
    assert errors["gptq"] < 0.8 * errors["weight_only"]


def test_calibration_statistics_of_an_expert_are_those_of_its_routed_tokens() -> None:
    """The hook on expert e's Linear sees exactly the tokens the router sent to e: the count of
    rows over both experts' inputs equals tokens x top-k."""
    model = build("qwen3-moe")
    unfuse_experts_(model, list(fused_experts(model)))
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(experts, UnfusedExperts)
    rows: list[int] = []
    handles = [layer.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
               for layer in experts.first]
    logits(model)
    for handle in handles:
        handle.remove()
    assert sum(rows) == IDS.numel() * 2
    assert repeated_blocks(model)[0] == "model.layers"  # not an experts list inside a block


def test_experts_no_calibration_token_reached_are_rounded_not_zeroed() -> None:
    """With 16 experts, one per token, and 4 calibration tokens, most experts see nothing: their
    Hessian is zero, and GPTQ used to zero their weights; now they are rounded to nearest, and
    named with the reason."""
    model = build("qwen3-moe", experts=16, top_k=1)
    with pytest.warns(UserWarning, match="got no calibration input and were rounded to nearest"):
        changes = apply_(model, GPTQ(bits=4, group_size=16), calibration=calibration(1, 4), targets=NOT_HEAD)
    unreached = changes["uncalibrated"]
    assert len(unreached) >= 16
    name = next(iter(unreached))
    assert "no calibration input reached it" in unreached[name]
    layer = model.get_submodule(name)
    assert float((layer.weight() == 0).float().mean()) < 0.3  # codes, not a zeroed matrix
    for technique in (SparseGPT(sparsity=0.5), Wanda(sparsity=0.5)):
        pruned = build("qwen3-moe", experts=16, top_k=1)
        with pytest.warns(UserWarning, match="pruned by magnitude"):
            changes = apply_(pruned, technique, calibration=calibration(1, 4), targets=NOT_HEAD)
        name = next(iter(changes["uncalibrated"]))
        weight = pruned.get_submodule(name).weight
        assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01


def test_awq_on_too_few_calibration_rows_leaves_the_scales_out_with_the_reason() -> None:
    """4 tokens for inputs of width 64: a scale searched on them fits the 4 rows, not the model
    (on this model it doubled the 8-bit error); the Linears are clipped only, and say why."""
    model = build("qwen3-moe", experts=16, top_k=1)
    dense = logits(model)
    with pytest.warns(UserWarning, match="got no calibration input"):
        changes = apply_(model, AWQ(bits=8, group_size=16), calibration=calibration(1, 4), targets=NOT_HEAD)
    assert changes["uncalibrated"]
    reason = changes["unscaled"]["model.layers.0.mlp.experts.first.3"]
    assert "rest on 4 calibration rows for 64 inputs" in reason
    assert error(model, dense) < 0.01  # 8-bit codes everywhere: nothing broken


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_experts_are_scaled_through_their_norm_and_the_router_reads_what_it_read(method: str) -> None:
    """The experts read the rows of post_attention_layernorm's output routed to them, and the
    router (a raw weight matrix, left float) reads that output too: the norm takes the scales,
    every expert's first projection and the router's columns their inverse, so the routing stays
    exactly as it was (before, the router blocked the fold and the experts got no scale)."""
    model = build("qwen3-moe")
    seen: dict[str, list[torch.Tensor]] = {"dense": [], "scaled": []}
    router = model.get_submodule("model.layers.0.mlp.gate")
    handle = router.register_forward_hook(lambda _m, _a, out: seen[key].append(out[0].detach()))
    key = "dense"
    logits(model)
    experts_only = Select(patterns=("*.experts.*",))
    technique = AWQ(bits=4, group_size=16) if method == "awq" else SmoothQuant()
    changes = apply_(model, technique, targets=experts_only, calibration=calibration(16, 64))
    key = "scaled"
    logits(model)
    handle.remove()
    if method == "awq":
        assert "model.layers.0.post_attention_layernorm" in changes["alpha"]
        assert "model.layers.0.mlp.experts.first.2" not in changes["unscaled"]
    else:
        smoothed = changes["smoothed"]["model.layers.0.post_attention_layernorm"]
        assert "model.layers.0.mlp.experts.first.2" in smoothed
    assert torch.allclose(seen["scaled"][0], seen["dense"][0], atol=1e-5)  # block 0's routing logits


def test_selection_decides_which_experts_are_unfused() -> None:
    model = build("qwen3-moe")
    apply_(model, WeightOnly(bits=4, group_size=16), targets=Select(patterns=("*.self_attn.*",)))
    assert type(model.get_submodule("model.layers.0.mlp.experts")).__name__ == "Qwen3MoeExperts"
    model = build("qwen3-moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        changes = apply_(model, WeightOnly(bits=4, group_size=16), targets=Select(
            exclude=("lm_head", "model.layers.0.mlp.experts")))
    assert type(model.get_submodule("model.layers.0.mlp.experts")).__name__ == "Qwen3MoeExperts"
    assert "model.layers.1.mlp.experts.down.3" in changes.changed
    model = build("qwen3-moe")
    changes = apply_(model, WeightOnly(bits=4, group_size=16), targets=Select(patterns=("*.experts.down.*",)))
    assert sorted(changes.changed) == sorted(f"model.layers.{b}.mlp.experts.down.{e}"
                                             for b in range(2) for e in range(4))


class DoubledExperts(nn.Module):
    """A user's experts module in Hugging Face's layout whose forward adds something (a factor
    of 2): it must be left fused, with the reason, not silently changed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 8))
        self.down_proj = nn.Parameter(torch.randn(3, 8, 8))
        self.act_fn = nn.SiLU()

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(3):
            token, position = torch.where(index == e)
            gate, up = nn.functional.linear(hidden[token], self.gate_up_proj[e]).chunk(2, -1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, 2 * y * weights[token, position, None])
        return out


class UserMoE(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.router = nn.Linear(8, 3)
        self.experts = experts
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.head(self.experts(x, index, weights))


class PlainExperts(DoubledExperts):
    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(hidden, index, weights)


def test_a_user_experts_module_is_unfused_only_if_the_loop_reproduces_it() -> None:
    torch.manual_seed(0)
    doubled = UserMoE(DoubledExperts())
    with pytest.warns(UserWarning, match="left 1 weight layer"):
        changes = apply_(doubled, WeightOnly(bits=4, group_size=8))
    assert "per-expert Linear loop differs from its forward" in changes["skipped"]["experts"]
    assert isinstance(doubled.experts, DoubledExperts)
    plain = UserMoE(PlainExperts())
    x = torch.randn(5, 8)
    with torch.no_grad():
        dense = plain(x)
    changes = apply_(plain, WeightOnly(bits=8, group_size=8))
    assert "experts.first.2" in changes.changed and "experts" not in changes["skipped"]
    with torch.no_grad():
        assert torch.allclose(plain(x), dense, atol=0.05 * float(dense.abs().max()))


def test_a_compressed_moe_saves_loads_and_generates(tmp_path: Path) -> None:
    model = build("mixtral")
    apply_(model, GPTQ(bits=4, group_size=16), calibration=calibration(), targets=NOT_HEAD)
    apply_(model, Int4Kernel(), calibration=calibration())
    saved = logits(model)
    save(model, tmp_path / "moe.slim")
    loaded = load(tmp_path / "moe.slim")
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.experts"), UnfusedExperts)
    assert torch.equal(logits(loaded), saved)
    out = loaded.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_a_pruned_moe_exports_as_a_transformers_folder(tmp_path: Path) -> None:
    from torchslim.huggingface import save_hf_folder

    model = build("gpt-oss")
    apply_(model, Wanda(sparsity=0.5), calibration=calibration(), targets=NOT_HEAD)
    finalize_(model)
    pruned = logits(model)
    save_hf_folder(model, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.allclose(logits(reloaded), pruned, atol=1e-4)
    assert abs(float((reloaded.model.layers[0].mlp.experts.gate_up_proj == 0).float().mean()) - 0.5) < 0.01


MOE_FACTORY = '''
import torch
import transformers


def model():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=8, num_experts_per_tok=2,
                                         vocab_size=49152, tie_word_embeddings=True)
    config.torchslim_tokenizer = "smollm2-135m"
    return transformers.Qwen3MoeForCausalLM(config).eval()
'''


def test_the_cli_quantizes_a_users_moe_onto_the_int4_kernel(tmp_path: Path) -> None:
    import json

    from torchslim.cli import main

    (tmp_path / "tiny_moe.py").write_text(MOE_FACTORY)
    factory, out = str(tmp_path / "tiny_moe.py:model"), tmp_path / "out"
    assert main(["quantize", "--model", factory, "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--int4-kernel", "--dataset", "python-docs", "--calibration-sequences", "4",
                 "--sequence-length", "64", "--eval-tokens", "512", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["changed"] == 2 * 4 + 2 * 2 * 8  # attention + blocks x projections x experts
    assert "model.layers.0.mlp.gate" in report["skipped"]
    namespace: dict[str, Any] = {}
    exec(MOE_FACTORY, namespace)
    loaded = load(out / "model.slim", model=namespace["model"]())
    assert type(loaded.get_submodule("model.layers.1.mlp.experts.down.7")).__name__ == "Int4Linear"
    assert report["perplexity_after"] > 1


def _kill_half_of_each_experts_neurons_(model: nn.Module, arch: str) -> None:
    """Zero every even neuron of every expert (its gate and up rows, its down column): pruning
    half the neurons by magnitude must then remove exactly these, leaving the logits as they were."""
    with torch.no_grad():
        for layer in model.model.layers:
            first, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
            if arch == "gpt-oss":  # (experts, width, 2·inner) with gate and up interleaved
                dead = torch.arange(0, down.shape[1], 2)
                first[:, :, 2 * dead] = 0
                first[:, :, 2 * dead + 1] = 0
                down[:, dead, :] = 0
            else:  # (experts, 2·inner, width): [gate; up]
                inner = down.shape[2]
                dead = torch.arange(0, inner, 2)
                first[:, dead, :] = 0
                first[:, inner + dead, :] = 0
                down[:, :, dead] = 0


@pytest.mark.parametrize("arch", ["qwen3-moe", "gpt-oss"])
def test_structured_pruning_removes_each_experts_neurons(arch: str, tmp_path: Path) -> None:
    """Each expert's neuron i is its gate and up rows ([gate; up] halves, or GPT-OSS's
    interleaved pairs) with its down column: removing the dead half leaves the logits exact, the
    config names the new width, and the folder `transformers` reloads gives the same logits."""
    from torchslim.huggingface import save_hf_folder
    from torchslim.pruning import ChannelPruning

    model = build(arch)
    _kill_half_of_each_experts_neurons_(model, arch)
    dense = logits(model)
    apply_(model, ChannelPruning(ratio=0.5, importance="l1"), targets=Select(patterns=("*.experts.*",)),
           example_inputs={"input_ids": IDS})
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert isinstance(experts, UnfusedExperts)
    assert [tuple(experts.first[e].weight.shape) for e in range(4)] == [(32, 64)] * 4
    assert torch.allclose(logits(model), dense, atol=1e-5)
    width = "moe_intermediate_size" if arch == "qwen3-moe" else "intermediate_size"
    assert getattr(model.config, width) == 16
    save_hf_folder(model, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.allclose(logits(reloaded), dense, atol=1e-5)


def test_structured_pruning_of_gpt_oss_takes_each_heads_attention_sink_with_it() -> None:
    """GPT-OSS learns one attention-sink logit per query head: pruning heads used to fail
    ("the pruned model no longer runs"); the sinks now go with their heads."""
    from torchslim.pruning import ChannelPruning

    model = build("gpt-oss")
    apply_(model, ChannelPruning(ratio=0.5), example_inputs={"input_ids": IDS})
    attention = model.get_submodule("model.layers.0.self_attn")
    assert attention.sinks.shape[0] == attention.q_proj.out_features // 16 == 2


class _NeighbourGate(nn.Module):
    """A gate that mixes neighbouring rows: its neurons are not row pairs."""

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        return h[..., :-1] * h[..., 1:]


def test_a_gate_that_does_not_pair_rows_keeps_its_neurons() -> None:
    from torchslim.fused_experts import _Layout

    source = _NeighbourGate()
    source.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
    source.down_proj = nn.Parameter(torch.randn(2, 4, 7))
    assert UnfusedExperts(source, _Layout("gate_up_proj", False)).neuron_layout() is None


def test_torch_int8_runs_every_expert_on_the_int8_kernel_and_names_the_router() -> None:
    """The torch backend of dynamic int8 swapped nn.Linear layers only: the experts stayed float
    and `float_ops` did not say so."""
    from torchslim.quantization import Quantization
    from torchslim.quantization.ptq import quantize_model

    model = build("qwen3-moe")
    dense = logits(model)
    int8 = quantize_model(model, Quantization(method="dynamic", backend="torch"),
                          example_inputs={"input_ids": IDS})
    assert type(int8.get_submodule("model.layers.1.mlp.experts.down.3")).__name__ == "Int8DynamicLinear"
    report = int8.report
    assert report["int8_ops"]["Int8DynamicLinear (torch._int_mm)"] == 8 + 16 + 1  # attention, experts, head
    assert any(op.startswith("model.layers.0.mlp.gate: Qwen3MoeTopKRouter") for op in report["float_ops"])
    assert type(model.get_submodule("model.layers.0.mlp.experts")).__name__ == "Qwen3MoeExperts"
    assert error(int8, dense) < 0.01


def test_an_onnx_program_of_a_moe_routes_inputs_its_example_did_not_reach(tmp_path: Path) -> None:
    """Traced, the routed loop used to write only the experts the example input reached: a
    program traced on one repeated token (2 of 4 experts) was off by 0.84 on other tokens' logits
    (their maximum 0.66). Every expert is now written; Hugging Face's own fused experts, which
    the exporter could not trace at all (grouped_mm's histc), are traced the same way."""
    import onnxruntime as ort

    from torchslim.export import export_model
    from torchslim.quantization import Quantization
    from torchslim.quantization.ptq import quantize_model

    one_token = torch.full_like(IDS, 7)
    other = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    model = build("mixtral")
    apply_(model, GPTQ(bits=4, group_size=16), calibration=calibration(), targets=NOT_HEAD)
    export_model(model, tmp_path / "moe.onnx", format="onnx", example_inputs={"input_ids": one_token})
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    (program,) = session.run(None, {"input_ids": other.numpy()})
    with torch.no_grad():
        expected = model(input_ids=other).logits
    assert torch.allclose(torch.from_numpy(program), expected, atol=1e-5)

    fused = build("mixtral")
    with torch.no_grad():
        dense = fused(input_ids=other).logits
    int8 = quantize_model(fused, Quantization(method="dynamic"), example_inputs={"input_ids": one_token})
    out = int8({"input_ids": other})
    assert float((getattr(out, "logits", out) - dense).pow(2).mean() / dense.var()) < 0.01
    assert type(fused.get_submodule("model.layers.0.mlp.experts")).__name__ == "MixtralExperts"


def test_onnxruntime_int8_keeps_the_routers_in_float() -> None:
    """onnxruntime's int8 quantized the router's matmul too, and its logits then sent tokens to
    other experts: on this Qwen3-MoE the logits' error was 3.9e-2 with the routers in int8,
    2.3e-3 with them in float."""
    from torchslim.quantization import Quantization
    from torchslim.quantization.ptq import quantize_model

    model = build("qwen3-moe")
    dense = logits(model)
    int8 = quantize_model(model, Quantization(method="dynamic"), example_inputs={"input_ids": IDS})
    assert "a mixture-of-experts router" in int8.report["excluded"]["model.layers.1.mlp.gate"]
    out = int8({"input_ids": IDS})
    assert float((getattr(out, "logits", out) - dense).pow(2).mean() / dense.var()) < 5e-3


def test_the_int4_kernel_warns_when_its_sessions_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each expert's int4 layer is its own onnxruntime session (about 0.5 MB to open): a large
    MoE would pay gigabytes, and is told so (the threshold lowered here to this small model)."""
    from torchslim.quantization import int4_kernel

    model = build("mixtral")
    apply_(model, WeightOnly(bits=4, group_size=16), targets=NOT_HEAD)
    monkeypatch.setattr(int4_kernel, "MANY_SESSIONS", 16)
    with pytest.warns(UserWarning, match=r"int4_kernel made 24 layers, each its own onnxruntime session"):
        apply_(model, Int4Kernel(), example_inputs={"input_ids": IDS})
