"""Run folders and bad recipes: one clean `torchslim: error:` line before any work, never a
traceback, and never a silently reused or deleted run."""

import fcntl
import os
import stat
from pathlib import Path

import pytest
import yaml

from torchslim.apps.recipe import load_recipe
from torchslim.apps.run_folder import LOCK_NAME, RunFolder
from torchslim.cli import main
from torchslim.errors import ConfigError
from torchslim.safefile import remove_leftovers, write_checked

RECIPE = {"version": 1, "model": "lenet300", "dataset": "digits", "seed": 0,
          "baseline": {"epochs": 1, "lr": 0.1},
          "stages": [{"prune": {"sparsity": 0.5}}, {"encode": {}}]}


def _write(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _compress(recipe: Path, out: Path, *flags: str) -> int:
    return main(["compress", str(recipe), "--out", str(out), "--no-progress", *flags])


def test_a_folder_in_use_by_another_run_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with (out / LOCK_NAME).open("a") as other:  # another process's claim
        fcntl.flock(other, fcntl.LOCK_EX)
        assert _compress(_write(tmp_path, RECIPE), out) == 2
    assert "in use by another torchslim run" in capsys.readouterr().err
    assert not (out / "stages").exists()


def test_a_finished_run_is_neither_reused_nor_deleted_without_being_asked(tmp_path: Path, capsys) -> None:
    recipe, out = _write(tmp_path, RECIPE), tmp_path / "out"
    assert _compress(recipe, out) == 0
    first = (out / "model.slim").read_bytes()
    capsys.readouterr()
    assert _compress(recipe, out) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (out / "model.slim").read_bytes() == first and (out / "stages").is_dir()
    other = _write(tmp_path, {**RECIPE, "stages": [{"prune": {"sparsity": 0.3}}]}, "other.yaml")
    assert _compress(other, out, "--resume") == 2
    assert "a different recipe" in capsys.readouterr().err
    assert _compress(other, out, "--overwrite") == 0
    assert not (out / "stages" / "02-encode.slim").exists()  # the old run went first
    assert (out / "recipe.lock").read_text().strip() == load_recipe(other).digest


def test_resume_removes_what_a_killed_write_left_and_files_get_normal_modes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    leftover = out / "stages" / ".01-prune.slim.abcd.tmp"
    leftover.write_bytes(b"half")
    keep = out / "stages" / "notes.tmp"  # not ours: no leading dot
    keep.write_text("x")
    assert remove_leftovers(out) == [leftover]
    assert keep.exists()
    umask = os.umask(0o022)
    try:
        write_checked(tmp_path / "a.slim", {}, {"format": "x"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.slim").stat().st_mode) == 0o644


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_a_bad_out_is_one_clean_error(tmp_path: Path, capsys, where: str) -> None:
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "out",
           "unwritable": tmp_path / "ro" / "out"}[where]
    if where == "unwritable":
        (tmp_path / "ro").mkdir(mode=0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
    assert _compress(_write(tmp_path, RECIPE), out) == 2
    assert capsys.readouterr().err.startswith("torchslim: error: --out")


@pytest.mark.parametrize(("change", "problem"), [
    ({"stages": [{"encode": {"coder": "brotli"}}]}, "unknown coder 'brotli'"),
    ({"stages": [{"prune": {"sparsity": 0.5, "targets": {"types": []}}}]}, "matched no"),
    ({"stages": [{"prune": {"per_layer": {"fc9": 0.5}}}]}, "per_layer names \\['fc9'\\]"),
    ({"stages": [{"gradual_prune": {"sparsity": 0.5, "train": {"epoch": 2}}}]}, "train:.*epoch"),
    ({"seed": "abc"}, "seed must be a non-negative integer"),
    ({"stages": [{"prune": {"sparsity": 0.5, "targets": 42}}]}, "targets must be a mapping"),
    ({"stages": [{"prune": [0.5]}]}, "options must be a mapping"),
])
def test_a_bad_recipe_fails_before_the_baseline_trains(tmp_path: Path, capsys, change: dict,
                                                       problem: str) -> None:
    out = tmp_path / "out"
    assert _compress(_write(tmp_path, {**RECIPE, **change}), out) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchslim: error:") and "Traceback" not in err
    assert pytest.importorskip("re").search(problem, err), err
    assert not out.exists()  # nothing written: the fixed recipe runs without --overwrite


def test_recipes_that_are_not_utf8_or_expand_aliases_are_refused(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(yaml.safe_dump(RECIPE).encode() + b"description: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(latin)
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
               f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
               for i in range(9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_recipe(bomb)


def test_a_non_utf8_out_path_still_gets_its_report(tmp_path: Path) -> None:
    out = Path(os.fsdecode(bytes(tmp_path) + b"/r\xe9sultat"))
    assert _compress(_write(tmp_path, RECIPE), out) == 0
    assert (out / "report.md").is_file() and (out / "model.slim").is_file()


def test_the_run_folder_lock_is_released_when_the_run_fails(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "out")
    folder.claim("abc", resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="in use"):
        RunFolder(tmp_path / "out").claim("abc", resume=True, overwrite=False)
    folder.release()
    with RunFolder(tmp_path / "out") as again:
        again.claim("abc", resume=True, overwrite=False)


def test_a_generated_recipe_never_overwrites_the_recipe_of_a_run_it_refuses(tmp_path: Path, capsys) -> None:
    zoo = str(Path(__file__).parent / "user_zoo.py")
    out = tmp_path / "p"
    argv = ["prune", "--model", f"{zoo}:build_same_conv", "--dataset", f"{zoo}:loaders_same_conv",
            "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main([*argv, "--ratio", "0.5"]) == 0
    kept = (out / "recipe.yaml").read_text()
    capsys.readouterr()
    assert main([*argv, "--ratio", "0.3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == kept
