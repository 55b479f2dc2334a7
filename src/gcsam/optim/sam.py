r"""The SAM family: GCSAM, SAM and ASAM, siblings on one :class:`SharpnessAwareOptimizer`.

One step at weights :math:`w` with gradient :math:`g = \nabla L(w)`:

.. math::
    d &= \mathrm{GC}(g) \qquad \text{(gradient centralization; identity for SAM)} \\
    \epsilon &= \rho \, \frac{T^2 d}{\lVert T r \rVert_2}, \quad
        T = |w| \text{ (ASAM) or } 1, \quad
        r = d \text{ (normalize\_by="centralized") or } g \text{ ("raw")} \\
    \epsilon &= \rho \, T \operatorname{sign}(d) \qquad \text{(p = inf)} \\
    w &\leftarrow \mathrm{base\_step}\bigl(w, \nabla L(w + \epsilon)\bigr)

The norm is one norm over every parameter of every group. With the paper's
``normalize_by="centralized"``, :math:`\lVert\epsilon\rVert_2 = \rho` exactly; ``"raw"`` divides
by the raw gradient's norm like the authors' released script, so :math:`\lVert\epsilon\rVert_2
\le \rho`.

Under ``DistributedDataParallel``, pass the DDP model (``model=ddp``) and choose ``ascent``:
``"local"`` (each worker perturbs with its own gradient, one all-reduce per step) or
``"global"`` (the all-reduced gradient, two). :mod:`gcsam.optim.distributed` explains what each
means for the results and how to write the passes and gradient accumulation.

``mode=`` makes the step cheaper: the full step only on some steps (:class:`~gcsam.Periodic`,
:class:`~gcsam.LookSAM`, :class:`~gcsam.AdaptiveAscent`) or one pass at a point the momentum
gives (:class:`~gcsam.MomentumAscent`). A mode is a strategy the step consults through a few
hooks; :mod:`gcsam.modes` has their math and the protocol.

Guarantees. Extra memory is one copy of the parameters (the exact backup of ``w``); after
``first_step`` the ascent gradients hold ``GC(g)``. A non-finite ascent gradient skips the
whole step (weights and base state untouched) with a ``RuntimeWarning``, or silently when a
``GradScaler`` is in charge (it records the overflow and lowers its scale); so does a step
scale ``rho / ||T r||`` beyond the fp64 range (a gradient norm below ~1e-308 * rho). Every
``first_step`` checks the settings again before touching anything, so a value written into
``param_groups`` later gets the constructor's error. A tensor listed twice (in one group or
two) would be perturbed twice: it raises ``ValueError`` (torch only warns within a group).
Complex parameters count as ``torch.view_as_real`` pairs (GC of the real and imaginary parts,
``|z|^2`` in norms, ``T = |w|``); ``p = inf`` groups refuse them (a complex number has no sign).

This module keeps the optimizers' bookkeeping (param groups, passes, state, skips); the math on
lists of tensors is in :mod:`gcsam.optim._functional`, the group checks in ``_groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _functional, _groups, distributed
from ._groups import NORMALIZERS
from ._perturbation import NonFiniteSkip, Perturbation
from .centralization import centralize_gradient
from .modes import Mode, load_mode_state, mode_name, resolve_mode
from .modes.base import FullStep, ModeState

__all__ = ["GCSAM", "NORMALIZERS", "SAM", "SharpnessAwareOptimizer"]

Batch = TypeVar("Batch")


_LIGHTNING = ("lightning.", "pytorch_lightning.")


def _lightning_wraps(closure: Callable[[], Tensor]) -> Any:
    """What PyTorch Lightning's precision plugin wrapped into ``closure`` (its
    ``functools.partial(_wrap_closure, model, optimizer, closure)``), or None for any other
    closure. Told by module names: Lightning is not a dependency."""
    function = getattr(closure, "func", None)
    if not (getattr(function, "__module__", None) or "").startswith(_LIGHTNING):
        return None
    args = getattr(closure, "args", ())
    return args[-1] if args else None


def _check_closure(optimizer: Optimizer, closure: Callable[[], Tensor] | None) -> None:
    """Refuse what ``step()`` cannot run twice: no closure, or Lightning's automatic one. A
    Lightning closure is told by what it wraps: under automatic optimization Lightning's own
    ``Closure`` object (from its ``loops``), under manual optimization the module's closure (or,
    when ``opt.step()`` got none, Lightning's do-nothing one)."""
    wrapped = None if closure is None else _lightning_wraps(closure)
    owner = (getattr(wrapped, "__module__", None) or "") if wrapped is not None else ""
    if closure is None or (owner.startswith(_LIGHTNING) and ".loops." not in owner):
        raise TypeError(
            f"{type(optimizer).__name__}.step() needs a closure that clears the gradients, "
            "computes the loss, calls backward() and returns the loss; or call first_step() "
            "and second_step() yourself (a trainer that calls step() itself, like "
            "GradScaler.step(opt) or PyTorch Lightning's automatic optimization, needs "
            "gcsam.integrations)"
        )
    if owner.startswith(_LIGHTNING):
        raise RuntimeError(
            f"{type(optimizer).__name__} under PyTorch Lightning's automatic optimization would "
            "update BatchNorm statistics in both passes and all-reduce both under DDP: set "
            "self.automatic_optimization = False and use gcsam.integrations.lightning"
        )


def _under_way(what: str, fix: str) -> RuntimeError:
    return RuntimeError(
        f"{what} between steps, and a step is under way (the weights may be perturbed): call "
        f"{fix} first"
    )


class SharpnessAwareOptimizer(Optimizer):
    r"""The machinery shared by the SAM family: a two-pass step around a base optimizer.

    Each step takes two gradients: ``g`` at the weights ``w``, then the descent gradient at
    ``w + eps``, ``eps = rho * d / ||r||_2`` with ``d = GC(g)``; ``w`` is restored exactly (from
    a copy) before ``base_optimizer`` steps with the second gradient. The module docstring has
    the ASAM and ``p = inf`` forms and the guarantees. Use :class:`GCSAM` or :class:`SAM`;
    ``isinstance(opt, SharpnessAwareOptimizer)`` tells whether an optimizer takes two passes.

    Args:
        params: parameters or param groups (``None`` with a base optimizer instance); groups may
            set their own ``rho``, ``adaptive``, ``p``, ``normalize_by``, ``gc_scope``,
            ``gc_descent``.
        base_optimizer: an optimizer class, built on the same param groups with
            ``**base_kwargs``, or an instance over the same parameters (its groups take these
            settings). Both share one ``param_groups`` list, for LR schedulers on either.
        rho: ascent radius: finite, >= 0, at most the largest value of the weights' dtype.
        adaptive: ASAM scaling ``T = |w|``: ``eps = rho * w^2 d / || |w| d ||``.
        p: ``2`` or ``float("inf")`` (``eps = rho * sign(d)``); one L2 norm over all p=2 groups.
        normalize_by: ``"centralized"``: ``r = d`` (the paper; ``||eps|| == rho``); ``"raw"``:
            ``r = g``, like the authors' released script (``||eps|| <= rho``).
        gc_scope: ``"all"`` (every tensor with ndim > 1, the paper), ``"conv"`` (ndim > 3) or
            ``"none"`` (plain SAM).
        gc_descent: also centralize the descent gradient before the base step.
        foreach: multi-tensor kernels (default: on for CPU/CUDA tensors); the single-tensor
            path gives the same values to float rounding.
        model: the ``DistributedDataParallel`` model of these parameters, whose all-reduce the
            optimizer turns off where ``ascent`` says; any other module, or ``None``: one process.
        ascent: under DDP, ``"local"``: each worker perturbs with its own gradient (one
            all-reduce per step); ``"global"``: with the all-reduced gradient (two).
        mode: ``None`` (the full step every step) or a cheap mode of :mod:`gcsam.modes`, or its
            name for the default settings.
        **base_kwargs: arguments of ``base_optimizer`` when it is a class (``lr=0.1``, ...).

    :attr:`descending` is True during a step's second pass, whatever ``rho``: a closure that runs
    both passes freezes BatchNorm statistics with ``frozen_bn_stats(model,
    enabled=opt.descending)``, which makes ``rho=0`` exactly the base optimizer.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        gc_scope: str,
        adaptive: bool = False,
        p: float = 2,
        normalize_by: str = "centralized",
        gc_descent: bool = False,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        ascent: str = "local",
        mode: Mode | str | None = None,
        **base_kwargs: Any,
    ) -> None:
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        self.foreach = foreach
        self.ascent = distributed.check_ascent(ascent)
        self._model, self._ddp = model, distributed.ddp_of(model)
        self._mode_state: ModeState | None = None
        # Before the groups are touched: bad input changes nothing.
        self._set_mode(mode, base_optimizer)
        defaults = dict(
            rho=rho,
            adaptive=adaptive,
            p=p,
            normalize_by=normalize_by,
            gc_scope=gc_scope,
            gc_descent=gc_descent,
        )
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise TypeError("params is required when base_optimizer is a class")
            super().__init__(params, defaults)
            base = _groups.build_base(base_optimizer, self.param_groups, base_kwargs, foreach)
            self._policy.check_base(base)
        else:
            super().__init__(
                _groups.adopt_groups(params, base_optimizer, defaults, base_kwargs), defaults
            )
            base = base_optimizer
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self._perturbation = Perturbation(self.state, self._foreach_for)
        self._skip = NonFiniteSkip()
        self._descending = False  # from a first_step that ascends to second_step/restore
        self._ascended = False  # this step's first_step took the ascent
        self._placement = distributed.Placement()  # FSDP2's shards, found once per parameters
        self._shards: distributed.Shards | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _groups.prepare_group(param_group, self.param_groups, self._check_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still inside Optimizer.__init__
            super().add_param_group(param_group)
        else:
            for key, value in self.defaults.items():
                param_group.setdefault(key, value)
            base.add_param_group(param_group)

    def _check_group(
        self, param_group: dict[str, Any], params: Sequence[Tensor] = (), index: int = 0
    ) -> None:
        """Raise if a param group's settings (or the defaults it falls back to) are invalid, or
        do not suit ``params``, its parameters (group ``index``)."""
        _groups.check_group(param_group, self.defaults, params, index)

    @property
    def perturbed(self) -> bool:
        """Whether the weights are at ``w + eps`` (not after a ``first_step`` that moved
        nothing: ``rho=0``, a zero gradient, a skipped step)."""
        return bool(self._perturbation.params)

    @property
    def descending(self) -> bool:
        """From a ``first_step`` that took the ascent to ``second_step``/``restore``: run the
        step's second pass (False on a cheap mode's step without ascent: its one pass is done)."""
        return self._descending

    @property
    def model(self) -> nn.Module | None:
        """The model given as ``model=``; settable between steps, for trainers that wrap the
        model in ``DistributedDataParallel`` after the optimizer is built."""
        return self._model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        self._check_between_steps("the model can only change")
        ddp = distributed.ddp_of(model)
        self._policy.check_ddp(ddp is not None and self.ascent == "local")
        self._model, self._ddp = model, ddp
        self._placement = distributed.Placement()  # checked again against the new model

    @property
    def mode(self) -> Mode | None:
        """The cheap mode (:mod:`gcsam.modes`), ``None`` for the full step. Assigning one between
        steps checks it like the constructor; one of the same kind keeps the mode's state (e.g.
        to schedule AdaptiveAscent's threshold), another kind keeps the step count only."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode | str | None) -> None:
        self._check_between_steps("the mode can only change")
        self._set_mode(mode, self.base_optimizer)

    def _set_mode(self, mode: Mode | str | None, base: type[Optimizer] | Optimizer) -> None:
        resolved = resolve_mode(mode)
        policy = FullStep() if resolved is None else resolved
        if isinstance(base, Optimizer):  # a class is checked once built
            policy.check_base(base)
        policy.check_ddp(self._ddp is not None and self.ascent == "local")
        self._mode, self._policy = resolved, policy
        self._mode_state = policy.init_state(self._mode_state)

    def _check_between_steps(self, what: str, fix: str = "second_step()", weights: bool = False):
        """``RuntimeError`` if a step is under way (``weights``: or the weights are moved)."""
        if self._descending or self._mode_state.mid_step or (weights and self.perturbed):
            raise _under_way(what, fix)

    def ascent_pass(self) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of a step's first pass (two-step
        style): DDP's ``no_sync()`` when it is a local ascent, and where the mode runs the pass
        (MomentumAscent moves the weights here; they go back if the pass raises). Not needed
        with :meth:`step`, which does it itself."""
        self._check_between_steps("ascent_pass() runs only", "second_step() (or restore())")
        return self._first_pass()

    @contextmanager
    def _first_pass(self) -> Iterator[None]:
        local = self._local_ascent and self._policy.plans_ascent(self._mode_state)
        with distributed.sync(self._ddp, enabled=not local):
            with torch.no_grad():
                self._policy.before_first_pass(self, self._mode_state)
            try:
                yield
            except BaseException:
                self.restore()
                raise

    def pass_batch(self, batch: Batch) -> Batch:
        """The part of ``batch`` (a tensor, or a tuple, list or dict of them) that the pass
        about to run takes: all of it, unless the mode says otherwise."""
        return self._policy.pass_batch(self._mode_state, batch, self._descending)

    def micro_batch(self, *, last: bool) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of one micro-batch of gradient
        accumulation, in either pass: DDP's ``no_sync()`` unless ``last`` (which all-reduces the
        accumulated gradient), and for every micro-batch of a local ascent pass. Nothing
        without a DDP model."""
        local = self._local_ascent and self._policy.plans_ascent(self._mode_state)
        return distributed.sync(self._ddp, enabled=bool(last) and (self._descending or not local))

    @property
    def _local_ascent(self) -> bool:
        return self._ddp is not None and self.ascent == "local"

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Move the weights to ``w + eps`` along the gradients in ``.grad`` (unscaled first by
        ``scaler``) if this step ascends; then :attr:`descending` says whether to run the second
        pass. On a step without ascent the gradients stay, for :meth:`second_step`."""
        if self._descending:  # (a mode's first pass under way is what first_step ends)
            raise _under_way("first_step() runs only", "second_step() (or restore())")
        self._check_step_settings()
        if not self._policy.ascends(self, self._mode_state, scaler):
            return
        if scaler is not None:
            scaler.unscale_(self)
        groups = _functional.gradient_groups(self.param_groups, self._foreach_for)  # g
        self._policy.before_ascent(self, self._mode_state, groups)
        finite = self._ascend(groups)  # d = GC(g); w <- w + eps
        self._skip.plan(finite, self, self._ddp, self._local_ascent, scaler)
        self._ascended = self._descending = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def prepare_descent(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """:meth:`second_step` without the base step, for trainers that clip or step it
        themselves: ``w`` restored exactly, the descent gradient (the mode's correction and
        ``gc_descent`` applied) in ``.grad``, the step counted. Returns whether to take the base
        step: ``False`` on a skipped step (a non-finite ascent gradient, here or on any DDP
        worker; ``scaler`` then records an overflow), with the gradients set to ``None``."""
        ascended, moved = self._ascended, self.perturbed
        self._ascended = self._descending = False
        self._perturbation.restore()  # w
        skip = self._skip.settle(self, scaler)
        self._policy.end_step(self._mode_state)
        self._opt_called = True  # LR schedulers built on this optimizer check it stepped first
        if skip:
            self.zero_grad(set_to_none=True)
            return False
        self._policy.correct_descent(self, self._mode_state, ascended=ascended, moved=moved)
        for group in self.param_groups:
            if group["gc_descent"]:
                centralize_gradient([p.grad for p in group["params"]], group["gc_scope"])
        return True

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore ``w`` and let the base optimizer step with the gradients now in ``.grad``
        (:meth:`prepare_descent`, then the base step). With ``scaler``, the base step goes
        through ``scaler.step(self.base_optimizer)``; call ``scaler.update()`` afterwards."""
        if self.prepare_descent(scaler):
            if scaler is not None:
                scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One full step; returns the first pass's loss. ``closure`` clears the gradients,
        computes the loss, calls ``backward()`` on it (on ``scaler.scale(loss)`` with a scaler)
        and returns it; it runs once or twice. If it raises, the weights are back at ``w``."""
        _check_closure(self, closure)
        with torch.enable_grad(), self.ascent_pass():
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        if self._descending and not self._skip.planned:
            try:
                with torch.enable_grad():
                    closure()
            except BaseException:
                self.restore()
                raise
        self.second_step(scaler=scaler)
        return loss

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back at ``w`` exactly if they are perturbed, and end the step (call
        it when the second forward/backward of the two-step style fails)."""
        self._descending = False
        self._skip.cancel()
        self._policy.abort_step(self._mode_state)
        self._perturbation.restore()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (moments, step counts), whose param groups carry the
        SAM settings too, and under ``"sharpness_aware"`` the mode's name and state (the step
        count, LookSAM's ``g_v``, AdaptiveAscent's statistics). The backup of ``w`` is transient
        and not saved."""
        self._check_between_steps("state_dict() works only", weights=True)
        entry = {"mode": mode_name(self._policy)} | self._policy.save(self, self._mode_state)
        return self.base_optimizer.state_dict() | {"sharpness_aware": entry}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (or a base optimizer's state dict). Everything
        is checked before anything changes."""
        self._check_between_steps("load_state_dict() works only", "restore()", weights=True)
        state_dict = dict(state_dict)
        entry = state_dict.pop("sharpness_aware", None)
        mode_state = None if entry is None else load_mode_state(self._policy, self, entry)
        # torch checks the group sizes before it loads anything
        for index, (group, current) in enumerate(
            zip(state_dict["param_groups"], self.param_groups, strict=False)
        ):
            self._check_group(group, current["params"], index)
        self.base_optimizer.load_state_dict(state_dict)
        if mode_state is not None:
            self._mode_state = mode_state
        # The base optimizer builds a new group list on load: share it again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- what the steps and the modes use ---------------------------------------------------

    def _check_step_settings(self) -> None:
        """Validate every param group (a bad value written since, or parameters moved to
        different devices, raises here) and find where FSDP2 shards the parameters."""
        for index, group in enumerate(self.param_groups):
            self._check_group(group, group["params"], index)
        _groups.check_one_device([group["params"] for group in self.param_groups])
        params = [p for group in self.param_groups for p in group["params"]]
        self._shards = self._placement.shards(params, self.model, self._ddp)

    def _foreach_for(self, tensors: list[Tensor]) -> bool:
        return self.foreach if self.foreach is not None else _functional.default_foreach(tensors)

    def _ascend(self, groups: list[_functional.AscentGroup]) -> bool:
        return self._perturbation.ascend(groups, self._shards, on_failure=self.restore)


class GCSAM(SharpnessAwareOptimizer):
    r"""Gradient-Centralized Sharpness-Aware Minimization (Hassan et al., 2025).

    The ascent direction is the centralized gradient: ``eps = rho * GC(g) / ||GC(g)||_2``.
    Arguments as :class:`SharpnessAwareOptimizer`, with ``gc_scope="all"`` (the paper) by
    default.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        gc_scope: str = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, gc_scope=gc_scope, **kwargs)


class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021): no gradient centralization.

    ``adaptive=True`` gives ASAM (Kwon et al., 2021). Arguments as
    :class:`SharpnessAwareOptimizer` except ``gc_scope``, which is ``"none"``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if "gc_scope" in kwargs:
            raise TypeError("SAM takes no gc_scope (it never centralizes); use GCSAM instead")
        super().__init__(params, base_optimizer, rho, gc_scope="none", **kwargs)

    def _check_group(
        self, param_group: dict[str, Any], params: Sequence[Tensor] = (), index: int = 0
    ) -> None:
        if param_group.get("gc_scope", "none") != "none":
            raise TypeError(
                "SAM param groups take no gc_scope other than 'none' (SAM never centralizes); "
                "use GCSAM"
            )
        super()._check_group(param_group, params, index)
