"""Run independent trials in-process or as Ray tasks, with the same results either way.

A sensitivity scan or a policy search evaluates many variants of one model that do not depend
on each other, so they spread over cores or machines for free. What must not change with the
backend is the numbers: every trial runs with torch's RNG seeded to its position in the list,
results come back in item order, and a missing Ray is a `ConfigError` (never a silent fallback
that would make `--workers 8` quietly serial).

Large shared inputs (a model, a validation split) travel once: bind them to the trial function
with `functools.partial` (or make the function an object that holds them). On Ray the whole
function is `ray.put` into the object store once and every task reads it from there; only the
items are sent per task, so keep items small (a layer name and a sparsity, a policy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from types import ModuleType
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from torchslim.errors import ConfigError
from torchslim.progress import ProgressLines

__all__ = ["TrialBackend", "choose_backend", "run_trials"]

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'torchslim[ray]'"


class TrialBackend(StrEnum):
    """Where `run_trials` runs: a plain loop here, or Ray tasks."""

    IN_PROCESS = "in-process"
    RAY = "ray"


def choose_backend(*, workers: int | None = None, ray_address: str | None = None) -> TrialBackend:
    """The backend `run_trials` uses for these options: Ray when a cluster or >1 worker is asked for.

    Example:
        >>> choose_backend(workers=None), choose_backend(workers=2), choose_backend(ray_address="auto")
        (<TrialBackend.IN_PROCESS: 'in-process'>, <TrialBackend.RAY: 'ray'>, <TrialBackend.RAY: 'ray'>)

    Raises:
        ConfigError: `workers` is below 1.
    """
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1 (or unset to run in-process), got {workers}")
    if ray_address is not None or (workers or 1) > 1:
        return TrialBackend.RAY
    return TrialBackend.IN_PROCESS


def run_trials(function: Callable[[T], R], items: Sequence[T], *, workers: int | None = None,
               ray_address: str | None = None, progress: bool = True, desc: str = "trials") -> list[R]:
    """`[function(item) for item in items]`, in-process or as Ray tasks, with identical results.

    In-process (a loop with a progress bar) when `workers` is None or 1 and no `ray_address`.
    Otherwise each item is one Ray task: on the cluster at `ray_address` (`"auto"` or
    `"ray://host:10001"`; its nodes need torchslim installed), else on a local Ray with
    `num_cpus=workers`. An already-initialised Ray is reused as it is, and a local Ray started
    here stays up for later calls until the process exits (or `ray.shutdown()`).

    At most `workers` tasks (default: the cluster's CPUs) are in flight at once. Each task sets
    torch to `cluster CPUs // tasks in flight` threads (1 when the tasks fill the cores) and
    reserves that many CPUs, so tasks never oversubscribe a node. Every trial, on either
    backend, runs with `torch.manual_seed(position in items)` (the caller's RNG state is left
    as it was), so random draws inside a trial do not depend on the backend or the order in
    which tasks finish. Trials that use other RNGs should seed them from their item.

    Args:
        function: one trial; must be picklable for Ray (module-level functions, partials of
            them, lambdas). Bind large shared inputs with `functools.partial`: they are put
            into Ray's object store once, not pickled per task.
        items: one entry per trial, sent to its task; keep them small.
        workers: tasks in flight; None or 1 (without `ray_address`) runs in-process.
        ray_address: an existing Ray cluster to run on.
        progress: show a progress bar of finished trials.
        desc: the progress bar's label.

    Returns:
        The trial results, in the order of `items`.

    Raises:
        ConfigError: `workers` < 1, or Ray was asked for and is not installed.

    Example:
        >>> run_trials(abs, [-2, 3, -5], progress=False)
        [2, 3, 5]
    """
    items = list(items)
    if choose_backend(workers=workers, ray_address=ray_address) is TrialBackend.IN_PROCESS:
        lines = ProgressLines(desc, len(items), enabled=progress)
        results = []
        for index, item in enumerate(tqdm(items, desc=desc, disable=None if progress else True)):
            results.append(run_seeded(function, index, item))
            lines.update(index + 1)
        return results
    ray = import_ray(workers=workers, ray_address=ray_address)
    connect_ray(ray, workers=workers, ray_address=ray_address)
    return _run_on_ray(ray, function, items, workers=workers, progress=progress, desc=desc)


def run_seeded(function: Callable[[T], R], index: int, item: T, threads: int | None = None) -> R:
    """One trial with torch's RNG seeded to `index` (restored afterwards), optionally on `threads`."""
    if threads is not None:
        torch.set_num_threads(threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(index)
        return function(item)


def import_ray(*, workers: int | None, ray_address: str | None) -> ModuleType:
    """The `ray` module, or a `ConfigError` that says how to install it and how to do without."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError(
            f"running trials on Ray (workers={workers}, ray_address={ray_address!r}) needs Ray, "
            f"which is not installed: {INSTALL_HINT}. Or leave workers unset (or 1) and "
            "ray_address unset to run in-process, with the same results, one trial at a time."
        ) from error
    return ray


def connect_ray(ray: ModuleType, *, workers: int | None, ray_address: str | None) -> None:
    """Join the cluster at `ray_address`, or start a local Ray with `workers` CPUs; reuse a live one."""
    if ray.is_initialized():
        return
    if ray_address is not None:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)


def threads_per_task(ray: ModuleType, in_flight: int) -> int:
    """Torch threads (and CPUs reserved) per task: the cluster's CPUs shared by the tasks in flight,
    at least 1 and at most the largest node's CPUs (a bigger reservation could never be scheduled)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]),
                  default=1)
    return max(1, min(total // in_flight, largest))


def _run_on_ray(ray: ModuleType, function: Callable[[T], R], items: list[T], *, workers: int | None,
                progress: bool, desc: str) -> list[R]:
    """Submit one task per item, at most `in_flight` at a time; gather the results in item order."""
    if not items:
        return []
    in_flight = min(workers or int(ray.cluster_resources().get("CPU", 1)), len(items))
    threads = threads_per_task(ray, in_flight)
    task = ray.remote(run_seeded).options(num_cpus=threads)
    shared = ray.put(function)  # once; a top-level ObjectRef argument reaches the task as the object
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    submitted = 0
    try:
        lines = ProgressLines(desc, len(items), enabled=progress)
        with tqdm(total=len(items), desc=desc, disable=None if progress else True) as bar:
            while submitted < len(items) or pending:
                while submitted < len(items) and len(pending) < in_flight:
                    pending[task.remote(shared, submitted, items[submitted], threads)] = submitted
                    submitted += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    results[pending.pop(ref)] = ray.get(ref)
                    bar.update(1)
                    lines.update(bar.n)
    except KeyboardInterrupt:  # the user stops the scan: do not leave the others running
        for ref in pending:
            ray.cancel(ref)
        raise
    except BaseException:
        # A trial failed: let the few in flight end instead of cancelling them. Cancelling a
        # task while it completes aborted the whole driver process in Ray 2.60 ("Tried to
        # complete task that was not pending"), seen when a scan followed a failed one.
        if pending:
            ray.wait(list(pending), num_returns=len(pending))
        raise
    return results
