"""The arrows of the house run one way: storage, runtime and training never import the model
zoo or the jobs built on top of them, and `run_stage` has no ladder over stage kinds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torchslim

SRC = Path(torchslim.__file__).parent
BELOW_THE_ZOO = ["artifact.py", "artifact_checks.py", "safefile.py", "signature.py", "structure.py",
                 "inspect.py", "encoding", "runtime", "training"]
ZOO_AND_JOBS = ("torchslim.models", "torchslim.data", "torchslim.apps", "torchslim.cli")
TECHNIQUES = ["api.py", "changes.py", "registry.py", "select.py", "calibration.py", "pruning", "quantization",
              "lowrank", "clustering.py", "depth.py", "distillation.py", "batchnorm.py", "graph"]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _files(entry: str) -> list[Path]:
    path = SRC / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", BELOW_THE_ZOO)
def test_storage_runtime_and_training_do_not_import_the_zoo_or_the_jobs(entry: str) -> None:
    for path in _files(entry):
        # docstring examples may build a reference model; the code may not
        bad = sorted(m for m in _imports(path) if m.startswith(ZOO_AND_JOBS))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


@pytest.mark.parametrize("entry", TECHNIQUES)
def test_techniques_do_not_import_the_jobs_built_on_them(entry: str) -> None:
    for path in _files(entry):
        bad = sorted(m for m in _imports(path) if m.startswith(("torchslim.apps", "torchslim.cli")))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_the_recipe_runner_dispatches_through_the_registry() -> None:
    from torchslim.apps.compress import CompressionRun
    from torchslim.registry import stage_kinds, stage_type

    source = ast.unparse(ast.parse(Path(SRC / "apps" / "compress.py").read_text()))
    run_stage = next(n for n in ast.walk(ast.parse(source))
                     if isinstance(n, ast.FunctionDef) and n.name == "run_stage")
    assert not [n for n in ast.walk(run_stage) if isinstance(n, ast.If)]
    assert hasattr(CompressionRun, "run_stage")
    # every technique apply_ knows is a stage, and every stage kind resolves to a config
    from torchslim.registry import technique_kinds

    assert set(technique_kinds()) <= set(stage_kinds())
    assert all(stage_type(kind).config.kind == kind for kind in stage_kinds())


def test_the_public_surface_registers_every_technique_edit_and_rule() -> None:
    """A fresh process that only calls `load_public_surface()` (what `ts.load` does) knows every
    structural edit, technique and channel rule that any torchslim module registers: an artifact
    holding int4 codes must load without the caller importing `torchslim.quantization` first."""
    import subprocess
    import sys

    script = """
import importlib, json, pkgutil
import torchslim
from torchslim import registry, structure
from torchslim.graph import rules

def snapshot():
    return [sorted(structure._REPLAYS), sorted(registry._KINDS), len(rules._RULES)]

torchslim.load_public_surface()
public = snapshot()
for found in pkgutil.walk_packages(torchslim.__path__, "torchslim."):
    if not found.name.startswith(("torchslim.apps", "torchslim.cli", "torchslim.__main__")):
        importlib.import_module(found.name)
print(json.dumps([public, snapshot()]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    public, everything = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert "weight_only" in everything[0] and "gptq" in everything[1]
    assert public == everything
