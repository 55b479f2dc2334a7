"""The protocol every mode follows (:class:`Mode`, :class:`ModeState`), what the optimizer
offers its modes (:class:`Host`), and the full step, whose hooks are all the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..._util.validate import check_int

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from torch.optim import Optimizer

    from .._functional import AscentGroup
    from ..distributed import Shards


class Host(Protocol):
    """What a mode may use of the :class:`~gcsam.SharpnessAwareOptimizer` it runs in."""

    param_groups: list[dict[str, Any]]
    base_optimizer: Optimizer
    _shards: Shards | None  # FSDP2's shards: every norm is reduced over them

    def _foreach_for(self, tensors: list[Tensor]) -> bool:
        """Whether to take the multi-tensor path for ``tensors``."""

    def _check_step_settings(self) -> None:
        """Validate every param group and find the shards, as ``first_step`` does first."""

    def _ascend(self, groups: list[AscentGroup]) -> bool:
        """``d = GC(direction)`` in place, then ``w <- w + eps`` along ``d`` with the backup of
        ``w`` taken; ``False`` (and no move) if the norm is not finite."""

    def restore(self) -> None:
        """Back to ``w`` exactly; ends the step (:meth:`Mode.abort_step`)."""


@dataclass
class ModeState:
    """What a mode keeps between steps (the optimizer holds it; the mode reads and updates it).

    Attributes:
        steps: completed steps: ``second_step`` calls, skipped steps included, so that every
            DDP worker counts alike.
    """

    steps: int = 0

    @property
    def mid_step(self) -> bool:
        """Whether a step has begun that only ``first_step`` or ``restore`` may end."""
        return False


def entry_error(key: str, expected: str, got: Any) -> ValueError:
    """The error for a bad ``state_dict()["sharpness_aware"][key]``."""
    return ValueError(
        f"the optimizer state's sharpness_aware entry {key!r} must be {expected}, got {got!r}: "
        "the checkpoint is damaged, or was not written by gcsam; nothing was loaded"
    )


def entry_item(entry: dict[str, Any], key: str) -> Any:
    """``entry[key]``; the error names the key when it is missing."""
    if key not in entry:
        raise entry_error(key, "present", "nothing")
    return entry[key]


class Mode:
    """A cheap mode: a frozen set of settings and the hooks the optimizer calls, in this order.

    Between steps: :meth:`check_base`, :meth:`check_ddp`, :meth:`init_state`.
    In a step: :meth:`plans_ascent` and :meth:`before_first_pass` (``ascent_pass()``),
    :meth:`pass_batch` (``opt.pass_batch``), :meth:`ascends` and :meth:`before_ascent`
    (``first_step``), then :meth:`end_step` and :meth:`correct_descent` (``second_step``),
    or :meth:`abort_step` (``restore``). Saving: :meth:`save`, :meth:`load`.

    Every default is the full step's; a mode overrides what it changes. Hooks run under
    ``torch.no_grad()``; the ``state`` they get is the :attr:`State` that :meth:`init_state`
    made.
    """

    State: ClassVar[type[ModeState]] = ModeState

    def check_base(self, base: Optimizer) -> None:
        """Raise ``ValueError`` if this mode cannot step ``base``."""

    def check_ddp(self, local_ascent: bool) -> None:
        """Raise ``ValueError`` if this mode cannot run under DDP with ``ascent="local"``
        (``local_ascent``: the optimizer has a DDP model and that setting)."""

    def init_state(self, previous: ModeState | None) -> ModeState:
        """The state to start from: ``previous`` itself when it is this mode's kind of state
        (e.g. ``opt.mode = AdaptiveAscent(threshold=-1.0)`` between steps keeps the
        statistics), else a new one that keeps the step count."""
        if type(previous) is self.State:
            return previous
        return self.State(steps=0 if previous is None else previous.steps)

    def plans_ascent(self, state: ModeState) -> bool:
        """Before the first pass: whether it may serve an ascent (under local-ascent DDP, the
        pass then runs under ``no_sync()``)."""
        return True

    def before_first_pass(self, host: Host, state: ModeState) -> None:
        """As the first pass begins, inside ``ascent_pass()``: where it runs (MomentumAscent
        moves the weights here; the optimizer restores them if the pass raises)."""

    def pass_batch(self, state: ModeState, batch: Any, descending: bool) -> Any:
        """The part of ``batch`` that this pass (the descent pass if ``descending``) runs on."""
        return batch

    def ascends(self, host: Host, state: ModeState, scaler: torch.amp.GradScaler | None) -> bool:
        """In ``first_step``, with the first pass's (still scaled) gradients in ``.grad``:
        whether this step takes the ascent. ``False``: those gradients are the step's descent
        gradients, and ``second_step`` follows with no second pass."""
        return True

    def before_ascent(self, host: Host, state: ModeState, groups: list[AscentGroup]) -> None:
        """In ``first_step``, just before ``GC`` overwrites the unscaled gradients ``g``."""

    def end_step(self, state: ModeState) -> None:
        """In ``second_step``: the step is complete (taken or skipped)."""
        state.steps += 1

    def abort_step(self, state: ModeState) -> None:
        """In ``restore()``: the step ends without completing."""

    def correct_descent(self, host: Host, state: ModeState, *, ascended: bool, moved: bool) -> None:
        """In ``second_step``, with ``w`` restored and the descent gradient in ``.grad``, before
        the base step (skipped steps excluded). ``ascended``: this step took the ascent;
        ``moved``: the ascent moved some weight."""

    def save(self, host: Host, state: ModeState) -> dict[str, Any]:
        """This mode's part of ``state_dict()["sharpness_aware"]`` (without ``"mode"``)."""
        return {"steps": state.steps}

    def load(self, host: Host, entry: dict[str, Any]) -> ModeState:
        """The state that :meth:`save` wrote, checked: ``ValueError`` naming the key for a
        value :meth:`save` cannot have written. Changes nothing (the optimizer installs the
        result once everything else has loaded). Keys of other modes are ignored: state dicts
        saved before each mode kept only its own had them all."""
        steps = entry_item(entry, "steps")
        try:
            check_int("steps", steps, 0)
        except ValueError:
            raise entry_error("steps", "an integer >= 0", steps) from None
        return self.State(steps=steps)


@dataclass(frozen=True)
class FullStep(Mode):
    """The full two-pass step on every step (``mode=None``): every hook at its default."""
