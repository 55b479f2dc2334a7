"""The two pieces of a step's state that its math does not show: where the weights are (at
``w``, or at ``w + eps`` with ``w`` in exact backups), and whether the step must skip its base
step because its ascent gradient was not finite (under local-ascent DDP, a vote of every
worker, so that they skip alike; under a ``GradScaler``, its overflow record)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _functional, distributed


class Perturbation:
    """The move to ``w + eps`` and back, bit for bit.

    The backup of each parameter is ``state[param]["backup"]`` of the optimizer's own (never
    saved) state, allocated once and kept across steps: the one extra copy of the parameters.
    """

    def __init__(self, state: dict[Tensor, dict[str, Any]], foreach: Callable[[list], bool]):
        self._state = state
        self._foreach = foreach
        self.params: list[Tensor] = []  # at w + eps; their backups hold w

    def ascend(
        self,
        groups: list[_functional.AscentGroup],
        shards: distributed.Shards | None,
        on_failure: Callable[[], None],
    ) -> bool:
        """``d = GC(direction)`` in place for each group, then ``w <- w + eps`` along ``d``;
        ``False`` (and no move) if the norm, or the step scale, is not finite. If the move
        raises, ``on_failure`` runs (it restores ``w``) before the error propagates."""
        for group in groups:
            group.centralized = _functional.centralize_(
                group.grads,
                group.settings["gc_scope"],
                foreach=group.foreach,
                measure=not group.settings["adaptive"],
            )
        # The step's one host-device sync, kept: whether the norm is finite decides on the host
        # whether the weights move and the second pass and base step run (as GradScaler reads
        # found_inf before its step), and whether an fp32 sum that may have under- or
        # overflowed is measured again in fp64.
        norm = _functional.ascent_norm(groups, shards)
        # An fp64-overflowing rho / norm (subnormal gradients) is no step to take either.
        finite = norm.finite and all(
            math.isfinite(_functional.step_scale(g.settings, norm.l2)) for g in groups
        )
        if finite:
            try:
                self._move(groups, norm.l2)
            except BaseException:
                on_failure()
                raise
        return finite

    def _move(self, groups: list[_functional.AscentGroup], norm: float) -> None:
        for group in groups:
            scale = _functional.step_scale(group.settings, norm)
            if scale == 0 or not group.params:  # p = inf: rho, even with no gradient
                continue
            backups = [self._backup(param) for param in group.params]
            _functional.copy_(backups, group.params, foreach=group.foreach)
            self.params += group.params  # only once w is safe in its backup
            _functional.perturb_(
                group.params,
                group.grads,
                scale=scale,
                p=group.settings["p"],
                adaptive=group.settings["adaptive"],
                foreach=group.foreach,
            )

    def _backup(self, param: Tensor) -> Tensor:
        state = self._state[param]
        state["backup"] = _functional.buffer_like(state.get("backup"), param)
        return state["backup"]

    def restore(self) -> None:
        """``w <- backup`` for every moved parameter."""
        if self.params:
            params, self.params = self.params, []
            backups = [self._state[p]["backup"] for p in params]
            _functional.copy_(params, backups, foreach=self._foreach(params))


class NonFiniteSkip:
    """Whether a step skips its base step because its ascent gradient was not finite."""

    def __init__(self) -> None:
        self.planned = False  # known on this process: skip, and run no second pass
        self._vote: distributed.NonFiniteVote | None = None

    def plan(
        self,
        finite: bool,
        optimizer: Optimizer,
        ddp: Any,
        local_ascent: bool,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        """After the ascent. Under local-ascent DDP the workers' gradients differ, so they vote:
        every worker still runs the descent pass, then every worker skips or none."""
        self.planned = False
        if local_ascent and distributed.world_size(ddp) > 1:
            device = optimizer.param_groups[0]["params"][0].device
            self._vote = distributed.NonFiniteVote(ddp, not finite, device)
        elif not finite:
            self.planned = True
            if scaler is None or not scaler.is_enabled():  # a scaler records it instead
                warnings.warn(
                    f"{type(optimizer).__name__}: the ascent gradient is not finite (inf/NaN); "
                    "this step is skipped and the weights are unchanged",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of first_step
                )

    def settle(self, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
        """Whether the step is skipped (waits for the vote); the plan is spent."""
        skip, self.planned = self.planned, False
        vote, self._vote = self._vote, None
        return vote.settle(optimizer, scaler) if vote is not None else skip

    def cancel(self) -> None:
        """The step ended early: drop the vote (every worker started it: it completes without
        us)."""
        self._vote = None
