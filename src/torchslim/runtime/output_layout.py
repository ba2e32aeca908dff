"""The shape of a model's output (a tensor, or tuples, lists and dicts of tensors) as JSON.

An ONNX program has a flat list of outputs. A user's model may return `(mask, logits)` or
`{"boxes": ..., "scores": ...}`: the program converted from it must hand back the same
structure, not just its first tensor. The layout is written into the program's metadata (JSON,
no code) and rebuilt around the outputs the program computes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["describe", "leaves", "rebuild"]

MAX_DEPTH = 32  # a layout read from a file nests no deeper (a forged one cannot recurse forever)


def describe(value: Any) -> Any:
    """The JSON layout of `value`, or None when it holds something other than tensors,
    tuples, lists and dicts with string keys."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, tuple | list):
        children = [describe(v) for v in value]
        return None if any(c is None for c in children) else {type(value).__name__: children}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items = [[k, describe(v)] for k, v in value.items()]
        return None if any(c is None for _, c in items) else {"dict": items}
    return None


def leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of `value` in the order the ONNX exporter lists them (depth first)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in leaves(v)]
    return [t for v in value for t in leaves(v)]


def count(layout: Any, depth: int = 0) -> int:
    """How many tensors a layout holds; ValueError for anything that is not a layout."""
    if depth > MAX_DEPTH:
        raise ValueError("output layout nests too deep")
    if layout == "tensor":
        return 1
    if isinstance(layout, dict) and len(layout) == 1:
        kind, children = next(iter(layout.items()))
        if kind in ("tuple", "list") and isinstance(children, list):
            return sum(count(c, depth + 1) for c in children)
        if kind == "dict" and isinstance(children, list) and all(
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) for item in children):
            return sum(count(c, depth + 1) for _, c in children)
    raise ValueError(f"not an output layout: {str(layout)[:80]}")


def rebuild(layout: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure `layout` describes, filled with `tensors` in order."""
    flow: Iterator[torch.Tensor] = iter(tensors)

    def build(node: Any) -> Any:
        if node == "tensor":
            return next(flow)
        kind, children = next(iter(node.items()))
        if kind == "dict":
            return {k: build(c) for k, c in children}
        built = [build(c) for c in children]
        return tuple(built) if kind == "tuple" else built

    return build(layout)


def dumps(layout: Any) -> str:
    return json.dumps(layout, separators=(",", ":"))


def loads(text: str) -> Any:
    """A layout read from a program's metadata, checked (ValueError if it is not one)."""
    layout = json.loads(text)
    count(layout)
    return layout
