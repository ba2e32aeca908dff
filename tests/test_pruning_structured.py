"""Structured pruning: physical removal of coupled channels, scoring, targets and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torchslim import artifact
from torchslim.api import apply_
from torchslim.errors import ConfigError, GraphError
from torchslim.models import create_model, example_inputs, spec_of
from torchslim.pruning import ChannelPruning
from torchslim.quantization.ptq import _transformer_shape
from torchslim.select import Select
from torchslim.structure import edits_of
from torchslim.testing import (
    AttentionBlock,
    ConcatBranches,
    DepthwiseBlock,
    FlattenLinear,
    HardcodedView,
    ResidualAdd,
    SharedLayer,
    SplitGate,
    assert_same_outputs,
)

IMAGE = torch.randn(2, 3, 8, 8)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def residual_params(c1: int, c2: int) -> int:  # c1: residual stream, c2: inside the block
    return (27 * c1 + c1) + (9 * c1 * c2 + c2) + 2 * c2 + (9 * c2 * c1 + c1) + 2 * c1 + (4 * c1 + 4)


CASES = [  # model, inputs, parameter count after removing half of every group
    (ResidualAdd, IMAGE, residual_params(4, 4)),
    (ConcatBranches, IMAGE, (27 * 3 + 3) + (3 * 2 + 2) + (5 * 5 + 5)),
    (SplitGate, IMAGE, (27 * 6 + 6) + (2 * 3 + 2)),
    (DepthwiseBlock, IMAGE, (3 * 6 + 6) + (9 * 6 + 6) + 12 + (4 * 6 + 4)),
    (FlattenLinear, torch.randn(2, 1, 8, 8), (9 * 3 + 3) + (3 * 48 + 3)),
    (SharedLayer, torch.randn(2, 5), (5 * 4 + 4) + (4 * 4 + 4) + (2 * 4 + 2)),
    (AttentionBlock, torch.randn(2, 5, 16), 32 + 3 * (16 * 8 + 8) + (16 * 8 + 16) + 2 * (16 * 16 + 16)),
]


@pytest.mark.parametrize(("build", "inputs", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
def test_half_pruned_model_has_the_formula_parameter_count_and_runs(build, inputs, expected):
    torch.manual_seed(0)
    model = build().eval()
    reference = model(inputs)
    result = apply_(model, ChannelPruning(ratio=0.5), example_inputs=inputs)
    out = model(inputs)
    assert out.shape == reference.shape
    assert params(model) == expected == result["params_after"]
    if build is not AttentionBlock:  # FlopCounterMode does not count torch's fused MHA kernel
        assert result["macs_after"] < result["macs_before"]
    assert not any(isinstance(m, nn.utils.parametrize.ParametrizationList) for m in model.modules())


@pytest.mark.parametrize(("build", "inputs", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
def test_pruning_nothing_changes_nothing(build, inputs, expected):
    torch.manual_seed(0)
    model = build().eval()
    before = copy.deepcopy(model)
    result = apply_(model, ChannelPruning(ratio=0.0), example_inputs=inputs)
    assert result["removed_units"] == 0 and edits_of(model) == []
    assert_same_outputs(before, model, inputs)


def test_l1_removes_the_smallest_units_and_keeps_the_rest_exactly():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1, 1], [0.01, 0, 0], [2, 2, 2], [0, 0.02, 0]]))
    kept_rows = net[0].weight[[0, 2]].clone()
    apply_(net, ChannelPruning(ratio=0.5, importance="l1"), example_inputs=torch.zeros(1, 3))
    assert torch.equal(net[0].weight, kept_rows) and net[2].weight.shape == (2, 2)


def test_bn_scale_keeps_the_channels_with_the_largest_gamma():
    model = ResidualAdd().eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.1, 5, 0.2, 4, 3, 0.3, 2, 0.4]))
    apply_(model, ChannelPruning(ratio=0.5, importance="bn_scale"), example_inputs=IMAGE)
    assert sorted(model.bn1.weight.tolist()) == [2, 3, 4, 5]


@pytest.mark.parametrize("criterion", ["taylor", "activation", "apoz", "random", "l2"])
def test_every_criterion_prunes_with_calibration_data(criterion):
    torch.manual_seed(0)
    model = ResidualAdd()
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    apply_(model, ChannelPruning(ratio=0.25, importance=criterion), calibration=batches)
    assert model.conv1.out_channels == 6 and model.stem.out_channels == 6
    assert model(IMAGE).shape == (2, 4)


def test_data_criterion_without_data_is_a_config_error():
    with pytest.raises(ConfigError, match="needs calibration batches"):
        apply_(ResidualAdd(), ChannelPruning(ratio=0.5, importance="taylor"), example_inputs=IMAGE)


def test_mac_target_is_reached_globally():
    model = ResidualAdd()
    result = apply_(model, ChannelPruning(ratio=0.5, target="macs", scope="global"), example_inputs=IMAGE)
    assert 0 < result["macs_after"] <= 0.5 * result["macs_before"]
    assert result["macs_after"] > 0.3 * result["macs_before"]  # not far past the target


def test_round_to_keeps_multiples_and_per_layer_overrides_win():
    model = AttentionBlock()
    apply_(model, ChannelPruning(ratio=0.3, round_to=8), targets=Select(exclude=("attention",)),
           example_inputs=torch.randn(2, 5, 16))
    assert model.up.out_features == 24 and model.attention.num_heads == 4  # 32 - 9 = 23 -> 24
    apply_(model, ChannelPruning(ratio=0.25, per_layer={"attention": 0.5}),
           example_inputs=torch.randn(2, 5, 16))
    assert model.up.out_features == 18 and model.attention.num_heads == 2


class NarrowAndWide(nn.Module):
    """A 16-channel layer (no wider than an AVX-512 vector) feeding a 64-channel one."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Conv2d(3, 16, 3, padding=1)
        self.wide = nn.Conv2d(16, 64, 3, padding=1)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(torch.relu(self.narrow(x)))).mean((2, 3)))


def test_groups_no_wider_than_a_vector_are_kept_whole_and_named():
    from torchslim.pruning.structured import vector_lanes

    if vector_lanes() != 16:
        pytest.skip("the widths below are chosen for a 16-lane (AVX-512) CPU")
    model = NarrowAndWide()
    result = apply_(model, ChannelPruning(ratio=0.3, target="macs"), example_inputs=IMAGE)
    assert model.narrow.out_channels == 16 and model.wide.out_channels in (16, 32, 48)
    assert result["macs_after"] <= 0.7 * result["macs_before"]
    assert "no wider than one 16-lane vector" in result["round_to"]["kept_whole"]["narrow"]
    with pytest.warns(UserWarning, match="no vector-aligned widths reach the MAC target"):
        apply_(NarrowAndWide(), ChannelPruning(ratio=0.9, target="macs"), example_inputs=IMAGE)


class WideConvs(nn.Module):
    """A user's plain CNN, wide enough for the CPU's vector width to matter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 96, 3, padding=1)
        self.c = nn.Conv2d(96, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_mac_target_keeps_vector_aligned_widths_by_default_and_channels_keep_the_exact_ratio():
    from torchslim.pruning.structured import vector_lanes

    lanes = vector_lanes()
    assert lanes in (4, 8, 16)
    model = WideConvs()
    result = apply_(model, ChannelPruning(ratio=0.5, target="macs"), example_inputs=IMAGE)
    assert result["macs_after"] <= 0.5 * result["macs_before"]  # the target is still met
    assert model.a.out_channels % lanes == 0 and model.b.out_channels % lanes == 0
    assert model.a.out_channels < 64 or model.b.out_channels < 96  # and something was cut
    assert model.c.out_channels in (24, 16) if lanes == 16 else model.c.out_channels % lanes == 0
    assert result["round_to"]["setting"] == "auto" and result["round_to"]["multiples"] == [lanes]
    exact = WideConvs()
    result = apply_(exact, ChannelPruning(ratio=0.3), example_inputs=IMAGE)
    assert (exact.a.out_channels, exact.b.out_channels) == (45, 68)  # 64 - 19, 96 - 28: as asked
    assert result["round_to"]["multiples"] == [1]
    unaligned = WideConvs()
    apply_(unaligned, ChannelPruning(ratio=0.5, target="macs", round_to=1), example_inputs=IMAGE)
    aligned_widths = (model.a.out_channels, model.b.out_channels)
    assert (unaligned.a.out_channels, unaligned.b.out_channels) != aligned_widths



class OddWidths(nn.Module):
    """A user's CNN whose widths are not multiples of the CPU's vector (1.5 and 2.5 vectors)."""

    def __init__(self, lanes: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3 * lanes // 2, 3, padding=1)
        self.b = nn.Conv2d(3 * lanes // 2, 5 * lanes // 2, 3, padding=1)
        self.c = nn.Conv2d(5 * lanes // 2, 3 * lanes // 2, 3, padding=1)
        self.head = nn.Linear(3 * lanes // 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_aligned_widths_step_down_to_a_multiple_from_an_odd_full_width(ratio):
    from torchslim.pruning.structured import vector_lanes

    lanes = vector_lanes()
    model = OddWidths(lanes)
    sizes = {name: layer.out_channels for name, layer in model.named_children() if name != "head"}
    result = apply_(model, ChannelPruning(ratio=ratio, target="macs"), example_inputs=IMAGE)
    assert result["macs_after"] <= (1 - ratio) * result["macs_before"]
    for name, size in sizes.items():  # 24 -> 16 with 16 lanes, never 24 - 16 = 8
        width = getattr(model, name).out_channels
        assert width == size or width % lanes == 0, (name, size, width)
    assert any(getattr(model, name).out_channels < size for name, size in sizes.items())

def test_targets_exclude_protects_a_group():
    model = ConcatBranches()
    apply_(model, ChannelPruning(ratio=0.5), targets=Select(exclude=("left",)), example_inputs=IMAGE)
    assert model.left.out_channels == 6 and model.right.out_channels == 2


@pytest.mark.parametrize(("config", "message"), [
    (dict(ratio=0.5, per_layer={"expand": 1.0}), "would remove every channel"),
    (dict(ratio=0.5, per_layer={"nope": 0.5}), "in no prunable group"),
    (dict(ratio=0.5, round_to=16), "round_to=16 is larger than the channel count of"),
])
def test_bad_options_raise_and_leave_the_model_unchanged(config, message):
    model = DepthwiseBlock().eval()
    before = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=message):
        apply_(model, ChannelPruning(**config), example_inputs=IMAGE)
    assert_same_outputs(before, model, IMAGE)
    assert model.expand.out_channels == 12


def test_ratio_of_one_is_rejected_at_construction():
    with pytest.raises(ConfigError, match="ratio"):
        ChannelPruning(ratio=1.0)


def test_strict_mode_fails_on_an_unmappable_op_and_rolls_back():
    model = HardcodedView().eval()
    before = copy.deepcopy(model)
    with pytest.raises(GraphError, match="constant"):
        apply_(model, ChannelPruning(ratio=0.5, strict=True), example_inputs=torch.randn(2, 1, 8, 8))
    assert_same_outputs(before, model, torch.randn(2, 1, 8, 8))


def test_pruned_registered_model_saves_and_loads_without_pickle(tmp_path):
    model = create_model("resnet-small", pretrained=False).eval()
    x = example_inputs(spec_of(model), 2)
    apply_(model, ChannelPruning(ratio=0.5, target="macs"), example_inputs=x)
    (edit,) = edits_of(model)
    assert edit["kind"] == "prune_channels" and edit["sizes"]
    loaded = artifact.load(artifact.save(model, tmp_path / "pruned.slim"))
    assert_same_outputs(model, loaded, x)


def test_pruned_model_exports_to_onnx_and_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = ResidualAdd().eval()
    apply_(model, ChannelPruning(ratio=0.5), example_inputs=IMAGE)
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (IMAGE,), str(path), dynamo=False, input_names=["x"])
    (out,) = ort.InferenceSession(str(path)).run(None, {"x": IMAGE.numpy()})
    np.testing.assert_allclose(out, model(IMAGE).detach().numpy(), atol=1e-5)


def test_tiny_bert_loses_heads_and_ffn_neurons():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state.mean(1)

    model = Encoder().eval()
    ids = torch.randint(1, 40, (2, 7))
    before = copy.deepcopy(model)
    apply_(model, ChannelPruning(ratio=0.0), example_inputs=ids)
    assert_same_outputs(before, model, ids)
    apply_(model, ChannelPruning(ratio=0.5, per_layer={"*.attention.self": 0.25}), example_inputs=ids)
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 3 and layer.attention.output.dense.in_features == 12
    assert layer.intermediate.dense.out_features == 16 and layer.output.dense.in_features == 16
    assert model(ids).shape == (2, 16)
    # int8 attention fusion must see the pruned heads (3 x 4 wide), not the config's 4 x 16
    assert _transformer_shape(model) == (3, 12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_with_every_head_reproduces_torch(batch_first):
    from torchslim.graph import PrunedMultiheadAttention, cut_axis_, rule_for

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    expected = mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    rule = rule_for(mha)
    assert rule is not None
    pruned = cut_axis_(mha, rule.axes(mha)["heads"], range(4))
    assert isinstance(pruned, PrunedMultiheadAttention)
    out = pruned(x, x, x, key_padding_mask=padding)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pruned_model_is_a_plain_module_that_torch_compile_captures():
    torch.manual_seed(0)
    model = ResidualAdd().eval()
    apply_(model, ChannelPruning(ratio=0.5), example_inputs=IMAGE)
    # aot_eager: dynamo capture + AOT autograd without a C compiler (inductor was checked by hand)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(IMAGE), model(IMAGE))


@pytest.mark.parametrize(("rounding", "width"), [("up", 40), ("down", 32), ("nearest", 32)])
@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_rounding_picks_the_multiple_above_below_or_nearest(rounding: str, width: int, scope: str):
    """48 units, 30%: 14 removed leaves 34, between the multiples of 8, 32 and 40."""
    model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.ReLU(), nn.Conv2d(48, 4, 1))
    config = ChannelPruning(ratio=0.3, round_to=8, rounding=rounding, scope=scope)
    result = apply_(model.eval(), config, example_inputs=torch.randn(1, 3, 8, 8))
    assert model[0].out_channels == model[1].num_features == model[3].in_channels == width
    assert result["params_after"] == 3 * 9 * width + width + 2 * width + 4 * width + 4
