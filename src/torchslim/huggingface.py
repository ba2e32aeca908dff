"""Hugging Face models, first-class: recorded by their config, rebuilt from it, loaded from a
local folder, written back as a `save_pretrained` folder.

`save` records a `transformers` model by its class name and config (JSON); `load` rebuilds it
with that class from the config (on the meta device first, to check every tensor the file
declares), replays the edits and fills in the weights: no model argument, no network, no remote
code (`auto_map` is refused), and bounded sizes. A local folder (config.json + weights) is a
model source for every CLI command. `transformers` is imported only when one of these is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.artifact import Architectures, register_architectures
from torchslim.errors import ConfigError

__all__ = ["is_hf_folder", "is_hf_model", "load_hf_folder", "save_hf_folder"]

PRETRAINED = "transformers.modeling_utils.PreTrainedModel"
INSTALL_HINT = "pip install -c constraints.txt 'torchslim[text]'"
MAX_CONFIG_INT = 1 << 24  # widths, vocabularies, positions: larger is a forged file
MAX_LAYERS = 512
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
              "num_decoder_layers", "n_layers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
ATTENTION = ("eager", "sdpa")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_hf_model(module: nn.Module) -> bool:
    """Whether `module` is a `transformers` `PreTrainedModel` (checked by class name)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == PRETRAINED for cls in type(module).__mro__)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("this model is a Hugging Face transformers model; install transformers: "
                          f"{INSTALL_HINT}") from None
    return transformers


def _model_class(name: Any) -> type:
    """A model class of `transformers` itself, by name (never code from elsewhere)."""
    transformers = _transformers()
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"{str(name)[:80]!r} is not a model class of transformers "
                          f"{transformers.__version__}")
    return cls


# ----------------------------------------------------------------------------- storage
def _describe(model: nn.Module) -> dict[str, Any] | None:
    if not is_hf_model(model):
        return None
    from torchslim.graph.hf_blocks import ORIGINAL_CONFIG

    original = getattr(model, ORIGINAL_CONFIG, None) or model.config  # edits replay on top of it
    config = json.loads(original.to_json_string(use_diff=False))  # type: ignore[operator,union-attr]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    attention = getattr(model.config, "_attn_implementation", None)
    return {"class": type(model).__name__, "config": config,
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": attention if attention in ATTENTION else "eager"}


def _check_config(value: Any, where: str = "config") -> None:
    """Bounded, plain JSON: a forged config must not make the builder loop or allocate for long."""
    if isinstance(value, dict):
        if "auto_map" in value:
            raise ConfigError(f"{where} asks for remote code (auto_map); torchslim never runs it")
        for key, item in value.items():
            if key in LAYER_KEYS and not (type(item) is int and 0 <= item <= MAX_LAYERS):
                raise ConfigError(f"{where}.{key} must be an int in [0, {MAX_LAYERS}], got {str(item)[:40]}")
            _check_config(item, f"{where}.{key}")
    elif isinstance(value, list):
        if len(value) > 4096:
            raise ConfigError(f"{where} is a list of {len(value)} items; a config holds short lists")
        for item in value:
            _check_config(item, where)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        raise ConfigError(f"{where} = {value} is out of range (|value| <= {MAX_CONFIG_INT})")
    elif isinstance(value, str) and len(value) > 10_000:
        raise ConfigError(f"{where} is a string of {len(value)} characters")


def _parse(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError("a Hugging Face record needs 'class' and a 'config' mapping")
    name, dtype = record.get("class"), record.get("dtype", "float32")
    attention = record.get("attn_implementation")
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 100:
        raise ConfigError(f"'class' must be a transformers model class name, got {str(name)[:80]!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"'dtype' must be one of {sorted(DTYPES)}, got {str(dtype)[:40]!r}")
    if attention not in (*ATTENTION, None):
        raise ConfigError(f"'attn_implementation' must be one of {ATTENTION}, got {str(attention)[:40]!r}")
    config = record["config"]
    if not isinstance(config.get("model_type"), str):
        raise ConfigError("the recorded config names no model_type")
    _check_config(config)
    return {"class": name, "config": config, "dtype": dtype, "attn_implementation": attention or "eager"}


def _resolve(spec: dict[str, Any]) -> Callable[[], nn.Module]:
    transformers = _transformers()
    cls = _model_class(spec["class"])
    options = {k: v for k, v in spec["config"].items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(spec["config"]["model_type"], **options)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"transformers cannot make a {spec['config']['model_type']!r} config "
                          f"({str(exc)[:200]})") from None

    def build() -> nn.Module:  # a config of its own each time: replayed edits update it
        import copy

        model = cls._from_config(copy.deepcopy(config),  # type: ignore[attr-defined]
                                 attn_implementation=spec["attn_implementation"])
        return model.to(DTYPES[spec["dtype"]])

    return build


register_architectures(Architectures(key="hf", describe=_describe, parse=_parse, resolve=_resolve))


# ------------------------------------------------------------------------------- folders
def is_hf_folder(source: str | Path) -> bool:
    """Whether `source` is a local Hugging Face model folder (it has a config.json)."""
    return Path(source).is_dir() and (Path(source) / "config.json").is_file()


def load_hf_folder(folder: str | Path) -> nn.Module:
    """The model a local `save_pretrained` folder holds, in eval mode; never reaches the network.

    Raises:
        ConfigError: no weights in the folder, a config without a known architecture, or one
            that asks for remote code.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder}/config.json cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder}/config.json is not a JSON object")
    _check_config(config, f"{folder}/config.json")
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise ConfigError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                          "save the model with save_pretrained(folder)")
    names = config.get("architectures") or []
    if not names:
        raise ConfigError(f"{folder}/config.json lists no 'architectures'; save the model with "
                          "save_pretrained so the folder names its class")
    cls = _model_class(names[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    model = cls.from_pretrained(str(folder), local_files_only=True)  # type: ignore[attr-defined]
    assert isinstance(model, nn.Module)
    return model.eval()


def _is_gguf(settings: Any) -> bool:
    if isinstance(settings, dict):
        method = settings.get("quant_method")
    else:
        method = getattr(settings, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def _forget_gguf_(model: nn.Module) -> None:
    """A model read from a GGUF file holds its weights in float (transformers dequantizes them on
    loading) but keeps a GGUF quantizer, and its config a GGUF `quantization_config` (also after a
    round trip through an artifact), which `save_pretrained` and converters refuse: drop both."""
    if _is_gguf(getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)):
        setattr(model, "hf_quantizer", None)  # noqa: B010 - an attribute nn.Module does not declare
    config = getattr(model, "config", None)
    if config is not None and _is_gguf(getattr(config, "quantization_config", None)):
        delattr(config, "quantization_config")


CODED_EDITS = {"weight_only", "weight_only_embedding", "int4_kernel", "int4_shared_input"}


def _dequantize_(model: nn.Module) -> None:
    """Replace every layer holding weight codes by the float layer its codes stand for; untie a
    head whose weights then differ from the input embedding's."""
    from torchslim.quantization.weight_only import GroupedWeightEmbedding, GroupedWeightLinear
    from torchslim.runtime.int4_linear import Int4Linear
    from torchslim.structure import replace_module_

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, GroupedWeightLinear | Int4Linear):
                weight = module.weight()  # the float matrix their codes stand for
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
                linear.weight.copy_(weight)
                if module.bias is not None and linear.bias is not None:
                    linear.bias.copy_(module.bias)
                replace_module_(model, name, linear)
            elif isinstance(module, GroupedWeightEmbedding):
                table = module.dequantize(module.codes, module.scales, module.zeros)
                replace_module_(model, name, nn.Embedding.from_pretrained(table.clone(), freeze=False))
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and inputs is not None and outputs is not None \
            and (outputs.weight is not inputs.weight):
        config.tie_word_embeddings = False  # type: ignore[union-attr]


def save_hf_folder(model: nn.Module, folder: str | Path, *, dequantize: bool = False) -> Path:
    """Write `model` as a `save_pretrained` folder `transformers` loads directly.

    GPT-2's Conv1D layers that torchslim handled as Linear go back to their own layout, and so do
    mixture-of-experts layers handled as one Linear per expert (`fused_experts`); a model
    whose layers were replaced by other modules (factorized, int8) is not a transformers
    architecture any more and is refused with the alternatives. With `dequantize`, layers that
    hold weight codes (GPTQ, AWQ, round-to-nearest, the int4 kernel) are written as the float
    weights their codes stand for, and a head whose weights no longer equal the embedding's is
    written untied (what a converter that re-reads the codes, such as the decoder export, needs).

    Raises:
        ConfigError: not a Hugging Face model, or its structure no longer matches its config.
    """
    import copy

    from torchslim.fused_experts import fuse_experts_
    from torchslim.graph.hf_blocks import ORIGINAL_CONFIG
    from torchslim.linear_layers import restore_hf_conv1d_
    from torchslim.structure import EDITS_ATTRIBUTE, edits_of

    if not is_hf_model(model):
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face model; export it with "
                          "--format onnx or pt2")
    allowed = {"hf_conv1d_as_linear", "prune_channels", "unfuse_experts"} | \
        (CODED_EDITS if dequantize else set())
    other = sorted({e.get("kind", "?") for e in edits_of(model)} - allowed)
    if other:
        raise ConfigError(f"the model's layers were changed by {', '.join(other)}, so it no longer "
                          "matches its transformers config; export it with --format onnx or pt2 "
                          "(or keep the .slim file, which loads with torchslim.load)")
    plain = copy.deepcopy(model)
    _forget_gguf_(plain)
    if dequantize:
        _dequantize_(plain)
    restore_hf_conv1d_(plain)
    fuse_experts_(plain)
    for attribute in (EDITS_ATTRIBUTE, ORIGINAL_CONFIG):
        if hasattr(plain, attribute):
            delattr(plain, attribute)
    with torch.device("meta"):  # what transformers will build from the config we write
        expected = type(plain)._from_config(copy.deepcopy(plain.config))  # type: ignore[attr-defined]
    shapes = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    differ = [k for k, v in plain.state_dict().items() if shapes.get(k) != tuple(v.shape)]
    if differ:
        raise ConfigError(f"{differ[0]} and {len(differ) - 1} more tensors differ from what the "
                          "transformers config can describe: layers pruned to different sizes, or heads "
                          "removed from an architecture whose head size is hidden_size / num_attention_heads "
                          "(BERT, GPT-2, OPT, GPT-NeoX; Llama-style configs name head_dim); "
                          "prune every layer alike (scope uniform, no per_layer), or only MLP neurons, "
                          "or export with --format onnx / pt2 (the .slim file loads with torchslim.load)")
    folder = Path(folder)
    plain.save_pretrained(str(folder))  # type: ignore[operator]
    return folder
