r"""Functional core of the SAM family: the math of one ascent step, on lists of tensors.

With weights :math:`w`, gradients :math:`g` and per-tensor row means :math:`m` removed by
gradient centralization (:mod:`gcsam.optim.centralization`):

.. math::
    d &= \mathrm{GC}(g) = g - m \\
    \lVert T r \rVert_2^2 &= \sum_\text{tensors} \lVert T r \rVert^2, \quad
        T = |w| \text{ (adaptive) or } 1, \quad r = d \text{ or } g = d + m \text{ (raw)} \\
    w &\leftarrow w + s \, T^2 d \quad (p = 2), \qquad
        w \leftarrow w + s \, T \operatorname{sign}(d) \quad (p = \infty)

with :math:`s = \rho / \lVert T r \rVert_2` for :math:`p = 2`, :math:`s = \rho` otherwise. The
weights are saved to (and put back from) exact backup copies around the perturbation.

Like ``torch/optim/sgd.py``, each operation has a single-tensor path (a Python loop of per-tensor
kernels) and a multi-tensor path (``torch._foreach_*`` kernels over many tensors at once), chosen
by ``foreach``; both give the same values up to float rounding. Squared norms are reduced in
fp32, or in the tensor's own dtype if wider; ``precise=True`` reduces in fp64 for when the fp32
sum overflowed or underflowed. fp16/bf16 weights are perturbed through an fp32 step, and any
weights through an fp64 one when the scale :math:`s` exceeds the fp32 range (subnormal gradients).

Complex tensors count as pairs of real ones (``torch.view_as_real``): norms sum :math:`|z|^2`,
:math:`T^2 = |w|^2`, and the scale :math:`s` is real; ``p = inf`` (``sign``) is refused for them
by :mod:`gcsam.optim.sam`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .centralization import WIDE_DTYPES, accumulation_dtype, is_centralized, row_mean
from .distributed import Shards, local

_DOUBLE = (torch.float64, torch.complex128)
# A larger scale becomes inf in an fp32 kernel's alpha: such steps are taken in fp64.
_FP32_MAX = torch.finfo(torch.float32).max
_FOREACH_DEVICES = ("cpu", "cuda", "xpu", "mps")
# Below this, fp32 squares of the gradient entries may have underflowed.
_TINY_NORM = 1e-18


def default_foreach(tensors: Iterable[Tensor]) -> bool:
    """Whether the multi-tensor path is the default for these tensors (all on devices that have
    ``torch._foreach_*`` kernels)."""
    return all(t.device.type in _FOREACH_DEVICES for t in tensors)


def _widened(tensor: Tensor) -> Tensor:
    """The tensor itself in fp32/fp64 (complex64/128), an fp32 (complex64) copy otherwise."""
    dtype = accumulation_dtype(tensor.dtype)
    return tensor if dtype is None else tensor.to(dtype)


# Squared norms --------------------------------------------------------------------------------


def _single_tensor_squared_norm(tensor: Tensor, precise: bool) -> Tensor:
    """``||tensor||^2`` as a 0-d tensor, reduced in fp32 (or the tensor's wider dtype), or in
    fp64 when ``precise``. An fp32 result may overflow or underflow; the caller checks.
    A complex tensor gives ``sum |z|^2`` (vector_norm wants a complex ``dtype`` for it)."""
    if precise:
        accumulate = torch.complex128 if tensor.is_complex() else torch.float64
    else:
        accumulate = accumulation_dtype(tensor.dtype)
    if tensor.dim() > 1:
        # Per-row reductions parallelize across CPU threads far better than one full reduction.
        dims = tuple(range(1, tensor.dim()))
        return torch.linalg.vector_norm(tensor, dim=dims, dtype=accumulate).square().sum()
    return torch.linalg.vector_norm(tensor, dtype=accumulate).square()


def _multi_tensor_squared_norms(tensors: list[Tensor]) -> list[Tensor]:
    """``||t||^2`` of each tensor (0-d, fp32 or wider), one ``_foreach_norm`` kernel per device
    and dtype; the order of the result follows those batches, not ``tensors``."""
    batches: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        batches[(tensor.device, tensor.dtype)].append(tensor)
    terms: list[Tensor] = []
    for (_, dtype), batch in batches.items():
        accumulate = torch.promote_types(dtype, torch.float32)
        terms.extend(torch._foreach_pow(torch._foreach_norm(batch, 2, dtype=accumulate), 2))
    return terms


def squared_norms(tensors: Iterable[Tensor], *, foreach: bool, precise: bool) -> list[Tensor]:
    """The terms ``||t||^2`` (0-d tensors) of each tensor, to be summed by :func:`total_norm`.

    With ``foreach`` (and not ``precise``), the 1-D tensors (biases, norm scales: many and small)
    share multi-tensor kernels; larger ones keep the per-row reduction.
    """
    terms: list[Tensor] = []
    flat: list[Tensor] = []
    for tensor in local(tensors):
        if foreach and not precise and tensor.dim() <= 1:
            flat.append(tensor)
        else:
            terms.append(_single_tensor_squared_norm(tensor, precise))
    return terms + _multi_tensor_squared_norms(flat)


def _fp64_sum(terms: list[Tensor], device: torch.device) -> Tensor:
    """The sum of 0-d terms in fp64 on ``device``: one stack and conversion per dtype and device,
    not one per term."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for term in terms:
        by_kind[(term.device, term.dtype)].append(term)
    partial = [torch.stack(batch).double().sum().to(device) for batch in by_kind.values()]
    return (
        torch.stack(partial).sum()
        if partial
        else torch.zeros((), dtype=torch.float64, device=device)
    )


def device_sums(term_lists: list[list[Tensor]], shards: Shards | None = None) -> Tensor:
    """The fp64 sum of each list of 0-d terms, as one 1-D tensor on the terms' device, read by
    nobody: no host-device sync. With ``shards`` (DTensor parameters), summed over their ranks
    too, all lists in one all-reduce."""
    device = next((t.device for terms in term_lists for t in terms), None)
    if device is None:
        device = shards.device if shards is not None else torch.device("cpu")
    sums = torch.stack([_fp64_sum(terms, device) for terms in term_lists])
    if shards is not None:  # no terms here, but the other ranks wait for this one
        torch.distributed.all_reduce(sums, group=shards.group)
    return sums


def reduced_sums(term_lists: list[list[Tensor]], shards: Shards | None = None) -> list[float]:
    """:func:`device_sums` read back as Python floats: one host-device sync (none when there
    are no terms and no other ranks)."""
    if shards is None and not any(term_lists):
        return [0.0] * len(term_lists)
    return device_sums(term_lists, shards).tolist()


def total_norm(terms: list[Tensor], shards: Shards | None = None) -> float:
    """``sqrt(sum(terms))`` of squared-norm terms, summed in fp64 (over the ranks of ``shards``
    too); ``0.0`` for no terms."""
    return math.sqrt(reduced_sums([terms], shards)[0])


# Centralization and the ascent norm ---------------------------------------------------------


@dataclass
class Centralized:
    """What :func:`centralize_` leaves behind for the norm of one list of gradients."""

    removed_means: list[Tensor | None]
    """Per gradient, the row means subtracted, shape ``(C_out, 1, ..., 1)``; ``None`` where GC
    skipped the tensor."""
    direction_terms: list[Tensor] | None
    """``||d||^2`` of the centralized gradients (0-d), ``None`` when not measured."""


def centralize_(grads: list[Tensor], gc_scope: str, *, foreach: bool, measure: bool) -> Centralized:
    """``g <- GC(g)`` in place for each gradient that ``gc_scope`` covers.

    With ``measure``, also takes each ``||d||^2`` right after its tensor is centralized, while it
    is still in cache (with ``foreach``, the 1-D ones together afterwards).
    """
    means: list[Tensor | None] = []
    terms: list[Tensor] = []
    flat: list[Tensor] = []
    for grad in local(grads):
        mean = row_mean(grad) if is_centralized(grad, gc_scope) else None
        if mean is not None:
            grad.sub_(mean)
        means.append(mean)
        if measure:
            if foreach and grad.dim() <= 1:
                flat.append(grad)
            else:
                terms.append(_single_tensor_squared_norm(grad, precise=False))
    if not measure:
        return Centralized(means, direction_terms=None)
    return Centralized(means, terms + _multi_tensor_squared_norms(flat))


def ascent_norm_terms(
    params: list[Tensor],
    directions: list[Tensor],
    centralized: Centralized,
    *,
    normalize_by: str,
    adaptive: bool,
    foreach: bool,
    precise: bool,
) -> list[Tensor]:
    """The terms of ``||T r||^2`` for one param group, to be summed over every group, from the
    directions ``d = GC(g)`` and what :func:`centralize_` returned for them
    (``g = d + removed mean``). Its ``direction_terms`` are reused unless ``precise``."""
    raw = normalize_by == "raw"
    params, directions = local(params), local(directions)
    means = centralized.removed_means
    if adaptive:
        normalizers = (
            _widened(w) * (d + m if raw and m is not None else d)
            for w, d, m in zip(params, directions, means, strict=True)
        )
        return squared_norms(normalizers, foreach=foreach, precise=precise)
    terms = centralized.direction_terms
    if terms is None or precise:
        terms = squared_norms(directions, foreach=foreach, precise=precise)
    if raw:
        # ||g||^2 = ||d||^2 + n ||mean||^2: GC removes an orthogonal component.
        terms = terms + [
            _real_view(m).double().square().sum() * (d.numel() // d.shape[0])
            for d, m in zip(directions, means, strict=True)
            if m is not None
        ]
    return terms


def _real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as its ``(..., 2)`` real pairs, so that squares sum ``|z|^2``."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


@dataclass
class AscentGroup:
    """One param group during an ascent: its parameters that have a gradient."""

    settings: dict[str, Any]  # the param group itself: rho, p, gc_scope, ...
    params: list[Tensor]
    grads: list[Tensor]  # each parameter's .grad: g, then d = GC(g) once centralized
    foreach: bool
    centralized: Centralized | None = None


def gradient_groups(
    param_groups: list[dict[str, Any]], foreach: Callable[[list[Tensor]], bool]
) -> list[AscentGroup]:
    """Each param group's parameters that have a gradient, with their gradients; sparse
    gradients are refused before any gradient is touched."""
    groups = []
    for settings in param_groups:
        params = [p for p in settings["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("the SAM family does not support sparse gradients")
        groups.append(AscentGroup(settings, params, [p.grad for p in params], foreach(params)))
    return groups


@dataclass(frozen=True)
class AscentNorm:
    """``||T r||_2`` over the ``p = 2`` groups (one norm: their step is ``rho / l2``), and over
    the ``p = inf`` groups, only to detect an inf/NaN gradient there."""

    l2: float
    p_inf: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.l2) and math.isfinite(self.p_inf)


def _measure_ascent_norm(
    groups: list[AscentGroup], precise: bool, shards: Shards | None
) -> AscentNorm:
    l2: list[Tensor] = []
    p_inf: list[Tensor] = []
    for group in groups:
        terms = ascent_norm_terms(
            group.params,
            group.grads,
            group.centralized,
            normalize_by=group.settings["normalize_by"],
            adaptive=group.settings["adaptive"],
            foreach=group.foreach,
            precise=precise,
        )
        (l2 if group.settings["p"] == 2 else p_inf).extend(terms)
    squared_l2, squared_p_inf = reduced_sums([l2, p_inf], shards)
    return AscentNorm(math.sqrt(squared_l2), math.sqrt(squared_p_inf))


def ascent_norm(groups: list[AscentGroup], shards: Shards | None = None) -> AscentNorm:
    """The norms of the centralized groups, reduced in fp32 (or wider), then again in fp64 if
    the fp32 sums may have overflowed or underflowed; with ``shards``, over every rank's shard
    (one all-reduce per reduction, and every rank takes the same branch)."""
    norm = _measure_ascent_norm(groups, precise=False, shards=shards)
    if not norm.finite or norm.l2 < _TINY_NORM:
        norm = _measure_ascent_norm(groups, precise=True, shards=shards)
    return norm


def step_scale(settings: dict[str, Any], norm: float) -> float:
    """The step ``eps = scale * ...`` of a group: ``rho / norm`` (p = 2) or ``rho``; ``0.0``
    when the group does not move (``rho = 0``, or p = 2 with a zero norm)."""
    rho = settings["rho"]
    if settings["p"] != 2:
        return rho
    return rho / norm if rho != 0 and norm != 0 else 0.0


# Backup, perturbation, restore --------------------------------------------------------------


def buffer_like(buffer: Tensor | None, like: Tensor) -> Tensor:
    """``buffer`` if it has ``like``'s shape, dtype and device, else a new uninitialized one
    (there was none, or the model was moved or cast since: ``model.double()``,
    ``.to("cuda")``): the exact backup of ``w``, LookSAM's ``g_v``."""
    if buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
        like.shape,
        like.dtype,
        like.device,
    ):
        return buffer
    return torch.empty_like(like, memory_format=torch.preserve_format)


def copy_(targets: list[Tensor], sources: list[Tensor], *, foreach: bool) -> None:
    """``target <- source`` bit for bit, pairwise: the backup ``b <- w`` and the restore
    ``w <- b``. Nothing to copy (no parameter has a gradient) is nothing done, as in torch's
    optimizers."""
    targets, sources = local(targets), local(sources)
    if foreach and targets:
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def _scales_directly(dtype: torch.dtype, scale: float) -> bool:
    """Whether ``add_(step, alpha=scale)`` in ``dtype`` itself holds ``scale``."""
    return dtype in _DOUBLE or (dtype in WIDE_DTYPES and scale <= _FP32_MAX)


def _add_scaled_(param: Tensor, step: Tensor, scale: float) -> None:
    """``param += scale * step``."""
    if _scales_directly(param.dtype, scale):
        param.add_(step, alpha=scale)
        return
    # fp16 cannot hold rho / ||d|| when gradients are tiny, nor fp32 when they are subnormal.
    wider = torch.float64 if scale > _FP32_MAX else torch.float32
    param.add_(step.to(torch.promote_types(step.dtype, wider)).mul_(scale))


def _single_tensor_perturb_(
    params: list[Tensor], directions: list[Tensor], scale: float, p: float, adaptive: bool
) -> None:
    for param, direction in zip(params, directions, strict=True):
        if p == 2:
            if adaptive:
                weight = _widened(param)
                # T^2 = |w|^2: conj() is a no-op view for real weights.
                direction = weight * weight.conj() * direction
        else:
            direction = direction.sign()
            if adaptive:
                direction.mul_(param.abs())
        _add_scaled_(param, direction, scale)


def _multi_tensor_perturb_(params: list[Tensor], directions: list[Tensor], scale: float) -> None:
    """``w += scale * d`` (p = 2, not adaptive): one ``_foreach_add_`` over the weights whose
    dtype holds ``scale``; the others go one by one through a wider step."""
    direct = [_scales_directly(w.dtype, scale) for w in params]
    pairs = list(zip(params, directions, direct, strict=True))
    if any(direct):
        torch._foreach_add_(
            [w for w, _, ok in pairs if ok], [d for _, d, ok in pairs if ok], alpha=scale
        )
    for param, direction, ok in pairs:
        if not ok:
            _add_scaled_(param, direction, scale)


def perturb_(
    params: list[Tensor],
    directions: list[Tensor],
    *,
    scale: float,
    p: float,
    adaptive: bool,
    foreach: bool,
) -> None:
    """``w <- w + eps`` with ``eps = scale * T^2 d`` (p = 2) or ``scale * T sign(d)``
    (p = inf), ``T = |w|`` if ``adaptive`` else 1.

    Only the plain p = 2 form has a multi-tensor path: the others need per-tensor temporaries.
    """
    params, directions = local(params), local(directions)
    if foreach and p == 2 and not adaptive:
        _multi_tensor_perturb_(params, directions, scale)
    else:
        _single_tensor_perturb_(params, directions, scale, p, adaptive)
