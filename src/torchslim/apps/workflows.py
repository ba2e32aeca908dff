"""The jobs behind the CLI, as plain functions: train a model, measure one, run the demo.

The CLI only parses arguments and prints; everything it does is callable from Python here.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim import artifact
from torchslim.config import build_config
from torchslim.data import Dataset, TensorLoader, load_dataset
from torchslim.errors import ConfigError
from torchslim.measure import (
    compare,
    count_flops,
    count_params,
    evaluate,
    file_bytes,
)
from torchslim.models import (
    ModelSpec,
    create_model,
    dataset_for,
    example_inputs,
    get_entry,
    model_names,
    spec_of,
)
from torchslim.models.registry import SPEC_ATTRIBUTE
from torchslim.report import write_report
from torchslim.select import Select
from torchslim.signature import example_for, record_signature_, signature_of
from torchslim.training import TrainConfig, Trainer, make_train_config

__all__ = ["backend_of", "load_model_or_artifact", "measure_model", "quantize_job", "structured_prune_job",
           "train_model"]


def load_model_or_artifact(source: str, *, factory: str | None = None) -> tuple[nn.Module, Path | None]:
    """A model from a registered name (with its shipped weights, if any), an artifact path, a
    local Hugging Face model folder, or a factory string `FILE.py:FUNCTION` /
    `package.module:FUNCTION` returning the module.

    An artifact of a model that is not a torchslim reference model is rebuilt on the module
    `factory` returns (the artifact itself never imports code).
    """
    from torchslim.factories import build_from_factory, is_factory
    from torchslim.huggingface import is_hf_folder, load_hf_folder

    if source in model_names():
        return create_model(source), None
    path = Path(source)
    if is_hf_folder(path):  # a local Hugging Face model folder (config.json + weights)
        return load_hf_folder(path), None
    if path.is_dir():
        raise ConfigError(f"{source} is a folder without a config.json: pass a .slim file, a "
                          "Hugging Face model folder (save_pretrained), a registered model or a factory")
    if path.exists():
        base = build_from_factory(factory) if factory else None
        return artifact.load(path, model=base), path
    if is_factory(source):
        return build_from_factory(source), None
    raise ConfigError(f"{source!r} is neither an artifact file, a Hugging Face model folder, a "
                      "registered model, nor a factory "
                      f"FILE.py:FUNCTION / package.module:FUNCTION; known models: {', '.join(model_names())}")


def inputs_for(model: nn.Module, batch: int = 1) -> Any:
    """A deterministic input batch for `model`: from its registered spec, else from the input
    signature recorded when it was compressed or saved.

    Raises:
        ConfigError: neither is known.
    """
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if isinstance(spec, ModelSpec):
        return example_inputs(spec, batch)
    signature = signature_of(model)
    if signature is None:
        raise ConfigError(f"the inputs of {type(model).__name__} are unknown; save it with "
                          "torchslim.save(model, path, example_inputs=batch) (or pass example_inputs "
                          "to apply_) so its input signature is recorded")
    return example_for(signature, batch)


def _sample_size(model: nn.Module) -> int:
    first = inputs_for(model, 1)
    if isinstance(first, dict):
        first = next(iter(first.values()))
    elif isinstance(first, tuple):
        first = first[0]
    return int(first.numel())


def backend_of(model: nn.Module) -> str:
    """Which engine runs the model's forward: `onnxruntime` (int8 programs) or `torch`."""
    return "onnxruntime" if isinstance(getattr(model, "program", None), bytes) else "torch"


def check_dataset_fits(data: Dataset, spec: ModelSpec) -> None:
    """Raise `ConfigError` unless the dataset's samples have the model's input shape."""
    if tuple(data.input_shape) != tuple(spec.input_shape):
        raise ConfigError(f"dataset {data.name!r} has inputs {data.input_shape}, the model "
                          f"expects {spec.input_shape}; pick a matching dataset or model")


def artifact_bytes(model: nn.Module, path: Path | None) -> int:
    """Bytes on disk of the model's artifact (written to a temp folder if it has none yet)."""
    if path is not None:
        return file_bytes(path)
    with tempfile.TemporaryDirectory() as folder:
        return file_bytes(artifact.save(model, Path(folder) / "model.slim"))


def default_latency_batch(model: nn.Module) -> int:
    """The batch latency is timed at: 256 small images, 32 for text and large inputs.

    It depends on the architecture's inputs only, so a compressed model is timed at the same
    batch as its original.
    """
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    if isinstance(spec, ModelSpec):
        large = get_entry(spec.name).input_kind == "tokens" or math.prod(spec.input_shape) > 3 * 64 * 64
    else:
        large = _sample_size(model) > 3 * 64 * 64
    return 32 if large else 256


def _evaluate_on(model: nn.Module, data: Any, split: str, batch_size: int) -> dict[str, Any]:
    """Accuracy on a built-in dataset's split, or on the user's loader under `split`."""
    if isinstance(data, Dataset):
        spec = getattr(model, SPEC_ATTRIBUTE, None)
        if isinstance(spec, ModelSpec):
            check_dataset_fits(data, spec)
        metrics = evaluate(model, TensorLoader(data.split(split), batch_size=batch_size),
                           topk=(1, 5) if data.num_classes > 5 else (1,))
        name = data.name
    else:
        if split not in data:
            raise ConfigError(f"the data factory gave no {split!r} loader (it has "
                              f"{sorted(data)}); pick --split from those or return it")
        metrics = evaluate(model, data[split])
        name = "user data"
    return {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "split": split,
            "dataset": name, "samples": int(metrics["samples"])}


def measure_model(model: nn.Module, *, path: Path | None = None, data: Any = None,
                  split: str = "test", batch_size: int = 256, latency_batch: int | None = None,
                  threads: int | None = None, timing: bool = True) -> dict[str, Any]:
    """Accuracy (if data is given), params, bytes, FLOPs per sample and latency of any model.

    `data` is a built-in `Dataset` or a mapping of the user's loaders by split (from a data
    factory). The batched latency uses `latency_batch` samples (default: `default_latency_batch`).
    """
    if data is not None and not isinstance(data, Dataset):  # the user's loaders
        from torchslim.apps.run_data import UserData, learn_inputs_

        learn_inputs_(model, UserData(dict(data)))
    total, nonzero = count_params(model)
    result: dict[str, Any] = {
        "backend": backend_of(model),
        "params": total, "nonzero_params": nonzero, "bytes": artifact_bytes(model, path),
        "flops": count_flops(model, inputs_for(model, 1)),
    }
    if data is not None:
        result.update(_evaluate_on(model, data, split, batch_size), split=split)
    if timing:
        time_rows_([result], [model], latency_batch=latency_batch, threads=threads)
    return result


def time_rows_(rows: Sequence[dict[str, Any]], models: Sequence[nn.Module], *,
               latency_batch: int | None = None, threads: int | None = None) -> None:
    """Time `models` interleaved (`measure.time_interleaved`) at batch 1 and at the latency batch,
    and write the results into their `rows`: `latency_b1_ms`, `latency_batch_ms`, `latency_batch`,
    `throughput`, `threads`, and under `latency` the raw runs, spread and noise flag of each."""
    from torchslim.measure import time_interleaved

    batch = latency_batch or default_latency_batch(models[0])
    for key, size in (("b1", 1), ("batch", batch)):
        timed = time_interleaved(models, [inputs_for(model, size) for model in models], threads=threads)
        for row, result in zip(rows, timed, strict=True):
            row.setdefault("latency", {})[key] = result
    for row in rows:
        b1, batched = row["latency"]["b1"], row["latency"]["batch"]
        row.update(latency_b1_ms=b1["median_ms"], latency_batch_ms=batched["median_ms"],
                   latency_batch=batch, throughput=batch * 1e3 / batched["median_ms"],
                   threads=batched["threads"])


def compare_models(before: nn.Module, after: nn.Module, data: Any = None, *, example_inputs: Any = None,
                   metric: Any = None, rounds: int = 5, batch: int | None = None) -> dict[str, Any]:
    """Before/after of any two modules: accuracy (or `metric(model, data)`), params, non-zeros,
    bytes of the real `.slim` file, MACs, and latency timed interleaved in this run.

    Args:
        before, after: the original and the compressed model.
        data: batches to score on (a DataLoader of `(x, y)`, a built-in `Dataset`'s split...).
        example_inputs: a batch both models take (default: the recorded input signature).
        metric: `metric(model, data) -> float` replacing classification accuracy.
        rounds: latency rounds; each times both models (10 runs each), medians over rounds.
        batch: the batch size latency is timed at (default: the example's).

    Returns:
        {"before": row, "after": row, "comparison": ratios (see `measure.compare`),
         "latency_spread": {"before": [min, max], "after": [...]} over rounds}.
    """
    from torchslim.measure import compare, time_interleaved

    if example_inputs is not None:
        for model in (before, after):
            known = isinstance(getattr(model, SPEC_ATTRIBUTE, None), ModelSpec)
            if signature_of(model) is None and not known:
                record_signature_(model, example_inputs)
    rows = []
    for model in (before, after):
        total, nonzero = count_params(model)
        row: dict[str, Any] = {"params": total, "nonzero_params": nonzero,
                               "bytes": artifact_bytes(model, None),
                               "macs": count_flops(model, inputs_for(model, 1)) // 2}
        if data is not None:
            row["accuracy"] = float(metric(model, data)) if metric else \
                evaluate(model, TensorLoader(data.test, batch_size=500) if isinstance(data, Dataset)
                         else data)["accuracy"]
        rows.append(row)
    inputs = example_inputs if example_inputs is not None and batch is None else \
        inputs_for(before, batch or 1)
    timed = time_interleaved([before, after], [inputs, inputs], rounds=rounds, repeats=10)
    for row, result in zip(rows, timed, strict=True):
        row["median_ms"] = result["median_ms"]
        row["latency"] = result
    return {"before": rows[0], "after": rows[1], "comparison": compare(rows[0], rows[1]),
            "latency_spread": {"before": timed[0]["spread_ms"], "after": timed[1]["spread_ms"]}}


def train_config_for(model_name: str | None, **overrides: Any) -> TrainConfig:
    """The registered model's tuned defaults (generic ones for a model of the user's own,
    `model_name` None), with the given options (None = keep default) on top."""
    from torchslim.models import TrainDefaults

    defaults = asdict(get_entry(model_name).train_defaults if model_name else TrainDefaults())
    return make_train_config(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})


def _training_subject(source: str, *, dataset: str | None, config: TrainConfig, pretrained: bool,
                      factory: str | None) -> tuple[nn.Module, Any, str, str]:
    """(model, RunData, label, dataset name) for `torchslim train`: a registered model built for
    its dataset, or the user's model (a factory or artifact) with the user's or a built-in dataset."""
    from torchslim.apps.run_data import BuiltinData, learn_inputs_, resolve_run_data

    if source in model_names():
        name = dataset_for(source, dataset)
        built = load_dataset(name, seed=config.seed)
        torch.manual_seed(config.seed)
        model = create_model(source, pretrained=pretrained, input_shape=built.input_shape,
                             num_classes=built.num_classes)
        return model, BuiltinData(built), source, name
    model = load_model_or_artifact(source, factory=factory)[0]
    data, named = resolve_run_data(dataset, None, seed=config.seed, required=True)
    assert data is not None
    learn_inputs_(model, data, seed=config.seed)
    return model, data, type(model).__name__, str(named)


def train_model(model_name: str, *, dataset: str | None, out: str | Path, config: TrainConfig,
                pretrained: bool = False, resume: bool = False, progress: bool = True,
                threads: int | None = None, factory: str | None = None) -> dict[str, Any]:
    """Train a registered model (or the user's, `FILE.py:FUNCTION`), save `out/model.slim`,
    write the report; returns the report."""
    out = Path(out)
    model, data, label, dataset = _training_subject(model_name, dataset=dataset, config=config,
                                                   pretrained=pretrained, factory=factory)
    measured, split = data.measured()
    # The untrained model, measured like the result so the table compares like with like.
    initial = measure_model(model, data=measured, split=split, timing=False)
    trainer = Trainer(model, data.train_loader(config.batch_size, config.seed),
                      val_loader=data.val_loader(), config=config,
                      checkpoint_dir=out / "checkpoints", progress=progress)
    history = trainer.fit(resume=resume)
    model.cpu()  # measured where it will be deployed; training may have run on a GPU
    model_path = artifact.save(model, out / "model.slim", metadata={
        "dataset": dataset, "train_config": config.to_dict(), "epochs_trained": trainer.start_epoch})
    final = measure_model(model, path=model_path, data=measured, split=split, threads=threads)
    val = evaluate(model, data.val_loader())
    report = {
        "model": label, "dataset": dataset, "seed": config.seed, "config": config.to_dict(),
        "test_accuracy": final["accuracy"], "val_accuracy": val["accuracy"],
        "initial_test_accuracy": initial["accuracy"], "metrics": final,
        "comparison": compare(initial, final),
        "train_samples_per_second": sorted(r.samples_per_second for r in history)[len(history) // 2]
        if history else None,
        "history": [asdict(r) for r in trainer.history], "artifact": str(model_path),
    }
    rows = [{"name": f"{label} before training", **initial},
            {"name": f"{label} trained ({trainer.start_epoch} epochs)", **final}]
    write_report(out, report, rows=rows, title=f"{label} trained on {dataset}: {trainer.start_epoch} "
                 f"epochs, {config.optimizer}, lr {config.lr:g}, batch {config.batch_size}")
    report["rows"] = rows
    return report


def quantize_job(source: str, *, method: str, out: str | Path, dataset: str | None = None,
                 bits: int = 8, calibrate: str = "minmax", percentile: float | None = None,
                 per_channel: bool = True, calibration_batches: int = 8, seed: int = 0,
                 threads: int | None = None,
                 backend: str = "onnxruntime", factory: str | None = None,
                 exclude: tuple[str, ...] = (), fp16: tuple[str, ...] = (),
                 adaround: bool = False, bias_correction: bool = False,
                 adaround_iterations: int = 300, equalize: bool = False,
                 range_search: bool = False,
                 sensitivity: float | None = None) -> dict[str, Any]:
    """Quantize any model or artifact to int8, save `out/model.slim`, measure both; the report.

    Calibration batches come from the training split of `dataset` (a built-in name, default:
    the model's own, or a data factory's `train` loader); accuracy is measured on its test split
    (a factory's `test`, else `val`), before and after, in the same run.
    """
    from torchslim.apps.run_data import BuiltinData, learn_inputs_, resolve_run_data
    from torchslim.quantization import Quantization, quantize_model

    if method not in ("dynamic", "static"):
        raise ConfigError(f"quantize_job runs post-training methods (dynamic, static), not "
                          f"{method!r}; training methods run as recipe stages (qat, lowbit)")
    config = build_config(Quantization, {
        "method": method, "bits": bits, "calibrate": calibrate, "per_channel": per_channel,
        "percentile": percentile,
        "calibration_batches": calibration_batches, "backend": backend, "exclude": list(exclude),
        "fp16": list(fp16), "adaround": adaround, "bias_correction": bias_correction,
        "adaround_iterations": adaround_iterations, "equalize": equalize, "range_search": range_search,
        "sensitivity": sensitivity})
    model, path = load_model_or_artifact(source, factory=factory)
    spec = getattr(model, SPEC_ATTRIBUTE, None)
    label = spec.name if isinstance(spec, ModelSpec) else type(model).__name__
    found, name = resolve_run_data(dataset, spec.name if isinstance(spec, ModelSpec) else None, seed=seed)
    if found is None and method == "static":
        raise ConfigError(f"static quantization needs calibration data and {label} has no default "
                          "dataset; pass --dataset DATASET (a built-in name or FILE.py:FUNCTION)")
    calibration, data, split = None, None, "test"
    if isinstance(found, BuiltinData):
        data = found.data
        if isinstance(spec, ModelSpec):
            check_dataset_fits(data, spec)  # before calibrating: a mismatch fails here, clearly
        loader = TensorLoader(data.train, batch_size=64, shuffle=True, seed=seed)
        calibration = [inputs for inputs, _ in loader.take(calibration_batches)]
        if not isinstance(spec, ModelSpec) and signature_of(model) is None:
            record_signature_(model, calibration[0])  # a user's model: its inputs are the data's
    elif found is not None:
        learn_inputs_(model, found, seed=seed)
        calibration = [inputs for inputs, _ in found.calibration(calibration_batches, seed)]
        data, split = found.measured()
    example = inputs_for(model, 2)
    _check_data_shape(label, example, calibration)
    quantized = quantize_model(model, config, example_inputs=example, calibration=calibration)
    out = Path(out)
    saved = artifact.save(quantized, out / "model.slim", metadata={
        "source": source, "quantization": config.to_dict(), "dataset": name,
        "report": getattr(quantized, "report", {})})
    before = measure_model(model, path=path, data=data, split=split, timing=False)
    after = measure_model(quantized, path=saved, data=data, split=split, timing=False)
    time_rows_([before, after], [model, quantized], threads=threads)
    report: dict[str, Any] = {
        "model": label, "source": source, "dataset": name, "config": config.to_dict(),
        "quantization": getattr(quantized, "report", {}), "before": before, "after": after,
        "comparison": compare(before, after), "artifact": str(saved)}
    rows = [{"name": f"{label} fp32 (torch)", **before},
            {"name": f"{label} int8 {method} ({backend})", **after}]
    write_report(out, report, rows=rows, title=f"{label}{f' on {name}' if name else ''}: int8 {method} "
                 f"quantization, run by {backend}")
    report["rows"] = rows
    return report


def _check_data_shape(label: str, example: Any, calibration: list[Any] | None) -> None:
    """The int8 program is built for the model's input shape: data of another shape is one clear
    error before any work (onnxruntime would fail half-way, calibrating)."""
    if not (calibration and isinstance(example, torch.Tensor) and isinstance(calibration[0], torch.Tensor)):
        return
    given, expected = tuple(calibration[0].shape[1:]), tuple(example.shape[1:])
    if given != expected:
        raise ConfigError(f"the dataset's inputs are {given} per sample but {label} takes {expected}: "
                          f"its int8 program is built for that shape; give data of shape {expected} "
                          "(resize or crop in your data factory)")


def structured_prune_job(source: str, config: Any, *, out: str | Path, dataset: str | None = None,
                         targets: Select | None = None, seed: int = 0,
                         threads: int | None = None) -> dict[str, Any]:
    """One-shot structured pruning without fine-tuning: prune, save `out/model.slim`, measure both.

    Works for models without a dataset (MobileNetV2, MiniLM): then only size, MACs and latency
    are compared. With a dataset, data-driven criteria use its training batches and accuracy is
    measured on its test split.
    """
    from torchslim.api import apply_

    model, path = load_model_or_artifact(source)
    spec = spec_of(model)
    name = dataset or get_entry(spec.name).default_dataset
    if name is None and path is not None:
        name = artifact.read_metadata(path).get("metadata", {}).get("dataset")
    data = load_dataset(name, seed=seed) if name else None
    calibration = None
    if data is not None:
        check_dataset_fits(data, spec)
        loader = TensorLoader(data.train, batch_size=64, shuffle=True, seed=seed)
        calibration = loader.take(config.calibration_batches)
    before = measure_model(model, path=path, data=data, timing=False)
    original = copy.deepcopy(model)  # timed beside the pruned model, at the end
    result = apply_(model, config, targets=targets, calibration=calibration,
                    example_inputs=example_inputs(spec, 2))
    out = Path(out)
    saved = artifact.save(model, out / "model.slim", metadata={
        "source": source, "structured_prune": config.to_dict(), "dataset": name})
    after = measure_model(model, path=saved, data=data, timing=False)
    time_rows_([before, after], [original, model], threads=threads)
    report: dict[str, Any] = {
        "model": spec.name, "source": source, "dataset": name, "config": config.to_dict(),
        "pruning": {k: v for k, v in result.items() if k != "sizes"}, "before": before,
        "after": after, "comparison": compare(before, after), "artifact": str(saved)}
    rows = [{"name": f"{spec.name}", **before},
            {"name": f"{spec.name}, {result['removed_units']} units removed", **after}]
    write_report(out, report, rows=rows, title=f"{spec.name}: structured pruning "
                 f"({config.kind}), {result['removed_units']} units removed, no fine-tuning")
    report["rows"] = rows
    return report
