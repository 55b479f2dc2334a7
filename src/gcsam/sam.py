r"""The SAM family: GCSAM, SAM and ASAM as one optimizer.

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
``"global"`` (the all-reduced gradient, two). :mod:`gcsam.distributed` explains what each means
for the results and how to write the passes and gradient accumulation.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import distributed
from .centralization import centralize_gradient, check_scope, is_centralized, row_mean

NORMALIZERS = ("centralized", "raw")
SAM_SETTINGS = ("rho", "adaptive", "p", "normalize_by", "gc_scope", "gc_descent")
_FOREACH_DEVICES = ("cpu", "cuda", "xpu", "mps")
_WIDE = (torch.float32, torch.float64)
# Below this, fp32 squares of the gradient entries may have underflowed.
_TINY_NORM = 1e-18


def _widened(tensor: Tensor) -> Tensor:
    """The tensor itself in fp32/fp64, an fp32 copy otherwise."""
    return tensor if tensor.dtype in _WIDE else tensor.float()


def _squared_norm(tensor: Tensor, precise: bool) -> Tensor:
    """``||tensor||^2`` as a 0-d tensor: reduced in fp32 (or the tensor's wider dtype), or in
    fp64 when ``precise``. An fp32 result may overflow or underflow; the caller checks."""
    wide = tensor.dtype in _WIDE
    accumulate = torch.float64 if precise else (None if wide else torch.float32)
    if tensor.dim() > 1:
        # Per-row reductions parallelize across CPU threads far better than one full reduction.
        dims = tuple(range(1, tensor.dim()))
        return torch.linalg.vector_norm(tensor, dim=dims, dtype=accumulate).square().sum()
    return torch.linalg.vector_norm(tensor, dtype=accumulate).square()


def _squared_norms(tensors: Iterable[Tensor], foreach: bool, precise: bool) -> list[Tensor]:
    """``_squared_norm`` of each tensor; with ``foreach``, the small 1-D tensors share one
    multi-tensor kernel per device and dtype."""
    terms: list[Tensor] = []
    flat: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        if foreach and not precise and tensor.dim() <= 1:
            flat[(tensor.device, tensor.dtype)].append(tensor)
        else:
            terms.append(_squared_norm(tensor, precise))
    for (_, dtype), batch in flat.items():
        accumulate = torch.float64 if precise else torch.promote_types(dtype, torch.float32)
        terms.extend(torch._foreach_pow(torch._foreach_norm(batch, 2, dtype=accumulate), 2))
    return terms


def centralize_(
    grads: list[Tensor], gc_scope: str, *, foreach: bool, measure: bool
) -> tuple[list[Tensor | None], list[Tensor]]:
    """``g <- GC(g)`` in place. Returns the subtracted row means (``None`` where GC skips) and,
    with ``measure``, the terms ``||d||^2`` (0-d fp64), each taken right after its tensor is
    centralized, while it is still in cache."""
    means: list[Tensor | None] = []
    terms: list[Tensor] = []
    flat: list[Tensor] = []
    for grad in grads:
        mean = row_mean(grad) if is_centralized(grad, gc_scope) else None
        if mean is not None:
            grad.sub_(mean)
        means.append(mean)
        if measure:
            if foreach and grad.dim() <= 1:
                flat.append(grad)
            else:
                terms.append(_squared_norm(grad, precise=False))
    terms += _squared_norms(flat, foreach, precise=False)
    return means, terms


def measure(
    params: list[Tensor],
    directions: list[Tensor],
    means: list[Tensor | None],
    *,
    normalize_by: str,
    adaptive: bool,
    foreach: bool,
    precise: bool = False,
    direction_terms: list[Tensor] | None = None,
) -> list[Tensor]:
    """The terms (0-d fp64 tensors) of ``||T r||^2``, to be summed over every group, from the
    directions ``d = GC(g)`` and the means GC removed (``g = d + mean``). ``direction_terms``:
    the ``||d||^2`` that :func:`centralize_` already measured, reused unless ``precise``."""
    raw = normalize_by == "raw"
    if adaptive:
        weights = (_widened(p) for p in params)
        normalizers = (
            w * (d + m if raw and m is not None else d)
            for w, d, m in zip(weights, directions, means, strict=True)
        )
        return _squared_norms(normalizers, foreach, precise)
    if direction_terms is None or precise:
        direction_terms = _squared_norms(directions, foreach, precise)
    terms = list(direction_terms)
    if raw:
        # ||g||^2 = ||d||^2 + n ||mean||^2: GC removes an orthogonal component.
        terms += [
            m.double().square().sum() * (d.numel() // d.shape[0])
            for d, m in zip(directions, means, strict=True)
            if m is not None
        ]
    return terms


def copy_backups(params: list[Tensor], backups: list[Tensor], foreach: bool) -> None:
    """``backup <- w`` for every parameter."""
    if foreach:
        torch._foreach_copy_(backups, params)
    else:
        for backup, param in zip(backups, params, strict=True):
            backup.copy_(param)


def _add_scaled(param: Tensor, tensor: Tensor, scale: float) -> None:
    if param.dtype in _WIDE:
        param.add_(tensor, alpha=scale)
    else:
        # fp16 cannot hold rho / ||d|| when gradients are tiny: scale in fp32.
        param.add_(tensor.float().mul_(scale))


def perturb(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    scale: float,
    p: float,
    adaptive: bool,
    foreach: bool,
) -> None:
    """``w <- w + eps`` with ``eps = scale * T^2 d`` (p = 2) or ``scale * T sign(d)`` (p = inf),
    ``T = |w|`` if ``adaptive`` else 1; ``grads`` hold the directions ``d``."""
    if p == 2 and not adaptive:
        wide = [(w, d) for w, d in zip(params, grads, strict=True) if w.dtype in _WIDE]
        if foreach and wide:
            torch._foreach_add_([w for w, _ in wide], [d for _, d in wide], alpha=scale)
        for param, direction in zip(params, grads, strict=True):
            if not (foreach and param.dtype in _WIDE):
                _add_scaled(param, direction, scale)
        return
    for param, direction in zip(params, grads, strict=True):
        if p == 2:
            weight = _widened(param)
            step = weight * weight * direction
        else:
            step = direction.sign()
            if adaptive:
                step.mul_(param.abs())
        _add_scaled(param, step, scale)


class GCSAM(Optimizer):
    r"""Gradient-Centralized Sharpness-Aware Minimization (Hassan et al., 2025).

    Each step takes two gradients: ``g`` at the weights ``w``, then the descent gradient at
    ``w + eps`` with ``eps = rho * GC(g) / ||GC(g)||_2``; ``w`` is restored exactly (from a copy)
    before ``base_optimizer`` steps with the second gradient. See the module docstring for the
    adaptive (ASAM) and ``p = inf`` forms.

    Args:
        params: parameters or param groups; ``None`` when ``base_optimizer`` is an instance.
            Groups may set their own ``rho``, ``adaptive``, ``p``, ``normalize_by``,
            ``gc_scope`` and ``gc_descent``.
        base_optimizer: an optimizer class (built on the same param groups with
            ``**base_kwargs``) or an optimizer instance over the same parameters (its groups
            take this constructor's settings). Both share one ``param_groups`` list, so LR
            schedulers built on either see the same groups.
        rho: radius of the ascent step (>= 0).
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
            gradient, like one process on the global batch (two). See :mod:`gcsam.distributed`.
            Neither is saved in ``state_dict``.
        **base_kwargs: arguments of ``base_optimizer`` when it is a class (``lr=0.1``, ...).

    Extra memory: one copy of the parameters (the exact backup of ``w``). After ``first_step``
    the ascent gradients hold ``GC(g)``. A non-finite ascent gradient skips the whole step
    (weights and base state untouched) with a ``RuntimeWarning``, or silently when a
    ``GradScaler`` is in charge (it records the overflow and lowers its scale).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        p: float = 2,
        normalize_by: str = "centralized",
        gc_scope: str = "all",
        gc_descent: bool = False,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        ascent: str = "local",
        **base_kwargs: Any,
    ) -> None:
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        self.foreach = foreach
        self.ascent = distributed.check_ascent(ascent)
        self.model = model
        self._ddp = distributed.ddp_of(model)
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
            if foreach is not None and "foreach" in inspect.signature(base_optimizer).parameters:
                base_kwargs.setdefault("foreach", foreach)  # one switch for both steps
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
            _check_no_shared_keys(self.base_optimizer)
        elif isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base optimizer arguments ({', '.join(sorted(base_kwargs))}) can only be "
                    "given when base_optimizer is a class; set them on the instance instead"
                )
            if params is not None:
                _check_same_params(params, base_optimizer)
            _check_no_shared_keys(base_optimizer)
            # The constructor's settings win over any a previous wrapper left in the groups.
            for group in base_optimizer.param_groups:
                group.update(defaults)
            super().__init__(base_optimizer.param_groups, defaults)
            self.base_optimizer = base_optimizer
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
        self.param_groups = self.base_optimizer.param_groups
        self._perturbed: list[Tensor] = []
        self._skip_descent = False
        # From first_step to second_step/restore: the descent pass (for micro_batch()).
        self._descending = False
        # Local-mode DDP: the workers' agreement on a non-finite ascent, read in second_step.
        self._vote: distributed.NonFiniteVote | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group(param_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still inside Optimizer.__init__
            super().add_param_group(param_group)
        else:
            for key, value in self.defaults.items():
                param_group.setdefault(key, value)
            base.add_param_group(param_group)

    def _check_group(self, param_group: dict[str, Any]) -> None:
        """Raise if a param group's settings (or the defaults it falls back to) are invalid."""

        def setting(key: str) -> Any:
            return param_group.get(key, self.defaults[key])

        rho = setting("rho")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < math.inf:
            raise ValueError(f"rho must be a finite non-negative number, got {rho!r}")
        if setting("p") not in (2, math.inf):
            raise ValueError(f"p must be 2 or float('inf'), got {setting('p')!r}")
        if setting("normalize_by") not in NORMALIZERS:
            raise ValueError(
                "normalize_by must be 'centralized' (the paper: divide by ||GC(g)||) or 'raw' "
                f"(the authors' released script: divide by ||g||), got {setting('normalize_by')!r}"
            )
        check_scope(setting("gc_scope"), "gc_scope")
        for flag in ("adaptive", "gc_descent"):
            if not isinstance(setting(flag), bool):
                raise TypeError(f"{flag} must be True or False, got {setting(flag)!r}")

    @property
    def perturbed(self) -> bool:
        """True between a ``first_step`` that moved the weights and ``second_step``/``restore``."""
        return bool(self._perturbed)

    @property
    def _local_ascent(self) -> bool:
        return self._ddp is not None and self.ascent == "local"

    def ascent_pass(self) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of the ascent pass (two-step style):
        DDP's ``no_sync()`` when ``ascent="local"``, nothing otherwise.

        Not needed with :meth:`step`, which does it itself, nor around :meth:`micro_batch`.
        """
        if self._descending:
            raise RuntimeError(
                "ascent_pass() after first_step(): the descent pass must be all-reduced; "
                "call second_step() (or restore()) first"
            )
        return distributed.sync(self._ddp, enabled=not self._local_ascent)

    def micro_batch(self, *, last: bool) -> AbstractContextManager[None]:
        """Context manager for the forward and backward of one micro-batch of gradient
        accumulation, in either pass: DDP's ``no_sync()`` unless ``last`` (which all-reduces the
        accumulated gradient), and for every micro-batch of the ascent pass when
        ``ascent="local"``. Nothing without a DDP model.
        """
        enabled = bool(last) and (self._descending or not self._local_ascent)
        return distributed.sync(self._ddp, enabled=enabled)

    def _needs_vote(self) -> bool:
        """Whether the workers must agree on a non-finite ascent: only local-mode DDP lets
        their ascent gradients differ."""
        return self._local_ascent and distributed.world_size(self._ddp) > 1

    def _use_foreach(self, params: list[Tensor]) -> bool:
        if self.foreach is not None:
            return self.foreach
        return all(p.device.type in _FOREACH_DEVICES for p in params)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Move the weights to ``w + eps`` using the gradients now in ``.grad``.

        With ``scaler``, the gradients are unscaled first (``scaler.unscale_(self)``).
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step() called twice: the weights are already perturbed; "
                "call second_step() (or restore()) first"
            )
        if scaler is not None:
            scaler.unscale_(self)
        self._skip_descent = False
        batches = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("GCSAM does not support sparse gradients")
            batches.append((group, params, [p.grad for p in params]))
        centralized = [
            centralize_(
                grads,
                group["gc_scope"],
                foreach=self._use_foreach(params),
                measure=not group["adaptive"],
            )
            for group, params, grads in batches
        ]

        def norms(precise: bool) -> tuple[float, float]:
            """(L2 norm over the p = 2 groups, norm of the other groups for the finite check)."""
            l2: list[Tensor] = []
            other: list[Tensor] = []
            for (group, params, grads), (means, found) in zip(batches, centralized, strict=True):
                terms = measure(
                    params,
                    grads,
                    means,
                    normalize_by=group["normalize_by"],
                    adaptive=group["adaptive"],
                    foreach=self._use_foreach(params),
                    precise=precise,
                    direction_terms=found,
                )
                (l2 if group["p"] == 2 else other).extend(terms)
            return _total_norm(l2), _total_norm(other)

        norm, check = norms(precise=False)
        if not (math.isfinite(norm) and math.isfinite(check)) or norm < _TINY_NORM:
            # The fp32 reduction may have overflowed or underflowed: measure again in fp64.
            norm, check = norms(precise=True)
        finite = math.isfinite(norm) and math.isfinite(check)
        if finite:
            self._move_to_perturbed_point(batches, norm)
        if self._needs_vote():
            # Every worker still runs the descent pass; second_step skips on every worker or none.
            device = self.param_groups[0]["params"][0].device
            self._vote = distributed.NonFiniteVote(self._ddp, not finite, device)
        elif not finite:
            self._skip_descent = True
            if scaler is None or not scaler.is_enabled():
                warnings.warn(
                    "GCSAM: the ascent gradient is not finite (inf/NaN); this step is skipped "
                    "and the weights are unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._descending = True
        if zero_grad:
            self.zero_grad()

    def _move_to_perturbed_point(self, batches: list, norm: float) -> None:
        for group, params, grads in batches:
            foreach = self._use_foreach(params)
            rho = group["rho"]
            if rho == 0 or (group["p"] == 2 and norm == 0):
                continue
            copy_backups(params, [self._backup(p) for p in params], foreach)
            self._perturbed += params  # only once w is safe in its backup
            try:
                perturb(
                    params,
                    grads,
                    scale=rho / norm if group["p"] == 2 else rho,
                    p=group["p"],
                    adaptive=group["adaptive"],
                    foreach=foreach,
                )
            except BaseException:
                self.restore()
                raise

    def _backup(self, param: Tensor) -> Tensor:
        """The buffer that holds the exact copy of ``param``, kept across steps."""
        state = self.state[param]
        backup = state.get("backup")
        if backup is None or (backup.shape, backup.dtype, backup.device) != (
            param.shape,
            param.dtype,
            param.device,
        ):
            # New, or the model was moved or cast (model.double(), .to("cuda")) since.
            backup = state["backup"] = torch.empty_like(param, memory_format=torch.preserve_format)
        return backup

    @torch.no_grad()
    def restore(self) -> None:
        """Put the weights back at ``w`` exactly if they are perturbed, and end the step's
        descent pass.

        Call it when the second forward/backward of the two-step style fails.
        """
        self._descending = False
        self._vote = None  # every worker started it: it completes without us
        if not self._perturbed:
            return
        params = self._perturbed
        backups = [self.state[p]["backup"] for p in params]
        copy_backups(backups, params, self._use_foreach(params))
        self._perturbed = []

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore ``w`` and let the base optimizer step with the gradients now in ``.grad``.

        With ``scaler``, the base step goes through ``scaler.step(self.base_optimizer)``
        (unscale, skip on inf/NaN); call ``scaler.update()`` afterwards, once.
        """
        vote = self._vote
        self.restore()
        skip, self._skip_descent = self._skip_descent, False
        if vote is not None:
            skip = self._agree_to_skip(vote, scaler)
        if not skip:
            for group in self.param_groups:
                if group["gc_descent"]:
                    centralize_gradient([p.grad for p in group["params"]], group["gc_scope"])
            if scaler is not None:
                scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
        # LR schedulers built on this optimizer check that it stepped before they do.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def _agree_to_skip(
        self, vote: distributed.NonFiniteVote, scaler: torch.amp.GradScaler | None
    ) -> bool:
        """Whether any worker's ascent gradient was not finite; if so, tell this worker's
        scaler (or the user) so that every worker handles the skip the same way."""
        workers = vote.count()
        if not workers:
            return False
        if scaler is not None and scaler.is_enabled():
            # The workers whose own ascent gradient was finite recorded no overflow: record one,
            # or their scales would part from the others' at update(). GradScaler has no public
            # way to; _found_inf_per_device is the hook optimizers that unscale themselves use.
            for found_inf in scaler._found_inf_per_device(self).values():
                found_inf.fill_(1.0)
        else:
            warnings.warn(
                f"GCSAM: the ascent gradient is not finite (inf/NaN) on {workers} of "
                f"{distributed.world_size(self._ddp)} DDP workers; this step is skipped on every "
                "worker and the weights are unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
        return True

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
                "GCSAM.step() needs a closure that clears the gradients, computes the loss, calls "
                "backward() and returns the loss; or call first_step() and second_step() yourself"
            )
        with torch.enable_grad(), distributed.sync(self._ddp, enabled=not self._local_ascent):
            loss = closure()
        self.first_step(zero_grad=True, scaler=scaler)
        if not self._skip_descent:
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
        """The base optimizer's state dict (moments, step counts); its param groups carry
        GCSAM's settings too. The backup of ``w`` is transient and not saved."""
        if self._perturbed:
            raise RuntimeError(
                "state_dict() while the weights are perturbed: call second_step() first"
            )
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._perturbed:
            raise RuntimeError(
                "load_state_dict() while the weights are perturbed: call restore() first"
            )
        for group in state_dict["param_groups"]:
            self._check_group(group)  # before loading: a bad checkpoint changes nothing
        self.base_optimizer.load_state_dict(state_dict)
        # The base optimizer builds a new group list on load: share it again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


def _total_norm(terms: list[Tensor]) -> float:
    """sqrt of the sum of squared-norm terms, summed in fp64 on the first term's device."""
    if not terms:
        return 0.0
    device = terms[0].device
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for term in terms:
        by_kind[(term.device, term.dtype)].append(term)
    # One stack and one conversion per dtype and device, not one per tensor.
    partial = [torch.stack(batch).double().sum().to(device) for batch in by_kind.values()]
    return float(torch.stack(partial).sum().sqrt())


class SAM(GCSAM):
    """Sharpness-Aware Minimization (Foret et al., 2021): GCSAM without centralization.

    ``adaptive=True`` gives ASAM (Kwon et al., 2021). Same arguments as :class:`GCSAM` except
    ``gc_scope``, which is ``"none"``.
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

    def _check_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("gc_scope", "none") != "none":
            raise TypeError(
                "SAM param groups take no gc_scope other than 'none' (SAM never centralizes); "
                "use GCSAM"
            )
        super()._check_group(param_group)


def _check_no_shared_keys(base: Optimizer) -> None:
    shared = sorted(set(SAM_SETTINGS) & set(base.defaults))
    if shared:
        raise ValueError(
            f"{type(base).__name__} keeps its own {', '.join(map(repr, shared))} in its param "
            "groups, which GCSAM shares and would overwrite; wrap a different base optimizer"
        )


def _check_same_params(params: Iterable[Any], base: Optimizer) -> None:
    given: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            group_params = item["params"]
            given += [group_params] if isinstance(group_params, Tensor) else list(group_params)
        else:
            given.append(item)
    expected = [p for group in base.param_groups for p in group["params"]]
    if {id(p) for p in given} != {id(p) for p in expected} or len(given) != len(expected):
        raise ValueError(
            f"params ({len(given)} tensors) do not match the {len(expected)} parameters of the "
            "base_optimizer instance; pass params=None or exactly the instance's parameters"
        )
