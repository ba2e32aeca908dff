"""Conformance matrix: every technique on Hugging Face architectures built from small configs in
code (random weights, nothing downloaded).

Each cell is one technique applied to a fresh copy of one architecture:
- `ok` with what changed (params/MACs before -> after, int8 ops, ...),
- `refused` with the clear error torchslim raised (the model is left unchanged),
- `fail` for anything else: an unexpected exception, or a technique that reported success
  while the model is unchanged (counted separately as `silent`).

`save_load` saves every result of the architecture and loads each in a fresh process (no model
argument: rebuilt from the recorded config) and compares outputs. Torch-Pruning (DepGraph,
group L2, attention heads through its `num_heads` mapping) gets the same structured cell when it
is installed (`pip install -c constraints.txt torch-pruning`).

    python bench/conformance.py [--json] [--only gpt2,llama] [--techniques prune,structured]
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as T
from torch import nn

from torchslim import apply_, artifact, finalize_
from torchslim.calibration import call_model, logits_of
from torchslim.errors import NothingChangedWarning, SlimError

SEQ, BATCH = 8, 2


def _text(vocab: int = 100) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))}


def _seq2seq() -> dict[str, torch.Tensor]:
    ids = _text()["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _pixels(size: int = 32, channels: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=generator)}


def _audio() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(BATCH, 1600, generator=torch.Generator().manual_seed(0))}


def _features() -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(BATCH, 16, 64, generator=torch.Generator().manual_seed(0))}


TEXT = {"vocab_size": 100, "max_position_embeddings": 64}
ENC = {**TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
DEC = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "intermediate_size": 64, "max_position_embeddings": 64}

# name -> (model class, config class, config options, inputs)
ARCHITECTURES: dict[str, tuple[Any, Any, dict[str, Any], Callable[[], dict[str, torch.Tensor]]]] = {
    "bert": (T.BertForSequenceClassification, T.BertConfig, ENC, _text),
    "roberta": (T.RobertaForSequenceClassification, T.RobertaConfig, {**ENC, "pad_token_id": 1}, _text),
    "distilbert": (T.DistilBertForSequenceClassification, T.DistilBertConfig,
                   {**TEXT, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}, _text),
    "albert": (T.AlbertForSequenceClassification, T.AlbertConfig, {**ENC, "embedding_size": 16}, _text),
    "electra": (T.ElectraForSequenceClassification, T.ElectraConfig, {**ENC, "embedding_size": 32}, _text),
    "deberta-v2": (T.DebertaV2ForSequenceClassification, T.DebertaV2Config, ENC, _text),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, {"vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                               "n_positions": 64}, _text),
    "gpt-neo": (T.GPTNeoForCausalLM, T.GPTNeoConfig, {"vocab_size": 100, "hidden_size": 32, "num_layers": 2,
                                                       "num_heads": 4, "attention_types": [[["global"], 2]],
                                                       "max_position_embeddings": 64}, _text),
    "opt": (T.OPTForCausalLM, T.OPTConfig,
            {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 64}, _text),
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, {**DEC, "num_key_value_heads": 2}, _text),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, {**DEC, "num_key_value_heads": 2}, _text),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, {**DEC, "num_key_value_heads": 2}, _text),
    "phi": (T.PhiForCausalLM, T.PhiConfig, DEC, _text),
    "gemma": (T.GemmaForCausalLM, T.GemmaConfig, {**DEC, "num_key_value_heads": 1, "head_dim": 8}, _text),
    "t5": (T.T5ForConditionalGeneration, T.T5Config, {"vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64,
                                                      "num_layers": 2, "num_heads": 4}, _seq2seq),
    "bart": (T.BartForConditionalGeneration, T.BartConfig,
             {"vocab_size": 100, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
              "decoder_ffn_dim": 64, "max_position_embeddings": 64}, _seq2seq),
    "vit": (T.ViTForImageClassification, T.ViTConfig, {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                                       "num_hidden_layers": 2, "num_attention_heads": 4,
                                                       "intermediate_size": 64}, _pixels),
    "convnext": (T.ConvNextForImageClassification, T.ConvNextConfig,
                 {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "image_size": 32}, _pixels),
    "resnet": (T.ResNetForImageClassification, T.ResNetConfig,
               {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
               _pixels),
    "mobilenet-v2": (T.MobileNetV2ForImageClassification, T.MobileNetV2Config,
                     {"image_size": 32, "depth_multiplier": 0.25}, _pixels),
    "swin": (T.SwinForImageClassification, T.SwinConfig, {"image_size": 32, "patch_size": 4, "embed_dim": 16,
                                                          "depths": [1, 1], "num_heads": [2, 2],
                                                          "window_size": 4}, _pixels),
    "wav2vec2": (T.Wav2Vec2ForSequenceClassification, T.Wav2Vec2Config,
                 {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "conv_dim": (16, 16), "conv_stride": (5, 2),
                  "conv_kernel": (10, 3),
                  "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}, _audio),
    "whisper-encoder": (T.WhisperForAudioClassification, T.WhisperConfig,
                        {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                         "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                         "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                         "num_mel_bins": 16, "max_source_positions": 32, "vocab_size": 100}, _features),
}


def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model_cls, config_cls, options, inputs = ARCHITECTURES[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**options)).eval(), inputs()


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(call_model(model, inputs))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, inputs: Any) -> int:
    from torchslim.measure import count_flops

    return count_flops(model, inputs) // 2


# ------------------------------------------------------------------------------ techniques
def t_prune(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.pruning import WeightPruning

    changes = apply_(model, WeightPruning(sparsity=0.5))
    finalize_(model)
    return model, f"{len(changes.changed)} layers masked to 50%"


def t_structured(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.pruning import ChannelPruning

    before, macs = _params(model), _macs(model, x)
    apply_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    return model, f"params {before:,} -> {_params(model):,}, MACs {macs:,} -> {_macs(model, x):,}"


def t_low_rank(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.lowrank import LowRank

    before = _params(model)
    changes = apply_(model, LowRank(param_ratio=0.5))
    return model, f"{len(changes['replaced'])} layers, params {before:,} -> {_params(model):,}"


def t_cluster(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.clustering import WeightSharing

    changes = apply_(model, WeightSharing(bits=4))
    finalize_(model)
    return model, f"{len(changes.changed)} layers to 16 values"


def _int8(method: str) -> Callable[[nn.Module, Any], tuple[nn.Module, str]]:
    def run(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
        from torchslim.quantization import Quantization, quantize_model

        int8 = quantize_model(model, Quantization(method=method), example_inputs=x,
                              calibration=[x] if method == "static" else None)
        return int8, f"int8 ops {int8.report.get('int8_ops')}"
    return run


def t_distill(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.distillation import DistillationLoss
    from torchslim.training import Trainer, make_train_config

    teacher = copy.deepcopy(model)
    out = _run(model, x)
    labels = out.argmax(-1)
    batches = [(x, labels)] * 2
    loss = DistillationLoss(teacher, temperature=2.0, alpha=0.0)
    Trainer(model, batches, config=make_train_config(epochs=1, lr=0.01, batch_size=BATCH), loss=loss,
            progress=False).fit()
    return model.eval(), "2 distillation steps"


def t_onnx(model: nn.Module, x: Any) -> tuple[nn.Module, str]:
    from torchslim.export import export_model

    with tempfile.TemporaryDirectory() as folder:
        result = export_model(model, Path(folder) / "m.onnx", format="onnx", example_inputs=x)
    return model, f"{result['bytes']:,} bytes, max rel. diff {result['max_relative_difference']:.1e}"


TECHNIQUES: dict[str, Callable[[nn.Module, Any], tuple[nn.Module, str]]] = {
    "prune": t_prune, "structured": t_structured, "low_rank": t_low_rank, "cluster": t_cluster,
    "int8_dynamic": _int8("dynamic"), "int8_static": _int8("static"), "distill": t_distill, "onnx": t_onnx,
}

LOAD = """
import json, sys, torch, torchslim
torch.set_num_threads(1)  # as in the run that made the outputs: conv reductions follow threads
from torchslim.calibration import call_model, logits_of
rows = []
for path, inputs, expected in json.loads(sys.argv[1]):
    model = torchslim.load(path)
    with torch.no_grad():
        got = logits_of(call_model(model, torch.load(inputs)))
    rows.append(bool(torch.equal(got, torch.load(expected))))
print(json.dumps(rows))
"""


def _state_changed(before: nn.Module, after: nn.Module) -> bool:
    if type(after) is not type(before):
        return True
    old, new = before.state_dict(), after.state_dict()
    return old.keys() != new.keys() or any(old[k].shape != new[k].shape or not torch.equal(old[k], new[k])
                                           for k in old)


def cell(arch: str, technique: str, folder: Path) -> dict[str, Any]:
    model, x = build(arch)
    original = copy.deepcopy(model)
    started = time.perf_counter()
    row: dict[str, Any] = {"arch": arch, "technique": technique}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, detail = TECHNIQUES[technique](model, x)
            _run(result, x)  # the result still runs
        said = [str(w.message) for w in caught if issubclass(w.category, NothingChangedWarning)]
        if technique not in ("onnx", "distill") and not _state_changed(original, result):
            if said:  # torchslim said so, with the reason: a refusal, not a silent no-op
                row.update(status="refused", detail=said[0][:240])
            else:
                row.update(status="fail", detail="reported success but nothing changed", silent=True)
        else:
            row.update(status="ok", detail=detail)
            if technique != "onnx":
                path = folder / f"{arch}-{technique}.slim"
                artifact.save(result, path, example_inputs=x)
                torch.save(x, folder / f"{arch}-inputs.pt")
                torch.save(_run(result, x), folder / f"{arch}-{technique}.pt")
                row["artifact"] = str(path)
    except SlimError as exc:
        changed = _state_changed(original, model)
        detail = f"{type(exc).__name__}: {str(exc)[:240]}"
        row.update(status="fail" if changed else "refused",
                   detail=detail + (" (model left changed)" if changed else ""))
    except Exception as exc:
        row.update(status="fail", detail=f"{type(exc).__name__}: {str(exc)[:240]}")
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def save_load(arch: str, rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    saved = [r for r in rows if "artifact" in r]
    jobs = [[r["artifact"], str(folder / f"{arch}-inputs.pt"), str(folder / f"{arch}-{r['technique']}.pt")]
            for r in saved]
    row: dict[str, Any] = {"arch": arch, "technique": "save_load"}
    if not jobs:
        return {**row, "status": "refused", "detail": "no result to save"}
    done = subprocess.run([sys.executable, "-c", LOAD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
        return {**row, "status": "fail", "detail": done.stderr.strip().splitlines()[-1][:240]}
    same = json.loads(done.stdout.strip().splitlines()[-1])
    bad = [r["technique"] for r, ok in zip(saved, same, strict=True) if not ok]
    return {**row, "status": "fail" if bad else "ok",
            "detail": f"outputs differ after reload: {bad}" if bad else
            f"{len(same)} results reloaded in a fresh process, outputs identical"}


def torch_pruning_cell(arch: str) -> dict[str, Any]:
    """Torch-Pruning's DepGraph on the same model: group L2, 50%, whole heads (its `num_heads`
    map from each q/k/v projection to its module's head count), the output head ignored. Its
    result keeps transformers' head-count attributes as they were, so they are set afterwards
    from the new shapes (as its README asks users to do by hand)."""
    from torchslim.graph import refresh_counts_

    row: dict[str, Any] = {"arch": arch, "technique": "structured", "tool": "torch-pruning"}
    try:
        import torch_pruning as tp
    except ImportError:
        return {**row, "status": "skipped", "detail": "torch-pruning is not installed"}
    model, x = build(arch)
    before, reference = _params(model), _run(model, x)
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        count = next((getattr(module, a) for a in ("num_attention_heads", "num_heads", "n_heads")
                      if isinstance(getattr(module, a, None), int)), None)
        for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
                      ("q", "k", "v")):
            layers = [getattr(module, n, None) for n in names]
            if count and all(isinstance(layer, nn.Linear) for layer in layers):
                heads.update(dict.fromkeys(layers, count))
    ignored = [m for n, m in model.named_modules() if n.endswith(("lm_head", "classifier", "score"))]
    def timed_out(*_: Any) -> None:
        raise TimeoutError(f"no result within {TP_SECONDS} s")

    signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(TP_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, example_inputs=x,
                                          importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=0.5, num_heads=heads, prune_num_heads=bool(heads),
                                          prune_head_dims=False, ignored_layers=ignored,
                                          output_transform=logits_of)  # ModelOutput -> logits
            pruner.step()
            refresh_counts_(model)
            out = _run(model, x)
        after = _params(model)
        if out.shape != reference.shape or after >= before:
            detail = f"output {tuple(out.shape)}, params {before:,} -> {after:,}"
            return {**row, "status": "fail", "detail": detail}
        return {**row, "status": "ok", "detail": f"params {before:,} -> {after:,}"}
    except Exception as exc:  # any error is a failed cell
        return {**row, "status": "fail", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        signal.alarm(0)


TP_SECONDS = 120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per cell")
    parser.add_argument("--only", default="", help="architectures, comma-separated")
    parser.add_argument("--techniques", default="", help="techniques, comma-separated")
    args = parser.parse_args()
    archs = [a for a in ARCHITECTURES if not args.only or a in args.only.split(",")]
    techniques = [t for t in TECHNIQUES if not args.techniques or t in args.techniques.split(",")]
    torch.set_num_threads(1)
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            rows = [cell(arch, technique, Path(tmp)) for technique in techniques]
            rows.append(save_load(arch, rows, Path(tmp)))
            if "structured" in techniques:
                rows.append(torch_pruning_cell(arch))
            for row in rows:
                row.pop("artifact", None)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{row['arch']:16} {row['technique']:13} {row.get('tool', 'torchslim'):13} "
                          f"{row['status']:8} {row.get('detail', '')}", flush=True)
            all_rows += rows
    ours = [r for r in all_rows if "tool" not in r]
    counts = {s: sum(r["status"] == s for r in ours) for s in ("ok", "refused", "fail")}
    silent = sum(bool(r.get("silent")) for r in ours)
    tp_ok = sum(r["status"] == "ok" for r in all_rows if r.get("tool") == "torch-pruning")
    our_structured = sum(r["status"] == "ok" for r in ours if r["technique"] == "structured")
    summary = {"summary": True, "cells": len(ours), **counts,
               "ok_fraction": round(counts["ok"] / max(len(ours), 1), 3), "silent_no_ops": silent,
               "structured_ok": our_structured, "torch_pruning_structured_ok": tp_ok}
    print(json.dumps(summary) if args.json else f"\n{summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
