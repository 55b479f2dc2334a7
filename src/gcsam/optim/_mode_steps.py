"""The cheap modes' part of :class:`~gcsam.SharpnessAwareOptimizer`'s step: which steps ascend,
Momentum-SAM's pass, LookSAM's stored direction and the modes' saved state. The math is in
:mod:`gcsam.modes`; the full step around it is in :mod:`gcsam.optim.sam`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _functional
from .distributed import local
from .modes import AdaptiveAscent, LookSAM, Mode, MomentumAscent, Periodic, mode_name
from .modes import momentum_key as _momentum_key
from .modes import resolve_mode as _resolve_mode


class ModeSteps:
    """Mixin of :class:`~gcsam.SharpnessAwareOptimizer`: the steps of :mod:`gcsam.modes`.

    It reads the optimizer's param groups, base optimizer and backup machinery
    (``_buffer``, ``_move_to_perturbed_point``, ``restore``) and keeps the modes' state.
    """

    param_groups: list[dict[str, Any]]
    state: Any
    base_optimizer: Optimizer
    ascent: str
    _ddp: Any
    _descending: bool
    _momentum_pass: bool
    _momentum_key: str

    def _init_mode_state(self) -> None:
        self._steps = 0  # completed steps: which ones ascend (Periodic, LookSAM)
        self._momentum_pass = False  # MomentumAscent: ascent_pass() moved the weights
        self._adaptive_stats = (0.0, 0.0)  # AdaptiveAscent: running mean and variance of ||g||^2
        self._pending_stats: tuple[float, float] | None = None  # this step's, until it completes
        # LookSAM: the parameters with a g_v (state "look_direction"), ||g_v||, and whether
        # g_v comes from a full step that completed.
        self._look_params: list[Tensor] = []
        self._look_norm = 0.0
        self._look_valid = False

    @property
    def mode(self) -> Mode | None:
        """The cheap mode (:mod:`gcsam.modes`), ``None`` for the full step. Assigning a new one
        between steps checks it like the constructor (e.g. to schedule AdaptiveAscent's
        threshold)."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode | str | None) -> None:
        if self._descending or self._momentum_pass:
            raise RuntimeError("the mode can only change between steps: call second_step() first")
        self._set_mode(mode, self.base_optimizer)

    def _set_mode(self, mode: Mode | str | None, base: type[Optimizer] | Optimizer) -> None:
        """Resolve and check ``mode``: ``ValueError`` if it cannot run on ``base`` (checked here
        when it is an instance; a class once built) or this DDP setup."""
        resolved = _resolve_mode(mode)
        if isinstance(resolved, MomentumAscent) and isinstance(base, Optimizer):
            self._momentum_key = _momentum_key(base)
        self._check_mode_under_ddp(resolved, self._ddp)
        self._mode = resolved

    def _check_mode_under_ddp(self, mode: Mode | None, ddp: nn.Module | None) -> None:
        """``ValueError`` if ``mode`` cannot run on the DDP model ``ddp`` with this ascent."""
        local = ddp is not None and self.ascent == "local"
        if local and isinstance(mode, LookSAM | AdaptiveAscent):
            raise ValueError(
                f"{type(mode).__name__} under DDP needs ascent='global': its steps "
                "without ascent descend along the all-reduced gradient of the first pass "
                "(and LookSAM's g_v must be the same on every worker)"
            )

    def _plans_ascent(self) -> bool:
        """Whether the step about to run uses its first pass for an ascent: known before the
        pass except under AdaptiveAscent (True: it may)."""
        if isinstance(self.mode, Periodic):  # LookSAM too
            return self.mode.ascends(self._steps)
        return not isinstance(self.mode, MomentumAscent)

    @contextmanager
    def _momentum_pass_context(self) -> Iterator[None]:
        self._move_along_momentum()
        try:
            yield
        except BaseException:
            self.restore()
            raise

    def _decide_ascent(self, scaler: torch.amp.GradScaler | None) -> bool:
        """Whether this step takes the ascent (the full two-pass step)."""
        if isinstance(self.mode, Periodic):  # LookSAM too
            return self.mode.ascends(self._steps)
        if not isinstance(self.mode, AdaptiveAscent):
            return True
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        (squared,) = _functional.reduced_sums(
            [_functional.squared_norms(grads, foreach=self._use_foreach(grads), precise=False)],
            self._shards,
        )
        if scaler is not None and scaler.is_enabled():
            squared /= scaler.get_scale() ** 2
        if not math.isfinite(squared):
            return True  # the ascent path skips the step
        mean, var = self._adaptive_stats
        mean, var, ascend = self.mode.update(mean, var, squared)
        self._pending_stats = (mean, var)  # kept by second_step; a failed step leaves no trace
        return ascend

    def _keep_gradient(self, groups: list[_functional.AscentGroup]) -> None:
        """LookSAM: copy ``g`` to the ``g_v`` buffers, where :meth:`second_step` turns it into
        ``g_v``."""
        self._look_valid = False
        self._look_params = [p for group in groups for p in group.params]
        for group in groups:
            stores = [self._buffer(p, "look_direction") for p in group.params]
            _functional.copy_(stores, group.grads, foreach=group.foreach)

    @torch.no_grad()
    def _move_along_momentum(self) -> None:
        """MomentumAscent: back up ``w`` and move to ``w + rho d / ||d||``, ``d = GC(-m)``."""
        for index, group in enumerate(self.param_groups):
            self._check_group(group, group["params"], index)
        self._find_shards()
        state = self.base_optimizer.state
        groups = []
        for settings in self.param_groups:
            params = [p for p in settings["params"] if state[p].get(self._momentum_key) is not None]
            momenta = local(state[p][self._momentum_key] for p in params)
            foreach = self._use_foreach(params)
            directions = (
                torch._foreach_neg(momenta) if foreach and momenta else [-m for m in momenta]
            )
            groups.append(_functional.AscentGroup(settings, params, directions, foreach))
        for group in groups:
            group.centralized = _functional.centralize_(
                group.grads,
                group.settings["gc_scope"],
                foreach=group.foreach,
                measure=not group.settings["adaptive"],
            )
        norm = _functional.ascent_norm(groups, self._shards)
        if norm.finite and all(
            math.isfinite(_functional.step_scale(g.settings, norm.l2)) for g in groups
        ):
            self._move_to_perturbed_point(groups, norm.l2)
        else:
            warnings.warn(
                f"{type(self).__name__}: the momentum is not finite (inf/NaN); this step's pass "
                "runs at the unperturbed weights",
                RuntimeWarning,
                stacklevel=4,  # the `with opt.ascent_pass()` line
            )
        self._momentum_pass = True

    def _end_momentum_pass(self) -> None:
        """MomentumAscent's first_step: back to ``w``, keeping the pass's gradients."""
        if not self._momentum_pass:
            raise RuntimeError(
                "MomentumAscent takes the step's only pass at the momentum-perturbed point: "
                "run the forward and backward inside `with opt.ascent_pass():` before "
                "first_step(), or use step(closure)"
            )
        self._momentum_pass = False
        self.restore()

    def _look(self, ascended: bool, moved: bool) -> None:
        """LookSAM: after a full step, ``g_v`` from the descent gradient ``g_s`` (none when the
        ascent ``moved`` no weight); after the others, ``g <- g + alpha ||g|| / ||g_v|| g_v``."""
        params = [p for p in self._look_params if p.grad is not None]
        grads = [p.grad for p in params]
        stores = [self.state[p]["look_direction"] for p in params]
        foreach = self._use_foreach(params)
        if ascended:
            norm = _functional.orthogonal_part_(stores, grads, foreach=foreach, shards=self._shards)
            # Unmoved (rho = 0, a zero gradient), g_s was taken at w: g_s = g and g_v = 0, and
            # the norm is rounding noise that add_sharpness_ would scale up to alpha ||g||.
            self._look_valid = (
                moved and math.isfinite(norm) and len(params) == len(self._look_params)
            )
            self._look_norm = norm
        elif self._look_valid:
            _functional.add_sharpness_(
                grads,
                stores,
                alpha=self.mode.alpha,
                norm=self._look_norm,
                foreach=foreach,
                shards=self._shards,
            )

    def _mode_state(self) -> dict[str, Any]:
        """What ``state_dict()["sharpness_aware"]`` holds; ``g_v`` keyed by the parameter's
        index over all groups, like torch's optimizer state."""
        params = [p for group in self.param_groups for p in group["params"]]
        look = {id(p) for p in self._look_params}
        return {
            "mode": mode_name(self.mode),
            "steps": self._steps,
            "adaptive_stats": list(self._adaptive_stats),
            "look_norm": self._look_norm,
            "look_valid": self._look_valid,
            "look_direction": {
                index: self.state[p]["look_direction"]
                for index, p in enumerate(params)
                if id(p) in look
            },
        }

    def _load_mode_state(self, mode_state: dict[str, Any]) -> None:
        self._steps = int(mode_state["steps"])
        mean, var = mode_state["adaptive_stats"]
        self._adaptive_stats = (float(mean), float(var))
        self._look_norm = float(mode_state["look_norm"])
        self._look_valid = bool(mode_state["look_valid"])
        params = [p for group in self.param_groups for p in group["params"]]
        self._look_params = []
        for index, direction in sorted(mode_state["look_direction"].items()):
            param = params[int(index)]
            self._buffer(param, "look_direction").copy_(direction)
            self._look_params.append(param)
