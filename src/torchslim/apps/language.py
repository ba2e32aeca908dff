"""Jobs for language models: one-shot compression from calibration text, perplexity, decoding speed.

`compress_language_model` is what `torchslim prune --method wanda|sparsegpt` and
`torchslim quantize --method gptq|rtn` run: load the model (a name such as `smollm2-135m`, an
artifact, or a Hugging Face folder), draw the calibration windows from the dataset's calibration
split, apply the technique, write `OUT/model.slim` and `OUT/report.json`, and score perplexity
before and after on the same held-out tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = ["TEXT_DATASETS", "compress_language_model", "decode_speed", "genai_decode_speed",
           "genai_perplexity", "is_causal_lm",
           "language_perplexity", "load_language_source"]

TEXT_DATASETS = {"python-docs": "English prose of Python's own documentation (pydoc topics: "
                                "evaluation; standard-library docstrings: calibration)"}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that predicts the next token (`...ForCausalLM`)."""
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "generate")


def load_language_source(source: str) -> tuple[nn.Module, Path | None]:
    """A language model by name (`smollm2-135m`), or any model `load_model_or_artifact` reads."""
    from torchslim.apps.workflows import load_model_or_artifact
    from torchslim.models.language import language_model_names, load_language_model

    if source in language_model_names():
        return load_language_model(source), None
    return load_model_or_artifact(source)


def text_tokens(dataset: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration tokens, evaluation tokens, source) of a text dataset for `model`."""
    from torchslim.data.text import calibration_text, evaluation_text, python_docs_source, tokenize_text
    from torchslim.models.language import tokenizer_for

    if dataset not in TEXT_DATASETS:
        raise ConfigError(f"unknown text dataset {dataset!r}; valid: {', '.join(TEXT_DATASETS)}")
    if not is_causal_lm(model):
        raise ConfigError(f"{type(model).__name__} is not a causal language model; perplexity and "
                          "one-shot LM compression need one (e.g. smollm2-135m)")
    tokenizer = tokenizer_for(model)
    calibration = tokenize_text(tokenizer, calibration_text())
    evaluation = tokenize_text(tokenizer, evaluation_text())
    _check_vocabulary(model, max(int(calibration.max()), int(evaluation.max())))
    return calibration, evaluation, python_docs_source()


def _check_vocabulary(model: nn.Module, largest_id: int) -> None:
    """A tokenizer whose ids the model's embedding table cannot look up (a model naming another
    model's tokenizer) fails here, before any work, rather than deep inside the first forward."""
    getter = getattr(model, "get_input_embeddings", None)
    table = getter() if callable(getter) else None
    rows = getattr(table, "num_embeddings", None)
    if isinstance(rows, int) and largest_id >= rows:
        from torchslim.models.language import TOKENIZER_KEY

        name = getattr(model.config, TOKENIZER_KEY, None)
        raise ConfigError(f"the {name} tokenizer gives token ids up to {largest_id}, but "
                          f"{type(model).__name__}'s embedding table has {rows} rows: name the tokenizer the "
                          f"model was trained with (config.{TOKENIZER_KEY}), or give the model a vocabulary "
                          f"of at least {largest_id + 1}")


def language_perplexity(model: nn.Module, dataset: str, *, max_tokens: int | None = None,
                        window: int = 512) -> dict[str, Any]:
    """Perplexity on the dataset's evaluation split (all of it unless `max_tokens`)."""
    from torchslim.measure import perplexity

    _, evaluation, source = text_tokens(dataset, model)
    return {**perplexity(model, evaluation, window=window, max_tokens=max_tokens), "text": source}


def measure_language_model(model: nn.Module, data: Any) -> dict[str, Any]:
    """Perplexity on a bound `TextData`'s held-out tokens (its `eval_tokens` first ones), params,
    non-zeros and the dense artifact's bytes: a recipe's row for a language model."""
    from torchslim.apps.workflows import artifact_bytes, backend_of
    from torchslim.measure import count_params, perplexity

    total, nonzero = count_params(model)
    scored = perplexity(model, data.evaluation_tokens, max_tokens=data.eval_tokens)
    return {"backend": backend_of(model), "params": total, "nonzero_params": nonzero,
            "bytes": artifact_bytes(model, None), "perplexity": scored["perplexity"],
            "perplexity_tokens": scored["tokens"], "split": "held-out"}


def time_decoding_(rows: list[dict[str, Any]], models: list[nn.Module], *, rounds: int = 3) -> None:
    """Greedy decoding speed (batch 1, KV cache) of several language models, measured in turns
    (`rounds` rounds, one timing of each model per round), written into their rows as
    `tokens_per_s` (the median) with every round under `decode_tokens_per_s`."""
    import statistics

    speeds: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for index, model in enumerate(models):
            speeds[index].append(decode_speed(model, repeats=1))
    for row, measured in zip(rows, speeds, strict=True):
        row["tokens_per_s"] = statistics.median(measured)
        row["decode_tokens_per_s"] = measured


def decode_speed(model: nn.Module, *, new_tokens: int = 32, prompt: int = 16, repeats: int = 3) -> float:
    """Greedy decoding speed at batch 1 with the key/value cache, in tokens/s (median)."""
    import statistics

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        generate: Any = getattr(model, "generate")  # noqa: B009 - Hugging Face models only
        generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def genai_perplexity(folder: str | Path, dataset: str, *, max_tokens: int | None = None,
                     window: int = 512) -> dict[str, Any]:
    """Perplexity of an `export --format genai` folder (its program, run by onnxruntime) on the
    dataset's evaluation split, tokenized by the tokenizer saved in the folder."""
    from transformers import AutoTokenizer

    from torchslim.data.text import evaluation_text, python_docs_source, tokenize_text
    from torchslim.decoder_export import DecoderProgram, genai_config
    from torchslim.measure import perplexity

    if dataset not in TEXT_DATASETS:
        raise ConfigError(f"unknown text dataset {dataset!r}; valid: {', '.join(TEXT_DATASETS)}")
    context = int(genai_config(folder)["context_length"])
    if context < window:
        raise ConfigError(f"the exported decoder takes {context} tokens at most, fewer than the perplexity "
                          f"window of {window}; export a model whose max_position_embeddings is >= {window}")
    tokens = tokenize_text(AutoTokenizer.from_pretrained(str(folder)), evaluation_text())
    return {**perplexity(DecoderProgram(folder), tokens, window=window, max_tokens=max_tokens),
            "text": python_docs_source(), "backend": "onnxruntime-genai"}


def genai_decode_speed(folder: str | Path, *, new_tokens: int = 32, prompt: int = 16, repeats: int = 3,
                       threads: int | None = None) -> float:
    """Greedy decoding speed at batch 1 of an onnxruntime-genai folder (`torchslim export
    --format genai`), timed as `decode_speed` times torch: a prompt of `prompt` fixed token ids
    read, then `new_tokens` generated, all of it in onnxruntime-genai (median tokens/s)."""
    import statistics

    import onnxruntime_genai as og

    from torchslim.decoder_export import genai_config

    config = og.Config(str(folder))
    if threads:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    vocab = int(genai_config(folder)["vocab_size"])
    ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def generate(count: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + count, min_length=prompt + count, do_sample=False)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - start

    generate(2)  # warm-up
    return new_tokens / statistics.median(generate(new_tokens) for _ in range(repeats))


def compress_language_model(source: str, config: Any, *, out: str | Path, dataset: str = "python-docs",
                            sequences: int = 128, length: int = 512, eval_tokens: int | None = 16384,
                            seed: int = 0, then: list[Any] | None = None) -> dict[str, Any]:
    """Compress a causal LM with a one-shot technique, save it, and report perplexity before/after.

    Args:
        config: `Wanda`, `SparseGPT`, `GPTQ` or `WeightOnly`.
        sequences, length: calibration windows drawn (fixed seed) from the calibration split.
        eval_tokens: evaluation tokens scored (None: the whole split, ~113k tokens).
        then: techniques applied after it without calibration (e.g. `Int4Kernel()`).

    Raises:
        ConfigError: not a causal LM, unknown dataset, or a calibration split shorter than a window
            (before any work).
    """
    from torchslim import apply_, artifact
    from torchslim.data.text import token_windows
    from torchslim.measure import perplexity
    from torchslim.select import Select

    model, _ = load_language_source(source)
    calibration_tokens, evaluation, text = text_tokens(dataset, model)
    windows = token_windows(calibration_tokens, count=sequences, length=length, seed=seed)
    batches = [windows[i:i + 8] for i in range(0, sequences, 8)]
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    before = perplexity(model, evaluation, max_tokens=eval_tokens)
    start = time.perf_counter()
    import resource

    changes = apply_(model, config, calibration=batches, targets=Select())
    for step in then or []:
        apply_(model, step)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = perplexity(model, evaluation, max_tokens=eval_tokens)
    artifact.save(model, target / "model.slim")
    report = {
        "model": source, "technique": config.to_dict(), "dataset": dataset, "text": text,
        "calibration": {"sequences": sequences, "length": length, "seed": seed,
                        "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)},
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "perplexity_ratio": after["perplexity"] / before["perplexity"],
        "perplexity_tokens": after["tokens"], "window": after["window"],
        "changed": len(changes.changed), "skipped": changes.skipped,
        "bytes": (target / "model.slim").stat().st_size,
    }
    temporary = target / "report.json.tmp"
    temporary.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    temporary.replace(target / "report.json")
    return report
