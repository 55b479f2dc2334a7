"""What a run's ``last.pt`` holds, and the one object that writes and restores it: the model, the
optimizer, the LR and rho schedules, the loss scaler, the weight average, the loop's progress and
every random stream, so that a killed run resumes bit for bit (under torchrun too: each worker's
streams are gathered into rank 0's file, and each gets its own back)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ..optim.schedules import ProportionalRho
from .averaging import WeightAverage
from .config import ConfigError
from .rundir import CheckpointError, checkpoint_remedy
from .world import World

# What a resume checkpoint must hold (best.pt and final.pt hold the model only).
_RESUME_KEYS = ("model", "optimizer", "schedule", "progress", "rng")


@dataclass
class Progress:
    """Everything about the loop that a resumed run must get back."""

    epoch: int = 0
    step: int = 0
    passes: float = 0  # forward/backward passes of training, in whole batches, as they run
    counted_from_step: int = 0  # a run resumed from before passes were counted: since then
    wall_time_s: float = 0.0
    best_epoch: int = 0
    best_score: float = -math.inf
    epochs_since_best: int = 0


@contextlib.contextmanager
def fitting(path: Path) -> Iterator[None]:
    """Turn a checkpoint that does not fit this run (another model, optimizer or shape: a file
    copied from another run) into a one-line :class:`CheckpointError` naming ``path``."""
    try:
        yield
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise CheckpointError(
            f"{path}: does not fit this run ({first}); was it copied from another run? "
            f"{checkpoint_remedy(path)}"
        ) from None


@dataclass
class RunState:
    """The state of one run that its checkpoint holds; :meth:`checkpoint` and :meth:`restore`
    are each other's inverse. Under FSDP (``fsdp``: :mod:`gcsam.toolkit.fsdp`) the model and
    optimizer states are gathered to full ones on rank 0 and sharded again on restore."""

    world: World
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    rho_schedule: ProportionalRho | None
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None
    data_rng: torch.Generator  # the epochs' order, the same on every worker
    augment_rng: torch.Generator  # this worker's augmentations
    fsdp: ModuleType | None = None
    progress: Progress = field(default_factory=Progress)

    def model_state(self) -> dict[str, Tensor]:
        """The model's full state dict (on rank 0 only under FSDP, which gathers it)."""
        if self.fsdp is None:
            return self.model.state_dict()
        return self.fsdp.gather_model_state(self.model)

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        if self.fsdp is None:
            self.model.load_state_dict(state)
        else:
            self.fsdp.load_model_state(self.model, state)

    def checkpoint(self) -> dict[str, Any]:
        """The resume checkpoint; every worker calls it (it gathers their random streams)."""
        if self.fsdp is None:
            optimizer = self.optimizer.state_dict()
        else:
            optimizer = self.fsdp.gather_optimizer_state(self.model, self.optimizer)
        return {
            "model": self.model_state(),
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "rho_schedule": self.rho_schedule.state_dict() if self.rho_schedule else {},
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "average": self.average.state_dict() if self.average else {},
            "progress": dataclasses.asdict(self.progress),
            "rng": {
                "torch": self._per_rank(torch.get_rng_state()),
                "data": self.data_rng.get_state(),
                "augment": self._per_rank(self.augment_rng.get_state()),
                "cuda": self._per_rank(torch.cuda.get_rng_state(self.device))
                if self.device.type == "cuda"
                else [],
            },
        }

    def _per_rank(self, state: Tensor) -> list[Tensor]:
        """Every worker's copy of an RNG state (the same size on each), for the checkpoint."""
        if self.world.size == 1:
            return [state]
        # nccl gathers CUDA tensors only; gloo takes either
        return [t.cpu() for t in self.world.all_gather(state.to(self.device))]

    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Load :meth:`checkpoint`'s ``ckpt``, read from ``path``; a file that is not a resume
        checkpoint, or does not fit this run, raises an error naming ``path`` and the fix."""
        missing = [key for key in _RESUME_KEYS if key not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path}: not a resume checkpoint (no {', '.join(missing)}; best.pt and "
                f"final.pt hold weights only): {checkpoint_remedy(path)}"
            )
        with fitting(path):
            self._restore(ckpt, path)

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        # Checked before anything is loaded.
        workers = len(ckpt["rng"]["augment"])
        if workers != self.world.size:
            raise ConfigError(
                f"{path} was written by {workers} worker(s); resume it with as many "
                f"(torchrun --nproc-per-node), not {self.world.size}"
            )
        if self.average is not None and not ckpt.get("average"):
            raise ConfigError(
                f"{path} holds no weight average: it was written without "
                f"--average {self.average.kind}; resume it with the settings it was run with"
            )
        self.load_model_state(ckpt["model"])
        if self.fsdp is None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            self.fsdp.load_optimizer_state(self.model, self.optimizer, ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.rho_schedule is not None and ckpt.get("rho_schedule"):
            self.rho_schedule.load_state_dict(ckpt["rho_schedule"])
        if self.scaler and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.average is not None:
            self.average.load_state_dict(ckpt["average"])
        # In place: the trainer's loop holds this object.
        vars(self.progress).update(vars(Progress(**ckpt["progress"])))
        if "passes" not in ckpt["progress"]:
            self.progress.counted_from_step = self.progress.step
        rng, rank = ckpt["rng"], self.world.rank
        torch.set_rng_state(rng["torch"][rank])
        self.data_rng.set_state(rng["data"])
        self.augment_rng.set_state(rng["augment"][rank])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank], self.device)
