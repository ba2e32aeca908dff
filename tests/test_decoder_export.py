"""`export --format genai`: a causal LM's whole decoding step as one onnxruntime program, coded
layers on `MatMulNBits`, decoded by onnxruntime-genai. Models built from transformers configs
(Llama, and Qwen2 whose q/k/v carry biases), a tokenizer built in code: nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim import apply_, artifact
from torchslim.cli import main
from torchslim.data.text import evaluation_text, tokenize_text
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.export import export_model
from torchslim.measure import perplexity
from torchslim.quantization import GPTQ, Int4Kernel, WeightOnly

transformers = pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

VOCAB = 320  # unlike every layer width: the builder takes a Linear of the vocabulary's width for the head


def tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(VOCAB)}
    table = Tokenizer(models.WordLevel(words, unk_token="w0"))
    table.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=table, unk_token="w0", bos_token="w1",
                                                eos_token="w2")


def llama(vocab: int = VOCAB, tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def ids(count: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, count), generator=torch.Generator().manual_seed(1))


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (4, 32), generator=generator) for _ in range(2)]


def greedy_genai(folder: Path, prompt: torch.Tensor, new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    length = prompt.shape[1] + new
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt[0].tolist())
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[prompt.shape[1]:]


def test_a_float_decoder_generates_what_transformers_generates(tmp_path: Path) -> None:
    model = llama()
    result = export_model(model, tmp_path / "genai", format="genai", tokenizer=tokenizer(),
                          example_inputs={"input_ids": ids()})
    assert result["int4_nodes"] == {} and result["max_relative_difference"] < 1e-4
    assert (tmp_path / "genai" / "genai_config.json").is_file()
    prompt = ids(6)
    with torch.no_grad():
        expected = model.generate(input_ids=prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert greedy_genai(tmp_path / "genai", prompt, 10) == expected[0, 6:].tolist()


def test_gptq_codes_run_on_matmul_nbits_in_the_exported_decoder(tmp_path: Path) -> None:
    """Each block's q/k/v become one stacked int4 node, o/gate/up/down one each: 5 per block; the
    float head is named, not silently left."""
    model = llama()
    apply_(model, GPTQ(bits=4, group_size=32, symmetric=False), calibration=calibration())
    result = export_model(model, tmp_path / "gptq", format="genai", tokenizer=tokenizer(),
                          example_inputs={"input_ids": ids()})
    assert len(result["int4_nodes"]) == 10
    stacked = [layers for layers in result["int4_nodes"].values() if len(layers) == 3]
    assert stacked == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    assert list(result["float_matmuls"]) == ["/lm_head/MatMul"]
    assert result["builder_difference"] < 1e-4 and result["max_relative_difference"] < 0.1
    float_bytes = export_model(llama(), tmp_path / "float", format="genai", tokenizer=tokenizer(),
                               example_inputs={"input_ids": ids()})["bytes"]
    assert result["bytes"] < 0.6 * float_bytes  # the layers' weights are 4-bit codes on disk
    program = __import__("onnx").load(str(tmp_path / "gptq" / "model.onnx"), load_external_data=False)
    kinds = [node.op_type for node in program.graph.node]
    assert kinds.count("MatMulNBits") == 10 and kinds.count("MatMul") == 1


def test_the_kernel_layers_and_an_8_bit_head_of_a_qwen2_model_with_biases(tmp_path: Path) -> None:
    """Qwen2's q/k/v have biases (MatMul then Add in the program); the tied head and embedding as
    one table of 8-bit codes: the head runs on the 8-bit kernel, the table is looked up from the
    same codes (GatherBlockQuantized): no float copy of it in the folder."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config).eval()
    apply_(model, WeightOnly(bits=4, group_size=32, embeddings=True, embedding_bits=8))
    apply_(model, Int4Kernel(), calibration=calibration())
    result = export_model(model, tmp_path / "qwen", format="genai", tokenizer=tokenizer(),
                          example_inputs={"input_ids": ids()})
    assert result["float_matmuls"] == {} and result["skipped"] == {} and len(result["int4_nodes"]) == 12
    assert result["int4_nodes"]["/lm_head/MatMul"] == ["lm_head"]
    assert ["model.embed_tokens"] in result["int4_nodes"].values()  # looked up from its codes
    program = __import__("onnx").load(str(tmp_path / "qwen" / "model.onnx"), load_external_data=False)
    bits = {node.name: next(a.i for a in node.attribute if a.name == "bits")
            for node in program.graph.node if node.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits["/lm_head/MatMul"] == 8 and sorted(set(bits.values())) == [4, 8]
    assert sum(v == 8 for v in bits.values()) == 2  # the head and the table
    float_tables = [i for i in program.graph.initializer if list(i.dims) == [VOCAB, 128] and i.data_type == 1]
    assert not float_tables  # only the table's codes are in the folder
    assert len(greedy_genai(tmp_path / "qwen", ids(4), 5)) == 5


def test_cli_exports_an_artifact_and_benches_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    model = llama()
    apply_(model, WeightOnly(bits=4, group_size=32))
    artifact.save(model, tmp_path / "model.slim")
    tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    assert main(["export", str(tmp_path / "model.slim"), "--format", "genai", "--tokenizer",
                 str(tmp_path / "tokenizer"), "--out", str(tmp_path / "decoder")]) == 0
    printed = capsys.readouterr().out
    assert "10 matmuls run their codes on MatMulNBits" in printed and "float: /lm_head/MatMul" in printed
    assert main(["bench", str(tmp_path / "decoder"), "--json", "--threads", "1", "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["backend"] == "onnxruntime-genai" and row["tokens_per_s"] > 0 and row["threads"] == 1
    assert main(["evaluate", str(tmp_path / "decoder"), "--dataset", "python-docs", "--max-tokens", "1024",
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    tokens = tokenize_text(tokenizer(), evaluation_text())
    module = perplexity(model, tokens, max_tokens=1024)  # the codes in float, in torch
    assert scored["tokens"] == module["tokens"] == 1022
    assert abs(scored["perplexity"] / module["perplexity"] - 1) < 0.05  # the kernel's int8 activations


def test_bad_input_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        export_model(llama(), tmp_path / "a", format="genai", tokenizer=None, example_inputs=None)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ConfigError, match="not a Hugging Face causal language model"):
        export_model(bert, tmp_path / "b", format="genai", tokenizer=tokenizer(), example_inputs=None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        export_model(llama(), tmp_path / "taken", format="genai", tokenizer=tokenizer(), example_inputs=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_program_the_builder_got_wrong_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """The builder takes any Linear as wide as the vocabulary for the output head: with a
    vocabulary of the MLP's width its program computes other logits. The check says so."""
    with pytest.raises(UnsupportedModuleError, match="output head"):
        export_model(llama(vocab=256), tmp_path / "wrong", format="genai", tokenizer=tokenizer(),
                     example_inputs=None)
    assert list(tmp_path.iterdir()) == []
