""":class:`Periodic`: the full step every ``every``-th step, the base step between."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..._util.validate import check_int
from .base import Host, Mode, ModeState

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Periodic(Mode):
    """The full step every ``every``-th step (the first included), the base step otherwise."""

    every: int = 5

    def __post_init__(self) -> None:
        check_int(f"{type(self).__name__}(every=...)", self.every, 1)

    def ascends_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based count of completed steps) takes the ascent."""
        return step % self.every == 0

    def plans_ascent(self, state: ModeState) -> bool:
        return self.ascends_at(state.steps)

    def ascends(self, host: Host, state: ModeState, scaler: torch.amp.GradScaler | None) -> bool:
        return self.ascends_at(state.steps)
