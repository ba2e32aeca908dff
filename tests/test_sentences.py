import json
from pathlib import Path

import pytest

from torchslim.data.sentences import read_uci_sentences, uci_sentences_dir
from torchslim.errors import DataError


def test_reads_rows_and_drops_the_trailing_empty_row(tmp_path: Path) -> None:
    for source in ("amazon", "imdb", "yelp"):
        rows = [{"text": f"{source} good", "class": 1}, {"text": f"{source} bad", "class": 0},
                {"text": "", "class": None}]
        (tmp_path / f"{source}.json").write_text(json.dumps(rows))
    texts, labels = read_uci_sentences(tmp_path)
    assert texts[:2] == ["amazon good", "amazon bad"] and len(texts) == 6
    assert labels.tolist() == [1, 0] * 3


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"npm install --ignore-scripts sentiment@5\.0\.2"):
        read_uci_sentences(tmp_path)
    (tmp_path / "amazon.json").write_text("{not json")
    with pytest.raises(DataError, match=r"amazon\.json is not the expected"):
        read_uci_sentences(tmp_path)


@pytest.mark.skipif(not (uci_sentences_dir() / "yelp.json").is_file(),
                    reason="UCI sentences not installed: npm install --ignore-scripts sentiment@5.0.2")
def test_the_real_files_hold_3000_balanced_sentences() -> None:
    texts, labels = read_uci_sentences()
    assert len(texts) == 3000 and labels.sum() == 1500
