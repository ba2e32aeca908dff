"""Attention heads as prunable units: `nn.MultiheadAttention` and Hugging Face BERT.

A head is D rows of each of the q/k/v projections plus D input columns of the output
projection; removing it removes all of those together. The embedding width of
`nn.MultiheadAttention` is prunable too: channel i is column i of the q/k/v projections and row
i of the output projection, coupled to whatever feeds the attention and reads its output (in a
transformer, the whole residual stream, its LayerNorms and embeddings). `nn.MultiheadAttention`
insists that heads fill `embed_dim`, so a pruned one becomes `PrunedMultiheadAttention` (same
maths, inner width H'*D, any embedding width). Hugging Face BERT's hidden size is not pruned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.graph.axes import Axis, ParamSlice
from torchslim.graph.rules import ChannelRule, Coupling, Space, register_channel_rule

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose heads need not fill `embed_dim` (after head pruning).

    Same call as `nn.MultiheadAttention` (query, key, value, key_padding_mask, need_weights,
    attn_mask); returns `(output, None)`: attention weights are not materialised.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, batch_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first = batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """Build from an `nn.MultiheadAttention` whose packed projections were already cut (its
        heads and embedding width are read from their shapes)."""
        head_dim = mha.head_dim
        rows, embed_dim = mha.in_proj_weight.shape
        new = cls(embed_dim, rows // 3 // head_dim, head_dim, batch_first=mha.batch_first,
                  bias=mha.in_proj_bias is not None)
        q, k, v = mha.in_proj_weight.detach().chunk(3)  # (H'*D, E) each
        with torch.no_grad():
            for proj, weight in zip((new.q_proj, new.k_proj, new.v_proj), (q, k, v), strict=True):
                proj.weight.copy_(weight)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj),
                                   mha.in_proj_bias.detach().chunk(3), strict=True):
                    assert proj.bias is not None
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D)
            return x.view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))  # (B, T, E)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True = do not attend) as one additive float mask."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None if attn_mask is None else additive(attn_mask)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]  # (B, 1, 1, S)
        merged = padding if merged is None else merged + padding
    return merged


def _mha_resize(update: Any) -> Any:
    """A resize for an attention axis: `nn.MultiheadAttention` (whose heads must fill its width)
    becomes a `PrunedMultiheadAttention` read from its cut tensors; a pruned one gets `update`."""
    def resize(module: nn.Module, size: int) -> nn.Module | None:
        if isinstance(module, nn.MultiheadAttention):
            return PrunedMultiheadAttention.from_torch(module)
        assert isinstance(module, PrunedMultiheadAttention)
        update(module, size)
        return None
    return resize


def _set_heads(module: PrunedMultiheadAttention, size: int) -> None:
    module.num_heads = size
    for proj in (module.q_proj, module.k_proj, module.v_proj):
        proj.out_features = size * module.head_dim
    module.out_proj.in_features = size * module.head_dim


def _set_embed(module: PrunedMultiheadAttention, size: int) -> None:
    module.embed_dim = size
    for proj in (module.q_proj, module.k_proj, module.v_proj):
        proj.in_features = size
    module.out_proj.out_features = size


class MultiheadAttentionRule(ChannelRule):
    """Heads and embedding width of `nn.MultiheadAttention` / `PrunedMultiheadAttention`."""

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        slices: tuple[ParamSlice, ...]
        if isinstance(module, nn.MultiheadAttention):
            d = module.head_dim
            slices = (ParamSlice("in_proj_weight", 0, d, blocks=3),
                      ParamSlice("in_proj_bias", 0, d, scored=False, blocks=3),
                      ParamSlice("out_proj.weight", 1, d))
            embed: tuple[ParamSlice, ...] = (ParamSlice("in_proj_weight", 1),)
        else:
            assert isinstance(module, PrunedMultiheadAttention)
            d = module.head_dim
            slices = tuple(piece for proj in ("q_proj", "k_proj", "v_proj")
                           for piece in (ParamSlice(f"{proj}.weight", 0, d),
                                         ParamSlice(f"{proj}.bias", 0, d, scored=False)))
            slices += (ParamSlice("out_proj.weight", 1, d),)
            embed = tuple(ParamSlice(f"{proj}.weight", 1) for proj in ("q_proj", "k_proj", "v_proj"))
        embed += (ParamSlice("out_proj.weight", 0), ParamSlice("out_proj.bias", 0, scored=False))
        return {"heads": Axis(slices, _mha_resize(_set_heads), produces=True),
                "embed": Axis(embed, _mha_resize(_set_embed), produces=True)}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        unsupported = isinstance(module, nn.MultiheadAttention) and (
            not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn)
        if unsupported:
            graph.block(inputs, f"{name}: attention with separate key/value sizes, bias_k or "
                        "add_zero_attn is not pruned")
            return (None, None)
        assert isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention)
        graph.atoms(name, "heads", module.num_heads)
        # query, key and value are read through the same projection columns: one embedding axis
        # ties their channels to the output's; an input whose channels are not tracked (or are
        # not on the last dim) keeps the width.
        embed = graph.atoms(name, "embed", module.embed_dim)
        tensors = [(space, value) for space, value in zip(inputs, values, strict=True)
                   if isinstance(value, torch.Tensor)][:3]
        for space, value in tensors:
            if space is not None and space.dim == value.dim() - 1:
                graph.couple(space, embed)
            else:
                graph.block(space, f"{name}: channels reach the attention on dim "
                            f"{getattr(space, 'dim', None)}, not its embedding dim")
                graph.block(Space(value.dim() - 1, embed), f"{name}: an input of the attention "
                            "has a fixed width, so its embedding width is kept")
        first = output[0] if isinstance(output, tuple) else output
        return (Space(first.dim() - 1, embed), None)


# -------------------------------------------------------------------------------- Hugging Face BERT
def _bert_heads(module: Any, size: int) -> None:  # a BertSelfAttention (transformers, untyped)
    head = int(module.attention_head_size)
    module.num_attention_heads = size
    module.all_head_size = size * head
    for proj in (module.query, module.key, module.value):
        proj.out_features = size * head


class BertSelfAttentionRule(ChannelRule):
    """Heads of `BertSelfAttention`: D rows of query, key and value each."""

    def axes(self, module: Any) -> dict[str, Axis]:
        d = int(module.attention_head_size)
        slices = tuple(piece for proj in ("query", "key", "value")
                       for piece in (ParamSlice(f"{proj}.weight", 0, d),
                                     ParamSlice(f"{proj}.bias", 0, d, scored=False)))
        return {"heads": Axis(slices, _bert_heads, produces=True)}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        graph.block(inputs, f"{name}: BERT's hidden size is not pruned")
        return None  # only reached if traced alone: its heads' output projection is not visible


def couple_bert_layer(graph: Coupling, name: str, layer: Any) -> None:
    """Heads (q/k/v rows + output-projection columns) and FFN neurons of one `BertLayer`."""
    attention = layer.attention.self
    heads, d = int(attention.num_attention_heads), int(attention.attention_head_size)
    head_atoms = graph.atoms(f"{name}.attention.self", "heads", heads)
    columns = graph.atoms(f"{name}.attention.output.dense", "in", heads * d)
    graph.couple(Space(0, np.repeat(head_atoms, d)), columns)
    width = int(layer.intermediate.dense.out_features)
    neurons = graph.atoms(f"{name}.intermediate.dense", "out", width)
    graph.couple(Space(0, neurons), graph.atoms(f"{name}.output.dense", "in", width))


class BertRule(ChannelRule):
    """`BertLayer` / `BertModel` as one node: heads and FFN neurons of each layer are prunable."""

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        graph.block(inputs, f"{name}: BERT's hidden size is not pruned")
        prefix = f"{name}." if name else ""
        for sub_name, sub in module.named_modules():
            if type(sub).__name__ == "BertLayer":
                couple_bert_layer(graph, f"{prefix}{sub_name}".rstrip("."), sub)
        return None


register_channel_rule(nn.MultiheadAttention, MultiheadAttentionRule())
register_channel_rule(PrunedMultiheadAttention, MultiheadAttentionRule())
_BERT = "transformers.models.bert.modeling_bert."
register_channel_rule(_BERT + "BertSelfAttention", BertSelfAttentionRule())
register_channel_rule(_BERT + "BertLayer", BertRule())
register_channel_rule(_BERT + "BertModel", BertRule())
