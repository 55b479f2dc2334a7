"""This process's place among the workers ``torchrun`` started, and its device."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .config import ConfigError

# How gloo ("Timed out waiting 5000ms ...", then "Application timeout caused pair closure") and
# nccl's watchdog word a collective that outlived the process group's timeout.
_TIMEOUT_WORDING = re.compile(r"timed out|timeout", re.IGNORECASE)


class WorkerTimeoutError(RuntimeError):
    """A collective waited longer than ``ddp_timeout_s``: another worker stopped, hung or died."""


@contextlib.contextmanager
def explain_timeouts(timeout_s: float) -> Iterator[None]:
    """Turn the timeout of a collective (or of joining the workers) into a
    :class:`WorkerTimeoutError` that names the setting, instead of the backend's message."""
    try:
        yield
    except RuntimeError as error:
        if not _TIMEOUT_WORDING.search(str(error)):
            raise
        raise WorkerTimeoutError(
            f"a worker did not answer within ddp_timeout_s={timeout_s:g} s: it stopped, hung or "
            "died (see its own output); if a step can take that long, raise --ddp-timeout-s"
        ) from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present; under torchrun, each worker takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def check_strategy(
    strategy: str, workers: int, *, average: str = "none", penalties: bool = False
) -> None:
    """``ConfigError`` for ``fsdp`` under torchrun (``workers > 1``; one process ignores it)
    with what needs the whole model on every worker (a weight ``average``, the ``penalties`` on
    the last layer), or where this torch lacks FSDP2's public ``fully_shard``."""
    if strategy != "fsdp" or workers < 2:
        return
    if average != "none":
        raise ConfigError(
            f"--average {average} keeps a full copy of the model on every worker, which FSDP "
            "shards; use --strategy ddp"
        )
    if penalties:
        raise ConfigError(
            "--feature-penalty and --head-penalty read the last layer's whole weight, which "
            "FSDP shards; use --strategy ddp"
        )
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--strategy fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, public since "
            f"torch 2.6), which torch {torch.__version__} lacks; upgrade torch, or use "
            "--strategy ddp"
        ) from None


@dataclass(frozen=True)
class World:
    """The workers of this run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = 300.0

    @property
    def main(self) -> bool:
        """Only the main worker writes files and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's ``tensor`` (the same shape on each), in rank order."""
        if self.size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        torch.distributed.all_gather(parts, tensor)
        return parts

    def gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The ``total`` rows every worker computed for its strided share (rows ``rank``,
        ``rank + size``, ...), back in their order."""
        if self.size == 1:
            return local
        padded = local.new_zeros(math.ceil(total / self.size), local.shape[1])
        padded[: len(local)] = local
        rows = local.new_empty(total, local.shape[1])
        for rank, part in enumerate(self.all_gather(padded)):
            rows[rank :: self.size] = part[: len(range(rank, total, self.size))]
        return rows

    def highest(self, value: int, device: torch.device) -> int:
        """The largest of every worker's ``value``: one all-reduce, so that all decide alike."""
        if self.size == 1:
            return value
        flag = torch.tensor([value], device=device)  # nccl reduces CUDA tensors only
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def check_shared(self, folder: Path, device: torch.device) -> None:
        """Refuse, on every worker alike, a run folder that some worker does not see as rank 0
        writes it (torchrun on several machines without a shared file system): workers read
        ``last.pt`` and ``best.pt`` from it, and would fail at the very end. Rank 0 writes a
        random token to ``folder/.gcsam-shared``, every worker reads it back, one all-gather
        compares them; the file is gone when this returns."""
        if self.size == 1:
            return
        probe = folder / ".gcsam-shared"
        token = secrets.randbits(62) + 1
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text(f"{token}\n")
        self.barrier()
        seen = 0
        with contextlib.suppress(OSError, ValueError):
            seen = int(probe.read_text())
        tokens = [int(t.item()) for t in self.all_gather(torch.tensor([seen], device=device))]
        if self.main:
            probe.unlink()
        blind = [rank for rank, t in enumerate(tokens) if t != tokens[0]]
        if blind:
            raise ConfigError(
                f"{folder}: worker(s) of rank {', '.join(map(str, blind))} do not see the files "
                "rank 0 writes there; under torchrun on several machines the run folder must be "
                "on a file system every node shares, at the same path"
            )

    def timeouts_explained(self) -> contextlib.AbstractContextManager[None]:
        """:func:`explain_timeouts` of this world's timeout; nothing to explain in one process."""
        return explain_timeouts(self.timeout_s) if self.size > 1 else contextlib.nullcontext()

    def distribute(
        self, model: nn.Module, strategy: str, device: torch.device
    ) -> tuple[nn.Module, ModuleType | None]:
        """The module the batches go through (the DDP wrapper when torchrun started workers;
        FSDP2 shards ``model`` in place) and, under ``--strategy fsdp``,
        :mod:`gcsam.toolkit.fsdp`, which gathers its checkpoints (imported only then: it loads
        torch.distributed.checkpoint)."""
        if self.size == 1:
            return model, None
        with self.timeouts_explained():  # collectives (DDP broadcasts rank 0's weights)
            if strategy == "fsdp":
                from . import fsdp

                fsdp.shard_model(model)
                return model, fsdp
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids), None


def world_size() -> int:
    """How many workers torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_world(device: str, timeout_s: float = 300.0) -> World:
    """Join the process group that torchrun's environment describes (``gloo`` on CPU, ``nccl``
    on CUDA), once; a plain process is a world of one. A collective that waits longer than
    ``timeout_s`` for another worker fails instead of hanging forever."""
    size = world_size()
    if size == 1:
        return World(timeout_s=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = pick_device(device, local_rank).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        with explain_timeouts(timeout_s):
            torch.distributed.init_process_group(
                "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )
    return World(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, timeout_s
    )


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not initialized or torch.distributed.get_rank() == 0


def worker_prefix() -> str:
    """``"[rank R of N] "`` under torchrun, ``""`` in one process: for printed lines."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"[rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}] "
    return ""
