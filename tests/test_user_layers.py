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
from torchslim.select import Select
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


class Encoder(nn.Module):
    """A user's transformer block: embedding, nn.MultiheadAttention, FFN, all on a residual stream."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        h = h + self.ffn(h)
        return self.head(h.mean(1))


def test_multihead_attention_embedding_width_is_pruned_with_the_residual_stream() -> None:
    """Channels that are zero everywhere on the residual stream (produced and read) go, and the
    model computes exactly what it did: the embedding axis is coupled to every reader and writer."""
    torch.manual_seed(0)
    model = Encoder().eval()
    dead = torch.arange(0, 32, 2)  # half the residual channels carry nothing
    with torch.no_grad():
        for layer in (model.embed, model.attention.out_proj, model.ffn[2]):
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        for weight in (model.attention.in_proj_weight, model.ffn[0].weight, model.head.weight):
            weight[:, dead] = 0
    x = torch.randn(3, 8, 8)
    expected = model(x)
    changes = apply_(model, ChannelPruning(ratio=0.5), targets=Select(names=("embed",)), example_inputs=x)
    assert changes["sizes"]["attention"] == {"embed": 16}
    assert model.attention.embed_dim == 16 and model.attention.num_heads == 4
    assert model.head.in_features == 16 and model.ffn[0].in_features == 16
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_on_a_fixed_width_input_keeps_its_embedding_width_and_says_so() -> None:
    class RawAttention(nn.Module):  # the model's own input goes straight into the attention
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = RawAttention().eval()
    with pytest.warns(UserWarning, match="attention: an input of the attention has a fixed width"):
        changes = apply_(model, ChannelPruning(ratio=0.5), example_inputs=torch.randn(2, 5, 16))
    assert changes["sizes"]["attention"] == {"heads": 2}
    assert model.attention.embed_dim == 16


def test_a_head_ratio_rounds_to_the_nearest_head_count() -> None:
    class Heads(nn.Module):  # 12 heads on a fixed-width input: only heads are prunable
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(48, 12, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = Heads().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding width is kept: the input is fixed
        changes = apply_(model, ChannelPruning(ratio=0.33), example_inputs=torch.randn(2, 5, 48))
    assert changes["sizes"]["attention"] == {"heads": 8}  # 0.33 x 12 = 3.96 -> 4 heads go


class ChecksAndPads(nn.Module):
    """Shape checks and padding arithmetic in forward, as Hugging Face's vision models do:
    `if x.shape[1] != ...: raise`, `int(...)` of a shape, unpacking a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.stem.in_channels:
            raise ValueError("wrong channel count")
        x = torch.relu(self.stem(x))
        height, width = x.shape[2:]  # unpacked: iterated while tracing
        pad = int(max(3 - width % 2, 0))  # int() of a traced shape
        x = nn.functional.pad(x, (pad, pad, pad * (height > 4), pad))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_forward_with_shape_checks_int_and_loops_is_traced_on_the_example_inputs() -> None:
    model = ChecksAndPads().eval()
    inputs = torch.randn(2, 3, 12, 12)
    changes = apply_(model, ChannelPruning(ratio=0.5), example_inputs=inputs)
    assert model.stem.out_channels == 4 and model.body.out_channels == 4
    assert "stem" in changes.changed
    assert model(inputs).shape == (2, 4)
    with pytest.raises(ValueError, match="wrong channel count"):  # the check is still there
        model(torch.randn(2, 1, 12, 12))
