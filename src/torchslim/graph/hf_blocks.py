"""Structured pruning of Hugging Face transformers: attention heads and MLP neurons, found by
the projections each block holds, without tracing the model.

Why at the module level: transformers' forwards branch on configs, caches and masks, so fx
cannot trace most of them (and the hidden width they share through the residual stream is kept
anyway). What is pruned lives inside a block: the heads of an attention layer (q/k/v rows and
output-projection columns; with grouped-query attention a key/value head goes with the query
heads that read it, so the grouping stays consistent) and the neurons of an MLP (the rows of
its up and gate projections with the columns of its down projection). Blocks are recognised by
their projections' names across families (Llama/Mistral/Qwen2/Gemma `q_proj..o_proj` +
`gate_proj/up_proj/down_proj`, OPT/BART/GPT-Neo/Phi `out_proj|dense` + `fc1/fc2`, GPT-2's
packed `c_attn` + `c_fc/c_proj`, Phi-3's fused `qkv_proj` ([q; k; v] heads) and `gate_up_proj`,
GPT-NeoX's `query_key_value` (each head's q, k, v in turn), GPT-NeoX/Falcon/Bloom MLPs
`dense_h_to_4h/dense_4h_to_h` (Falcon's and Bloom's fused `query_key_value` keeps its heads, named
with the reason), BERT/RoBERTa/ELECTRA/ViT `query/key/value` + `intermediate`, and each expert of
a mixture-of-experts layer once unfused (`torchslim.fused_experts`)).
After a cut, `refresh_counts_` sets each block's head counts from its projections' shapes, and
the config where the model is pruned alike everywhere (so `save_pretrained` folders reload).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from torchslim.errors import GraphError
from torchslim.fused_experts import UnfusedExperts
from torchslim.graph.axes import Axis, ParamSlice
from torchslim.graph.rules import ChannelRule, Coupling, Space, register_channel_rule, rule_for
from torchslim.structure import forward_source

__all__ = ["AttentionBlock", "HeadParametersRule", "MLPBlock", "find_blocks", "refresh_counts_"]

ORIGINAL_CONFIG = "torchslim_original_config"  # what storage rebuilds before replaying edits


@dataclass(frozen=True)
class AttentionBlock:
    """One attention layer: its projections (dotted names) and sizes."""

    name: str
    q: str
    k: str
    v: str
    out: str
    head_dim: int
    packed: str = ""  # q, k and v in one projection (`q` names it): "thirds" (GPT-2: [q; k; v]),
    # "qkv" (Phi-3: [q heads; k heads; v heads], grouped-query), "per_head" (GPT-NeoX: [q_h; k_h; v_h]
    # for each head h in turn)


@dataclass(frozen=True)
class MLPBlock:
    """One MLP: the projections making its neurons (`ins`) and the one reading them (`out`)."""

    name: str
    ins: tuple[str, ...]
    out: str
    rows: str = "plain"  # neuron i is row i of each of `ins`; "halves": rows i and width + i of
    # one projection ([gate; up]: Phi-3, most MoE experts); "pairs": rows 2i and 2i + 1 (GPT-OSS)
    expert: bool = False  # one expert of a mixture-of-experts layer (`UnfusedExperts`)


FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv")  # q, k and v in one projection, kept whole


def _linear(module: nn.Module, child: str) -> nn.Linear | None:
    found = getattr(module, child, None)
    return found if isinstance(found, nn.Linear) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _head_dim(module: nn.Module, config: Any) -> int | None:
    for attribute in ("head_dim", "attention_head_size", "key_value_proj_dim"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return hidden // heads if isinstance(heads, int) and isinstance(hidden, int) and heads else None


def find_blocks(model: nn.Module) -> tuple[list[AttentionBlock], list[MLPBlock]]:
    """The attention layers and MLPs of a transformers model, recognised by their projections."""
    config = getattr(model, "config", None)
    attentions: list[AttentionBlock] = []
    mlps: list[MLPBlock] = []
    for name, module in model.named_modules():
        children = {child for child, _ in module.named_children()}
        dim = _head_dim(module, config)
        if {"q_proj", "k_proj", "v_proj"} <= children and dim:
            out = next((c for c in ("o_proj", "out_proj", "dense") if _linear(module, c)), None)
            if out and all(_linear(module, c) for c in ("q_proj", "k_proj", "v_proj")):
                attentions.append(AttentionBlock(name, _join(name, "q_proj"), _join(name, "k_proj"),
                                                 _join(name, "v_proj"), _join(name, out), dim))
        elif {"query", "key", "value", "dense"} <= children and dim and _linear(module, "dense"):  # ALBERT
            attentions.append(AttentionBlock(name, _join(name, "query"), _join(name, "key"),
                                             _join(name, "value"), _join(name, "dense"), dim))
        elif {"query", "key", "value"} <= children and dim:  # BERT family: output in the parent
            parent_name, _, _ = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            output = getattr(parent, "output", None)
            if output is not None and _linear(output, "dense"):
                attentions.append(AttentionBlock(
                    name, _join(name, "query"), _join(name, "key"), _join(name, "value"),
                    _join(parent_name, "output.dense"), dim))
        elif dim and _linear(module, "c_attn") and _linear(module, "c_proj"):
            attentions.append(AttentionBlock(name, _join(name, "c_attn"), "", "", _join(name, "c_proj"),
                                             dim, packed="thirds"))
        elif dim and _linear(module, "qkv_proj") and _linear(module, "o_proj") and \
                isinstance(getattr(module, "num_key_value_heads", None), int):  # Phi-3
            attentions.append(AttentionBlock(name, _join(name, "qkv_proj"), "", "", _join(name, "o_proj"),
                                             dim, packed="qkv"))
        elif type(module).__name__ == "GPTNeoXAttention" and _linear(module, "query_key_value") \
                and _linear(module, "dense") and isinstance(size := getattr(module, "head_size", None), int):
            attentions.append(AttentionBlock(name, _join(name, "query_key_value"), "", "",
                                             _join(name, "dense"), size, packed="per_head"))
        fused, down = _linear(module, "gate_up_proj"), _linear(module, "down_proj")
        if fused is not None and down is not None and fused.out_features == 2 * down.in_features:
            mlps.append(MLPBlock(name, (_join(name, "gate_up_proj"),), _join(name, "down_proj"),
                                 rows="halves"))
        if isinstance(module, UnfusedExperts):
            layout = module.neuron_layout()
            mlps += [MLPBlock(_join(name, f"first.{e}"), (_join(name, f"first.{e}"),),
                              _join(name, f"down.{e}"), rows=layout or "unknown", expert=True)
                     for e in range(module.num_experts)]
        for ins, out in ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"),
                         (("lin1",), "lin2"), (("wi_0", "wi_1"), "wo"), (("wi",), "wo"),
                         (("ffn",), "ffn_output"), (("dense_h_to_4h",), "dense_4h_to_h")):
            if all(_linear(module, c) for c in (*ins, out)):
                mlps.append(MLPBlock(name, tuple(_join(name, c) for c in ins), _join(name, out)))
                break
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        if intermediate is not None and output is not None and _linear(intermediate, "dense") \
                and _linear(output, "dense") and not _linear(module, "dense"):
            mlps.append(MLPBlock(name, (_join(name, "intermediate.dense"),), _join(name, "output.dense")))
    return attentions, mlps


def _couple_attention(graph: Coupling, model: nn.Module, block: AttentionBlock) -> None:
    d = block.head_dim
    q_layer = model.get_submodule(block.q)
    assert isinstance(q_layer, nn.Linear)
    out_layer = model.get_submodule(block.out)
    assert isinstance(out_layer, nn.Linear)
    if block.packed:
        width = out_layer.in_features  # the query heads' rows
        rows = graph.atoms(block.q, "out", q_layer.out_features)
        if block.packed == "per_head":  # [q_h; k_h; v_h] for each head h
            per_head = rows.reshape(-1, 3, d) if len(rows) % (3 * d) == 0 else rows[:0].reshape(0, 3, d)
            q_rows, k_rows, v_rows = (per_head[:, i].reshape(-1) for i in range(3))
        else:  # [q; k; v]: thirds (GPT-2), or q's heads then k's and v's fewer ones (Phi-3)
            kv_width = (len(rows) - width) // 2
            q_rows, k_rows, v_rows = rows[:width], rows[width:width + kv_width], rows[width + kv_width:]
    else:
        k_layer, v_layer = model.get_submodule(block.k), model.get_submodule(block.v)
        assert isinstance(k_layer, nn.Linear) and isinstance(v_layer, nn.Linear)
        width = q_layer.out_features
        q_rows = graph.atoms(block.q, "out", width)
        k_rows = graph.atoms(block.k, "out", k_layer.out_features)
        v_rows = graph.atoms(block.v, "out", v_layer.out_features)
    columns = graph.atoms(block.out, "in", out_layer.in_features)
    heads, kv_heads = width // d, len(k_rows) // d
    everything = [Space(0, rows) for rows in (q_rows, k_rows, v_rows, columns)]
    if heads == 0 or kv_heads == 0 or heads % kv_heads or len(columns) != width or len(v_rows) != len(k_rows):
        graph.block(everything, f"{block.name}: heads of {d} do not tile its projections")
        return
    across = _norms_across_heads(model, block, {width, len(k_rows)})
    if across:  # OLMo 2: an RMSNorm over all of q's heads at once; fewer heads change its statistics
        graph.block(everything, f"{block.name}: {', '.join(across)} normalise across all heads, "
                    "so the heads are kept")
        return
    per_group = heads // kv_heads  # query heads reading one key/value head: they go together
    graph.couple(Space(0, q_rows), columns)  # output-projection column i reads q/v row i's head
    _couple_head_parameters(graph, model, block, q_rows, heads)
    for g in range(kv_heads):
        unit = np.concatenate([q_rows[g * per_group * d:(g + 1) * per_group * d],
                               k_rows[g * d:(g + 1) * d], v_rows[g * d:(g + 1) * d]])
        graph.couple(Space(0, unit[1:]), np.repeat(unit[0], len(unit) - 1))


def _norms_across_heads(model: nn.Module, block: AttentionBlock, widths: set[int]) -> list[str]:
    """The attention's own norm layers whose weight spans a whole projection (several heads)."""
    module = model.get_submodule(block.name)
    found = []
    for child, layer in module.named_children():
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, nn.Linear) and isinstance(weight, nn.Parameter) and weight.dim() == 1 \
                and weight.numel() in widths and weight.numel() != block.head_dim:
            found.append(_join(block.name, child))
    return found


class HeadParametersRule(ChannelRule):
    """Tensors of an attention module that hold one entry per head besides its projections (Swin's
    relative-position bias table `(2w-1)^2 x heads`, Swin V2's `logit_scale`): sliced with the
    heads, so a pruned head takes its bias with it. Used through `_couple_attention`; the module
    itself is never traced alone (its model is one `TransformersRule` node)."""

    def __init__(self, slices: tuple[ParamSlice, ...]) -> None:
        self.slices = slices

    def axes(self, module: nn.Module) -> dict[str, Axis]:
        return {"heads": Axis(self.slices, lambda _module, _size: None)}

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        graph.block(inputs, f"{name}: an attention layer traced alone keeps its widths")
        return None


def _couple_head_parameters(graph: Coupling, model: nn.Module, block: AttentionBlock,
                            q_rows: np.ndarray, heads: int) -> None:
    """Tie each head's per-head tensors (a `HeadParametersRule`) to the head's query rows."""
    module = model.get_submodule(block.name)
    if not isinstance(rule_for(module), HeadParametersRule):
        return
    per_head = graph.atoms(block.name, "heads", heads)
    graph.couple(Space(0, per_head), q_rows[::block.head_dim])


def _couple_mlp(graph: Coupling, model: nn.Module, block: MLPBlock) -> None:
    out_layer = model.get_submodule(block.out)
    assert isinstance(out_layer, nn.Linear)
    columns = graph.atoms(block.out, "in", out_layer.in_features)
    for name in block.ins:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear) or block.rows == "unknown":
            graph.block(Space(0, columns), f"{block.name}: its gate does not pair the rows of {name} "
                        "neuron by neuron (plain, [gate; up] halves or interleaved pairs), so its neurons "
                        "are kept")
            return
        if block.rows in ("halves", "pairs"):  # neuron i: row i of each half, or rows 2i and 2i + 1
            rows = graph.atoms(name, "out", layer.out_features)
            parts = (rows[:len(columns)], rows[len(columns):]) if block.rows == "halves" else (rows[0::2],
                                                                                             rows[1::2])
            for part in parts:
                graph.couple(Space(0, part), columns)
            continue
        if layer.out_features != out_layer.in_features:
            graph.block(Space(0, columns), f"{block.name}: {name} and {block.out} disagree on the width")
            return
        graph.couple(Space(0, graph.atoms(name, "out", layer.out_features)), columns)


class TransformersRule(ChannelRule):
    """A transformers model (or a submodule that is one) as a single node: its heads and MLP
    neurons are prunable, its hidden width and vocabulary are kept. A model without attention
    or MLP blocks (a transformers CNN: ResNet, ConvNeXt, MobileNetV2) is traced like any other."""

    def applies(self, module: nn.Module) -> bool:
        attentions, mlps = find_blocks(module)
        return bool(attentions or mlps)

    def propagate(self, graph: Coupling, name: str, module: nn.Module, inputs: list[Space | None],
                  values: list[Any], output: Any) -> Any:
        graph.block(inputs, f"{name or type(module).__name__}: the hidden size of a transformers model "
                    "is not pruned")
        attentions, mlps = find_blocks(module)
        prefixed = _Prefixed(graph, name)
        for block in attentions:
            _couple_attention(prefixed, module, block)
        for mlp in mlps:
            _couple_mlp(prefixed, module, mlp)
        recognised = {block.name for block in attentions}
        fused = set()
        for child, layer in module.named_modules():
            parent, _, last = child.rpartition(".")
            if last in FUSED_QKV and isinstance(layer, nn.Linear) and parent not in recognised:
                fused.add(parent)
                prefixed.block(Space(0, prefixed.atoms(child, "out", layer.out_features)),
                               f"{child}: q, k and v in one projection (its heads are kept)")
        for child, projections in _unrecognised_attentions(module, recognised | fused).items():
            layers = {p: module.get_submodule(_join(child, p)) for p in projections}
            prefixed.block([Space(0, prefixed.atoms(_join(child, p), "out", layer.out_features))
                            for p, layer in layers.items() if isinstance(layer, nn.Linear)],
                           f"{child}: {type(module.get_submodule(child)).__name__}'s projections "
                           f"({', '.join(projections)}) are not a layout whose heads torchslim can pair "
                           "(q/k/v + output projections), so its heads are kept")
        return None


def _unrecognised_attentions(model: nn.Module, known: set[str]) -> dict[str, list[str]]:
    """Attention modules (by class name) holding Linears of their own that no recognised block
    covers (DeepSeek's latent attention, T5's q/k/v/o), with those Linears: named, not passed over."""
    found = {}
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or any(
                name == k or name.startswith(f"{k}.") or k.startswith(f"{name}.") for k in known):
            continue
        linears = [child for child, layer in module.named_children() if isinstance(layer, nn.Linear)]
        if linears:
            found[name] = linears
    return found


class _Prefixed:
    """The coupling seen from a submodule: its names are prefixed with the submodule's."""

    def __init__(self, graph: Coupling, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def atoms(self, module: str, axis: str, size: int) -> np.ndarray:
        return self.graph.atoms(_join(self.prefix, module), axis, size)

    def couple(self, space: Space, atoms: np.ndarray) -> None:
        self.graph.couple(space, atoms)

    def block(self, spaces: Any, reason: str) -> None:
        self.graph.block(spaces, reason)


def _set_first(module: Any, names: tuple[str, ...], value: int) -> None:
    for attribute in names:
        if isinstance(getattr(module, attribute, None), int):
            setattr(module, attribute, value)


def refresh_counts_(model: nn.Module) -> None:
    """Set every attention block's head counts from its projections' shapes, and the config's
    counts where every block agrees (the original config is kept for storage)."""
    import copy

    attentions, mlps = find_blocks(model)
    heads_seen: set[int] = set()
    kv_seen: set[int] = set()
    widths: set[int] = set()
    for block in attentions:
        module = model.get_submodule(block.name)
        q = model.get_submodule(block.q)
        assert isinstance(q, nn.Linear)
        if block.packed:
            out = model.get_submodule(block.out)
            assert isinstance(out, nn.Linear)
            heads = out.in_features // block.head_dim
            kv = (q.out_features // block.head_dim - heads) // 2
            _set_first(module, ("split_size",), heads * block.head_dim)
        else:
            k = model.get_submodule(block.k)
            assert isinstance(k, nn.Linear)
            heads, kv = q.out_features // block.head_dim, k.out_features // block.head_dim
        _set_first(module, ("num_heads",), heads)
        _set_first(module, ("num_attention_heads",), heads)
        _set_first(module, ("n_heads",), heads)
        _set_first(module, ("all_head_size", "inner_dim"), heads * block.head_dim)
        _set_first(module, ("num_key_value_heads",), kv)
        _set_first(module, ("num_key_value_groups",), max(heads // max(kv, 1), 1))
        heads_seen.add(heads)
        kv_seen.add(kv)
    classes: set[Any] = {type(model.get_submodule(block.name)) for block in attentions}
    shared = sorted(cls.__name__ for cls in classes
                    if "self.config.num_attention_heads" in forward_source(cls))
    if shared and len(heads_seen) > 1:  # Phi-3: one count for every layer, read from the config
        raise GraphError(f"{', '.join(shared)} reads its head count from the model's config "
                         f"(self.config.num_attention_heads), so every layer must keep as many heads; these "
                         f"would keep {sorted(heads_seen)}: prune with scope uniform and no per_layer, or "
                         "only the MLP neurons")
    expert_widths: set[int] = set()
    for mlp in mlps:
        out = model.get_submodule(mlp.out)
        assert isinstance(out, nn.Linear)
        (expert_widths if mlp.expert else widths).add(out.in_features)
    config = getattr(model, "config", None)
    if config is None or not (attentions or mlps):
        return
    if not hasattr(model, ORIGINAL_CONFIG):
        setattr(model, ORIGINAL_CONFIG, copy.deepcopy(config))
    if len(heads_seen) == 1:
        heads = heads_seen.pop()
        _set_config(config, ("num_attention_heads", "n_head", "n_heads"), heads)
        dims = {block.head_dim for block in attentions}
        hidden = getattr(config, "hidden_size", None)
        if not hasattr(config, "head_dim") and len(dims) == 1 and isinstance(hidden, int) \
                and hidden // heads != next(iter(dims)):  # Phi-3 reads head_dim, else hidden / heads
            config.head_dim = next(iter(dims))
    if len(kv_seen) == 1 and isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = kv_seen.pop()
    if len(widths) == 1:
        _set_config(config, ("intermediate_size", "n_inner", "ffn_dim", "d_ff"), next(iter(widths)))
    # Qwen3-MoE and DeepSeek name the experts' width apart; Mixtral and GPT-OSS call it intermediate_size
    named = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
    if len(expert_widths) == 1 and (named == "moe_intermediate_size" or not widths):
        _set_config(config, (named,), next(iter(expert_widths)))


def _set_config(config: Any, names: tuple[str, ...], value: int) -> None:
    """Set the first of `names` the config has (GPT-2's `n_inner` may be None: it is set too)."""
    for attribute in names:
        if hasattr(config, attribute):
            setattr(config, attribute, value)
            return


register_channel_rule("transformers.modeling_utils.PreTrainedModel", TransformersRule())
# GPT-OSS's attention sinks: one learned logit per query head
register_channel_rule("transformers.models.gpt_oss.modeling_gpt_oss.GptOssAttention", HeadParametersRule(
    (ParamSlice("sinks", 0),)))
# transformers 5 keeps Swin's relative-position bias table in a child of the attention module
register_channel_rule("transformers.models.swin.modeling_swin.SwinAttention", HeadParametersRule(
    (ParamSlice("relative_position_bias.relative_position_bias_table", 1),)))
