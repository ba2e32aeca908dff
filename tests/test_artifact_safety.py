"""Loading a forged `.slim` (valid checksum, hostile contents) only ever raises ArtifactError.

Each test encodes one hole an audit found; the fuzz test at the end forges at random, in a
subprocess under a memory limit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from forgery import (
    dense_artifact,
    encoded_artifact,
    external_tensor,
    onnx_program,
    program_artifact,
    read_layout,
    replace_layout,
    rewrite,
    zstd_bomb,
)
from torchslim import artifact
from torchslim.errors import ArtifactError
from torchslim.inspect import inspect_artifact

onnx = pytest.importorskip("onnx")
SECRET = b"top secret bytes"


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding a file a forged program would like to read."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_program_that_loads_and_runs(tmp_path: Path) -> None:
    path = program_artifact(tmp_path / "ok.slim", onnx_program(), coding="zstd")
    model = artifact.load(path)
    assert torch.equal(model(torch.zeros(2, 4)), torch.ones(2, 4))
    assert inspect_artifact(path)["version"] == 2


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_external_data_is_refused_before_onnxruntime_reads_it(secret_cwd: Path, where: str) -> None:
    from onnx import TensorProto, helper

    leak = external_tensor("leak", "secret.bin")
    if where == "initializer":
        program = onnx_program(initializers=(leak,),
                               nodes=(helper.make_node("Identity", ["leak"], ["stolen"]),),
                               outputs=("stolen",))
    elif where == "constant":
        program = onnx_program(nodes=(helper.make_node("Constant", [], ["stolen"], value=leak),),
                               outputs=("stolen",))
    else:  # hidden in the branch of an If
        branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=leak)], "then", [],
                                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        program = onnx_program(initializers=(cond,), outputs=("stolen",), nodes=(
            helper.make_node("If", ["cond"], ["stolen"], then_branch=branch, else_branch=branch),))
    path = program_artifact(secret_cwd / "forged.slim", program)
    with pytest.raises(ArtifactError, match=r"external data at 'secret\.bin'"):
        artifact.load(path)
    with pytest.raises(ArtifactError, match="external data"):
        inspect_artifact(path)


@pytest.mark.parametrize(("program", "problem"), [
    (onnx_program(output="logits"), "gives \\['logits'\\]"),
    (onnx_program(nodes=(onnx.helper.make_node("Exec", ["input"], ["x"], domain="evil.ops"),)),
     "domain 'evil.ops'"),
    (onnx_program(nodes=(onnx.helper.make_node("NotAnOp", ["input"], ["x"]),)), "not an ONNX operator"),
    (onnx_program(outputs=("big",), initializers=(
        onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [1 << 20, 1 << 20]),),
        nodes=(onnx.helper.make_node("ConstantOfShape", ["shape"], ["big"]),)), "ConstantOfShape"),
])
def test_programs_not_shaped_like_ours_are_refused_at_load(tmp_path: Path, program: bytes,
                                                           problem: str) -> None:
    with pytest.raises(ArtifactError, match=problem):
        artifact.load(program_artifact(tmp_path / "forged.slim", program))


def test_a_zstd_bomb_program_is_refused_within_its_bound(tmp_path: Path) -> None:
    bomb = zstd_bomb(1 << 30)  # 1 GiB of zeros in ~40 KB, content size declared
    path = program_artifact(tmp_path / "bomb.slim", onnx_program())
    rewrite(path, lambda t, d: (t.update(onnx=torch.frombuffer(bytearray(bomb), dtype=torch.uint8)),
                                d["runtime"].update(program_coding="zstd")))
    with pytest.raises(ArtifactError, match="decompresses to more than"):
        artifact.load(path)


def test_a_zstd_bomb_layout_is_refused(tmp_path: Path) -> None:
    path = encoded_artifact(tmp_path / "m.slim")
    rewrite(path, lambda t, d: replace_layout(t, d, None, packed=zstd_bomb(1 << 28)))
    with pytest.raises(ArtifactError, match="decompresses to more than"):
        artifact.load(path)


def test_encoded_sizes_are_checked_against_the_architecture_before_decoding(tmp_path: Path) -> None:
    path = encoded_artifact(tmp_path / "m.slim")

    def grow(tensors: dict, document: dict) -> None:
        layout = read_layout(tensors, document)
        layout["fc1.weight"]["meta"]["shape"] = [46340, 46340]  # 2^31 elements: 8 GiB if trusted
        replace_layout(tensors, document, layout)

    rewrite(path, grow)
    with pytest.raises(ArtifactError, match=r"shape mismatch.*fc1.weight"):
        artifact.load(path)


def test_a_spec_and_layout_forged_together_stay_within_the_file_s_element_budget(tmp_path: Path) -> None:
    path = encoded_artifact(tmp_path / "m.slim")

    def grow(tensors: dict, document: dict) -> None:
        document["model"]["input_shape"] = [1, 512, 512]  # fc1 becomes 300 x 262,144
        layout = read_layout(tensors, document)
        layout["fc1.weight"]["meta"]["shape"] = [300, 262144]
        replace_layout(tensors, document, layout)

    rewrite(path, grow)
    with pytest.raises(ArtifactError, match="more than a file of"):
        artifact.load(path)


@pytest.mark.parametrize(("edit", "problem"), [
    ({"num_classes": 5e6}, "num_classes"),
    ({"num_classes": 10**12}, "num_classes"),
    ({"num_classes": -5}, "num_classes"),
    ({"input_shape": [1, 65536, 65536]}, "does not fit"),
    ({"input_shape": [1, 8, 9]}, "does not fit"),
    ({"name": ["lenet300"]}, "'name'"),
])
def test_model_specs_are_bounded_before_anything_is_built(tmp_path: Path, edit: dict,
                                                          problem: str) -> None:
    path = rewrite(dense_artifact(tmp_path / "m.slim"), lambda t, d: d["model"].update(edit))
    with pytest.raises(ArtifactError, match=problem):
        artifact.load(path)


def test_malformed_documents_are_artifact_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from torchslim.safefile import _checksum

    nested: object = []
    for _ in range(100):
        nested = [nested]
    for name, text in (("list", "[1, 2]"), ("deep", "[" * 100_000 + "]" * 100_000),
                       ("nested", json.dumps({"format": "torchslim.artifact", "x": nested}))):
        tensors = {"x": torch.zeros(1)}
        save_file(tensors, str(tmp_path / name), metadata={"torchslim": text,
                                                            "sha256": _checksum(text, tensors)})
        with pytest.raises(ArtifactError):
            artifact.load(tmp_path / name)


@pytest.mark.parametrize("forgery", ["int64", "nan"])
def test_tensors_of_the_wrong_dtype_or_with_nan_are_refused(tmp_path: Path, forgery: str) -> None:
    def edit(tensors: dict, document: dict) -> None:
        weight = tensors["fc1.weight"]
        tensors["fc1.weight"] = (weight.long() if forgery == "int64"
                                 else torch.full_like(weight, float("nan")))

    path = rewrite(dense_artifact(tmp_path / "m.slim"), edit)
    with pytest.raises(ArtifactError, match="dtype mismatch" if forgery == "int64" else "NaN"):
        artifact.load(path)


def test_a_forged_file_fails_inspect_with_one_clean_error(tmp_path: Path, capsys) -> None:
    from torchslim.cli import main

    path = encoded_artifact(tmp_path / "m.slim")
    rewrite(path, lambda t, d: replace_layout(t, d, {"fc1.weight": {"meta": {"shape": "x"}, "streams": {}}}))
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err.startswith("torchslim: error:")


def test_fuzzed_forgeries_only_raise_artifact_error_within_memory_and_time(tmp_path: Path) -> None:
    """Hypothesis forges files with valid checksums (see fuzz_artifacts.py) in a subprocess whose
    address space is capped 1.5 GiB above what torch and onnxruntime need."""
    script = Path(__file__).parent / "fuzz_artifacts.py"
    paths = [str(script.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["examples"] >= 300 and summary["refused"] > summary["examples"] // 2, summary
    assert summary["max_seconds"] < 10, summary


@pytest.mark.parametrize("dtype", [["int8"], {"a": 1}, 7, "int64", "complex64"])
def test_a_coded_tensor_declaring_a_dtype_that_codes_cannot_have_is_refused(tmp_path: Path,
                                                                             dtype: Any) -> None:
    path = encoded_artifact(tmp_path / "m.slim")

    def forge(tensors: dict, document: dict) -> None:
        layout = read_layout(tensors, document)
        layout["fc1.weight"]["dtype"] = dtype
        replace_layout(tensors, document, layout)

    rewrite(path, forge)
    with pytest.raises(ArtifactError, match="declares coded dtype"):
        artifact.load(path)
