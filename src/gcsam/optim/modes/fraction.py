""":class:`AscentFraction`: every step takes the ascent, from a fraction of its batch
(m-sharpness; Andriushchenko & Flammarion, ICML 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .base import Host, Mode, ModeState

if TYPE_CHECKING:
    import torch


@dataclass
class FractionState(ModeState):
    """Attributes:
    sliced: this step's first pass asked ``opt.pass_batch`` for its part of the batch.
    """

    sliced: bool = False


@dataclass(frozen=True)
class AscentFraction(Mode):
    """The full step, with its first (ascent) pass on the first ``round(fraction * n)`` (at
    least 1) of the batch's ``n`` samples: ``1 + fraction`` passes' worth of compute."""

    fraction: float = 0.5
    State = FractionState

    def __post_init__(self) -> None:
        ok = isinstance(self.fraction, int | float) and not isinstance(self.fraction, bool)
        if not ok or not 0 < self.fraction <= 1:
            raise ValueError(
                f"AscentFraction(fraction=...) must be in (0, 1], got {self.fraction!r}"
            )

    def pass_batch(self, state: FractionState, batch: Any, descending: bool) -> Any:
        if descending:
            return batch
        size = _batch_size(batch)
        keep = max(1, round(self.fraction * size))
        state.sliced = True
        return _map_tensors(batch, lambda t: t if t.dim() == 0 else t[:keep])

    def ascends(
        self, host: Host, state: FractionState, scaler: torch.amp.GradScaler | None
    ) -> bool:
        if not state.sliced:
            raise RuntimeError(
                "AscentFraction takes the ascent on part of the batch: in the step's first "
                "pass, run the model on `batch = opt.pass_batch(batch)` (in the closure too; "
                "it gives the whole batch in the second pass)"
            )
        state.sliced = False
        return True

    def abort_step(self, state: FractionState) -> None:
        state.sliced = False


def _map_tensors(batch: Any, apply: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``apply`` on every tensor in it (tuples, named tuples, lists, mappings)."""
    if isinstance(batch, Tensor):
        return apply(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)._make(_map_tensors(item, apply) for item in batch)
    if isinstance(batch, tuple | list):
        return type(batch)(_map_tensors(item, apply) for item in batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: _map_tensors(item, apply) for key, item in batch.items()})
    return batch


def _batch_size(batch: Any) -> int:
    """The common ``dim 0`` size of the batch's tensors (0-d ones aside)."""
    sizes: set[int] = set()

    def record(tensor: Tensor) -> Tensor:
        if tensor.dim():
            sizes.add(tensor.shape[0])
        return tensor

    _map_tensors(batch, record)
    if len(sizes) != 1:
        raise ValueError(
            "opt.pass_batch needs a tensor, or a tuple, list or dict of tensors that share "
            f"their first (batch) dimension; got {'no tensors' if not sizes else sorted(sizes)}"
        )
    return sizes.pop()
