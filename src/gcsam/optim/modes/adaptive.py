""":class:`AdaptiveAscent` (AE-SAM; Jiang et al., ICLR 2023): the full step when the squared
gradient norm is large against its running statistics, the base step otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import _functional
from .base import Host, Mode, ModeState, entry_error, entry_item


@dataclass
class AdaptiveState(ModeState):
    """Attributes:
    mean, var: running mean and variance of ``||g||^2``.
    pending: this step's ``(mean, var)``, kept when the step completes.
    """

    mean: float = 0.0
    var: float = 0.0
    pending: tuple[float, float] | None = None


@dataclass(frozen=True)
class AdaptiveAscent(Mode):
    """The full step when the squared gradient norm is large against its running statistics."""

    decay: float = 0.9
    threshold: float = 0.0
    State = AdaptiveState

    def __post_init__(self) -> None:
        ok = isinstance(self.decay, int | float) and not isinstance(self.decay, bool)
        if not ok or not 0 <= self.decay < 1:
            raise ValueError(f"AdaptiveAscent(decay=...) must be in [0, 1), got {self.decay!r}")
        finite = isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
        if not finite or not math.isfinite(self.threshold):
            raise ValueError(
                f"AdaptiveAscent(threshold=...) must be a finite number, got {self.threshold!r}"
            )

    def update(self, mean: float, var: float, squared_norm: float) -> tuple[float, float, bool]:
        """The new ``(mean, var)`` after ``squared_norm``, and whether this step ascends."""
        mean = self.decay * mean + (1 - self.decay) * squared_norm
        var = self.decay * var + (1 - self.decay) * (squared_norm - mean) ** 2
        return mean, var, squared_norm >= mean + self.threshold * math.sqrt(var)

    def check_ddp(self, local_ascent: bool) -> None:
        if local_ascent:
            raise ValueError(
                "AdaptiveAscent under DDP needs ascent='global': its steps without ascent "
                "descend along the all-reduced gradient of the first pass"
            )

    def ascends(
        self, host: Host, state: AdaptiveState, scaler: torch.amp.GradScaler | None
    ) -> bool:
        grads = [p.grad for group in host.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        # A host read, kept: the decision picks whether the step takes a second pass.
        (squared,) = _functional.reduced_sums(
            [_functional.squared_norms(grads, foreach=host._foreach_for(grads), precise=False)],
            host._shards,
        )
        if scaler is not None and scaler.is_enabled():
            squared /= scaler.get_scale() ** 2
        if not math.isfinite(squared):
            return True  # the ascent path skips the step
        mean, var, ascend = self.update(state.mean, state.var, squared)
        state.pending = (mean, var)  # kept by end_step; a failed step leaves no trace
        return ascend

    def end_step(self, state: AdaptiveState) -> None:
        if state.pending is not None:
            state.mean, state.var = state.pending
            state.pending = None
        super().end_step(state)

    def abort_step(self, state: AdaptiveState) -> None:
        state.pending = None

    def save(self, host: Host, state: AdaptiveState) -> dict[str, Any]:
        return super().save(host, state) | {"adaptive_stats": [state.mean, state.var]}

    def load(self, host: Host, entry: dict[str, Any]) -> AdaptiveState:
        state = super().load(host, entry)
        stats = entry_item(entry, "adaptive_stats")
        numbers = (
            isinstance(stats, list | tuple)
            and len(stats) == 2
            and all(
                not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
                for v in stats
            )
        )
        if not numbers or stats[0] < 0 or stats[1] < 0:
            raise entry_error("adaptive_stats", "[mean, variance]: two finite numbers >= 0", stats)
        state.mean, state.var = float(stats[0]), float(stats[1])
        return state
