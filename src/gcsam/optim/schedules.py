r"""rho schedules, used like ``torch.optim.lr_scheduler``: build on the optimizer, call
``step()`` after each ``optimizer.step()``, save ``state_dict()`` with the checkpoint.

:class:`LambdaRho` (like ``LambdaLR``)
    :math:`\rho_t = \rho_0 \, f(t)` per param group, for warm-up, decay or any shape.
:class:`ProportionalRho` (GSAM, Zhuang et al., ICLR 2022)
    :math:`\rho_t = \rho_{min} + (\rho_0 - \rho_{min})\,
    \frac{\eta_t - \eta_{min}}{\eta_0 - \eta_{min}}`: :math:`\rho` follows the learning rate
    :math:`\eta_t` that any LR scheduler (or a hand-written loop) set in the same param group.

:math:`\rho_0` and :math:`\eta_0` are each group's ``initial_rho`` and ``initial_lr``, set when
the first scheduler is built (like torch's ``initial_lr``) and saved in the optimizer's state
dict, so a resumed run schedules from the same start. A schedule that gives a negative or
non-finite :math:`\rho` raises ``ValueError`` before any group changes.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from .._util.validate import check_number

__all__ = ["LambdaRho", "ProportionalRho"]


class _RhoScheduler(abc.ABC):
    """Sets every param group's ``rho`` from :meth:`rho_at` after each optimizer step."""

    def __init__(self, optimizer: Optimizer) -> None:
        if not optimizer.param_groups or any("rho" not in g for g in optimizer.param_groups):
            raise TypeError(
                f"{type(self).__name__} schedules rho, and {type(optimizer).__name__}'s param "
                "groups have none: build it on a GCSAM or SAM optimizer"
            )
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_rho", group["rho"])
            group.setdefault("initial_lr", group.get("lr"))
        self.last_step = 0
        self._apply(0)

    @abc.abstractmethod
    def rho_at(self, group: dict[str, Any], step: int) -> float:
        """The radius of param ``group`` at ``step``."""

    def _apply(self, step: int) -> None:
        """Set each group's ``rho`` at ``step``, and ``last_step``, once every value is valid."""
        rhos = [float(self.rho_at(group, step)) for group in self.optimizer.param_groups]
        for index, rho in enumerate(rhos):  # all checked before any group changes
            if not math.isfinite(rho) or rho < 0:
                raise ValueError(
                    f"{type(self).__name__} gave rho = {rho!r} for param group {index} at step "
                    f"{step}: a radius must be finite and >= 0; fix the schedule"
                )
        for group, rho in zip(self.optimizer.param_groups, rhos, strict=True):
            group["rho"] = rho
        # Only now: a failed step or load leaves the schedule where it was, like the groups.
        self.last_step = step

    def step(self) -> None:
        """Advance one step and set each group's ``rho``."""
        self._apply(self.last_step + 1)

    def get_last_rho(self) -> list[float]:
        """Each param group's current ``rho``."""
        return [group["rho"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._apply(int(state_dict["last_step"]))


class LambdaRho(_RhoScheduler):
    """``rho = initial_rho * factor(step)``; ``factor`` is not saved in :meth:`state_dict`
    (like ``LambdaLR``'s function)."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        if not callable(factor):
            raise TypeError(f"factor must be a function of the step, got {factor!r}")
        self.factor = factor
        super().__init__(optimizer)

    def rho_at(self, group: dict[str, Any], step: int) -> float:
        return group["initial_rho"] * self.factor(step)


class ProportionalRho(_RhoScheduler):
    """``rho`` proportional to the learning rate (GSAM): from ``initial_rho`` at ``initial_lr``
    down to ``min_rho`` at ``min_lr``. Step it after the LR scheduler."""

    def __init__(self, optimizer: Optimizer, *, min_rho: float = 0.0, min_lr: float = 0.0):
        self.min_rho = check_number("min_rho", min_rho, zero=True)
        self.min_lr = check_number("min_lr", min_lr, zero=True)
        for index, group in enumerate(optimizer.param_groups):
            if group.get("initial_lr", group.get("lr")) in (None, self.min_lr):
                raise ValueError(
                    f"ProportionalRho: param group {index}'s learning rate "
                    f"{group.get('lr')!r} must differ from min_lr={min_lr!r}"
                )
        super().__init__(optimizer)

    def rho_at(self, group: dict[str, Any], step: int) -> float:
        fraction = (group["lr"] - self.min_lr) / (group["initial_lr"] - self.min_lr)
        return self.min_rho + (group["initial_rho"] - self.min_rho) * fraction
