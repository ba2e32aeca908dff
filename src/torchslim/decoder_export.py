"""A causal language model's whole decoding step as one onnxruntime program (onnxruntime-genai).

Why: decoding from torch pays for thousands of small ops around the matmuls on every token.
On a 2-core AVX2 CPU, SmolLM2-135M with int4 layers spent 23 ms of its 53 ms a token in the
int4 kernel and 30 ms in torch and `transformers` around it, so no kernel could make it 2x
faster than fp32. Exported whole, with the key/value cache inside the program and run by
onnxruntime-genai's C++ generation loop, the same CPU decodes fp32 at twice torch's speed and
int4 at more than twice that (`bench/llm_decode.py`).

How: onnxruntime-genai's model builder (a maintained converter for Llama, Mistral, Qwen, Phi,
Gemma and more) writes the float decoder with its fused attention, cache and norm ops from a
`save_pretrained` folder of the model's float weights (coded layers written as the weights their
codes stand for). Then every `MatMul` whose weights are exactly those of layers holding 4- or
8-bit codes becomes a `MatMulNBits` node reading those very codes: the same codes and kernel as
`Int4Linear`, so GPTQ's or AWQ's choices survive, not a re-quantization. Layers are found by
their weight values, not their names, so this holds whatever the builder calls them and
whichever layers it stacks into one matmul (q/k/v). A matmul left in float is named with the
reason. The folder is checked before it is kept: the program's logits on the example tokens
must match the module's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError, UnsupportedModuleError
from torchslim.progress import ProgressLines

__all__ = ["DecoderProgram", "export_decoder", "genai_config", "is_genai_folder"]

# The builder's float program must give the float model's logits (1e-4 of their scale). With
# codes on MatMulNBits, the kernel quantizes its activations to int8 per block, so float
# differences of 1e-6 in what feeds it (norms, attention computed by other code) move some
# activations to the next int8 step: measured on SmolLM2-135M int4, the program and the torch
# model on the same kernel differed by up to 0.036 of the logits' scale (0.005 on average), as
# much as the torch model differs from its own float weights; so the coded check is looser.
FLOAT_TOLERANCE = 1e-4
CODED_TOLERANCE = 0.1  # largest difference, relative to the logits' scale
CODED_MEAN_TOLERANCE = 0.02  # mean difference, relative to the logits' scale
PROGRAM = "model.onnx"
GENAI_CONFIG = "genai_config.json"


def is_genai_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `export --format genai`."""
    return (Path(path) / GENAI_CONFIG).is_file()


def genai_config(folder: str | Path) -> dict[str, Any]:
    """The `model` section of an exported folder's onnxruntime-genai config."""
    import json

    return dict(json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"])


def _require_builder() -> None:
    try:
        import onnx_ir  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"export --format genai needs onnxruntime-genai and onnx-ir ({exc}); "
                          "install them with: pip install 'torchslim[llm]'") from None


def _coded_layers(model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    """{name: Int4Linear} of every layer whose codes the kernel can run (and {name:
    GroupedWeightEmbedding} of every coded table the lookup op can read), and {name: reason} of
    coded layers it cannot (left in float)."""
    from torchslim.quantization.int4_kernel import int4_layer
    from torchslim.quantization.weight_only import GroupedWeightEmbedding, GroupedWeightLinear
    from torchslim.runtime.int4_linear import Int4Linear

    coded: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            coded[name] = module
        elif isinstance(module, GroupedWeightLinear | GroupedWeightEmbedding):
            size = module.group_size
            if size < 16 or size & (size - 1):
                skipped[name] = f"written in float: group size {size} is not a power of two >= 16"
            else:
                coded[name] = int4_layer(module) if isinstance(module, GroupedWeightLinear) else module
    return coded, skipped


def _build_float_program(model: nn.Module, tokenizer: Any, work: Path) -> Path:
    """The builder's fp32 program of `model` (coded layers dequantized) in `work/fp32`, beside
    the float model it was built from (`work/hf`)."""
    from torchslim.huggingface import save_hf_folder

    source = work / "hf"
    save_hf_folder(model, source, dequantize=True)
    tokenizer.save_pretrained(str(source))
    out = work / "fp32"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (out / PROGRAM).exists():
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise UnsupportedModuleError(
            f"onnxruntime-genai's builder cannot convert {type(model).__name__} "
            f"({' / '.join(lines[-2:])[:400]}); it converts the decoder architectures it lists "
            "(Llama, Mistral, Qwen, Phi, Gemma, ...): use --format onnx or hf for others")
    return out


def _row_index(coded: dict[str, Any]) -> tuple[dict[bytes, list[str]], dict[str, Any]]:
    """Each coded layer's float weight (out, in) as numpy, and an index from its first row's
    bytes to the layers starting with that row."""
    weights = {name: layer.dequantized_weight().numpy() for name, layer in coded.items()
               if hasattr(layer, "dequantized_weight")}
    index: dict[bytes, list[str]] = {}
    for name, weight in weights.items():
        index.setdefault(weight[0].tobytes(), []).append(name)
    return index, weights


def _split(rows: Any, index: dict[bytes, list[str]], weights: dict[str, Any]) -> list[str] | None:
    """The coded layers whose weights, stacked in order, are exactly `rows` (N, K); None if the
    rows are not all some coded layers' weights."""
    import numpy as np

    names: list[str] = []
    offset = 0
    while offset < rows.shape[0]:
        match = next((name for name in index.get(rows[offset].tobytes(), [])
                      if weights[name].shape[1] == rows.shape[1]
                      and offset + weights[name].shape[0] <= rows.shape[0]
                      and np.array_equal(rows[offset:offset + weights[name].shape[0]], weights[name])), None)
        if match is None:
            return None
        names.append(match)
        offset += weights[match].shape[0]
    return names


def _coded_table(node: Any, initializers: dict[str, Any], coded: dict[str, Any]) -> str | None:
    """The coded table a Gather node looks up, found by its float values; None if none."""
    from onnx import numpy_helper

    from torchslim.quantization.weight_only import GroupedWeightEmbedding

    table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
    if table is None or len(table.dims) != 2 or any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return None
    for name, module in coded.items():
        if isinstance(module, GroupedWeightEmbedding) and tuple(module.codes.shape) == tuple(table.dims):
            values = module.dequantize(module.codes, module.scales, module.zeros).detach().numpy()
            if (values == numpy_helper.to_array(table)).all():
                return name
    return None


def _gather_node(node: Any, table: Any) -> tuple[Any, list[Any]]:
    """A `GatherBlockQuantized` node looking up `table`'s codes where `node` looked up floats."""
    from onnx import TensorProto, helper

    from torchslim.quantization.int4_kernel import kernel_codes

    bits, packed, zero_points = kernel_codes(table)
    rows = table.codes.shape[0]
    data = packed.reshape(rows, -1)
    name = node.name or "gather_block_quantized"
    d, s, z = f"{name}.qdata", f"{name}.scales", f"{name}.qzeros"
    new = helper.make_node("GatherBlockQuantized", [d, node.input[1], s, z], list(node.output), name=name,
                           domain="com.microsoft", gather_axis=0, quantize_axis=1,
                           block_size=table.group_size, bits=bits)
    scales = table.scales.detach().float()
    tensors = [
        helper.make_tensor(d, TensorProto.UINT8, list(data.shape), data.numpy().tobytes(), raw=True),
        helper.make_tensor(s, TensorProto.FLOAT, list(scales.shape), scales.numpy().tobytes(), raw=True),
        helper.make_tensor(z, TensorProto.UINT8, list(zero_points.shape), zero_points.numpy().tobytes(),
                           raw=True)]
    return new, tensors


def _substitute_(program: Any, coded: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Replace in place every MatMul whose weight is stacked coded layers by a MatMulNBits node
    on their codes, and every Gather of a coded table by a GatherBlockQuantized node on its
    codes. Returns {node: layers or table} replaced and {node: reason} left in float."""
    from onnx import numpy_helper

    from torchslim.runtime.int4_linear import matmul_nbits_node

    index, weights = _row_index(coded)
    graph = program.graph
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    replaced: dict[str, list[str]] = {}
    left: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        table = _coded_table(node, initializers, coded)
        if table is not None:
            new, tensors = _gather_node(node, coded[table])
            nodes.append(new)
            graph.initializer.extend(tensors)
            weight = initializers[node.input[0]]
            uses[weight.name] -= 1
            if uses[weight.name] == 0:
                graph.initializer.remove(weight)
            replaced[node.name] = [table]
            continue
        is_matmul = node.op_type == "MatMul" and len(node.input) == 2
        weight = initializers.get(node.input[1]) if is_matmul else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        rows = numpy_helper.to_array(weight).T  # the builder stores (in, out)
        names = _split(rows, index, weights)
        layers = [coded[n] for n in names or []]
        if not names:
            left[node.name] = "its weights are no coded layer's (a float layer)"
        elif len({(layer.bits, layer.block_size) for layer in layers}) > 1:
            left[node.name] = f"stacks layers of different bit widths or blocks ({', '.join(names)})"
        if node.name in left:
            nodes.append(node)
            continue
        first = layers[0]
        new, tensors = matmul_nbits_node(
            node.input[0], node.output[0], name=node.name or f"matmul_nbits_{len(replaced)}",
            in_features=first.in_features, out_features=rows.shape[0], bits=first.bits,
            block_size=first.block_size, packed=torch.cat([layer.packed for layer in layers]),
            scales=torch.cat([layer.scales for layer in layers]),
            zero_points=torch.cat([layer.zero_points for layer in layers]))
        nodes.append(new)
        graph.initializer.extend(tensors)
        uses[weight.name] -= 1
        if uses[weight.name] == 0:  # a tied embedding's Gather may still read it
            graph.initializer.remove(weight)
        replaced[node.name] = names or []
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in program.opset_import):
        from onnx import helper

        program.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced, left


class DecoderProgram(nn.Module):
    """An exported decoder (`export --format genai` folder) run by a plain onnxruntime session on
    whole sequences from an empty key/value cache: `input_ids` (B, T) -> logits (B, T, vocab).
    What the export checks and what perplexity scores; decoding token by token is
    onnxruntime-genai's job (`genai_decode_speed`)."""

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime as ort

        super().__init__()
        self.decoder = genai_config(folder)["decoder"]
        self.session = ort.InferenceSession(str(Path(folder) / self.decoder["filename"]),
                                            providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        import numpy as np

        ids = input_ids.numpy().astype(np.int64)
        batch, length = ids.shape
        feeds: dict[str, Any] = {}
        for item in self.session.get_inputs():
            if item.name == "input_ids":
                feeds[item.name] = ids
            elif item.name == "attention_mask":
                feeds[item.name] = np.ones((batch, length), dtype=np.int64)
            elif item.name == "position_ids":
                feeds[item.name] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
            elif item.name.startswith("past_key_values"):
                feeds[item.name] = np.zeros((batch, self.decoder["num_key_value_heads"], 0,
                                             self.decoder["head_size"]), dtype=np.float32)
            else:
                raise UnsupportedModuleError(f"the exported decoder has an input {item.name!r} that "
                                             "torchslim does not know how to feed")
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits)


def _float_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the float `save_pretrained` folder the builder read."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _relative(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(largest, mean) absolute difference relative to the expected logits' scale (>= 1)."""
    if got.shape != expected.shape:
        return float("inf"), float("inf")
    scale = max(1.0, float(expected.abs().max()))
    difference = (expected - got).abs()
    return float(difference.max()) / scale, float(difference.mean()) / scale


def _bytes_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def export_decoder(model: nn.Module, path: str | Path, *, tokenizer: Any,
                   example_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Write a causal LM as an onnxruntime-genai folder (`model.onnx`, its weights,
    `genai_config.json`, the tokenizer): the whole decoding step, key/value cache included, with
    coded layers on `MatMulNBits`. Load it with `onnxruntime_genai.Model(path)`.

    Args:
        tokenizer: the model's tokenizer (anything with `save_pretrained`) or a folder holding one.
        example_ids: token ids (1, T) the check runs (default: 8 fixed ids).

    Returns:
        format, path, bytes, the largest and mean logit differences from the module (relative to the
        logits' scale), the builder's float program's difference from the float model,
        `int4_nodes` {node: layers},
        `float_matmuls` {node: reason} and `skipped` {layer: reason} (coded layers written in float).

    Raises:
        ConfigError: not a causal LM, no tokenizer, the builder not installed, `path` exists, or a
            program whose logits differ from the module's (nothing is written then).
        UnsupportedModuleError: an architecture the builder does not convert.
    """
    import onnx

    from torchslim.huggingface import is_hf_model

    path = Path(path)
    if not (is_hf_model(model) and type(model).__name__.endswith("ForCausalLM")):
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face causal language model; "
                          "--format genai exports decoders (...ForCausalLM)")
    if tokenizer is None:
        raise ConfigError("--format genai writes the tokenizer beside the program and none is known for "
                          "this model: pass --tokenizer FOLDER (a save_pretrained tokenizer folder)")
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if path.exists():
        raise ConfigError(f"{path} exists; export --format genai writes a new folder: pick another --out "
                          "or remove it")
    _require_builder()
    coded, skipped = _coded_layers(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2))
    ids = example_ids if example_ids is not None else \
        torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    progress = ProgressLines("genai export step", 4)  # about a minute for a 135M-parameter model
    try:
        with tempfile.TemporaryDirectory() as work:
            built = _build_float_program(model, tokenizer, Path(work))
            progress.update(1, "float program built by onnxruntime-genai's builder")
            reference = _float_logits(Path(work) / "hf", ids)
            builder_difference, _ = _relative(reference, DecoderProgram(built)(ids))
            if builder_difference > FLOAT_TOLERANCE:
                raise UnsupportedModuleError(
                    f"onnxruntime-genai's builder wrote a program that computes something else than "
                    f"{type(model).__name__} in float (largest relative logit difference "
                    f"{builder_difference:.3g}); nothing was written. Known cause: a layer whose output "
                    "width equals the vocabulary size is taken for the output head by the builder")
            progress.update(2, f"float program checked ({builder_difference:.2g})")
            program = onnx.load(str(built / PROGRAM))
            replaced, left = _substitute_(program, coded) if coded else ({}, {})
            found = {name for names in replaced.values() for name in names}
            skipped.update({name: "written in float: no matmul or lookup of the builder's program reads "
                                  "exactly these weights" for name in coded if name not in found})
            onnx.save_model(program, str(staging / PROGRAM), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{PROGRAM}.data", size_threshold=1024)
            del program
            for item in built.iterdir():
                if item.name not in (PROGRAM, f"{PROGRAM}.data"):
                    shutil.copy2(item, staging / item.name)
        progress.update(3, f"{len(replaced)} nodes on codes, {len(left)} matmuls float")
        with torch.no_grad():
            expected = model.eval()(input_ids=ids).logits.float()
        difference, mean = _relative(expected, DecoderProgram(staging)(ids))
        limits = (CODED_TOLERANCE, CODED_MEAN_TOLERANCE) if replaced else (FLOAT_TOLERANCE, FLOAT_TOLERANCE)
        if difference > limits[0] or mean > limits[1]:
            raise ConfigError(f"the genai export computes something else than the module (relative logit "
                              f"difference: largest {difference:.3g}, mean {mean:.3g}; limits {limits[0]:g}, "
                              f"{limits[1]:g}); nothing was written")
        staging.rename(path)
        progress.update(4, f"checked against the module ({difference:.2g}) and written")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"format": "genai", "path": str(path), "bytes": _bytes_of(path),
            "max_relative_difference": difference, "mean_relative_difference": mean,
            "builder_difference": builder_difference, "int4_nodes": replaced, "float_matmuls": left,
            "skipped": skipped}
