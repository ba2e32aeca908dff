"""Progress lines for long work that nobody watches on a terminal.

A progress bar only shows on a terminal; with the output going to a file (CI, nohup, a notebook
cell) a run would stay silent for its whole length. Long loops (training epochs, recipe stages,
trials, calibrated blocks) report each finished unit here: the line always goes to the
`torchslim.progress` logger, and when stderr is not a terminal it is also printed there, with the
elapsed time and an ETA. `--quiet` (or `--no-progress`) silences the printed lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["ProgressLines", "format_seconds", "set_quiet"]

LOG = logging.getLogger("torchslim.progress")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) the printed progress lines of this process; logging is unaffected."""
    global _quiet
    _quiet = quiet


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short and sortable by eye."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """Announce `total` units of `what` as they finish.

    >>> import io, contextlib
    >>> lines = ProgressLines("epoch", 4, stream=io.StringIO(), force=True)
    >>> lines.update(1, "loss 0.31")
    >>> print(lines.stream.getvalue().split(" (")[0])
    torchslim: epoch 1/4: loss 0.31
    """

    def __init__(self, what: str, total: int | None = None, *, enabled: bool = True,
                 stream: TextIO | None = None, force: bool = False) -> None:
        self.what, self.total, self.enabled = what, total, enabled
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.force = force  # print even on a terminal (tests)
        self.start = time.monotonic()

    def _printing(self) -> bool:
        if not self.enabled or _quiet:
            return False
        if self.force:
            return True
        if self.stream.isatty():
            return False  # the terminal has the live progress bar
        # the same line already goes to stderr through logging (-v)
        return not (self.stream is sys.stderr and LOG.isEnabledFor(logging.INFO) and logging.root.handlers)

    def update(self, done: int, detail: str = "") -> None:
        """Unit `done` (1-based) has finished; `detail` says how it went."""
        elapsed = time.monotonic() - self.start
        count = f"{done}/{self.total}" if self.total else str(done)
        timing = f"elapsed {format_seconds(elapsed)}"
        if self.total and 0 < done < self.total:
            timing += f", ETA {format_seconds(elapsed / done * (self.total - done))}"
        text = f"{self.what} {count}" + (f": {detail}" if detail else "") + f" ({timing})"
        LOG.info(text)
        if self._printing():
            print(f"torchslim: {text}", file=self.stream, flush=True)
