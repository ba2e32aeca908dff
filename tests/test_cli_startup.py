"""The CLI answers --help and argument errors without importing torch, and the lazy package still
knows every technique, edit and architecture however it is entered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torchslim.names import DATASET_NAMES, MODEL_NAMES


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_torch_free_names_match_the_registries() -> None:
    from torchslim.data import dataset_names
    from torchslim.models import model_names

    assert list(MODEL_NAMES) == model_names()
    assert list(DATASET_NAMES) == dataset_names()


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["quantize", "--help"],
                                  ["prune"], ["no-such-command"]])
def test_help_and_argument_errors_do_not_import_torch(argv: list[str]) -> None:
    done = _python(
        "import sys\n"
        "from torchslim.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n")
    assert "torch loaded: False" in done.stdout, done.stdout + done.stderr
    expected = "exit 0" if "--help" in argv else "exit 2"
    assert expected in done.stdout
    if "--help" in argv:
        assert "usage: torchslim" in done.stdout


def test_a_submodule_entered_directly_still_sees_every_registration() -> None:
    done = _python(
        "from torchslim.registry import technique_kinds\n"
        "from torchslim.artifact import _architectures\n"
        "print(sorted(technique_kinds()))\n"
        "print(sorted(_architectures()))\n")
    assert done.returncode == 0, done.stderr
    kinds, architectures = done.stdout.splitlines()[-2:]
    assert "'structured_prune'" in kinds and "'wanda'" in kinds
    assert "'hf'" in architectures


def test_the_package_attributes_load_on_first_use() -> None:
    import torchslim as ts

    assert callable(ts.save) and callable(ts.apply_)
    assert ts.pruning.ChannelPruning.__name__ == "ChannelPruning"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ts.nope


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`torchslim train` with its output going to pipes, as under CI or nohup."""
    return subprocess.run([sys.executable, "-m", "torchslim", "train", "--model", "lenet300",
                           "--dataset", "digits", "--epochs", "2", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=600)


def test_progress_lines_show_without_a_terminal_and_quiet_silences_them(tmp_path: Path) -> None:
    shown = _train(tmp_path / "shown")
    assert shown.returncode == 0, shown.stderr
    assert "torchslim: training 1/2: epoch 1/2, train loss" in shown.stderr
    assert "ETA" in shown.stderr and "torchslim: training 2/2" in shown.stderr
    assert "training 1/2" not in shown.stdout  # stdout keeps only the results (and --json output)
    quiet = _train(tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "torchslim: training" not in quiet.stderr
    assert "test accuracy" in quiet.stdout


def test_quiet_lasts_for_its_command_only(tmp_path: Path) -> None:
    import io

    from torchslim.cli import main
    from torchslim.progress import ProgressLines

    assert main(["--quiet", "inspect", str(tmp_path / "missing.slim")]) == 2
    stream = io.StringIO()
    ProgressLines("epoch", 2, stream=stream, force=True).update(1)
    assert "torchslim: epoch 1/2" in stream.getvalue()
