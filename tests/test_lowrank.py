import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim import artifact
from torchslim.errors import ArtifactError, ConfigError
from torchslim.lowrank import (
    ConvDecomposition,
    DecomposedConv,
    FactorizedLinear,
    LowRank,
    break_even_rank,
    decompose_conv,
    energy_rank,
    factorize_linear,
    svd_factors,
)
from torchslim.models import create_model
from torchslim.safefile import read_checked, write_checked
from torchslim.testing import RankOneConv, TinyConvNet, TinyMLP, assert_same_outputs


# ------------------------------------------------------------------- pure math
def test_svd_factors_at_full_rank_reproduce_and_truncation_is_optimal() -> None:
    matrix = torch.randn(12, 7)
    left, right = svd_factors(matrix, 7)
    assert torch.allclose(left @ right, matrix, atol=1e-5)
    left, right = svd_factors(matrix, 3)
    singular = torch.linalg.svdvals(matrix)
    # Eckart-Young: the Frobenius error of the best rank-3 fit is the norm of the dropped values.
    error = torch.linalg.norm(matrix - left @ right)
    assert float(error) == pytest.approx(float(singular[3:].norm()), rel=1e-4)


@pytest.mark.parametrize("rank", [0, 8, -1])
def test_svd_rank_out_of_range_names_the_valid_range(rank: int) -> None:
    with pytest.raises(ConfigError, match=r"rank=.* valid: 1\.\.7"):
        svd_factors(torch.randn(12, 7), rank)


def test_energy_rank_and_break_even() -> None:
    values = torch.tensor([4.0, 2.0, 1.0, 0.5])
    total = float((values**2).sum())
    assert energy_rank(values, 16 / total) == 1
    assert energy_rank(values, 16.01 / total) == 2
    assert energy_rank(values, 1.0) == 4
    for energy in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"energy=.*\(0, 1\]"):
            energy_rank(values, energy)
    rows, cols = 300, 784
    r = break_even_rank(rows, cols)
    assert r * (rows + cols) < rows * cols <= (r + 1) * (rows + cols)


# ------------------------------------------------------------------- Linear
def test_factorized_linear_at_full_rank_reproduces_the_layer() -> None:
    layer = nn.Linear(20, 9)
    pair = factorize_linear(layer, 9)
    assert isinstance(pair, FactorizedLinear) and pair.rank == 9
    x = torch.randn(16, 20)
    assert torch.allclose(pair(x), layer(x), atol=1e-5)


def test_apply_full_rank_without_skipping_keeps_the_model_function() -> None:
    model = TinyMLP().eval()
    reference = copy.deepcopy(model)
    result = ts.apply_(model, LowRank(per_layer={"net.1": 16, "net.4": 10},
                                      skip_unprofitable=False))
    assert result["ranks"] == {"net.1": 16, "net.4": 10}
    assert_same_outputs(reference, model, torch.randn(8, 1, 8, 8), atol=1e-5)


def test_param_ratio_halves_weights_with_the_expected_count() -> None:
    model = create_model("lenet300", pretrained=False)
    result = ts.apply_(model, LowRank(param_ratio=0.5))
    expected_ranks = {"fc1": int(0.5 * 784 * 300 / 1084), "fc2": int(0.5 * 300 * 100 / 400),
                      "fc3": max(1, int(0.5 * 100 * 10 / 110))}
    assert result["ranks"] == expected_ranks
    weights = sum(r * (m + n) for (m, n), r in zip([(784, 300), (300, 100), (100, 10)],
                                                   expected_ranks.values(), strict=True))
    biases = 300 + 100 + 10
    assert result["params_after"] == weights + biases
    assert sum(p.numel() for p in model.parameters()) == weights + biases
    assert isinstance(model.fc1, FactorizedLinear)


def test_unprofitable_layers_are_skipped_and_reported() -> None:
    model = TinyMLP()
    result = ts.apply_(model, LowRank(per_layer={"net.1": 2, "net.4": 9}))
    assert result["ranks"] == {"net.1": 2}
    assert "would not save weights" in result["skipped"]["net.4"]
    assert isinstance(model.net[4], nn.Linear)


def test_bad_rank_fails_naming_layer_and_range_and_changes_nothing() -> None:
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"net\.4: rank 11 \(valid: 1\.\.10\)"):
        ts.apply_(model, LowRank(rank=11))
    assert isinstance(model.net[1], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        LowRank(rank=0)
    with pytest.raises(ConfigError, match="exactly one of rank, energy, param_ratio"):
        LowRank()
    with pytest.raises(ConfigError, match="energy"):
        LowRank(energy=1.5)
    with pytest.raises(ConfigError, match=r"per_layer names \['fc9'\]"):
        ts.apply_(TinyMLP(), LowRank(per_layer={"fc9": 2}))


def test_factorized_model_saves_and_loads_without_pickle(tmp_path: Path) -> None:
    model = create_model("lenet300", pretrained=False)
    ts.apply_(model, LowRank(energy=0.5))
    path = ts.save(model, tmp_path / "m.slim")
    reloaded = ts.load(path)
    assert isinstance(reloaded.fc1, FactorizedLinear)
    assert_same_outputs(model, reloaded, torch.randn(4, 1, 28, 28))
    # A second structural change on top of the first is replayed in order.
    ts.apply_(reloaded, LowRank(per_layer={"fc1.0": 5}, skip_unprofitable=False))
    again = ts.load(ts.save(reloaded, tmp_path / "m2.slim"))
    assert_same_outputs(reloaded, again, torch.randn(4, 1, 28, 28))


def test_unknown_structural_edit_is_a_clear_artifact_error(tmp_path: Path) -> None:
    model = create_model("lenet300", pretrained=False)
    ts.apply_(model, LowRank(rank=4))
    path = ts.save(model, tmp_path / "m.slim")
    tensors, document = read_checked(path)
    document["edits"][0]["kind"] = "mystery_edit"
    write_checked(path, tensors, document)
    with pytest.raises(ArtifactError, match=r"mystery_edit.*upgrade torchslim"):
        artifact.load(path)


# ------------------------------------------------------------------- conv
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_full_rank_decompositions_reproduce_the_conv(stride: int, padding: int, dilation: int) -> None:
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 4, 11, 11)
    for method, ranks in (("tucker", (6, 4)), ("spatial", (12,))):
        chain = decompose_conv(conv, method, ranks)
        assert isinstance(chain, DecomposedConv)
        assert chain(x).shape == conv(x).shape
        assert torch.allclose(chain(x), conv(x), atol=1e-4), method


def test_depthwise_replacement_is_exact_for_a_separable_kernel() -> None:
    conv = RankOneConv(3, 5, 3)
    chain = decompose_conv(conv, "depthwise")
    assert chain[0].groups == 3 and chain[1].kernel_size == (1, 1)
    x = torch.randn(2, 3, 7, 7)
    assert torch.allclose(chain(x), conv(x), atol=1e-4)


def test_conv_decomposition_skips_what_it_cannot_split_and_cuts_weights(tmp_path: Path) -> None:
    model = TinyConvNet().eval()
    before = sum(p.numel() for p in model.parameters())
    result = ts.apply_(model, ConvDecomposition(method="tucker", param_ratio=0.5),
                       targets=ts.Select(types=("Conv2d",)))
    assert set(result["ranks"]) == {"conv2"}
    assert "1x1" in result["skipped"]["point"]
    assert "grouped" in result["skipped"]["grouped"]
    assert "no Tucker ranks" in result["skipped"]["conv1"]  # 1 input channel: nothing to gain
    conv2_before = 16 * 8 * 9
    r_out, r_in = result["ranks"]["conv2"]
    conv2_after = 8 * r_in + r_in * r_out * 9 + r_out * 16
    assert conv2_after <= 0.5 * conv2_before
    assert sum(p.numel() for p in model.parameters()) == before - conv2_before + conv2_after
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_decomposed_registered_model_round_trips(tmp_path: Path) -> None:
    model = create_model("resnet-small", pretrained=False).eval()
    flops = ts.measure.count_flops(model, torch.randn(1, 1, 28, 28))
    ts.apply_(model, ConvDecomposition(method="spatial", param_ratio=0.4))
    assert ts.measure.count_flops(model, torch.randn(1, 1, 28, 28)) < 0.6 * flops
    reloaded = ts.load(ts.save(model, tmp_path / "r.slim"))
    assert_same_outputs(model, reloaded, torch.randn(3, 1, 28, 28))


def test_conv_decomposition_bad_options() -> None:
    with pytest.raises(ConfigError, match="depthwise takes no rank"):
        ConvDecomposition(method="depthwise", rank=3)
    with pytest.raises(ConfigError, match="exactly one of rank, energy, param_ratio"):
        ConvDecomposition(method="tucker")
    with pytest.raises(ConfigError, match="method"):
        ConvDecomposition(method="cp3", rank=2)
    model = TinyConvNet()
    with pytest.raises(ConfigError, match=r"conv2: ranks \(9, 9\)"):
        ts.apply_(model, ConvDecomposition(method="tucker", rank=9),
                  targets=ts.Select(names=("conv2",)))
    assert isinstance(model.conv2, nn.Conv2d)
