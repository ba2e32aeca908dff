"""The output folder of a recipe run: claimed by one process at a time, never silently reused.

A run folder holds `recipe.lock` (the recipe's digest), `stages/` (one checkpoint a stage, and
training checkpoints inside them), then `model.slim` and the report. Two runs writing into one
folder would mix their checkpoints, and a new run over an old one would leave the old result
beside the new recipe's lock. So a run takes an exclusive `flock` on `OUT/.torchslim.lock`
(released by the kernel even on SIGKILL), refuses a folder that already holds a run unless told
to `resume` it or `overwrite` it, and on resume first deletes the temporary files a killed
write leaves behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

from torchslim.errors import ConfigError
from torchslim.safefile import remove_leftovers

__all__ = ["RUN_FILES", "RunFolder"]

LOCK_NAME = ".torchslim.lock"
RECIPE_LOCK = "recipe.lock"
# What a finished or interrupted run leaves: all of it goes with --overwrite.
RUN_FILES = (RECIPE_LOCK, "stages", "model.slim", "report.json", "report.md",
             "accuracy_vs_size.png", "accuracy_vs_latency.png")


def check_writable_folder(out: Path) -> None:
    """`out` can be (or is) a folder we may write into; else a clear error, before any work.

    Raises:
        ConfigError: `out` is a file, lies under a file, or is not writable.
    """
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a folder; choose another "
                                  "--out")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out}: {parent} is not writable by this user; choose "
                                  "another --out or fix its permissions")
            return


class RunFolder:
    """One run's claim on its output folder (a context manager; `release` on exit)."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self._handle: IO[str] | None = None

    def holds_a_run(self) -> bool:
        return any((self.out / name).exists() for name in RUN_FILES)

    def claim(self, digest: str, *, resume: bool, overwrite: bool) -> None:
        """Lock the folder for this process and make it ready for a run of recipe `digest`.

        Raises:
            ConfigError: another run holds the folder, the folder holds another recipe's run
                (with `resume`), or holds a run and neither `resume` nor `overwrite` is given.
        """
        check_writable_folder(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        handle = (self.out / LOCK_NAME).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(f"{self.out} is in use by another torchslim run; wait for it to end "
                              "or choose another --out") from None
        self._handle = handle
        try:
            self._prepare(digest, resume=resume, overwrite=overwrite)
        except BaseException:
            self.release()
            raise

    def _prepare(self, digest: str, *, resume: bool, overwrite: bool) -> None:
        lock = self.out / RECIPE_LOCK
        if resume and lock.is_file() and lock.read_text().strip() != digest:
            raise ConfigError(f"{self.out} holds a run of a different recipe; use another --out, "
                              "or --overwrite to replace that run")
        if not resume and self.holds_a_run():
            if not overwrite:
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it, "
                                  "--overwrite to delete it and start over, or choose another --out")
            for name in RUN_FILES:
                target = self.out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        remove_leftovers(self.out)
        lock.write_text(digest + "\n")

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
