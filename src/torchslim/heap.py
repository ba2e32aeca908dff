"""Give freed memory back to the system between the steps of a calibration.

glibc serves allocations below its mmap threshold from the heap and keeps what is freed there;
the threshold rises to the largest block freed so far (up to 32 MB), so once a model's first
large tensors are freed, the activations of every later forward pass come from the heap too.
They are freed, yet the process keeps the pages: measured on SmolLM2-135M, SmoothQuant's
observation of one batch of 8 x 256 tokens left 770 MB more in the process (12 MB with a fixed
threshold), and four batches peaked at 888 MB, 133 MB when trimmed after each transformer block
(1.5 s of trimming, ~150 block calls). Trimming after each step hands those pages back, so the
memory a technique needs is what it holds, not what it once touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Iterator

from torch import nn

__all__ = ["return_freed_memory", "returning_memory_after"]


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere a no-op)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl)
        return None


@contextlib.contextmanager
def returning_memory_after(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, every call of one of `modules` (a model's transformer blocks) ends by
    handing freed heap pages back: a whole-model forward then holds one block's activations."""
    if _malloc_trim() is None:
        yield
        return
    handles = [module.register_forward_hook(lambda *_: return_freed_memory()) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
