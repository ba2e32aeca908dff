"""Hand a compressed model to another runtime: an ONNX file, a `torch.export` program (.pt2),
(Hugging Face models) a `save_pretrained` folder that `transformers` loads directly, or (causal
language models) an onnxruntime-genai folder: the whole decoding step with its key/value cache
in one program, coded layers on the int4 kernel (`torchslim.decoder_export`).

Every export is checked before it is kept: the exported program is run on a batch of the
model's recorded inputs and must give the module's outputs (float programs within 1e-4
relative to the output's scale). An int8 model is already an ONNX program and is written as is.
"""

from __future__ import annotations

import io
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.calibration import logits_of
from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.fused_experts import traceable_experts
from torchslim.runtime.onnx_program import KeywordCall
from torchslim.safefile import write_atomic

__all__ = ["ExportFormat", "export_model"]

TOLERANCE = 1e-4


class ExportFormat(StrEnum):
    ONNX = "onnx"
    PT2 = "pt2"  # torch.export ExportedProgram, loadable with torch.export.load
    HF = "hf"  # a save_pretrained folder (Hugging Face models)
    GENAI = "genai"  # an onnxruntime-genai folder (causal language models)


def _first(output: Any) -> torch.Tensor:
    """The tensor to compare: the output itself, or the first of a tuple / dict of outputs."""
    if isinstance(output, dict):
        output = next(iter(output.values()))
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise UnsupportedModuleError(f"the model returns {type(output).__name__}; export checks "
                                     "need a tensor (or a tuple/dict of tensors)")
    return output


def _difference(expected: Any, got: Any) -> float:
    reference, candidate = _first(expected).float(), _first(got).float()
    if reference.shape != candidate.shape:
        return float("inf")
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return float((reference - candidate).abs().max()) / scale if reference.numel() else 0.0


def _arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch is passed: a dict as keywords, a tuple as positional inputs, else one input."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


class _Keywords(KeywordCall):
    """`model(**inputs)` from positional tensors, the exporter's convention."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.call(dict(zip(self.keys, tensors, strict=True)))


def _onnx_keywords(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[bytes, Any]:
    """A keyword-input model (Hugging Face) as an ONNX program with one named input per key
    (batch, and the sequence of 2-D inputs, left free) and one output `logits`."""
    import tempfile
    import warnings

    import onnxruntime as ort

    keys = list(inputs)
    # each input its own length name: an encoder-decoder's two sequences differ
    axes = {k: ({0: "batch", 1: f"{k}_length"} if v.dim() == 2 else {0: "batch"}) for k, v in inputs.items()}
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.onnx"
        try:
            with warnings.catch_warnings(), traceable_experts(model):
                warnings.simplefilter("ignore")
                torch.onnx.export(_Keywords(model, keys).eval(), tuple(inputs.values()), str(target),
                                  input_names=keys, output_names=["logits"], opset_version=17, dynamo=False,
                                  dynamic_axes={**axes, "logits": {0: "batch"}})
        except UnsupportedModuleError:  # ours, already naming the problem and the fix
            raise
        except Exception as exc:  # the exporter raises many types: name it
            raise UnsupportedModuleError(f"{type(model).__name__} cannot be exported to ONNX "
                                         f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        program = target.read_bytes()
    session = ort.InferenceSession(program, providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})
    return program, torch.from_numpy(out)


def _onnx_bytes(model: nn.Module, inputs: Any) -> tuple[bytes, Any]:
    from torchslim.runtime.onnx_program import OrtModule, export_onnx

    program = getattr(model, "program", None)
    if isinstance(program, bytes):  # an int8 program: as is
        return program, model(inputs)
    if isinstance(inputs, dict) and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return _onnx_keywords(model, inputs)
    if not isinstance(inputs, torch.Tensor):
        raise UnsupportedModuleError("ONNX export takes one tensor or a dict of tensors (keyword inputs); "
                                     "use --format pt2 for tuple inputs")
    program = export_onnx(model, inputs)
    return program, OrtModule(program)(inputs)


def _pt2(model: nn.Module, inputs: Any, path: Path) -> Any:
    if isinstance(getattr(model, "program", None), bytes):
        raise ConfigError("an int8 model is an onnxruntime program; export it with --format onnx")
    args, kwargs = _arguments(inputs)
    try:
        program = torch.export.export(model.eval(), args, kwargs)
    except Exception as exc:
        raise UnsupportedModuleError(f"torch.export cannot capture {type(model).__name__} "
                                     f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    buffer = io.BytesIO()  # the archive writer wants a .pt2 name or a buffer, not our temp name
    torch.export.save(program, buffer)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return torch.export.load(str(path)).module()(*args, **kwargs)


def _hf_folder(model: nn.Module, path: Path, inputs: Any) -> Any:
    """Write the folder beside its destination, check it reloads, then move it into place."""
    import shutil
    import tempfile

    from torchslim.huggingface import load_hf_folder, save_hf_folder

    if path.exists():
        raise ConfigError(f"{path} exists; export --format hf writes a new folder: pick another --out "
                          "or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_hf_folder(model, staging)
        args, kwargs = _arguments(inputs)
        got = load_hf_folder(staging)(*args, **kwargs)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return got


def export_model(model: nn.Module, path: str | Path, *, format: ExportFormat | str,
                 example_inputs: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Write `model` to `path` in `format` and check the result reproduces the module.

    Returns the format, the file's bytes and the largest output difference (relative); `genai`
    also says which matmuls run codes and which stay float (`export_decoder`), and needs the
    model's `tokenizer` (an object with `save_pretrained`, or its folder).

    Raises:
        UnsupportedModuleError: the exporter cannot capture the model.
        ConfigError: an unknown format, or an export whose outputs differ from the module's.
    """
    try:
        chosen = ExportFormat(format)
    except ValueError:
        raise ConfigError(f"unknown export format {format!r}; valid: {', '.join(ExportFormat)}") from None
    path = Path(path)
    if chosen is ExportFormat.GENAI:
        from torchslim.decoder_export import export_decoder

        ids = example_inputs.get("input_ids") if isinstance(example_inputs, dict) else None
        return export_decoder(model, path, tokenizer=tokenizer,
                              example_ids=ids[:1] if isinstance(ids, torch.Tensor) else None)
    with torch.no_grad():
        args, kwargs = _arguments(example_inputs)
        expected = model.eval()(*args, **kwargs)
        if chosen is ExportFormat.ONNX:
            data, got = _onnx_bytes(model, example_inputs)
            reference = logits_of(expected) if isinstance(example_inputs, dict) else expected
            difference = _difference(reference, got)
            if difference <= TOLERANCE:
                write_atomic(path, lambda tmp: tmp.write_bytes(data))
        elif chosen is ExportFormat.HF:
            got = _hf_folder(model, path, example_inputs)
            difference = _difference(expected, got)
        else:
            got = _pt2(model, example_inputs, path)
            difference = _difference(expected, got)
    if difference > TOLERANCE:
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        raise ConfigError(f"the {chosen.value} export computes something else than the module "
                          f"(largest relative difference {difference:.3g}); nothing was written")
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files)
    return {"format": chosen.value, "path": str(path), "bytes": size,
            "max_relative_difference": difference}
