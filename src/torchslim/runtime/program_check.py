"""Validate an untrusted ONNX program before onnxruntime sees it.

An int8 artifact carries an ONNX program, and an ONNX program can point outside itself: a
tensor may declare *external data* (`location: etc/passwd`), which onnxruntime resolves against
the working directory and reads. A program can also ask for a giant tensor (`ConstantOfShape`
of 10^12 elements) or name inputs and outputs that `OrtModule` never feeds. `check_program`
refuses all of that statically, before any session exists, so loading a forged file can only
ever end in an `ArtifactError`.

What a program may hold: operators of the standard ONNX domains plus the fused `com.microsoft`
kernels onnxruntime's own quantizer and transformer optimizer emit; tensors with their data
inline; one graph input `input` and an output `output`; no inferred tensor above
`MAX_TENSOR_ELEMENTS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torchslim.errors import ArtifactError

__all__ = ["MAX_TENSOR_ELEMENTS", "MICROSOFT_OPS", "check_program"]

MAX_TENSOR_ELEMENTS = 1 << 28  # 1 GiB of float32 in one tensor: far above any model we convert
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MICROSOFT_DOMAIN = "com.microsoft"
# Fused kernels that onnxruntime's quantizer and transformer optimizer write into our programs.
MICROSOFT_OPS = frozenset({
    "Attention", "BiasGelu", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "EmbedLayerNormalization",
    "FastGelu", "FusedConv", "FusedGemm", "FusedMatMul", "Gelu", "LayerNormalization",
    "MatMulIntegerToFloat", "QAttention", "QGemm", "QLinearAdd", "QLinearAveragePool",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearMul", "QLinearSigmoid",
    "QEmbedLayerNormalization", "QuickGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization", "DequantizeLinear", "QuantizeLinear", "NhwcConv",
})
# Ops whose output size is read from the *values* of an input (not only from shapes).
_SIZE_FROM_VALUES = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1, "Resize": 3, "OneHot": 1}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _fail(problem: str) -> ArtifactError:
    return ArtifactError(f"the int8 program is refused: {problem}; the file is forged or corrupt "
                         "(torchslim never writes such a program), re-create it")


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        for node in current.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto a graph holds: initializers, sparse ones, and node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices


def _check_tensor(tensor: Any) -> None:
    if tensor.data_location == _EXTERNAL or len(tensor.external_data):
        where = {entry.key: entry.value for entry in tensor.external_data}.get("location", "?")
        raise _fail(f"tensor {tensor.name!r} points to external data at {where!r} (a file outside "
                    "the artifact)")
    count = math.prod(tensor.dims) if tensor.dims else 1
    if any(d < 0 for d in tensor.dims) or count > MAX_TENSOR_ELEMENTS:
        raise _fail(f"tensor {tensor.name!r} declares shape {list(tensor.dims)}")


def _check_op(node: Any, onnx: Any) -> None:
    domain = node.domain
    if domain in STANDARD_DOMAINS:
        if not onnx.defs.has(node.op_type, domain if domain != "ai.onnx" else ""):
            raise _fail(f"operator {node.op_type!r} is not an ONNX operator")
    elif domain == MICROSOFT_DOMAIN:
        if node.op_type not in MICROSOFT_OPS:
            raise _fail(f"operator {domain}.{node.op_type} is not one torchslim emits "
                        f"(allowed: {', '.join(sorted(MICROSOFT_OPS))})")
    else:
        raise _fail(f"operator {node.op_type!r} comes from domain {domain!r}; only the standard "
                    f"ONNX domain and {MICROSOFT_DOMAIN} are allowed")


def _constant_values(graph: Any) -> dict[str, Any]:
    """Values of the graph's inline constants (initializers and Constant nodes) by name."""
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    values[node.output[0]] = attribute.t
    return {name: tensor for name, tensor in values.items()
            if (math.prod(tensor.dims) if tensor.dims else 1) <= 64}


def _check_sizes(model: Any, onnx: Any) -> None:
    """No constant size argument, and no inferred tensor shape, above the element bound."""
    from onnx import numpy_helper

    graph = model.graph
    constants = _constant_values(graph)
    for node in graph.node:
        position = _SIZE_FROM_VALUES.get(node.op_type)
        if position is None or len(node.input) <= position or node.input[position] not in constants:
            continue
        values = numpy_helper.to_array(constants[node.input[position]]).reshape(-1)
        if not values.size:
            continue
        if values.dtype.kind in "iu" and int(abs(values.astype(float)).prod()) > MAX_TENSOR_ELEMENTS:
            raise _fail(f"{node.op_type} node {node.name!r} asks for shape {values.tolist()[:8]}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is advisory: unknown contrib ops, partial shapes
        return
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        known = [d.dim_value for d in dims if d.HasField("dim_value")]
        if known and math.prod(known) > MAX_TENSOR_ELEMENTS:
            raise _fail(f"tensor {value.name!r} would have shape {known[:8]}")


def check_program(program: bytes) -> None:
    """Refuse an ONNX program that reads files, uses unknown operators, or is not shaped like
    the programs torchslim writes (one input `input`, an output `output`).

    Raises:
        ArtifactError: naming the offending tensor, operator or signature.
    """
    import onnx

    try:
        model = onnx.load_model_from_string(program)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise _fail(f"it is not a valid ONNX protobuf ({str(exc)[:120]})") from None
    # Opset imports only declare versions (the quantizer lists many); the nodes are what run.
    if len(model.functions):
        raise _fail("it defines model-local functions")
    for graph in _graphs(model.graph):
        for tensor in _tensors(graph):
            _check_tensor(tensor)
        for node in graph.node:
            _check_op(node, onnx)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    outputs = [value.name for value in model.graph.output]
    if inputs != ["input"] or "output" not in outputs:
        raise _fail(f"its graph takes {inputs} and gives {outputs}; a torchslim program takes "
                    "['input'] and gives 'output'")
    _check_sizes(model, onnx)
