import numpy as np
import pytest
import torch
from torch import nn

from torchslim.api import apply_, finalize_
from torchslim.clustering import WeightSharing, keep_shared_, kmeans_codebook
from torchslim.data import TensorLoader
from torchslim.errors import ConfigError
from torchslim.pruning import WeightPruning
from torchslim.testing import TinyMLP
from torchslim.training import Trainer, make_train_config


def test_linear_init_kmeans_finds_the_obvious_clusters() -> None:
    values = np.concatenate([np.full(50, -1.0), np.full(30, 0.5), np.full(20, 2.0)]).astype(np.float32)
    values += np.random.default_rng(0).normal(0, 0.01, values.size).astype(np.float32)
    book, labels = kmeans_codebook(values, 3)
    assert np.allclose(sorted(book), [-1.0, 0.5, 2.0], atol=0.01)
    assert np.bincount(labels).tolist() == [50, 30, 20]


def test_clustered_layer_has_at_most_2_to_the_bits_values_and_keeps_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    apply_(model, WeightPruning(sparsity=0.5))
    zeros = model[0].weight == 0
    result = apply_(model, WeightSharing(bits=3))
    finalize_(model)
    weight = model[0].weight
    assert result["clusters"]["0"] == {"bits": 3, "centroids": 8}
    assert torch.unique(weight[weight != 0]).numel() <= 8
    assert torch.equal(weight == 0, zeros)


def test_centroid_gradients_are_summed_per_cluster() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.1, 5.0, 5.1]]))
    apply_(model, WeightSharing(bits=1))
    model(torch.ones(1, 4)).sum().backward()
    codebook = model[0].parametrizations.weight[0].codebook
    assert codebook.grad.tolist() == [2.0, 2.0]  # two weights of input 1.0 per centroid


def test_fine_tuning_moves_centroids_not_assignments(digits) -> None:
    model = TinyMLP()
    apply_(model, WeightSharing(bits=4))
    index = model.net[1].parametrizations.weight[0].index.clone()
    Trainer(model, TensorLoader(digits.train, batch_size=64, shuffle=True),
            config=make_train_config(epochs=1, lr=0.01), progress=False).fit()
    assert torch.equal(model.net[1].parametrizations.weight[0].index, index)
    finalize_(model)
    assert torch.unique(model.net[1].weight).numel() <= 16


def test_keep_shared_reattaches_without_changing_a_bit() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    apply_(model, WeightSharing(bits=2))
    finalize_(model)
    before = model[0].weight.detach().clone()
    assert keep_shared_(model[0]) <= 4
    assert torch.equal(model[0].weight.view(torch.int32), before.view(torch.int32))


def test_bits_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigError, match="bits"):
        WeightSharing(bits=17)
    with pytest.raises(ConfigError, match="per_layer bits"):
        WeightSharing(per_layer={"fc1": 0})
