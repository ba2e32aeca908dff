"""The UCI Sentiment Labelled Sentences (Kotzias et al. 2015): 3,000 short reviews, 0/1 labels.

They ship inside the npm package `sentiment` (test fixtures), the one offline copy available:
`npm install --ignore-scripts sentiment@5.0.2` in the working directory, or point
`TORCHSLIM_UCI_SENTENCES_DIR` at a folder holding `amazon.json`, `imdb.json` and `yelp.json`.
Used for sentence-embedding models: a probe's accuracy on frozen embeddings, and unlabeled text
to distil on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from torchslim.errors import DataError

__all__ = ["read_uci_sentences", "uci_sentences_dir"]

ENV = "TORCHSLIM_UCI_SENTENCES_DIR"
SOURCES = ("amazon", "imdb", "yelp")
INSTALL_HINT = f"run `npm install --ignore-scripts sentiment@5.0.2` here, or set {ENV}"


def uci_sentences_dir() -> Path:
    """Where the three JSON files are (environment variable first, then ./node_modules)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path.cwd() / "node_modules" / "sentiment" / "test" / "fixtures"


def read_uci_sentences(root: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """All 3,000 sentences and their 0/1 labels, in file order (amazon, imdb, yelp).

    Raises:
        DataError: the files are missing or malformed.
    """
    folder = Path(root) if root is not None else uci_sentences_dir()
    texts: list[str] = []
    labels: list[int] = []
    for source in SOURCES:
        path = folder / f"{source}.json"
        if not path.is_file():
            raise DataError(f"UCI sentences not found ({path} is missing); {INSTALL_HINT}")
        try:
            rows = json.loads(path.read_text())
            for row in rows:
                if row.get("class") is None:  # each file ends with an empty row
                    continue
                texts.append(str(row["text"]))
                labels.append(int(row["class"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path} is not the expected [{{text, class}}] JSON ({exc})") from exc
    if sorted(set(labels)) != [0, 1]:
        raise DataError(f"UCI sentences in {folder} have labels {sorted(set(labels))}, expected 0/1")
    return texts, np.asarray(labels, dtype=np.int64)
