r"""The inner maximization of :func:`gcsam.sharpness.sam_sharpness`: normalized gradient ascent
on the loss in the rho-ball :math:`\lVert T^{-1} \epsilon \rVert_2 \le \rho` around ``w``
(:math:`T = |w|` adaptive, else 1), in the coordinates :math:`u = T^{-1} \epsilon`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._hessian import Objective


def _squared_norm(tensors: list[Tensor]) -> float:
    return math.fsum(float(t.double().square().sum()) for t in tensors)


def _first_point(direction: list[Tensor], rho: float, seed: int) -> list[Tensor]:
    """``u = rho d / ||d||`` for the scaled gradient ``d``; from a seeded random direction
    where ``d`` vanishes (at an exact critical point the gradient gives no direction)."""
    norm = math.sqrt(_squared_norm(direction))
    if norm == 0 or not math.isfinite(norm):
        generator = torch.Generator().manual_seed(seed)
        direction = [
            torch.randn(d.shape, generator=generator, dtype=torch.float64).to(d.device, d.dtype)
            for d in direction
        ]
        norm = math.sqrt(_squared_norm(direction))
    return [d * (rho / norm) for d in direction]


def _next_point(
    u: list[Tensor], direction: list[Tensor], rho: float, step_size: float | None
) -> list[Tensor] | None:
    """The next ``u`` in the ball from the scaled gradient ``direction`` at ``u``: the
    first-order SAM point of the linearization (``step_size=None``) or a normalized step
    projected back on the ball; None where the gradient vanishes (nowhere to climb)."""
    norm = math.sqrt(_squared_norm(direction))
    if norm == 0:
        return None
    if step_size is None:
        return [d * (rho / norm) for d in direction]
    u = [ui + d * (step_size / norm) for ui, d in zip(u, direction, strict=True)]
    length = math.sqrt(_squared_norm(u))
    return u if length <= rho else [ui * (rho / length) for ui in u]


def ascent(
    objective: Objective,
    origin: list[Tensor],
    *,
    rho: float,
    adaptive: bool,
    steps: int,
    step_size: float | None,
    seed: int,
) -> tuple[float, float]:
    """``(L(w), largest loss found in the ball)``; the parameters hold ``origin`` (``w``)
    on entry and again on exit, even on error."""
    params = objective.params
    loss, grad = objective.loss_and_grad()
    if rho == 0:
        return loss, loss
    scales = [w.abs() for w in origin] if adaptive else None  # T = |w|, or 1

    def scaled(tensors: list[Tensor]) -> list[Tensor]:
        """``T x``: the gradient in the coordinates ``u = T^-1 eps``, or ``eps`` from ``u``."""
        if scales is None:
            return tensors
        return [t * s for t, s in zip(tensors, scales, strict=True)]

    u = _first_point(scaled(grad), rho, seed)
    best = loss
    try:
        for step in range(steps):
            with torch.no_grad():
                torch._foreach_copy_(params, origin)
                torch._foreach_add_(params, scaled(u))
            if step == steps - 1:
                best = max(best, objective.loss())
                break
            value, grad = objective.loss_and_grad()
            best = max(best, value)
            following = _next_point(u, scaled(grad), rho, step_size)
            if following is None:
                break
            u = following
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, origin)
    return loss, best
