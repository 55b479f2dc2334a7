""":class:`MomentumAscent` (Momentum-SAM; Becker, Altrock, Risse, 2024): one pass per step, at
the point the base optimizer's momentum leads away from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from .. import _functional
from ..distributed import local
from .base import Host, Mode, ModeState

_MOMENTUM_SOURCES: tuple[tuple[tuple[type[Optimizer], ...], str], ...] = (
    ((torch.optim.SGD,), "momentum_buffer"),
    (
        (
            torch.optim.Adam,
            torch.optim.AdamW,
            torch.optim.NAdam,
            torch.optim.RAdam,
            torch.optim.Adamax,
        ),
        "exp_avg",
    ),
)


def momentum_key(base: Optimizer) -> str:
    """The state key of ``base``'s momentum buffer; ``ValueError`` naming the bases that have
    one when it has none."""
    for classes, key in _MOMENTUM_SOURCES:
        if isinstance(base, classes):
            if key == "momentum_buffer" and not all(g["momentum"] > 0 for g in base.param_groups):
                break
            return key
    raise ValueError(
        f"MomentumAscent perturbs along the base optimizer's momentum, and {type(base).__name__}"
        f"{' without momentum' if isinstance(base, torch.optim.SGD) else ''} keeps none: use "
        "SGD with momentum > 0, Adam, AdamW, NAdam, RAdam or Adamax, or another mode "
        "(Periodic, LookSAM, AdaptiveAscent) for this base"
    )


@dataclass
class MomentumState(ModeState):
    """Attributes:
    pass_open: ``ascent_pass()`` has moved to the perturbed point (or found no momentum to
        move along) and ``first_step`` has not yet put ``w`` back.
    """

    pass_open: bool = False

    @property
    def mid_step(self) -> bool:
        return self.pass_open


@dataclass(frozen=True)
class MomentumAscent(Mode):
    """One pass per step, at the point the base optimizer's momentum leads away from."""

    State = MomentumState

    def check_base(self, base: Optimizer) -> None:
        momentum_key(base)

    def plans_ascent(self, state: ModeState) -> bool:
        return False  # its one pass is the descent pass: DDP all-reduces it

    def before_first_pass(self, host: Host, state: MomentumState) -> None:
        """Back up ``w`` and move to ``w + rho d / ||d||``, ``d = GC(-m)``."""
        host._check_step_settings()
        key = momentum_key(host.base_optimizer)
        base_state = host.base_optimizer.state
        groups = []
        for settings in host.param_groups:
            params = [p for p in settings["params"] if base_state[p].get(key) is not None]
            momenta = local(base_state[p][key] for p in params)
            foreach = host._foreach_for(params)
            directions = (
                torch._foreach_neg(momenta) if foreach and momenta else [-m for m in momenta]
            )
            groups.append(_functional.AscentGroup(settings, params, directions, foreach))
        if not host._ascend(groups):
            warnings.warn(
                f"{type(host).__name__}: the momentum is not finite (inf/NaN); this step's pass "
                "runs at the unperturbed weights",
                RuntimeWarning,
                stacklevel=4,  # the `with opt.ascent_pass()` line
            )
        state.pass_open = True

    def ascends(
        self, host: Host, state: MomentumState, scaler: torch.amp.GradScaler | None
    ) -> bool:
        """Back to ``w``, keeping the pass's gradients: they are the descent gradients."""
        if not state.pass_open:
            raise RuntimeError(
                "MomentumAscent takes the step's only pass at the momentum-perturbed point: "
                "run the forward and backward inside `with opt.ascent_pass():` before "
                "first_step(), or use step(closure)"
            )
        host.restore()
        return False

    def end_step(self, state: MomentumState) -> None:
        state.pass_open = False
        super().end_step(state)

    def abort_step(self, state: MomentumState) -> None:
        state.pass_open = False
