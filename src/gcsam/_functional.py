r"""Functional core of the SAM family: the math of one ascent step, on lists of tensors.

With weights :math:`w`, gradients :math:`g` and per-tensor row means :math:`m` removed by
gradient centralization (:mod:`gcsam.centralization`):

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
sum overflowed or underflowed. fp16/bf16 weights are perturbed through an fp32 step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .centralization import is_centralized, row_mean

_WIDE = (torch.float32, torch.float64)
_FOREACH_DEVICES = ("cpu", "cuda", "xpu", "mps")
# Below this, fp32 squares of the gradient entries may have underflowed.
_TINY_NORM = 1e-18


def default_foreach(tensors: Iterable[Tensor]) -> bool:
    """Whether the multi-tensor path is the default for these tensors (all on devices that have
    ``torch._foreach_*`` kernels)."""
    return all(t.device.type in _FOREACH_DEVICES for t in tensors)


def _widened(tensor: Tensor) -> Tensor:
    """The tensor itself in fp32/fp64, an fp32 copy otherwise."""
    return tensor if tensor.dtype in _WIDE else tensor.float()


# Squared norms --------------------------------------------------------------------------------


def _single_tensor_squared_norm(tensor: Tensor, precise: bool) -> Tensor:
    """``||tensor||^2`` as a 0-d tensor, reduced in fp32 (or the tensor's wider dtype), or in
    fp64 when ``precise``. An fp32 result may overflow or underflow; the caller checks."""
    wide = tensor.dtype in _WIDE
    accumulate = torch.float64 if precise else (None if wide else torch.float32)
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
    for tensor in tensors:
        if foreach and not precise and tensor.dim() <= 1:
            flat.append(tensor)
        else:
            terms.append(_single_tensor_squared_norm(tensor, precise))
    return terms + _multi_tensor_squared_norms(flat)


def total_norm(terms: list[Tensor]) -> float:
    """``sqrt(sum(terms))`` of squared-norm terms, summed in fp64 on the first term's device;
    ``0.0`` for no terms."""
    if not terms:
        return 0.0
    device = terms[0].device
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for term in terms:
        by_kind[(term.device, term.dtype)].append(term)
    # One stack and one conversion per dtype and device, not one per tensor.
    partial = [torch.stack(batch).double().sum().to(device) for batch in by_kind.values()]
    return float(torch.stack(partial).sum().sqrt())


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
    for grad in grads:
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
            m.double().square().sum() * (d.numel() // d.shape[0])
            for d, m in zip(directions, means, strict=True)
            if m is not None
        ]
    return terms


@dataclass
class AscentGroup:
    """One param group during an ascent: its parameters that have a gradient."""

    settings: dict[str, Any]  # the param group itself: rho, p, gc_scope, ...
    params: list[Tensor]
    grads: list[Tensor]  # each parameter's .grad: g, then d = GC(g) once centralized
    foreach: bool
    centralized: Centralized | None = None


@dataclass(frozen=True)
class AscentNorm:
    """``||T r||_2`` over the ``p = 2`` groups (one norm: their step is ``rho / l2``), and over
    the ``p = inf`` groups, only to detect an inf/NaN gradient there."""

    l2: float
    p_inf: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.l2) and math.isfinite(self.p_inf)


def _measure_ascent_norm(groups: list[AscentGroup], precise: bool) -> AscentNorm:
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
    return AscentNorm(total_norm(l2), total_norm(p_inf))


def ascent_norm(groups: list[AscentGroup]) -> AscentNorm:
    """The norms of the centralized groups, reduced in fp32 (or wider), then again in fp64 if
    the fp32 sums may have overflowed or underflowed."""
    norm = _measure_ascent_norm(groups, precise=False)
    if not norm.finite or norm.l2 < _TINY_NORM:
        norm = _measure_ascent_norm(groups, precise=True)
    return norm


# Backup, perturbation, restore --------------------------------------------------------------


def copy_(targets: list[Tensor], sources: list[Tensor], *, foreach: bool) -> None:
    """``target <- source`` bit for bit, pairwise: the backup ``b <- w`` and the restore
    ``w <- b``."""
    if foreach:
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def _add_scaled_(param: Tensor, step: Tensor, scale: float) -> None:
    """``param += scale * step``."""
    if param.dtype in _WIDE:
        param.add_(step, alpha=scale)
    else:
        # fp16 cannot hold rho / ||d|| when gradients are tiny: scale in fp32.
        param.add_(step.float().mul_(scale))


def _single_tensor_perturb_(
    params: list[Tensor], directions: list[Tensor], scale: float, p: float, adaptive: bool
) -> None:
    for param, direction in zip(params, directions, strict=True):
        if p == 2:
            if adaptive:
                weight = _widened(param)
                direction = weight * weight * direction
        else:
            direction = direction.sign()
            if adaptive:
                direction.mul_(param.abs())
        _add_scaled_(param, direction, scale)


def _multi_tensor_perturb_(params: list[Tensor], directions: list[Tensor], scale: float) -> None:
    """``w += scale * d`` (p = 2, not adaptive): one ``_foreach_add_`` over the fp32/fp64
    weights; fp16/bf16 weights go one by one through an fp32 step."""
    wide = [(w, d) for w, d in zip(params, directions, strict=True) if w.dtype in _WIDE]
    if wide:
        torch._foreach_add_([w for w, _ in wide], [d for _, d in wide], alpha=scale)
    for param, direction in zip(params, directions, strict=True):
        if param.dtype not in _WIDE:
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
    if foreach and p == 2 and not adaptive:
        _multi_tensor_perturb_(params, directions, scale)
    else:
        _single_tensor_perturb_(params, directions, scale, p, adaptive)
