"""``--jobs N``: helper processes that share a study's work with this one, each on its share of
the CPU threads. What they share is claimed through files and locks (Optuna's storage for the
trials, each run folder's lock for the runs), so a helper that dies loses only its current run."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


def threads_per_job(jobs: int) -> int:
    """The CPU threads each of ``jobs`` processes gets (at least one)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _run_helper(target: Callable[..., None], args: tuple[Any, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    target(*args)


@contextlib.contextmanager
def helpers(
    target: Callable[..., None], args: tuple[Any, ...], jobs: int, what: str
) -> Iterator[None]:
    """Run ``target(*args)`` in ``jobs - 1`` spawned processes while the body runs in this one,
    all on :func:`threads_per_job` threads; wait for them on the way out, and raise naming
    ``what`` when one failed."""
    if jobs <= 1:
        yield
        return
    threads = threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_run_helper, args=(target, args, threads)) for _ in range(jobs - 1)
    ]
    for process in processes:
        process.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for process in processes:
            process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} {what} helper(s) failed (exit codes {failed})")
