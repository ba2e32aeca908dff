"""Fuzz `artifact.load` and `inspect_artifact` with forged files that carry a valid checksum.

Run by tests/test_artifact_safety.py as `python fuzz_artifacts.py WORKDIR` in its own process:
after warming up, the address space is capped (RLIMIT_AS) 1.5 GiB above what torch and
onnxruntime need, so a forged size that gets allocated fails the run instead of the machine.
Hypothesis edits the JSON document and the tensor layout at random places (random JSON, huge and
negative sizes, deep nesting), swaps in zstd frames that declare huge contents, and ONNX programs
that read a secret file through external data or use odd operators. Every outcome must be a
model or an `ArtifactError`; prints one JSON summary line.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HEADROOM = 3 << 29  # 1.5 GiB


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the root excluded)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def main(workdir: Path) -> None:
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from onnx import TensorProto, helper

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

    secret = b"the fuzzer must never see this"
    (workdir / "secret.bin").write_bytes(secret)
    bases = {"dense": dense_artifact(workdir / "dense.slim"),
             "encoded": encoded_artifact(workdir / "encoded.slim"),
             "program": program_artifact(workdir / "program.slim", onnx_program()),
             "zstd-program": program_artifact(workdir / "zprogram.slim", onnx_program(), coding="zstd")}
    for path in bases.values():  # warm up: every library loaded before the cap
        artifact.load(path)
        inspect_artifact(path)
    bomb = zstd_bomb(1 << 31)  # 2 GiB declared, beyond the cap
    limit = _vm_bytes() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63) | st.floats() | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=12)
    sizes = st.sampled_from([0, -1, -5, 1, 3, 2 ** 31, 2 ** 40, 10 ** 12, 5e6, 46341])
    shapes = st.lists(sizes, min_size=0, max_size=4)
    odd_ops = st.sampled_from([("Exec", "evil"), ("NotAnOp", ""), ("Attention", "com.microsoft"),
                               ("Loop", ""), ("ConstantOfShape", "")])
    stats = {"examples": 0, "refused": 0, "loaded": 0, "max_seconds": 0.0}

    def forge_program(data: Any, path: Path) -> bool:
        """A program artifact with external data or odd ops; True if it must be refused."""
        kind = data.draw(st.sampled_from(["external", "op", "shape", "bomb"]))
        if kind == "external":
            location = data.draw(st.sampled_from(["secret.bin", "../secret.bin",
                                                  str(workdir / "secret.bin")]))
            leak = external_tensor("leak", location, len(secret) // 4 * 4)
            program = onnx_program(initializers=(leak,), outputs=("stolen",),
                                   nodes=(helper.make_node("Identity", ["leak"], ["stolen"]),))
        elif kind == "op":
            op, domain = data.draw(odd_ops)
            program = onnx_program(nodes=(helper.make_node(op, ["input"], ["x"], domain=domain),))
        else:
            dims = data.draw(st.lists(st.integers(1, 2 ** 40), min_size=1, max_size=3))
            shape = helper.make_tensor("shape", TensorProto.INT64, [len(dims)], dims)
            program = onnx_program(initializers=(shape,), outputs=("big",),
                                   nodes=(helper.make_node("ConstantOfShape", ["shape"], ["big"]),))
        program_artifact(path, program, coding=data.draw(st.sampled_from(["raw", "zstd"])))
        if kind == "bomb":
            rewrite(path, lambda t, d: (t.update(onnx=torch.frombuffer(bytearray(bomb), dtype=torch.uint8)),
                                        d["runtime"].update(program_coding="zstd")))
        return kind in ("external", "bomb")

    def forge_json(data: Any, path: Path, base: str) -> None:
        def edit(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
            layout = read_layout(tensors, document) if base == "encoded" else None
            target = document if layout is None or data.draw(st.booleans()) else layout
            for _ in range(data.draw(st.integers(1, 3))):
                places = _paths(target)  # afresh: an earlier edit may have removed some
                place = data.draw(st.sampled_from(places)) if places else ("extra",)
                last = place[-1]
                value = data.draw(shapes if last in ("shape", "input_shape") else
                                  sizes if last in ("num_classes", "nnz", "index_count", "codebook_size")
                                  else json_values)
                _set(target, place, value)
            if layout is not None:
                replace_layout(tensors, document, layout)

        rewrite(path, edit)

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: Any) -> None:
        base = data.draw(st.sampled_from(sorted(bases)))
        path = workdir / "forged.slim"
        shutil.copyfile(bases[base], path)
        must_refuse = False
        if base.endswith("program") and data.draw(st.booleans()):
            must_refuse = forge_program(data, path)
        else:
            forge_json(data, path, base)
        started = time.perf_counter()
        outcomes = []
        for action in (artifact.load, inspect_artifact):
            try:
                result = action(path)
                outcomes.append("ok")
                assert secret not in repr(result).encode()
            except ArtifactError:
                outcomes.append("refused")
        stats["max_seconds"] = max(stats["max_seconds"], time.perf_counter() - started)
        stats["examples"] += 1
        stats["refused" if "refused" in outcomes else "loaded"] += 1
        assert not must_refuse or outcomes == ["refused", "refused"], outcomes

    fuzz()
    print(json.dumps(stats))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
