"""What a compression result is judged by: accuracy, parameters, bytes, latency, FLOPs.

Latency is measured the way benchmarks should be: a fixed thread count (recorded), warm-up runs,
then repeated timed runs summarised by median and p90. FLOPs come from
`torch.utils.flop_counter`, so they follow the real shapes of the (possibly pruned) model.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim.calibration import (
    batch_size_of,
    call_model,
    call_uncached,
    logits_of,
    move_inputs,
    split_batch,
)
from torchslim.errors import ConfigError

__all__ = [
    "Latency",
    "compare",
    "count_flops",
    "count_params",
    "evaluate",
    "file_bytes",
    "measure_latency",
    "num_threads",
    "perplexity",
    "probe_accuracy",
    "time_interleaved",
]


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             topk: tuple[int, ...] = (1,), device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean cross-entropy loss and top-k accuracy (fractions) of a classifier.

    Returns keys `loss`, `accuracy` (top-1) and `top{k}` for every other k, plus `samples`.
    A language model's (N, T, V) scores against (N, T) next-token labels count per token
    (`samples` is then the tokens; -100 labels are skipped). The model's train/eval mode is
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, loss_sum = 0, 0.0
    correct = dict.fromkeys(topk, 0)
    with torch.inference_mode():
        for batch in batches:
            inputs, labels = split_batch(batch)
            if labels is None:
                raise ConfigError("evaluate() needs labelled batches: (inputs, labels) or a dict "
                                  "with 'labels'; for unlabelled data compare outputs instead")
            inputs, labels = move_inputs(inputs, device), labels.to(device)
            logits = logits_of(call_model(model, inputs))
            if logits.dim() == 3 and labels.dim() == 2:  # (N, T, V) tokens of a language model
                kept = labels.reshape(-1) != -100
                logits, labels = logits.reshape(-1, logits.shape[-1])[kept], labels.reshape(-1)[kept]
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            ranked = logits.topk(max(topk), dim=1).indices  # (B, max_k)
            hits = ranked.eq(labels.unsqueeze(1))  # (B, max_k)
            for k in topk:
                correct[k] += int(hits[:, :k].any(dim=1).sum())
            total += int(labels.shape[0])
    model.train(was_training)
    if total == 0:
        raise ConfigError("evaluate() got no batches: the loader is empty")
    result: dict[str, float] = {"loss": loss_sum / total, "samples": float(total)}
    for k in topk:
        result["accuracy" if k == 1 else f"top{k}"] = correct[k] / total
    return result


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter counts; shared parameters are counted once.

    A converted model (an ONNX Runtime program) reports the counts of the model it came from.
    """
    weight_count = getattr(model, "weight_count", None)
    if isinstance(weight_count, int) and weight_count > 0:
        return weight_count, weight_count
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    return total, nonzero


def file_bytes(path: str | Path) -> int:
    """Size of a file on disk in bytes."""
    return os.path.getsize(path)


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass on `inputs` (a tensor, or a dict of keyword inputs; a
    multiply-add counts 2); MACs = FLOPs / 2."""
    per_sample = getattr(model, "flops_per_sample", None)
    if isinstance(per_sample, int) and per_sample > 0:  # a converted model: counted before
        return per_sample * batch_size_of(inputs)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    recurrent: list[int] = []  # the counter has no formula for the fused RNN kernels
    hooks = [m.register_forward_hook(lambda m, args, out: recurrent.append(_rnn_flops(m, args[0])))
             for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        # Grad mode on: under no_grad nn.MultiheadAttention takes a fused kernel the counter misses.
        with torch.enable_grad(), counter:
            call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return int(counter.get_total_flops()) + sum(recurrent)


def _rnn_flops(module: nn.RNNBase, inputs: Any) -> int:
    """Multiply-adds x 2 of an LSTM/GRU/RNN's gate matmuls over the whole sequence."""
    if not isinstance(inputs, torch.Tensor):  # a PackedSequence: count its data's rows
        inputs = inputs.data.unsqueeze(0)
    if inputs.dim() == 2:  # unbatched (T, F)
        steps, batch = inputs.shape[0], 1
    else:
        steps, batch = (inputs.shape[1], inputs.shape[0]) if module.batch_first else inputs.shape[:2]
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    directions = 2 if module.bidirectional else 1
    total = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else module.hidden_size * directions
        total += gates * module.hidden_size * (width + module.hidden_size) * directions
    return 2 * total * int(steps) * int(batch)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (None: leave as is); yields the count."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Latency:
    """Latency of one forward pass over repeated runs."""

    batch_size: int
    threads: int
    repeats: int
    median_ms: float
    p90_ms: float
    throughput: float  # samples per second, from the median
    samples_ms: tuple[float, ...] = ()  # every timed run, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(model: nn.Module, inputs: torch.Tensor, *, threads: int | None = None,
                    warmup: int = 5, repeats: int = 30, min_seconds: float = 0.0) -> Latency:
    """Time `model(inputs)`: warm-up runs first, then at least `repeats` timed runs.

    Args:
        model: the module to time (run in eval mode, without autograd).
        inputs: one batch (a tensor, or a dict of keyword inputs); its first dimension is the
            batch size.
        threads: intra-op threads for the measurement (default: current setting).
        warmup: untimed runs before timing (allocations, caches, lazy init).
        repeats: timed runs; more are added until `min_seconds` have passed.
        min_seconds: lower bound on the total timed duration, for very fast models.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    was_training = model.training
    model.eval()
    samples: list[float] = []
    with num_threads(threads) as used, torch.inference_mode():
        for _ in range(warmup):
            call_model(model, inputs)
        start = time.perf_counter()
        while len(samples) < repeats or time.perf_counter() - start < min_seconds:
            tick = time.perf_counter()
            call_model(model, inputs)
            samples.append(time.perf_counter() - tick)
    model.train(was_training)
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    batch = batch_size_of(inputs)
    return Latency(batch_size=batch, threads=used, repeats=len(samples), median_ms=median * 1e3,
                   p90_ms=p90 * 1e3, throughput=batch / median,
                   samples_ms=tuple(round(t * 1e3, 6) for t in samples))


NOISY_P90_RATIO = 1.5  # p90 / median above this: the machine was not quiet, say so next to the number


def time_interleaved(models: Sequence[nn.Module], inputs: Sequence[Any], *, rounds: int = 5,
                     repeats: int = 4, threads: int | None = None) -> list[dict[str, Any]]:
    """Latency of several models measured in turns, so that they share the machine's moods.

    Timing a baseline and a compressed model minutes apart compares two machine states (a
    background job, a thermal limit), not two models. Here every round times each model
    `repeats` times, one model after the other, for `rounds` rounds.

    Args:
        models: the models to compare.
        inputs: one batch per model (the same shape for all, as a rule).

    Returns:
        Per model: `median_ms` and `p90_ms` over all its timed runs, `spread_ms` (the lowest and
        highest round median), `noisy` (p90 / median > 1.5: the number is not to be trusted
        alone), `batch_size`, `threads`, and the raw `samples_ms` and `round_medians_ms`.
    """
    if len(models) != len(inputs) or rounds < 1 or repeats < 1:
        raise ConfigError(f"need one input per model and rounds, repeats >= 1; got {len(models)} "
                          f"models, {len(inputs)} inputs, rounds={rounds}, repeats={repeats}")
    for model, batch in zip(models, inputs, strict=True):  # warm-up: allocations, lazy init
        measure_latency(model, batch, threads=threads, warmup=2, repeats=1)
    runs: list[list[Latency]] = [[] for _ in models]
    for _ in range(rounds):
        for index, (model, batch) in enumerate(zip(models, inputs, strict=True)):
            runs[index].append(measure_latency(model, batch, threads=threads, warmup=1,
                                               repeats=repeats))
    results = []
    for timed in runs:
        samples = sorted(t for run in timed for t in run.samples_ms)
        median = statistics.median(samples)
        p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
        round_medians = [run.median_ms for run in timed]
        results.append({
            "batch_size": timed[0].batch_size, "threads": timed[0].threads,
            "median_ms": median, "p90_ms": p90,
            "spread_ms": [min(round_medians), max(round_medians)],
            "noisy": p90 / median > NOISY_P90_RATIO,
            "round_medians_ms": round_medians,
            "samples_ms": [t for run in timed for t in run.samples_ms]})
    return results


def compare(before: Any, after: Any, data: Any = None, **options: Any) -> dict[str, Any]:
    """Ratios `before / after` for sizes and times (bigger is better), and accuracy change.

    Given two measurement rows (dicts), compares them. Given two modules, measures both first
    (`torchslim.apps.workflows.compare_models`: accuracy on `data`, params, bytes of the real file,
    MACs, interleaved latency; options `example_inputs=`, `metric=`) and returns the rows with
    the comparison.

    Keys present in both are compared: `accuracy` gives `accuracy_delta` (after - before, in
    fraction points) and `accuracy_retention` (after / before); `params`, `nonzero_params`,
    `bytes`, `flops`, `median_ms`, `latency_b1_ms` and `latency_batch_ms` give `<key>_ratio` =
    before / after (for latencies: the speedup); `perplexity` gives `perplexity_ratio` = after /
    before (1.0: no loss).

    Example:
        >>> compare({"accuracy": 0.98, "bytes": 1000}, {"accuracy": 0.97, "bytes": 250})
        {'accuracy_delta': -0.01, 'accuracy_retention': 0.9898, 'bytes_ratio': 4.0}
    """
    if isinstance(before, nn.Module) and isinstance(after, nn.Module):
        from torchslim.apps.workflows import compare_models

        return compare_models(before, after, data, **options)
    result: dict[str, Any] = {}
    if "accuracy" in before and "accuracy" in after:
        result["accuracy_delta"] = round(after["accuracy"] - before["accuracy"], 6)
        result["accuracy_retention"] = round(after["accuracy"] / before["accuracy"], 4)
    if before.get("perplexity") and after.get("perplexity"):
        result["perplexity_ratio"] = round(after["perplexity"] / before["perplexity"], 4)
    for key in ("params", "nonzero_params", "bytes", "flops", "macs", "median_ms", "latency_b1_ms",
                "latency_batch_ms"):
        if key in before and key in after and after[key]:
            result[f"{key}_ratio"] = round(before[key] / after[key], 4)
    return result


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor | Any, *, folds: int = 5,
                   seed: int = 0, repeats: int = 1) -> float:
    """Mean k-fold accuracy of a logistic-regression probe on frozen features (scikit-learn).

    How sentence-embedding models are judged without a task head: the embedding is good for a
    task when a linear classifier on it separates the labels.

    Args:
        folds: the k of k-fold cross-validation (stratified by label).
        seed: the shuffle of the first split into folds.
        repeats: how many different splits into folds the mean is taken over (seeds `seed`,
            `seed + 1`, ...). Which sentences land in which fold moves the result: on 3,000
            sentences, one split's accuracy moves by up to 0.6 pt with the seed, as much as the
            effect of int8; comparing two models on one split measures mostly that luck.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if repeats < 1 or folds < 2:
        raise ValueError(f"probe_accuracy needs folds >= 2 and repeats >= 1 (got {folds}, {repeats})")
    x = features.detach().cpu().float().numpy() if isinstance(features, torch.Tensor) else features
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    scores = [cross_val_score(LogisticRegression(max_iter=2000), x, y,
                              cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)).mean()
              for r in range(repeats)]
    return float(sum(scores) / repeats)


def perplexity(model: nn.Module, tokens: torch.Tensor, *, window: int = 512, batch_size: int = 8,
               max_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity of a causal language model on a token stream: exp(mean next-token loss).

    The stream is cut into consecutive, non-overlapping windows of `window` tokens (the
    convention of the GPTQ and SparseGPT papers, with 2048 there); in each window every token
    after the first is predicted from the ones before it in the window. A shorter last window is
    dropped, so every model is scored on the same tokens.

    Args:
        model: takes `input_ids` (B, T) and returns logits (B, T, vocab) (or an output with
            `.logits`).
        tokens: 1-D token ids.
        max_tokens: score only the first `max_tokens` tokens (a quicker, noisier estimate).

    Returns:
        {"perplexity", "loss" (mean nats per token), "tokens" (scored), "window"}.

    Raises:
        ConfigError: fewer tokens than one window, or a model that returns no token logits.
    """
    stream = tokens.reshape(-1)[:max_tokens] if max_tokens else tokens.reshape(-1)
    count = stream.numel() // window
    if count == 0:
        raise ConfigError(f"{stream.numel()} tokens are fewer than one window of {window}: give more "
                          "text or a smaller window")
    windows = stream[:count * window].reshape(count, window)
    was_training = model.training
    model.eval()
    total, scored = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                ids = windows[start:start + batch_size]
                try:  # one pass per window: no cache to build
                    logits = logits_of(call_uncached(model, {"input_ids": ids}))
                except TypeError as exc:  # forward takes no input_ids keyword
                    raise ConfigError(f"{type(model).__name__} cannot be called with input_ids "
                                      f"({exc}); perplexity needs a causal language model") from exc
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise ConfigError(f"{type(model).__name__} returned logits of shape "
                                      f"{tuple(logits.shape)} for input_ids {tuple(ids.shape)}; "
                                      "perplexity needs a causal language model (B, T, vocab)")
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1), reduction="sum")
                total += float(loss)
                scored += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / scored
    return {"perplexity": float(torch.tensor(mean).exp()), "loss": mean, "tokens": scored,
            "window": window}
