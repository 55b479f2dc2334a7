r"""Flatness of a trained model: Hessian eigenvalues, trace and spectral density, SAM sharpness.

Every measure looks at the loss over a fixed list of batches, the batch-size weighted mean of the
per-batch (mean-reduced) losses,

.. math::
    L(w) = \frac{\sum_b n_b L_b(w)}{\sum_b n_b},

as a function of the chosen parameters :math:`w \in \mathbb{R}^n` (by default those with
``requires_grad=True``), in eval mode (BatchNorm uses its running statistics, dropout is off)
unless ``train_mode=True``. The model comes back exactly as it was: weights (bit for bit),
``requires_grad`` flags, train/eval flags, BatchNorm statistics and every ``.grad``.

* Hessian-vector product, never forming :math:`H`:
  :math:`Hv = \nabla_w \langle \nabla_w L(w), v \rangle` (double backward).
* Top eigenvalues (Lanczos with full re-orthogonalization): from a random unit :math:`q_1`,
  :math:`m` steps give an orthonormal :math:`Q_m` and a tridiagonal :math:`T_m = Q_m^\top H Q_m`
  with :math:`H Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top`. For :math:`T_m = S \Theta S^\top` the
  Ritz pair :math:`(\theta_i, y_i = Q_m s_i)` has residual
  :math:`\lVert H y_i - \theta_i y_i \rVert_2 = |\beta_m s_{m,i}|`; the top :math:`k` have
  converged once each is at most :math:`\mathrm{tol}\,|\theta_i|` (the eigenvalue error is then
  about residual² / gap, far below tol).
* Trace (Hutchinson): :math:`\operatorname{tr} H = \mathbb{E}_z[z^\top H z]` for Rademacher
  :math:`z`; the standard error is the sample std of :math:`z^\top H z` over
  :math:`\sqrt{\mathrm{samples}}`.
* Spectral density (stochastic Lanczos quadrature, Ghorbani et al., 2019): for a unit Rademacher
  probe :math:`v`, :math:`v^\top f(H) v \approx \sum_j \tau_j f(\theta_j)` with nodes
  :math:`\theta_j` (eigenvalues of :math:`T_m`) and weights :math:`\tau_j = s_{1,j}^2`
  (:math:`\sum_j \tau_j = 1`). The density :math:`\frac{1}{n}\sum_i \delta(t - \lambda_i)`,
  broadened by a Gaussian of width :math:`\sigma`, is estimated as
  :math:`\hat\phi(t) = \operatorname{mean}_\mathrm{probes} \sum_j \tau_j
  \mathcal{N}(t;\, \theta_j, \sigma^2)`, which integrates to 1.
* SAM sharpness:
  :math:`\max_{\lVert T^{-1}\epsilon \rVert_2 \le \rho} L(w + \epsilon) - L(w)` with
  :math:`T = |w|` (adaptive, ASAM) or 1, approximated by projected normalized gradient ascent in
  :math:`u = T^{-1}\epsilon` from the first-order SAM point
  :math:`u_1 = \rho\, T g / \lVert T g \rVert_2` (:math:`g = \nabla L(w)`, so
  :math:`\epsilon_1 = \rho\, T^2 g / \lVert T g \rVert_2`):
  :math:`u_{t+1} = \Pi_\rho\bigl(u_t + \eta\, T g_t / \lVert T g_t \rVert_2\bigr)`,
  :math:`g_t = \nabla L(w + T u_t)`, or by default (:math:`\eta \to \infty`) the
  conditional-gradient step :math:`u_{t+1} = \rho\, T g_t / \lVert T g_t \rVert_2`, which
  never lowers a loss that is convex in the ball; the largest loss seen is kept, :math:`w`
  itself included (so the sharpness is never negative).
* m-sharpness (Foret et al., 2021): the mean of the SAM sharpness of disjoint chunks of
  :math:`m` examples, each maximized on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._util.progress import progress_bar
from .._util.validate import check_int, check_number
from ._ascent import ascent
from ._hessian import Objective, lanczos
from ._measure import (
    Batch,
    Batches,
    LossFn,
    like_params,
    measuring,
    prepare_batches,
    resolve_params,
)
from ._sharpness_results import (
    Density,
    Eigenvalues,
    MSharpness,
    SamSharpness,
    SharpnessResult,
    Trace,
)

__all__ = [
    "Density",
    "Eigenvalues",
    "MSharpness",
    "SamSharpness",
    "SharpnessResult",
    "Trace",
    "hessian_trace",
    "hessian_vector_product",
    "m_sharpness",
    "sam_sharpness",
    "spectral_density",
    "top_eigenvalues",
]


def _prepare(
    model: nn.Module, batches: Batches, params: Iterable[Tensor] | None
) -> tuple[list[Tensor], list[Batch]]:
    """The measured parameters and the batches on their device."""
    chosen = resolve_params(model, params)
    return chosen, prepare_batches(batches, chosen[0].device)


# --------------------------------------------------------------------------- Hessian


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    vector: list[Tensor],
    *,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> list[Tensor]:
    """``H v`` for the loss over ``batches``; ``vector`` and the result are shaped like the
    parameters (``params`` or those requiring grad, in ``model.parameters()`` order)."""
    chosen, data = _prepare(model, batches, params)
    names = {id(p): name for name, p in model.named_parameters()}
    vector = like_params(vector, [(names[id(p)], p) for p in chosen], "vector")
    with measuring(model, chosen, train_mode):
        objective = Objective(model, loss_fn, data, chosen)
        return [h.detach() for h in objective.hvp(vector)]


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    return_vectors: bool = False,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
    progress: bool | None = None,
) -> Eigenvalues:
    """The ``k`` largest (algebraic) Hessian eigenvalues by Lanczos (one HVP per iteration,
    ``max_iter`` at most, capped at the parameter count); memory: one parameter-sized vector
    per iteration for the full re-orthogonalization.

    An eigenvalue of multiplicity r > 1 is found once, as by any single-vector Krylov method.
    """
    chosen, data = _prepare(model, batches, params)
    numel = sum(p.numel() for p in chosen)
    check_int("k", k, 1)
    if k > numel:
        raise ValueError(f"k must be at most the number of parameters ({numel}), got {k}")
    check_int("max_iter", max_iter, 1)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k ({k}), got {max_iter}")
    check_number("tol", tol)
    check_int("seed", seed, 0)
    with measuring(model, chosen, train_mode):
        objective = Objective(model, loss_fn, data, chosen)
        generator = torch.Generator().manual_seed(seed)
        start = objective.random(generator, "gaussian")
        total = min(max_iter, numel)
        with progress_bar(total=total, show=progress, desc="Lanczos", leave=False) as bar:
            krylov = lanczos(objective, start, max_iter, k=k, tol=tol, generator=generator, bar=bar)
        top = krylov.top(k)
        vectors = None
        if return_vectors:
            vectors = [[t.detach() for t in objective.unflatten(y)] for y in krylov.vectors(top)]
    return Eigenvalues(
        values=[float(krylov.theta[i]) for i in top],
        iterations=len(krylov.alphas),
        hvp_count=objective.hvp_count,
        converged=krylov.converged,
        tol=float(tol),
        k=k,
        max_iter=max_iter,
        seed=seed,
        train_mode=train_mode,
        vectors=vectors,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    samples: int = 100,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
    progress: bool | None = None,
) -> Trace:
    """Hutchinson's estimate of ``tr H`` from ``samples`` Rademacher probes (one HVP each)."""
    chosen, data = _prepare(model, batches, params)
    check_int("samples", samples, 1)
    check_int("seed", seed, 0)
    estimates: list[float] = []
    with measuring(model, chosen, train_mode):
        objective = Objective(model, loss_fn, data, chosen)
        generator = torch.Generator().manual_seed(seed)
        for _ in progress_bar(range(samples), show=progress, desc="Hutchinson", leave=False):
            z = objective.random(generator, "rademacher")
            estimates.append(float(torch.dot(z, objective.flat_hvp(z))))
    mean = math.fsum(estimates) / samples
    if samples > 1:
        variance = math.fsum((e - mean) ** 2 for e in estimates) / (samples - 1)
        std_error = math.sqrt(variance / samples)
    else:
        std_error = math.nan
    return Trace(trace=mean, std_error=std_error, samples=samples, seed=seed, train_mode=train_mode)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    lanczos_steps: int = 30,
    probes: int = 5,
    seed: int = 0,
    sigma: float | None = None,
    grid: int = 200,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
    progress: bool | None = None,
) -> Density:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (``probes`` runs of
    ``lanczos_steps`` HVPs each).

    ``sigma`` (eigenvalue units) defaults to 1/100 of the span of the nodes; the ``grid``
    points run from 5 sigma below the smallest node to 5 sigma above the largest.
    """
    chosen, data = _prepare(model, batches, params)
    check_int("lanczos_steps", lanczos_steps, 1)
    check_int("probes", probes, 1)
    check_int("seed", seed, 0)
    check_int("grid", grid, 2)
    if sigma is not None:
        check_number("sigma", sigma)
    nodes: list[Tensor] = []
    weights: list[Tensor] = []
    with measuring(model, chosen, train_mode):
        objective = Objective(model, loss_fn, data, chosen)
        generator = torch.Generator().manual_seed(seed)
        for _ in progress_bar(range(probes), show=progress, desc="SLQ probes", leave=False):
            start = objective.random(generator, "rademacher")
            krylov = lanczos(
                objective,
                start,
                lanczos_steps,
                k=None,
                tol=0.0,
                generator=generator,
                bar=progress_bar(show=False),
            )
            nodes.append(krylov.theta)
            weights.append(krylov.ritz[0].square())
    sigma, points, density = _broadened(nodes, weights, sigma, grid)
    return Density(
        eigenvalue_nodes=[t.tolist() for t in nodes],
        weights=[w.tolist() for w in weights],
        grid=points.tolist(),
        density=density.tolist(),
        lanczos_steps=lanczos_steps,
        probes=probes,
        seed=seed,
        sigma=sigma,
        train_mode=train_mode,
    )


def _broadened(
    nodes: list[Tensor], weights: list[Tensor], sigma: float | None, grid: int
) -> tuple[float, Tensor, Tensor]:
    """``(sigma, points, density)``: the mean over probes of the weighted node Gaussians of
    width ``sigma`` (default: 1/100 of the nodes' span) on ``grid`` points (fp64, ``(grid,)``)."""
    low = min(float(t.min()) for t in nodes)
    high = max(float(t.max()) for t in nodes)
    if sigma is None:
        span = high - low
        # One node (or all equal): fall back to the magnitude, then to 1 for a zero Hessian.
        sigma = 0.01 * (span if span > 0 else (max(abs(high), abs(low)) or 1.0))
    sigma = float(sigma)
    points = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid, dtype=torch.float64)
    density = torch.zeros(grid, dtype=torch.float64)
    for theta, tau in zip(nodes, weights, strict=True):
        gaussians = torch.exp(-0.5 * ((points[:, None] - theta[None, :]) / sigma) ** 2)
        density += (gaussians * tau[None, :]).sum(dim=1)
    density /= len(nodes) * sigma * math.sqrt(2 * math.pi)
    return sigma, points, density


# --------------------------------------------------------------------------- SAM sharpness


def _check_sam_args(rho: Any, adaptive: Any, steps: Any, step_size: Any) -> None:
    check_number("rho", rho, zero=True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    check_int("steps", steps, 1)
    if step_size is not None:
        check_number("step_size", step_size)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    steps: int = 5,
    step_size: float | None = None,
    seed: int | None = None,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
) -> SamSharpness:
    """The largest loss increase found in the rho-ball around ``w`` (L2, or the ASAM ball
    ``||eps / |w| ||_2 <= rho`` when ``adaptive``).

    ``steps`` loss evaluations in the ball: the first at the first-order SAM point (``steps=1``
    is SAM's own one-step estimate), each next one a normalized gradient step of length
    ``step_size`` (same units as ``rho``) projected back on the ball. The default
    ``step_size=None`` is the limit of an infinite step: jump to the first-order SAM point of
    the linearization at the current iterate, ``u <- rho T g_t / ||T g_t||`` (conditional
    gradient). Where the loss is convex in the ball this never decreases the loss,
    ``L(u') >= L(u) + <T g_t, u' - u> >= L(u)``, and on a test quadratic and network it
    converges several times faster than finite steps.

    ``seed`` (default 0) draws the start direction only where the gradient vanishes.
    Cost: ``steps`` gradient passes and one loss pass over the batches.
    """
    chosen, data = _prepare(model, batches, params)
    _check_sam_args(rho, adaptive, steps, step_size)
    if seed is not None:
        check_int("seed", seed, 0)
    step_size = None if step_size is None else float(step_size)
    with measuring(model, chosen, train_mode):
        objective = Objective(model, loss_fn, data, chosen)
        origin = [p.detach().clone() for p in chosen]
        loss, best = ascent(
            objective,
            origin,
            rho=float(rho),
            adaptive=adaptive,
            steps=steps,
            step_size=step_size,
            seed=0 if seed is None else seed,
        )
    return SamSharpness(
        sharpness=best - loss,
        loss=loss,
        perturbed_loss=best,
        rho=float(rho),
        adaptive=adaptive,
        steps=steps,
        step_size=step_size,
        seed=seed,
        train_mode=train_mode,
    )


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    m: int,
    rho: float = 0.05,
    adaptive: bool = False,
    steps: int = 1,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    train_mode: bool = False,
    progress: bool | None = None,
) -> MSharpness:
    """Foret et al.'s m-sharpness: the batches are concatenated and cut into ``N // m`` chunks
    of ``m`` consecutive examples (the last ``N % m`` examples are dropped), and the mean of
    ``sam_sharpness`` over the chunks, each maximized on its own, is returned.

    The default ``steps=1`` is the paper's one-step (first-order SAM) estimate; more steps use
    ``sam_sharpness``'s default (conditional-gradient) steps.
    """
    chosen, data = _prepare(model, batches, params)
    check_int("m", m, 1)
    _check_sam_args(rho, adaptive, steps, None)
    check_int("seed", seed, 0)
    total = sum(n for _, _, n in data)
    if m > total:
        raise ValueError(f"m must be at most the number of examples ({total}), got {m}")
    inputs = torch.cat([x for x, _, _ in data])
    targets = torch.cat([y for _, y, _ in data])
    chunks = total // m
    per_chunk: list[float] = []
    with measuring(model, chosen, train_mode):
        origin = [p.detach().clone() for p in chosen]
        for i in progress_bar(range(chunks), show=progress, desc="m-sharpness", leave=False):
            part = slice(i * m, (i + 1) * m)
            objective = Objective(model, loss_fn, [(inputs[part], targets[part], m)], chosen)
            loss, best = ascent(
                objective,
                origin,
                rho=float(rho),
                adaptive=adaptive,
                steps=steps,
                step_size=None,
                seed=seed,
            )
            per_chunk.append(best - loss)
    return MSharpness(
        sharpness=math.fsum(per_chunk) / chunks,
        per_chunk=per_chunk,
        m=m,
        rho=float(rho),
        adaptive=adaptive,
        steps=steps,
        seed=seed,
        dropped=total - chunks * m,
        train_mode=train_mode,
    )
