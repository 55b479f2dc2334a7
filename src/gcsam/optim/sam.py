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
gives (:class:`~gcsam.MomentumAscent`); :mod:`gcsam.modes` has their math.

This module keeps the optimizers' bookkeeping (param groups, state, passes, DDP, skips); the
math on lists of tensors is in :mod:`gcsam.optim._functional`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _functional, _groups, distributed
from ._groups import NORMALIZERS
from ._mode_steps import ModeSteps
from .centralization import centralize_gradient
from .modes import LookSAM, Mode, MomentumAscent, mode_name
from .modes import momentum_key as _momentum_key

__all__ = ["GCSAM", "NORMALIZERS", "SAM", "SharpnessAwareOptimizer"]


def _from_lightning(closure: Callable[[], Tensor]) -> bool:
    """Whether ``closure`` is PyTorch Lightning's automatic-optimization closure (a
    ``functools.partial`` of its precision plugin), told by module name: Lightning is not a
    dependency."""
    function = getattr(closure, "func", closure)
    module = getattr(function, "__module__", None) or ""
    return module.startswith(("lightning.", "pytorch_lightning."))


class SharpnessAwareOptimizer(ModeSteps, Optimizer):
    r"""The machinery shared by the SAM family: a two-pass step around a base optimizer.

    Each step takes two gradients: ``g`` at the weights ``w``, then the descent gradient at
    ``w + eps`` with ``eps = rho * d / ||r||_2``, ``d = GC(g)`` (identity when ``gc_scope`` is
    ``"none"``); ``w`` is restored exactly (from a copy) before ``base_optimizer`` steps with
    the second gradient. See the module docstring for the adaptive (ASAM) and ``p = inf`` forms.
    Use :class:`GCSAM` or :class:`SAM`; ``isinstance(opt, SharpnessAwareOptimizer)`` tells
    whether an optimizer takes the two-pass step.

    Args:
        params: parameters or param groups; ``None`` when ``base_optimizer`` is an instance.
            Groups may set their own ``rho``, ``adaptive``, ``p``, ``normalize_by``,
            ``gc_scope`` and ``gc_descent``.
        base_optimizer: an optimizer class (built on the same param groups with
            ``**base_kwargs``) or an optimizer instance over the same parameters (its groups
            take this constructor's settings). Both share one ``param_groups`` list, so LR
            schedulers built on either see the same groups.
        rho: radius of the ascent step: finite, >= 0, and no larger than the largest value of
            the parameters' dtype (65504 for fp16), since ``|eps|`` reaches ``rho``.
        adaptive: ASAM scaling ``T = |w|``: ``eps = rho * w^2 d / || |w| d ||``.
        p: ``2`` or ``float("inf")`` (``eps = rho * sign(d)``). The L2 norm is one norm over
            the parameters of every ``p = 2`` group.
        normalize_by: ``"centralized"`` divides by ``||GC(g)||`` (the paper; ``||eps|| == rho``);
            ``"raw"`` divides by ``||g||`` like the authors' released script
            (``||eps|| <= rho``).
        gc_scope: ``"all"`` (every tensor with ndim > 1, the paper), ``"conv"`` (ndim > 3) or
            ``"none"`` (plain SAM).
        gc_descent: also centralize the descent gradient before the base step.
        foreach: multi-tensor kernels (default: on for CPU/CUDA tensors). Results match the
            single-tensor path to float rounding.
        model: the ``DistributedDataParallel`` model these parameters belong to, so that the
            optimizer can turn DDP's gradient all-reduce off where ``ascent`` says
            (:meth:`step`, :meth:`ascent_pass`, :meth:`micro_batch`). Any other module, or
            ``None``, means one process: ``ascent`` then changes nothing.
        ascent: ``"local"``: each DDP worker perturbs with its own centralized gradient
            (m-sharpness; one gradient all-reduce per step); ``"global"``: with the all-reduced
            gradient, like one process on the global batch (two). See
            :mod:`gcsam.optim.distributed`. Neither is saved in ``state_dict``.
        mode: ``None`` (the full step every step) or a cheap mode of :mod:`gcsam.modes`
            (an instance, or its name for the default settings). It applies to every group:
            a step either takes its second pass or not.
        **base_kwargs: arguments of ``base_optimizer`` when it is a class (``lr=0.1``, ...).

    Extra memory: one copy of the parameters (the exact backup of ``w``). After ``first_step``
    the ascent gradients hold ``GC(g)``. A non-finite ascent gradient skips the whole step
    (weights and base state untouched) with a ``RuntimeWarning``, or silently when a
    ``GradScaler`` is in charge (it records the overflow and lowers its scale); so does a step
    scale ``rho / ||T r||`` beyond the fp64 range (a gradient norm below ~1e-308 * rho).

    Every ``first_step`` checks the settings again before touching anything, so a value
    written into ``param_groups`` later gets the constructor's error. A tensor listed twice (in
    one group or two) would be perturbed twice: it raises ``ValueError`` (torch only warns within
    a group). Complex parameters count as ``torch.view_as_real`` pairs (GC of the real and
    imaginary parts, ``|z|^2`` in norms, ``T = |w|``); ``p = inf`` groups refuse them (a complex
    number has no sign).

    :attr:`descending` is True during a step's second (descent) pass (from a ``first_step``
    that took the ascent to ``second_step``/``restore``), whatever ``rho``: a closure that runs
    both passes freezes BatchNorm statistics with ``frozen_bn_stats(model,
    enabled=opt.descending)``, which makes ``rho=0`` exactly the base optimizer.
    :attr:`perturbed` only says whether the weights moved.
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
        # Before _wrap writes the SAM settings into an instance's groups: bad input changes nothing.
        self._set_mode(mode, base_optimizer)
        defaults = dict(
            rho=rho,
            adaptive=adaptive,
            p=p,
            normalize_by=normalize_by,
            gc_scope=gc_scope,
            gc_descent=gc_descent,
        )
        self.base_optimizer = self._wrap(params, base_optimizer, defaults, base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self._perturbed: list[Tensor] = []
        self._skip_descent = False
        # From an ascending first_step to second_step/restore: the descent pass (`descending`).
        self._descending = False
        # Local-mode DDP: the workers' agreement on a non-finite ascent, read in second_step.
        self._vote: distributed.NonFiniteVote | None = None
        if isinstance(self.mode, MomentumAscent):  # a class base is built only now
            self._momentum_key = _momentum_key(self.base_optimizer)
        self._ascended = False  # this step's first_step took the ascent
        # FSDP2: the process group that shards the parameters (all norms are reduced over it),
        # and the parameters it was found for.
        self._shards: distributed.Shards | None = None
        self._shards_key: tuple[int, ...] | None = None
        self._init_mode_state()

    def _wrap(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> Optimizer:
        """Initialize this optimizer on the base optimizer's param groups; return the base."""
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise TypeError("params is required when base_optimizer is a class")
            super().__init__(params, defaults)
            takes_foreach = "foreach" in inspect.signature(base_optimizer).parameters
            if self.foreach is not None and takes_foreach:
                base_kwargs.setdefault("foreach", self.foreach)  # one switch for both steps
            base = base_optimizer(self.param_groups, **base_kwargs)
            _groups.check_no_shared_keys(base)
            return base
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
        if base_kwargs:
            raise TypeError(
                f"base optimizer arguments ({', '.join(sorted(base_kwargs))}) can only be "
                "given when base_optimizer is a class; set them on the instance instead"
            )
        if params is not None:
            _groups.check_same_params(params, base_optimizer)
        _groups.check_no_shared_keys(base_optimizer)
        groups = base_optimizer.param_groups
        _groups.check_unique([group["params"] for group in groups])  # torch only warned
        for index, group in enumerate(groups):  # before the update below changes the instance
            _groups.check_group(defaults, defaults, group["params"], index)
        # The constructor's settings win over any a previous wrapper left in the groups.
        for group in groups:
            group.update(defaults)
        super().__init__(groups, defaults)
        return base_optimizer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses sets (no order) below
            params = param_group["params"] = (
                [params] if isinstance(params, Tensor) else list(params)
            )
            _groups.check_unique([*(group["params"] for group in self.param_groups), params])
            self._check_group(param_group, params, len(self.param_groups))
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
        """True between a ``first_step`` that moved the weights and ``second_step``/``restore``.

        False when ``first_step`` moved nothing (``rho=0``, a zero gradient, a skipped
        non-finite step): to freeze BatchNorm statistics in the descent pass use
        :attr:`descending`, which such steps set too.
        """
        return bool(self._perturbed)

    @property
    def descending(self) -> bool:
        """True from a ``first_step`` that took the ascent until ``second_step``/``restore``,
        whatever ``rho``: run the step's second (descent) pass, e.g. under
        ``frozen_bn_stats(model, enabled=opt.descending)``. False after a ``first_step`` of a
        cheap mode's step without ascent: its one pass is done."""
        return self._descending

    @property
    def model(self) -> nn.Module | None:
        """The model given as ``model=``; settable between steps, for trainers that wrap the
        model in ``DistributedDataParallel`` after the optimizer is built (Lightning's
        ``configure_optimizers``, Hugging Face's ``Trainer``)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        if self._descending or self._momentum_pass:
            raise RuntimeError("the model can only change between steps: call second_step() first")
        ddp = distributed.ddp_of(model)
        self._check_mode_under_ddp(self.mode, ddp)
        self._model, self._ddp = model, ddp
        self._shards_key = None  # checked again against the new model at the next step

    @property
    def _local_ascent(self) -> bool:
        return self._ddp is not None and self.ascent == "local"

    @property
    def _local_first_pass(self) -> bool:
        """Whether DDP must not all-reduce the first pass (a local ascent)."""
        return self._local_ascent and self._plans_ascent()

    def ascent_pass(self) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of a step's first pass (two-step
        style): DDP's ``no_sync()`` when it is a local ascent (``ascent="local"``); under
        :class:`~gcsam.modes.MomentumAscent`, the move to the momentum-perturbed point, where
        the step's only pass runs (undone if the pass raises).

        Not needed with :meth:`step`, which does it itself; needed for ``MomentumAscent``.
        """
        if self._descending or self._momentum_pass:
            raise RuntimeError(
                "ascent_pass() after first_step() or inside another ascent_pass(): call "
                "second_step() (or restore()) first"
            )
        if not isinstance(self.mode, MomentumAscent):
            return distributed.sync(self._ddp, enabled=not self._local_first_pass)
        return self._momentum_pass_context()

    def micro_batch(self, *, last: bool) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of one micro-batch of gradient
        accumulation, in either pass: DDP's ``no_sync()`` unless ``last`` (which all-reduces the
        accumulated gradient), and for every micro-batch of a local ascent pass
        (``ascent="local"``). Nothing without a DDP model.
        """
        enabled = bool(last) and (self._descending or not self._local_first_pass)
        return distributed.sync(self._ddp, enabled=enabled)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Move the weights to ``w + eps`` using the gradients now in ``.grad``, if this step
        ascends; afterwards :attr:`descending` says whether to run the second pass.

        With ``scaler``, the gradients are unscaled first (``scaler.unscale_(self)``). Every
        group's settings are validated first: a bad one raises before anything changes. On a
        step without ascent (see :mod:`gcsam.modes`) the gradients are the step's descent
        gradients: they stay (``zero_grad`` is ignored) for :meth:`second_step`; under
        ``MomentumAscent`` the weights go back to ``w``.
        """
        if self._descending:
            raise RuntimeError(
                "first_step() called twice: the step's descent pass has begun (the weights may "
                "be perturbed); call second_step() (or restore()) first"
            )
        for index, group in enumerate(self.param_groups):
            self._check_group(group, group["params"], index)
        self._find_shards()
        if isinstance(self.mode, MomentumAscent):
            self._end_momentum_pass()
            return
        if not self._decide_ascent(scaler):
            return
        if scaler is not None:
            scaler.unscale_(self)
        groups = self._ascent_groups()
        if isinstance(self.mode, LookSAM):
            self._keep_gradient(groups)
        for group in groups:  # .grad <- d = GC(g)
            group.centralized = _functional.centralize_(
                group.grads,
                group.settings["gc_scope"],
                foreach=group.foreach,
                measure=not group.settings["adaptive"],
            )
        self._take_ascent(groups, scaler)
        self._ascended = self._descending = True
        if zero_grad:
            self.zero_grad()

    def _take_ascent(
        self, groups: list[_functional.AscentGroup], scaler: torch.amp.GradScaler | None
    ) -> None:
        """``w <- w + eps`` along the groups' directions (the ``grads`` of ``groups``, already
        centralized), or plan the step's skip if they are not finite."""
        norm = _functional.ascent_norm(groups, self._shards)
        # An fp64-overflowing rho / norm (subnormal gradients) is no step to take either.
        finite = norm.finite and all(
            math.isfinite(_functional.step_scale(g.settings, norm.l2)) for g in groups
        )
        if finite:  # w <- w + eps
            self._move_to_perturbed_point(groups, norm.l2)
        self._plan_nonfinite_skip(finite, scaler)

    def _ascent_groups(self) -> list[_functional.AscentGroup]:
        """Each param group's parameters that have a gradient; sparse gradients are refused
        before any gradient is touched."""
        groups = []
        for settings in self.param_groups:
            params = [p for p in settings["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads = [p.grad for p in params]
            foreach = self._use_foreach(params)
            groups.append(_functional.AscentGroup(settings, params, grads, foreach))
        return groups

    def _find_shards(self) -> None:
        """Set ``_shards``: where FSDP2 shards the parameters (``None``: plain tensors), after
        checking their placements; kept while the parameters stay the same."""
        params = [p for group in self.param_groups for p in group["params"]]
        key = tuple(map(id, params))
        if key == self._shards_key:
            return
        shards = distributed.shards_of(params, self.model)
        if shards is not None and self._ddp is not None:
            raise ValueError(
                "model= is a DistributedDataParallel module over DTensor (FSDP2) parameters: "
                "FSDP2 reduces the gradients itself and the ascent is global; give the "
                "fully_shard model (or nothing) as model="
            )
        self._shards, self._shards_key = shards, key

    def _use_foreach(self, params: list[Tensor]) -> bool:
        return self.foreach if self.foreach is not None else _functional.default_foreach(params)

    def _move_to_perturbed_point(self, groups: list[_functional.AscentGroup], norm: float) -> None:
        """Back up ``w`` and move to ``w + eps``; on any failure, back to ``w`` before raising."""
        for group in groups:
            scale = _functional.step_scale(group.settings, norm)
            if scale == 0 or not group.params:  # p = inf: rho, even with no gradient
                continue
            backups = [self._buffer(param, "backup") for param in group.params]
            _functional.copy_(backups, group.params, foreach=group.foreach)
            self._perturbed += group.params  # only once w is safe in its backup
            try:
                _functional.perturb_(
                    group.params,
                    group.grads,
                    scale=scale,
                    p=group.settings["p"],
                    adaptive=group.settings["adaptive"],
                    foreach=group.foreach,
                )
            except BaseException:
                self.restore()
                raise

    def _buffer(self, param: Tensor, key: str) -> Tensor:
        """The buffer ``state[param][key]`` shaped like ``param`` (the exact ``backup`` of ``w``,
        LookSAM's ``look_direction``), kept across steps."""
        state = self.state[param]
        buffer = state.get(key)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
            param.shape,
            param.dtype,
            param.device,
        ):
            # New, or the model was moved or cast (model.double(), .to("cuda")) since.
            buffer = state[key] = torch.empty_like(param, memory_format=torch.preserve_format)
        return buffer

    def _plan_nonfinite_skip(self, finite: bool, scaler: torch.amp.GradScaler | None) -> None:
        """Arrange for ``second_step`` to skip the base step if the ascent gradient is not
        finite. Under local-mode DDP the workers' gradients differ, so they vote instead: every
        worker still runs the descent pass, and second_step skips on every worker or none."""
        self._skip_descent = False
        if self._local_ascent and distributed.world_size(self._ddp) > 1:
            device = self.param_groups[0]["params"][0].device
            self._vote = distributed.NonFiniteVote(self._ddp, not finite, device)
        elif not finite:
            self._skip_descent = True
            if scaler is None or not scaler.is_enabled():
                warnings.warn(
                    f"{type(self).__name__}: the ascent gradient is not finite (inf/NaN); this "
                    "step is skipped and the weights are unchanged",
                    RuntimeWarning,
                    stacklevel=5,  # the caller of first_step
                )

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back at ``w`` exactly if they are perturbed, and end the step's
        descent pass.

        Call it when the second forward/backward of the two-step style fails.
        """
        self._descending = self._momentum_pass = False
        self._pending_stats = None  # the step did not complete
        self._vote = None  # every worker started it: it completes without us
        if not self._perturbed:
            return
        params = self._perturbed
        backups = [self.state[p]["backup"] for p in params]
        _functional.copy_(params, backups, foreach=self._use_foreach(params))
        self._perturbed = []

    @torch.no_grad()
    def prepare_descent(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Restore ``w`` exactly and leave in ``.grad`` the gradient the base optimizer steps
        with (LookSAM's correction and ``gc_descent`` applied), without stepping it: for trainers
        that step the base optimizer themselves (Hugging Face's ``Trainer``), or that clip the
        descent gradient first. :meth:`second_step` is this, then the base step.

        Returns whether to take the base step. ``False`` when the step is skipped (a non-finite
        ascent gradient here or, under local-mode DDP, on any worker; ``scaler`` then records an
        overflow on every worker): the gradients are then set to ``None``, so a trainer that
        steps anyway changes no weight. Counts the step either way.
        """
        vote, ascended, moved = self._vote, self._ascended, bool(self._perturbed)
        stats, self._pending_stats = self._pending_stats, None
        self._ascended = False
        self.restore()
        if stats is not None:  # the step completes: its ||g||^2 joins the statistics
            self._adaptive_stats = stats
        skip, self._skip_descent = self._skip_descent, False
        if vote is not None:
            skip = vote.settle(self, scaler)
        self._steps += 1
        # LR schedulers built on this optimizer check that it stepped before they do.
        self._opt_called = True
        if skip:
            self.zero_grad(set_to_none=True)
            return False
        if isinstance(self.mode, LookSAM):
            self._look(ascended, moved)
        for group in self.param_groups:
            if group["gc_descent"]:
                centralize_gradient([p.grad for p in group["params"]], group["gc_scope"])
        return True

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore ``w`` and let the base optimizer step with the gradients now in ``.grad``
        (:meth:`prepare_descent`, then the base step).

        With ``scaler``, the base step goes through ``scaler.step(self.base_optimizer)``
        (unscale, skip on inf/NaN); call ``scaler.update()`` afterwards, once.
        """
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
        """One full step. ``closure`` clears the gradients, computes the loss, calls
        ``backward()`` on it (on ``scaler.scale(loss)`` when a scaler is used) and returns it.

        Returns the loss of the first (unperturbed) pass. If the second pass raises, the weights
        are back at ``w`` before the exception propagates. With a DDP ``model`` and
        ``ascent="local"``, the first pass runs under ``no_sync()``; use :meth:`micro_batch`
        inside the closure to accumulate gradients.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that clears the gradients, "
                "computes the loss, calls backward() and returns the loss; or call first_step() "
                "and second_step() yourself (a trainer that calls step() itself, like "
                "GradScaler.step(opt) or PyTorch Lightning's automatic optimization, needs "
                "gcsam.integrations)"
            )
        if _from_lightning(closure):
            raise RuntimeError(
                f"{type(self).__name__} under PyTorch Lightning's automatic optimization would "
                "update BatchNorm statistics in both passes and all-reduce both under DDP: set "
                "self.automatic_optimization = False and use gcsam.integrations.lightning"
            )
        with torch.enable_grad(), self.ascent_pass():
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        if self._descending and not self._skip_descent:
            try:
                with torch.enable_grad():
                    closure()
            except BaseException:
                self.restore()
                raise
        self.second_step(scaler=scaler)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (moments, step counts), whose param groups carry the
        SAM settings too, and under ``"sharpness_aware"`` the mode's state: the step count,
        LookSAM's ``g_v`` and AdaptiveAscent's statistics. The backup of ``w`` is transient and
        not saved."""
        if self._perturbed or self._descending:
            raise RuntimeError(
                "state_dict() in the middle of a step (the weights may be perturbed): call "
                "second_step() first"
            )
        return self.base_optimizer.state_dict() | {"sharpness_aware": self._mode_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._perturbed or self._descending:
            raise RuntimeError(
                "load_state_dict() in the middle of a step (the weights may be perturbed): call "
                "restore() first"
            )
        state_dict = dict(state_dict)
        mode_state = state_dict.pop("sharpness_aware", None)
        if mode_state is not None and mode_state["mode"] != mode_name(self.mode):
            raise ValueError(
                f"this state dict was saved with mode {mode_state['mode']!r}, and this optimizer "
                f"runs {mode_name(self.mode)!r}: build it with the same mode to resume"
            )
        # Before loading: a bad checkpoint changes nothing (torch checks the group sizes).
        for index, (group, current) in enumerate(
            zip(state_dict["param_groups"], self.param_groups, strict=False)
        ):
            self._check_group(group, current["params"], index)
        self.base_optimizer.load_state_dict(state_dict)
        if mode_state is not None:
            self._load_mode_state(mode_state)
        # The base optimizer builds a new group list on load: share it again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


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
