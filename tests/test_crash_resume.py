"""SIGKILL `torchslim compress` and `torchslim auto` at many points; resuming must give a
`model.slim` byte-identical to an uninterrupted run's, and leave no temporary files behind.

Each run is a real subprocess of the CLI. Kill points are files appearing or being rewritten
in the output folder (an epoch checkpoint of a training stage, a stage checkpoint, a temporary
file mid-write), so every training stage kind is killed after its first epoch checkpoint.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TRAIN = {"lr": 0.05, "batch_size": 64}
RECIPES = {
    "gradual_cluster": [
        {"gradual_prune": {"sparsity": 0.7, "every": 5, "train": {"epochs": 3, **TRAIN}}},
        {"cluster": {"bits": 4}},
        {"fine_tune": {"epochs": 2, **TRAIN}},
        {"encode": {}}],
    "structured_distill_lowbit": [
        {"structured_prune": {"ratio": 0.3}},
        {"fine_tune": {"epochs": 2, **TRAIN, "distill": {"teacher": "original"}}},
        {"lowbit": {"mode": "ternary", "epochs": 2, **TRAIN}},
        {"encode": {}}],
    "qat": [
        {"prune": {"sparsity": 0.5}},
        {"qat": {"epochs": 3, "lr": 0.01, "batch_size": 64}}],
}
# Kill points, in order, for the successive processes of one recipe (after the last: run to the
# end). A ".tmp" point (mid-write) may miss its moment and let the run finish, so it comes last.
KILLS = {
    "gradual_cluster": ["00-baseline-ckpt/last.ckpt", "01-gradual_prune-ckpt/last.ckpt",
                        "01-gradual_prune-ckpt/last.ckpt", "03-fine_tune-ckpt/last.ckpt", ".tmp"],
    "structured_distill_lowbit": ["00-baseline.slim", "02-fine_tune-ckpt/last.ckpt",
                                  "03-lowbit-ckpt/last.ckpt", ".tmp"],
    "qat": ["01-prune.slim", "02-qat-ckpt/last.ckpt", "02-qat-ckpt/last.ckpt"],
}


def _snapshot(folder: Path) -> dict[str, int]:
    found = {}
    for path in folder.rglob("*") if folder.exists() else ():
        try:
            found[str(path.relative_to(folder))] = path.stat().st_mtime_ns
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
    return found


def _run(args: list[str], out: Path, kill_at: str | None) -> bool:
    """Run the CLI; with `kill_at`, SIGKILL it once a path ending so is created or rewritten.
    Returns whether it was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = _snapshot(out)
    process = subprocess.Popen([sys.executable, "-m", "torchslim", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        if kill_at is not None:
            now = _snapshot(out)
            if any(name.endswith(kill_at) and before.get(name) != stamp for name, stamp in now.items()):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
        time.sleep(0.002)
    error = process.stderr.read().decode() if process.stderr else ""
    assert process.returncode == 0, error[-2000:]
    return False


def _recipe(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": "lenet300", "dataset": "digits", "seed": 0,
                                    "baseline": {"epochs": 2, **TRAIN}, "stages": RECIPES[name]}))
    return path


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_killed_compress_runs_resume_to_byte_identical_artifacts(tmp_path: Path, name: str) -> None:
    recipe = _recipe(tmp_path, name)
    reference = tmp_path / "reference"
    _run(["compress", str(recipe), "--out", str(reference), "--no-progress"], reference, None)
    out = tmp_path / "killed"
    kills = 0
    for index, point in enumerate([*KILLS[name], None]):
        resume = ["--resume"] if index else []
        kills += _run(["compress", str(recipe), "--out", str(out), "--no-progress", *resume], out, point)
    assert kills >= len([point for point in KILLS[name] if point != ".tmp"])
    assert (out / "model.slim").read_bytes() == (reference / "model.slim").read_bytes()
    assert not [p for p in out.rglob("*.tmp")], "leftover temporary files"
    assert (out / "report.json").is_file()


def test_killed_auto_resumes_to_a_byte_identical_artifact(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _run(["train", "--model", "lenet300", "--dataset", "digits", "--out", str(base), "--epochs", "2",
          "--lr", "0.1", "--no-progress"], base, None)
    args = ["auto", "--model", str(base / "model.slim"), "--target", "size=8", "--max-drop", "5",
            "--trials", "2", "--epochs", "1", "--no-progress"]
    reference = tmp_path / "reference"
    _run([*args, "--out", str(reference)], reference, None)
    out = tmp_path / "killed"
    for point in ("last.ckpt", "01-gradual_prune.slim", ".tmp", None):
        _run([*args, "--out", str(out)], out, point)
    assert (out / "model.slim").read_bytes() == (reference / "model.slim").read_bytes()
    assert not [p for p in out.rglob("*.tmp")], "leftover temporary files"
