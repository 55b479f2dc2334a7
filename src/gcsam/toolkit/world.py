"""This process's place among the workers ``torchrun`` started, and its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present; under torchrun, each worker takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


@dataclass(frozen=True)
class World:
    """The workers of this run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main worker writes files and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def join_world(device: str) -> World:
    """Join the process group that torchrun's environment describes (``gloo`` on CPU, ``nccl``
    on CUDA), once; a plain process is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = pick_device(device, local_rank).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def is_main_process() -> bool:
    """False on every torchrun worker but rank 0."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not initialized or torch.distributed.get_rank() == 0


def worker_prefix() -> str:
    """``"[rank R of N] "`` under torchrun, ``""`` in one process: for printed lines."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"[rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}] "
    return ""
