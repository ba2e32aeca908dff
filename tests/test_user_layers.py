"""Structured pruning of layers third-party code writes: subclassed convs (checked, not assumed),
GroupNorm (whole groups), and no silent no-op: `strict` works on ordinary models."""

import copy
import warnings

import pytest
import torch
from torch import nn

from torchslim import apply_
from torchslim.errors import GraphError, NothingChangedWarning
from torchslim.pruning import ChannelPruning
from user_zoo import SameConv


class StandardizedConv(nn.Conv2d):
    """Weight standardisation: every output row is normalised over its *input* channels, so
    removing an input channel changes the others' weights: not a plain Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class TwoConvNet(nn.Module):
    def __init__(self, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.a, self.b, self.fc = conv(3, 16, 3), conv(16, 16, 3), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


class GroupNormNet(nn.Module):
    """conv -> GroupNorm(4 groups of 4) -> conv straight to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.Conv2d(16, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x)))).mean((2, 3))


def test_a_conv2d_subclass_that_convolves_its_own_weight_is_pruned_like_a_conv2d() -> None:
    model, x = TwoConvNet(SameConv), torch.randn(2, 3, 12, 12)
    result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    assert (model.a.out_channels, model.b.in_channels, model.b.out_channels) == (8, 8, 8)
    assert result["macs_after"] < result["macs_before"] / 3
    assert model(x).shape == (2, 4)
    untouched = TwoConvNet(SameConv)
    before = untouched(x)
    apply_(untouched, ChannelPruning(ratio=0.0), example_inputs=x)
    assert torch.equal(untouched(x), before)


def test_a_conv2d_subclass_computing_something_else_is_refused_by_name() -> None:
    model, x = TwoConvNet(StandardizedConv), torch.randn(2, 3, 12, 12)
    with pytest.warns(NothingChangedWarning, match="removed nothing.*a: StandardizedConv subclasses Conv2d"):
        result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    assert result["sizes"] == {} and any("b: StandardizedConv" in r for r in result["excluded"])
    with pytest.raises(GraphError, match="a: StandardizedConv subclasses Conv2d but overrides forward"):
        apply_(TwoConvNet(StandardizedConv), ChannelPruning(ratio=0.5, strict=True), example_inputs=x)


def test_strict_passes_on_an_ordinary_model_and_refuses_a_no_op() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    result = apply_(mlp, ChannelPruning(ratio=0.5, strict=True), example_inputs=torch.randn(2, 4))
    assert mlp[0].out_features == 4 and result["sizes"]
    with pytest.raises(GraphError, match="no prunable channel group"):
        apply_(nn.Sequential(nn.Linear(4, 4)), ChannelPruning(ratio=0.5, strict=True),
               example_inputs=torch.randn(2, 4))


def test_groupnorm_loses_whole_groups_and_the_kept_groups_compute_as_before() -> None:
    torch.manual_seed(0)
    model, x = GroupNormNet(), torch.randn(4, 3, 10, 10)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingChangedWarning)
        apply_(model, ChannelPruning(ratio=0.5), example_inputs=x)
    assert (model.norm.num_groups, model.norm.num_channels, model.b.in_channels) == (2, 8, 8)
    rows = {tuple(w.flatten().tolist()): i for i, w in enumerate(original.a.weight)}
    kept = sorted(rows[tuple(w.flatten().tolist())] for w in model.a.weight)
    assert all(sum(1 for i in kept if i // 4 == group) in (0, 4) for group in range(4))  # whole groups
    removed = sorted(set(range(16)) - set(kept))
    with torch.no_grad():  # GroupNorm groups are independent: dropping a group = ignoring it downstream
        original.b.weight[:, removed] = 0
    assert torch.allclose(model(x), original(x), atol=1e-5)


class Decoder(nn.Module):
    """conv down, transposed conv up, conv to the output: a UNet-style path."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1)
        self.out = nn.Conv2d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(torch.relu(self.down(x)))))


class Volume(nn.Module):
    """Conv1d and Conv3d paths."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 8, 3, padding=1)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.relu(self.c3(x)).mean((3, 4))  # (B, C, D)
        return self.head(torch.relu(self.c1(v)).mean(2))


@pytest.mark.parametrize(("net", "shape"), [(Decoder, (2, 3, 8, 8)), (Volume, (2, 2, 4, 4, 4))])
def test_transposed_conv1d_and_conv3d_layers_are_pruned(net: type, shape: tuple) -> None:
    torch.manual_seed(0)
    model, x = net(), torch.randn(*shape)
    reference = model(x)
    untouched = copy.deepcopy(model)
    apply_(untouched, ChannelPruning(ratio=0.0), example_inputs=x)
    assert torch.equal(untouched(x), reference)  # pruning nothing changes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingChangedWarning)
        result = apply_(model, ChannelPruning(ratio=0.5, strict=True), example_inputs=x)
    assert result["params_after"] < 0.6 * result["params_before"]
    assert model(x).shape == untouched(x).shape
