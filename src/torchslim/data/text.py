"""English text for language models, from a package every Python ships: its own documentation.

Nothing is downloaded and nothing needs installing, and the two splits come from disjoint
sources, so calibration never sees the evaluation text:

- **evaluation**: the Python Language Reference topics that `pydoc` serves
  (`pydoc_data.topics`: 79 topics, ~465k characters, ~113k SmolLM2 tokens on Python 3.11),
  joined in sorted topic order;
- **calibration**: the docstrings of the standard library's modules, classes and functions
  (every docstring of at least 200 characters, files and nodes in sorted order; tests excluded).

Both depend on the Python version (they are its documentation); `python_docs_source()` names
it, and reports record it.
"""

from __future__ import annotations

import ast
import platform
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch

from torchslim.errors import ConfigError

__all__ = ["calibration_text", "evaluation_text", "python_docs_source", "token_windows"]

SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}


def python_docs_source() -> str:
    """Where the text comes from, with the version that fixes it."""
    return f"CPython {platform.python_version()} documentation (pydoc_data.topics; stdlib docstrings)"


def evaluation_text() -> str:
    """The held-out split: the Language Reference topics, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def calibration_text(*, min_chars: int = 200) -> str:
    """The calibration split: the standard library's docstrings (tests excluded), in file order."""
    library = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in sorted(library.rglob("*.py")):
        if SKIPPED_FOLDERS & set(path.relative_to(library).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(doc)
    return "\n\n".join(parts)


def token_windows(tokens: torch.Tensor, *, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """`count` windows of `length` tokens drawn at random (fixed seed) from a token stream.

    Raises:
        ConfigError: the stream is shorter than one window.
    """
    if tokens.numel() <= length:
        raise ConfigError(f"the calibration text has {tokens.numel()} tokens, fewer than one window "
                          f"of {length}; use a shorter window")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=generator)
    return torch.stack([tokens[int(s):int(s) + length] for s in starts])


def tokenize_text(tokenizer: Callable[..., dict[str, list[int]]], text: str) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
