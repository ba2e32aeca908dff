"""Channel-group tracing: which channels of which layers are coupled, and what is excluded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.errors import GraphError
from torchslim.graph import AtomTable, trace_channels
from torchslim.graph.atoms import BLOCKED
from torchslim.testing import (
    AttentionBlock,
    ConcatBranches,
    DepthwiseBlock,
    FlattenLinear,
    HardcodedView,
    ResidualAdd,
    SharedLayer,
    SplitGate,
)

IMAGE = torch.randn(2, 3, 8, 8)


def layers_of(graph):
    return sorted((group.modules, len(group.units)) for group in graph.groups)


def test_atom_table_couples_and_blocks():
    table = AtomTable()
    a = table.axis("a", "out", 3, produces=True)
    b = table.axis("b", "in", 3, produces=False)
    c = table.axis("c", "in", 2, produces=False)
    table.union(a, b)
    table.block(a[:1], "kept on purpose")
    units = table.units()
    assert sorted(len(u) for u in units) == [2, 2]  # a1+b1, a2+b2; a0 blocked; c has no producer
    assert table.find(int(b[0])) == BLOCKED and table.reasons == ["kept on purpose"]
    assert all(m.module != "c" for u in units for m in u) and len(c) == 2
    with pytest.raises(ValueError, match="3 and 4"):
        table.axis("a", "out", 4, produces=True)


def test_residual_add_couples_stem_with_block_output():
    graph = trace_channels(ResidualAdd(), IMAGE)
    assert layers_of(graph) == [(["bn1", "conv1", "conv2"], 8),
                                (["bn2", "conv1", "conv2", "head", "stem"], 8)]


def test_concat_maps_each_branch_to_its_slice_of_the_consumer():
    graph = trace_channels(ConcatBranches(), IMAGE)
    assert layers_of(graph) == [(["left", "merge"], 6), (["merge", "right"], 4)]
    right = next(g for g in graph.groups if "right" in g.modules)
    assert [m.index for m in right.units[0] if m.module == "merge"] == [6]


def test_split_halves_that_are_multiplied_are_one_unit():
    graph = trace_channels(SplitGate(), IMAGE)
    (group,) = graph.groups
    first = sorted((m.module, m.axis, m.index) for m in group.units[0])
    assert first == [("conv", "out", 0), ("conv", "out", 6), ("out", "in", 0)]


def test_depthwise_conv_passes_channels_through():
    graph = trace_channels(DepthwiseBlock(), IMAGE)
    assert layers_of(graph) == [(["bn", "depthwise", "expand", "project"], 12)]


def test_flatten_gives_each_channel_its_block_of_linear_inputs():
    graph = trace_channels(FlattenLinear(), torch.randn(2, 1, 8, 8))
    (group,) = graph.groups
    inputs = [m.index for m in group.units[1] if m.module == "fc"]
    assert inputs == list(range(16, 32))


def test_hardcoded_reshape_is_excluded_with_a_warning():
    with pytest.warns(UserWarning, match="spells the channel size as a constant"):
        graph = trace_channels(HardcodedView(), torch.randn(2, 1, 8, 8))
    assert graph.groups == []
    with pytest.raises(GraphError, match="constant"):
        trace_channels(HardcodedView(), torch.randn(2, 1, 8, 8), strict=True)


def test_shared_layer_couples_its_input_and_output_features():
    graph = trace_channels(SharedLayer(), torch.randn(2, 5))
    assert layers_of(graph) == [(["inp", "out", "shared"], 8)]


def test_attention_heads_and_ffn_are_groups_and_the_width_is_kept():
    graph = trace_channels(AttentionBlock(), torch.randn(2, 5, 16))
    assert layers_of(graph) == [(["attention"], 4), (["down", "up"], 32)]


def test_layer_without_rule_is_excluded_with_its_name():
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.rnn = nn.LSTM(6, 3, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.proj(x))[0]

    with pytest.warns(UserWarning, match=r"rnn \(LSTM\) has no channel rule.*register_channel_rule"):
        graph = trace_channels(WithLSTM(), torch.randn(2, 3, 4))
    assert graph.groups == []


def test_data_dependent_control_flow_is_a_graph_error_naming_the_fix():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(GraphError, match="register_channel_rule"):
        trace_channels(Branchy(), torch.randn(2, 3))


def test_unit_of_maps_a_traced_tensor_channel_to_its_unit():
    graph = trace_channels(DepthwiseBlock(), IMAGE)
    node = next(name for name, space in graph.spaces.items() if len(space.atoms) == 12)
    where = [graph.unit_of(int(a)) for a in graph.spaces[node].atoms]
    assert sorted(where) == [(0, u) for u in range(12)]
    assert np.all(graph.spaces[node].atoms > 0)
