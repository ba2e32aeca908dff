"""Every script in examples/ runs as a user runs it (`python examples/NAME.py`, in a fresh
process, from an empty folder) and produces what its docs page says: numbers and files checked
here. The examples are the code the documentation site includes, so this is the docs' test too."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HELPERS = {"own_model.py"}  # imported by the examples, not run on its own


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return float(match.group(1).replace(",", ""))


def _line(prefix: str, text: str) -> str:
    line = next((line for line in text.splitlines() if line.startswith(prefix)), None)
    assert line is not None, f"no line starting with {prefix!r} in:\n{text[-3000:]}"
    return line


def check_compress_your_own_model(out: str, folder: Path) -> None:
    comparison = ast.literal_eval(_line("{'accuracy_delta'", out))
    assert comparison["params_ratio"] > 3 and comparison["macs_ratio"] > 3
    assert comparison["accuracy_delta"] > -0.1
    assert _number(r"int8 test accuracy: ([\d.]+)", out) > 0.75
    assert (folder / "runs" / "pruned.slim").stat().st_size > 1000


def check_unstructured_pruning(out: str, folder: Path) -> None:
    assert _number(r"features\.3: (\d+)% zeros", out) >= 70
    before, after = _number(r"test accuracy ([\d.]+)%", out), _number(r"-> ([\d.]+)%", out)
    assert before > 80 and after > before - 5
    assert _number(r"\(([\d.]+)x smaller\)", out) > 2.5


def check_structured_pruning(out: str, folder: Path) -> None:
    # which groups the global ranking cuts depends on the CPU's vector width (round_to auto): 6
    # layers with 16 fp32 lanes (AVX-512), 3 (the block's inner group) with 8 (AVX2)
    assert _number(r"structured_prune: (\d+) layer\(s\) changed, 0 skipped", out) >= 3
    assert _number(r"\(([\d.]+)x fewer\)", out) >= 1.9
    assert _number(r"test accuracy [\d.]+% -> ([\d.]+)%", out) > 85


def check_distillation(out: str, folder: Path) -> None:
    teacher = _number(r"teacher: ([\d,]+) params", out)
    student = _number(r"student, distilled: ([\d,]+) params", out)
    assert student < teacher / 10
    assert _number(r"student, distilled: [\d,]+ params, test accuracy ([\d.]+)%", out) > 70


def check_low_rank(out: str, folder: Path) -> None:
    assert ast.literal_eval(_line("{'0'", out)) == {"0": 85, "2": 128, "4": 4}
    assert "params 399,370 -> 199,474" in out
    assert "changed features.3: replaced: Conv2d -> DecomposedConv" in out
    assert "reloaded outputs identical" in out
    assert _number(r"test accuracy [\d.]+% -> ([\d.]+)%", out) > 80


def check_weight_sharing(out: str, folder: Path) -> None:
    assert _number(r"features\.3 holds (\d+) distinct values", out) <= 33
    assert _number(r"\(([\d.]+)x smaller\)", out) > 5
    before, after = _number(r"test accuracy ([\d.]+)%", out), _number(r"-> ([\d.]+)%$", out.strip())
    assert after > before - 5


def check_quantization(out: str, folder: Path) -> None:
    ops = ast.literal_eval(_line("{'Conv", out).split(" int8 ops")[0])
    assert sum(ops.values()) == 3 and "float ops: []" in out  # both convs and the head run in int8
    before = _number(r"static int8: test accuracy ([\d.]+)%", out)
    assert _number(r"static int8: test accuracy [\d.]+% -> ([\d.]+)%", out) > before - 3
    assert _number(r"QAT int8: test accuracy ([\d.]+)%", out) > 80
    dense, packed = _number(r"weight-only int4: ([\d,]+) B", out), _number(r"-> ([\d,]+) B", out)
    assert dense / packed > 5


def check_layer_dropping(out: str, folder: Path) -> None:
    assert "blocks 6 -> 3" in out
    assert _number(r"test accuracy [\d.]+% -> ([\d.]+)%", out) > 85


def check_prune_huggingface_bert(out: str, folder: Path) -> None:
    assert "heads per layer: 4 -> 2" in out
    assert _number(r"params [\d,]+ -> ([\d,]+)", out) < 0.7 * _number(r"params ([\d,]+) ->", out)
    assert _number(r"test accuracy [\d.]+% -> ([\d.]+)%", out) > 90


def check_llm_one_shot(out: str, folder: Path) -> None:
    error = {name: _number(rf"{re.escape(name)}: relative logit error ([\d.]+)", out)
             for name in ("50% magnitude", "50% Wanda", "50% SparseGPT", "2:4 SparseGPT",
                          "int3 g32 round-to-nearest", "int3 g32 GPTQ")}
    assert error["50% SparseGPT"] < error["50% Wanda"] < error["50% magnitude"]
    assert error["int3 g32 GPTQ"] < 0.7 * error["int3 g32 round-to-nearest"]


def check_cli_own_model(out: str, folder: Path) -> None:
    evaluated = json.loads(_line('{"accuracy"', out))
    assert evaluated["backend"] == "onnxruntime" and evaluated["samples"] == 297
    assert evaluated["accuracy"] > 0.7 and evaluated["params"] < 3000
    bench = json.loads(_line('{"backend"', out))
    assert bench["backend"] == "onnxruntime" and bench["median_ms"] > 0
    pruned = json.loads((folder / "runs/own-pruned/report.json").read_text())
    assert pruned["comparison"]["params_ratio"] > 3


def check_recipe_own_model(out: str, folder: Path) -> None:
    report = json.loads((folder / "runs/own-recipe/report.json").read_text())
    assert [stage["name"] for stage in report["rows"]][-1] == "7. encode"
    assert report["baseline"]["bytes"] / report["final"]["bytes"] > 5
    assert report["final"]["nonzero_params"] < 0.35 * report["baseline"]["params"]
    assert report["final"]["accuracy"] > 0.7


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "compress_your_own_model": check_compress_your_own_model,
    "unstructured_pruning": check_unstructured_pruning,
    "structured_pruning": check_structured_pruning,
    "distillation": check_distillation,
    "low_rank": check_low_rank,
    "weight_sharing": check_weight_sharing,
    "quantization": check_quantization,
    "layer_dropping": check_layer_dropping,
    "prune_huggingface_bert": check_prune_huggingface_bert,
    "llm_one_shot": check_llm_one_shot,
    "cli_own_model": check_cli_own_model,
    "recipe_own_model": check_recipe_own_model,
}
NEEDS_TRANSFORMERS = {"prune_huggingface_bert", "llm_one_shot"}
SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py") if p.name not in HELPERS)


def test_every_example_is_checked_and_included_in_the_docs() -> None:
    assert sorted(CHECKS) == SCRIPTS, "add a check to CHECKS for every examples/NAME.py (and only those)"
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    missing = [name for name in SCRIPTS if f"examples/{name}.py" not in docs]
    assert not missing, f"examples not included in any docs page: {missing}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_and_produces_what_its_page_says(name: str, tmp_path: Path) -> None:
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    # One thread: the examples' models are tiny, and two threads on a busy 2-core machine are
    # several times slower than one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    CHECKS[name](result.stdout, tmp_path)


def _fenced_block(text: str, heading: str, language: str) -> list[str]:
    """The lines of the first ```language block after `heading`."""
    after = text[text.index(heading):]
    start = after.index(f"```{language}\n") + len(f"```{language}\n")
    return after[start:after.index("```", start)].splitlines()


def test_the_readme_example_is_the_tested_example() -> None:
    readme = (ROOT / "README.md").read_text()
    python = (EXAMPLES / "compress_your_own_model.py").read_text()
    shell = (EXAMPLES / "cli_own_model.py").read_text()
    for lines, source in ((_fenced_block(readme, "## Compress your own model", "python"), python),
                          (_fenced_block(readme, "## Compress your own model", "bash"), shell)):
        code = [line.split("  #")[0].rstrip() for line in lines if line.strip()]
        assert code, "the README lost its example"
        missing = [line for line in code if line not in source]
        assert not missing, f"README lines that are not in the tested example: {missing}"
