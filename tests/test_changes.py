"""`apply_` returns a typed `Changes`: every technique says, per layer, what it changed and what
it skipped with the reason; a technique that changes nothing warns (an error on request)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.clustering import WeightSharing
from torchslim.depth import LayerDropping
from torchslim.errors import NothingChangedWarning
from torchslim.lowrank import ConvDecomposition, LowRank
from torchslim.pruning import ChannelPruning, WeightPruning
from torchslim.quantization.lowbit import LowBit
from torchslim.quantization.weight_only import WeightOnly


class Scaled(nn.Module):
    """A layer type no technique knows: a raw weight matrix used by a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
        self.mix = Scaled()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = nn.functional.pad(h, (0, 8))
        return self.head(self.mix(self.blocks(h)))


def _net() -> UserNet:
    torch.manual_seed(0)
    return UserNet().eval()


X = torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("config, expected", [
    (WeightPruning(sparsity=0.5), {"conv": "parametrized (Mask)", "head": "parametrized (Mask)"}),
    (WeightSharing(bits=2), {"conv": "parametrized", "blocks.1": "parametrized"}),
    (LowRank(rank=2), {"blocks.0": "replaced: Linear -> FactorizedLinear"}),
    (ConvDecomposition(rank=2), {"conv": "replaced: Conv2d ->"}),
    (WeightOnly(bits=4, group_size=16), {"head": "replaced: Linear ->"}),
    (LowBit(), {"head": "weight parametrized (LowBitWeight)"}),
])
def test_every_layer_technique_lists_what_it_changed_and_names_the_layer_type_it_skipped(config, expected):
    model = _net()
    with pytest.warns(UserWarning, match="mix \\(Scaled\\)"):
        changes = ts.apply_(model, config)
    assert isinstance(changes, ts.Changes) and changes.technique == config.kind
    for layer, what in expected.items():
        assert what in changes.changed[layer], (layer, changes.changed.get(layer))
    assert "mix" in changes.skipped and "Scaled is not a layer type" in changes.skipped["mix"]
    assert "mix" not in changes.changed and "bn" not in changes.changed
    assert "mix" in changes.summary()


def test_structured_pruning_lists_new_shapes_and_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(128, 4)).eval()
    model.train()  # counting MACs in train mode used to move the BatchNorm statistics
    changes = ts.apply_(model, ChannelPruning(ratio=0.5), example_inputs=torch.randn(2, 3, 8, 8))
    assert changes.changed["0"] == "weight 8x3x3x3 -> 4x3x3x3; bias 8 -> 4"
    assert changes.changed["5"] == "weight 4x128 -> 4x64"
    assert "num_batches_tracked" not in changes.changed["1"] and int(model[1].num_batches_tracked) == 0


def test_dropped_blocks_and_recalibrated_statistics_are_reported():
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(4)]))
    changes = ts.apply_(model, LayerDropping(stack="0", keep=(0, 2)))
    assert changes.changed == {"0.2": "removed", "0.3": "removed", "0.1": "weight values; bias values"}
    net = _net()
    changes = ts.apply_(net, ts.RecalibrateBN(), calibration=[(X, None)])
    assert set(changes.changed) == {"bn"} and "running_mean values" in changes.changed["bn"]


def test_a_technique_that_changes_nothing_warns_once_and_strict_users_get_an_error():
    model = _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        changes = ts.apply_(model, LowRank(rank=4), targets=ts.Select(names=("head",)))
    nothing = [w for w in caught if issubclass(w.category, NothingChangedWarning)]
    assert len(nothing) == 1 and "low_rank changed nothing" in str(nothing[0].message)
    assert changes.changed == {} and "head" in changes.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingChangedWarning)
        with pytest.raises(NothingChangedWarning):
            ts.apply_(_net(), ChannelPruning(ratio=0.0), example_inputs=X)
