"""Data-parallel plumbing for runs launched by `torchrun`: one process group and rank helpers.

`torchrun --nproc_per_node=N` starts N copies of the same command and tells each its place
through the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Everything
in torchslim asks this module whether it is one of several processes, so a plain run (no such
variables, or WORLD_SIZE=1) takes exactly the single-process path: no group, no collectives.

The group is created on first use, once per process, with gloo for CPU tensors and, where CUDA
is present, NCCL for CUDA tensors (one group serving both, so bookkeeping collectives on small
CPU tensors never need a GPU).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchslim.errors import ConfigError

__all__ = ["all_reduce_sum", "barrier", "broadcast_object", "data_parallel", "device_for",
           "global_range", "init_process_group", "is_distributed", "is_main_process", "rank", "shard",
           "shutdown", "world_size"]


def _launched_world() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a process count; launch with "
                          "`torchrun --nproc_per_node=N ...` or unset it") from None


def init_process_group() -> bool:
    """Join the process group torchrun set up (idempotent); False when running alone.

    Collectives here call it, so a plain process never creates a group.

    Raises:
        ConfigError: WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if _launched_world() <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; "
                          "run a single process or install a build with distributed support")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    return True


def world_size() -> int:
    """How many processes train together: the group's size, else what torchrun announced.

    Example:
        >>> world_size(), rank(), is_distributed(), is_main_process()  # a plain process
        (1, 0, False, True)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _launched_world()


def rank() -> int:
    """This process's index in [0, world_size())."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if _launched_world() > 1 else 0


def is_distributed() -> bool:
    """True in one of 2+ processes (launched by torchrun, or in a group made by the caller)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes files, prints and times."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op when running alone).

    An all-reduce of one CPU number rather than `dist.barrier()`: it goes through gloo on any
    backend mix, so it never has to guess which GPU a process owns.
    """
    if init_process_group():
        dist.all_reduce(torch.zeros(1))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over all processes, in place; returned for chaining (alone: unchanged)."""
    if init_process_group():
        dist.all_reduce(values)
    return values


def global_range(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) of per-process (min, max) scalars: a range observed on every shard is
    the range of the whole global batch (alone: unchanged)."""
    if not init_process_group():
        return low, high
    extremes = torch.stack([-low, high])  # one max all-reduce for both ends
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return -extremes[0], extremes[1]


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every process (a JSON-like report, a decision)."""
    if not init_process_group():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of a global batch (sizes differ by at most one).

    Example:
        >>> shard(torch.arange(4)).tolist()  # alone: the whole batch
        [0, 1, 2, 3]
    """
    if not is_distributed():
        return batch
    return batch.tensor_split(world_size())[rank()]


def device_for(device: str) -> torch.device:
    """The device this process trains on: "cuda" means cuda:LOCAL_RANK under torchrun.

    Raises:
        ConfigError: an explicit CUDA index with several processes (they would share one GPU).
    """
    chosen = torch.device(device)
    if chosen.type != "cuda" or not is_distributed():
        return chosen
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.index is not None and chosen.index != local:
        raise ConfigError(f"device {device!r} asked for under torchrun, but each process uses "
                          f"its own GPU (cuda:LOCAL_RANK, here cuda:{local}); pass device='cuda'")
    return torch.device("cuda", local)


class _Replica(nn.Module):
    """The model plus parameters its loss owns (distillation adapters), so that DDP averages
    the gradients of both; its forward is the model's."""

    def __init__(self, model: nn.Module, extra: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra)

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.model(inputs)


def data_parallel(model: nn.Module, extra: list[nn.Parameter], device: torch.device) -> nn.Module:
    """Wrap `model` (and its loss's `extra` parameters) in DistributedDataParallel.

    The wrapper shares the parameters, so `model` stays the plain module that callbacks,
    masks (parametrizations) and checkpoints see. DDP broadcasts rank 0's weights and buffers
    when it is built, then averages gradients in backward: the loss must be a mean over the
    process's shard, weighted by the shard's share of the global batch.
    """
    init_process_group()
    return DistributedDataParallel(_Replica(model, extra),
                                   device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun command); no-op when there is none.

    Unreachable DDP wrappers still hold the group: they are collected first, so that its
    threads stop here and not during interpreter exit (where gloo aborts).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
