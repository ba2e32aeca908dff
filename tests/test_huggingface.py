"""Hugging Face models built from configs in code (nothing downloaded): stored by their config
and rebuilt without a model argument (also in a fresh process), forged records refused, a local
save_pretrained folder as a CLI model, `export --format hf`, and int8 programs for encoders and
decoder LMs on onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from forgery import rewrite
from torchslim import apply_, artifact, finalize_
from torchslim.calibration import call_model, logits_of
from torchslim.cli import main
from torchslim.errors import ArtifactError, ConfigError
from torchslim.pruning import WeightPruning

transformers = pytest.importorskip("transformers")


def _run(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(call_model(model, inputs))


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(config).eval()


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))}
LOAD_IN_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, torchslim
    model = torchslim.load(sys.argv[1])   # no model argument: rebuilt from the recorded config
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
""")


@pytest.mark.parametrize("build", [gpt2, bert])
def test_a_pruned_model_loads_from_its_config_in_a_fresh_process(build: Any, tmp_path: Path) -> None:
    model = build()
    apply_(model, WeightPruning(sparsity=0.5))
    finalize_(model)
    path = artifact.save(model, tmp_path / "m.slim", example_inputs=IDS)
    assert "hf" in artifact.read_metadata(path) and "module" not in artifact.read_metadata(path)
    torch.save(IDS["input_ids"], tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(path), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), _run(model, IDS))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["hf"].update({"class": "AutoTokenizer"}), "not a model class of transformers"),
    (lambda d: d["hf"]["config"].update({"auto_map": {"AutoModel": "evil.Model"}}), "remote code"),
    (lambda d: d["hf"]["config"].update({"n_layer": 100_000}), "n_layer must be an int"),
    (lambda d: d["hf"]["config"].update({"n_embd": 1 << 30}), "out of range"),
])
def test_a_forged_config_is_refused_before_anything_is_built(tmp_path: Path, change: Any,
                                                             message: str) -> None:
    path = artifact.save(gpt2(), tmp_path / "m.slim")
    forged = rewrite(path, lambda tensors, document: change(document))
    with pytest.raises(ArtifactError, match=message):
        artifact.load(forged)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = bert()
    model.save_pretrained(str(tmp_path / "bert"))
    (tmp_path / "data.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Texts(Dataset):
            def __init__(self, n, seed):
                self.ids = torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(seed))
            def __len__(self):
                return len(self.ids)
            def __getitem__(self, i):
                return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                        "labels": self.ids[i, 0] % 2}

        def loaders():
            return {"train": DataLoader(Texts(64, 0), batch_size=16, shuffle=True),
                    "val": DataLoader(Texts(32, 1), batch_size=16)}
    """))
    return tmp_path


def test_a_local_folder_goes_through_prune_quantize_evaluate_and_export(folder: Path, capsys: Any) -> None:
    pytest.importorskip("onnxruntime")
    model, data = str(folder / "bert"), f"{folder / 'data.py'}:loaders"
    assert main(["prune", "--model", model, "--dataset", data, "--ratio", "0.5", "--epochs", "1",
                 "--out", str(folder / "p"), "--no-progress"]) == 0
    pruned = artifact.load(folder / "p" / "model.slim")  # no model argument
    weight = pruned.bert.encoder.layer[0].intermediate.dense.weight
    assert float((weight == 0).float().mean()) > 0.4
    assert main(["quantize", "--model", str(folder / "p" / "model.slim"), "--dataset", data,
                 "--method", "dynamic", "--out", str(folder / "q")]) == 0
    int8 = artifact.load(folder / "q" / "model.slim")
    assert "QAttention" in int8.report["int8_ops"]  # onnxruntime's fused attention on a plain BERT
    batch = {"input_ids": torch.randint(0, 100, (3, 12)),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    assert float((_run(int8, batch) - _run(pruned, batch)).abs().max()) < 0.05
    capsys.readouterr()
    assert main(["evaluate", str(folder / "q" / "model.slim"), "--dataset", data, "--split", "val",
                 "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main(["export", str(folder / "p" / "model.slim"), "--format", "hf", "--out",
                 str(folder / "hf")]) == 0
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder / "hf")).eval()
    torch.testing.assert_close(_run(reloaded, batch), _run(pruned, batch))


def test_a_folder_without_weights_is_named_with_the_fix(folder: Path) -> None:
    from torchslim.huggingface import load_hf_folder

    (folder / "bert" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no weights .*save_pretrained"):
        load_hf_folder(folder / "bert")


@pytest.mark.parametrize("build", [gpt2, llama])
def test_decoder_language_models_run_as_int8_programs_at_any_length(build: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    model = build()
    int8 = quantize_model(model, Quantization(method="dynamic"), example_inputs=IDS)
    assert int8.report["int8_ops"].get("MatMulInteger", 0) >= 8
    longer = {"input_ids": torch.randint(0, 100, (3, 13))}
    expected = model(**longer, use_cache=False).logits
    got = _run(int8, longer)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 0.5 * float(expected.abs().max())
    reloaded = artifact.load(artifact.save(int8, tmp_path / "int8.slim"))
    assert torch.equal(_run(reloaded, longer), got)


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_layers_kept_in_float_are_float_in_the_program_of_a_keyword_input_model(method: str) -> None:
    """The program wraps the model (its layers are exported under "/model/..."): the names the
    user gives must still reach their nodes, and one the program does not use is said."""
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model

    model = bert()
    batch = {"input_ids": torch.randint(0, 100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    int8 = quantize_model(model, Quantization(method=method, exclude=("bert.encoder.layer.1.output.dense",),
                                              fp16=("bert.pooler.dense",)),
                          example_inputs=batch, calibration=[batch])
    left = int8.report["float_ops"]  # the fp16 pooler computes in float too
    assert len(left) == 2 and "/model/bert/encoder/layer.1/output/dense/" in left[0] and "pooler" in left[1]
    assert int8.report["excluded"]["bert.encoder.layer.1.output.dense"] == "kept in float by exclude="
    assert int8.report["fp16_weights"]  # the pooler feeds the classifier: in the program, halved



def test_given_input_ranges_reach_the_program_of_a_keyword_input_model() -> None:
    """Static int8 of a Hugging Face model with the input range of one layer given (as QAT's
    conversion gives them): the program quantizes that input on that grid, the rest calibrated."""
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model
    from torchslim.quantization.layer_reconstruction import program_grids

    model = bert()
    batch = {"input_ids": torch.randint(0, 100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    layer = "bert.encoder.layer.0.intermediate.dense"
    int8 = quantize_model(model, Quantization(method="static"), example_inputs=batch, calibration=[batch],
                          input_ranges={layer: (-1.0, 3.0), "bert.no.such.layer": (0.0, 1.0)})
    assert int8.report["input_ranges"]["applied"] == 1
    assert list(int8.report["input_ranges"]["not_applied"]) == ["bert.no.such.layer"]
    grids = program_grids(int8.program).inputs
    scale, zero = grids[f"model.{layer}"]
    assert scale == pytest.approx(4.0 / 255, rel=1e-5) and zero == 64
    other = grids["model.bert.encoder.layer.1.intermediate.dense"]
    assert other[0] != pytest.approx(4.0 / 255, rel=1e-3)  # calibrated, not given


def test_range_search_on_a_keyword_input_model_reaches_its_program() -> None:
    """`range_search` runs the model on keyword inputs and reads its (dict) output's gradients;
    the ranges it finds are the program's grids."""
    pytest.importorskip("onnxruntime")
    from torchslim.quantization import Quantization, quantize_model
    from torchslim.quantization.layer_reconstruction import program_grids

    model = bert()
    batch = {"input_ids": torch.randint(0, 100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    int8 = quantize_model(model, Quantization(method="static", range_search=True), example_inputs=batch,
                          calibration=[batch])
    searched = int8.report["range_search"]["layers"]
    assert "bert.encoder.layer.0.intermediate.dense" in searched
    assert not int8.report["range_search"]["skipped"]
    assert int8.report["input_ranges"]["applied"] >= 4  # every FFN layer at least
    low, high = searched["bert.encoder.layer.1.output.dense"]["range"]
    scale, _ = program_grids(int8.program).inputs["model.bert.encoder.layer.1.output.dense"]
    assert scale == pytest.approx((high - min(low, 0.0)) / 255, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def _zero_half(model: torch.nn.Module) -> None:
    """Zero the second key/value group of every Llama attention (its kv head, the query heads
    reading it, their output columns) and every odd MLP neuron: they contribute nothing."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp, d = layer.self_attn, layer.mlp, layer.self_attn.head_dim
            attention.k_proj.weight[d:] = 0
            attention.v_proj.weight[d:] = 0
            attention.q_proj.weight[2 * d:] = 0
            attention.o_proj.weight[:, 2 * d:] = 0
            for projection in (mlp.gate_proj, mlp.up_proj):
                projection.weight[1::2] = 0
            mlp.down_proj.weight[:, 1::2] = 0


def test_llama_loses_whole_key_value_groups_and_neurons_and_computes_the_same(tmp_path: Path,
                                                                             ) -> None:
    from torchslim.pruning import ChannelPruning

    model = llama()
    _zero_half(model)
    expected = _run(model, IDS)
    expected_tokens = model.generate(**IDS, max_new_tokens=4, do_sample=False)
    changes = apply_(model, ChannelPruning(ratio=0.5), example_inputs=IDS)
    attention = model.model.layers[0].self_attn
    # 2 of 4 query heads and 1 of 2 key/value heads stay: the grouping is kept
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (16, 8)
    assert attention.num_key_value_groups == 2 and model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 32
    assert "model.layers.1.mlp.down_proj" in changes.changed
    torch.testing.assert_close(_run(model, IDS), expected, atol=1e-5, rtol=1e-5)
    # generation (with its key/value cache sized by the updated config) picks the same tokens
    assert torch.equal(model.generate(**IDS, max_new_tokens=4, do_sample=False), expected_tokens)
    reloaded = artifact.load(artifact.save(model, tmp_path / "llama.slim", example_inputs=IDS))
    assert torch.equal(_run(reloaded, IDS), _run(model, IDS))
    from torchslim.huggingface import load_hf_folder, save_hf_folder

    save_hf_folder(model, tmp_path / "hf")  # pruned alike everywhere: the config says it
    torch.testing.assert_close(_run(load_hf_folder(tmp_path / "hf"), IDS), _run(model, IDS))


@pytest.mark.parametrize("build", [gpt2, bert])
def test_packed_and_bert_style_attention_lose_heads_and_neurons_and_reload(build: Any,
                                                                          tmp_path: Path) -> None:
    from torchslim.huggingface import save_hf_folder
    from torchslim.pruning import ChannelPruning

    model = build()
    before, heads = sum(p.numel() for p in model.parameters()), model.config.num_attention_heads
    apply_(model, ChannelPruning(ratio=0.5), example_inputs=IDS)
    assert sum(p.numel() for p in model.parameters()) < 0.75 * before
    assert model.config.num_attention_heads == heads // 2
    reloaded = artifact.load(artifact.save(model, tmp_path / "m.slim", example_inputs=IDS))
    assert torch.equal(_run(reloaded, IDS), _run(model, IDS))
    with pytest.raises(ConfigError, match="head size is hidden_size / num_attention_heads"):
        save_hf_folder(model, tmp_path / "hf")


def test_a_language_model_distils_from_its_teacher_on_dict_batches() -> None:
    import copy

    from torchslim.distillation import DistillationLoss
    from torchslim.training import Trainer, make_train_config

    student = gpt2()
    teacher = copy.deepcopy(student)
    apply_(student, WeightPruning(sparsity=0.5))
    ids = IDS["input_ids"]
    batches = [{"input_ids": ids, "labels": ids}] * 3  # Hugging Face style: labels in the dict
    before = student.transformer.h[0].mlp.c_fc.parametrizations.weight.original.detach().clone()
    loss = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    history = Trainer(student, batches, config=make_train_config(epochs=2, lr=0.01, batch_size=2),
                      loss=loss, progress=False).fit()
    assert len(history) == 2 and history[-1].train_loss < history[0].train_loss
    assert not torch.equal(student.transformer.h[0].mlp.c_fc.parametrizations.weight.original, before)


def _pixels_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "swin":
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                         num_heads=[2, 2], window_size=4, num_labels=10)
        return transformers.SwinForImageClassification(config).eval()
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32,
                                         num_labels=10)
    return transformers.ConvNextForImageClassification(config).eval()


@pytest.mark.parametrize("name", ["swin", "convnext"])
def test_swin_heads_and_convnext_neurons_are_pruned_and_compute_the_same(name: str, tmp_path: Path) -> None:
    from torchslim.pruning import ChannelPruning

    model = _pixels_model(name)
    with torch.no_grad():  # half the heads / neurons contribute nothing: pruning them changes nothing
        for module in model.modules():
            if type(module).__name__ == "SwinAttention":
                d = module.head_dim
                module.o_proj.weight[:, d:] = 0
                for projection in (module.q_proj, module.k_proj, module.v_proj):
                    projection.weight[d:] = 0
            for up, down in (("fc1", "fc2"), ("pwconv1", "pwconv2")):
                if hasattr(module, up) and hasattr(module, down):
                    width = getattr(module, up).out_features
                    getattr(module, up).weight[width // 2:] = 0
                    getattr(module, down).weight[:, width // 2:] = 0
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).logits
    before = sum(p.numel() for p in model.parameters())
    changes = apply_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before, changes.summary()
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
    if name == "swin":  # a pruned head takes its relative-position bias column with it
        bias = model.swin.encoder.layers[0].blocks[0].attention.relative_position_bias
        assert tuple(bias.relative_position_bias_table.shape) == (49, 1)
    reloaded = artifact.load(artifact.save(model, tmp_path / "m.slim", example_inputs=x))
    assert torch.equal(reloaded(x).logits, model(x).logits)
