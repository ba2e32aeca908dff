"""Freed heap pages go back to the system during calibration forwards, and nothing of the
mechanism stays on the model afterwards."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from torchslim.heap import _malloc_trim, return_freed_memory, returning_memory_after


def test_trimming_hooks_run_inside_the_block_and_leave_no_trace() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
    x = torch.randn(2, 8)
    expected = [block(x) for block in blocks]
    with returning_memory_after(blocks):
        if _malloc_trim() is not None:
            assert all(len(block._forward_hooks) == 1 for block in blocks)
        outputs = [block(x) for block in blocks]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert all(not block._forward_hooks for block in blocks)


def test_hooks_are_removed_when_the_forward_fails() -> None:
    block = nn.Linear(8, 8)
    with pytest.raises(RuntimeError), returning_memory_after([block]):
        block(torch.randn(2, 3))
    assert not block._forward_hooks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_the_trim_is_found_on_glibc_linux() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _malloc_trim() is not None
    return_freed_memory()
