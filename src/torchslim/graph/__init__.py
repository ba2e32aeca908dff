"""Dependency tracing for structured pruning: which channels of which layers go together.

`trace_channels(model, example_inputs)` returns groups of coupled channels; `register_channel_rule`
teaches it a new layer type.
"""

from torchslim.graph.atoms import AtomTable, Member
from torchslim.graph.attention import PrunedMultiheadAttention
from torchslim.graph.axes import Axis, ParamSlice, cut_axis_
from torchslim.graph.hf_blocks import refresh_counts_
from torchslim.graph.rules import ChannelRule, Space, register_channel_rule, rule_for
from torchslim.graph.trace import ChannelGraph, Group, trace_channels

__all__ = ["AtomTable", "Axis", "ChannelGraph", "ChannelRule", "Group", "Member", "ParamSlice",
           "PrunedMultiheadAttention", "Space", "cut_axis_", "refresh_counts_", "register_channel_rule",
           "rule_for", "trace_channels"]
