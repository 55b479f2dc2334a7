r"""The Hessian machinery of :mod:`gcsam.sharpness`: the loss over fixed batches as a function
of the measured parameters (value, gradient, Hessian-vector product by double backward,
:math:`Hv = \nabla_w \langle \nabla_w L(w), v \rangle`), and Lanczos with full
re-orthogonalization on it (see the :mod:`gcsam.sharpness` docstring for the stopping rule and
the quadrature)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._measure import Batch, LossFn


class Objective:
    """The loss over fixed batches as a function of ``params``: value, gradient and Hv.

    ``batches`` are on the parameters' device; the loss is the size-weighted mean of the
    per-batch (mean-reduced) losses, accumulated in fp64.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, batches: list[Batch], params: list[Tensor]
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = params
        self.batches = batches
        self.total = sum(n for _, _, n in batches)
        # Krylov vectors: the widest parameter dtype, at least fp32.
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.device = params[0].device
        self.numel = sum(p.numel() for p in params)
        self.hvp_count = 0

    def _batch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(self.model(x), y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar (mean-reduced) loss tensor")
        return loss.reshape(())

    @staticmethod
    def _finite(total: Tensor) -> float:
        value = float(total)
        if not math.isfinite(value):
            raise ValueError(f"loss_fn: the loss over the batches is not finite ({value})")
        return value

    def _zeros(self) -> list[Tensor]:
        return [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]

    def _accumulate(self, out: list[Tensor], parts: tuple[Tensor | None, ...], n: int) -> None:
        for acc, part in zip(out, parts, strict=True):
            if part is not None:
                acc.add_(part, alpha=n / self.total)

    def loss(self) -> float:
        """``L(w)``."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y, n in self.batches:
                total += self._batch_loss(x, y).double() * (n / self.total)
        return self._finite(total)

    def loss_and_grad(self) -> tuple[float, list[Tensor]]:
        """``(L(w), grad L(w))``, the gradient shaped like ``params``."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = self._zeros()
        for x, y, n in self.batches:
            loss = self._batch_loss(x, y)
            if loss.requires_grad:
                parts = torch.autograd.grad(loss, self.params, allow_unused=True)
                self._accumulate(grads, parts, n)
            total += loss.detach().double() * (n / self.total)
        return self._finite(total), grads

    def hvp(self, vector: list[Tensor]) -> list[Tensor]:
        """``H v`` by double backward, batch-size weighted over the batches."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        out = self._zeros()
        for x, y, n in self.batches:
            loss = self._batch_loss(x, y)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                # A gradient that is constant in w (loss linear in that tensor) has no graph.
                terms = [
                    (g * v).sum()
                    for g, v in zip(grads, vector, strict=True)
                    if g is not None and g.requires_grad
                ]
                if terms:
                    parts = torch.autograd.grad(sum(terms), self.params, allow_unused=True)
                    self._accumulate(out, parts, n)
            total += loss.detach().double() * (n / self.total)
        self._finite(total)
        self.hvp_count += 1
        return out

    # Flat vectors (length numel, dtype self.dtype) for the Krylov methods.

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        chunks = flat.split([p.numel() for p in self.params])
        return [c.view(p.shape).to(p.dtype) for c, p in zip(chunks, self.params, strict=True)]

    def flat_hvp(self, flat: Tensor) -> Tensor:
        return self.flatten(self.hvp(self.unflatten(flat)))

    def random(self, generator: torch.Generator, kind: str) -> Tensor:
        """A length-numel ``"rademacher"`` or ``"gaussian"`` vector, drawn on the CPU so that a
        seed gives the same vector on every device."""
        if kind == "rademacher":
            z = torch.randint(0, 2, (self.numel,), generator=generator).double().mul_(2).sub_(1)
        else:
            z = torch.randn(self.numel, generator=generator, dtype=torch.float64)
        return z.to(self.device, self.dtype)


@dataclass
class Krylov:
    """A Lanczos run: ``T`` (``alphas`` on the diagonal, ``betas`` beside it) and its
    eigendecomposition, over the orthonormal ``basis`` (m flat vectors)."""

    alphas: list[float]
    betas: list[float]  # couplings between consecutive basis vectors (0 after a restart)
    basis: list[Tensor]
    theta: Tensor  # Ritz values, ascending, (m,) fp64
    ritz: Tensor  # eigenvectors of T as columns, (m, m) fp64
    converged: bool

    def top(self, k: int) -> list[int]:
        """Indices into ``theta`` of the ``k`` largest Ritz values, largest first."""
        return _top_indices(len(self.alphas), k)

    def vectors(self, indices: list[int]) -> list[Tensor]:
        """The unit Ritz vectors ``Q s_i`` (flat) of the given Ritz values."""
        basis = torch.stack(self.basis)  # (m, n)
        flats = (self.ritz[:, indices].to(basis.dtype).T @ basis).unbind()  # k x (n,)
        return [y / torch.linalg.vector_norm(y) for y in flats]


def _top_indices(m: int, k: int) -> list[int]:
    return list(range(m - 1, m - 1 - k, -1))  # theta ascends


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _orthogonalize(w: Tensor, basis: list[Tensor]) -> Tensor:
    """``w`` minus its projection on the orthonormal ``basis``; two Gram-Schmidt passes
    ("twice is enough") keep the basis orthogonal to working precision."""
    for _ in range(2):
        for q in basis:
            w = w - torch.dot(w, q) * q
    return w


def _top_converged(
    theta: Tensor, ritz: Tensor, k: int, coupling: float, tol: float, noise: float
) -> bool:
    """Every top-``k`` Ritz residual ``|beta_m s_{m,i}|`` is within ``tol |theta_i|``; the noise
    floor lets a (near-)zero eigenvalue converge too."""
    m = theta.shape[0]
    return all(
        abs(coupling * float(ritz[m - 1, i])) <= max(tol * abs(float(theta[i])), noise)
        for i in _top_indices(m, k)
    )


def lanczos(
    objective: Objective,
    start: Tensor,
    steps: int,
    *,
    k: int | None,
    tol: float,
    generator: torch.Generator,
    bar: Any,
) -> Krylov:
    """Up to ``steps`` Lanczos steps (one HVP each, ``bar.update()`` after each) with full
    re-orthogonalization from ``start``.

    With ``k``, stops once the top-``k`` Ritz residuals meet ``tol``; if the Krylov space
    becomes invariant before ``k`` values exist, restarts from a random vector orthogonal to
    the basis. Without ``k`` (quadrature), an invariant space simply ends the run.
    """
    eps = torch.finfo(objective.dtype).eps
    q = start / torch.linalg.vector_norm(start)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # running estimate of ||H|| for the breakdown test
    while True:
        w = objective.flat_hvp(q)
        alpha = float(torch.dot(w, q))
        w = _orthogonalize(w, basis)  # subsumes the three-term recurrence
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        bar.update()
        scale = max(scale, abs(alpha), beta)
        m = len(alphas)
        theta, ritz = torch.linalg.eigh(_tridiagonal(alphas, betas))
        # Below this, w is rounding noise: span(basis) is invariant and the Ritz values exact.
        noise = 100 * eps * math.sqrt(objective.numel) * scale
        invariant = beta <= noise
        if k is None:
            converged = invariant
        else:
            coupling = 0.0 if invariant else beta
            converged = m >= k and _top_converged(theta, ritz, k, coupling, tol, noise)
        if converged:
            break
        if m >= steps or m >= objective.numel:
            converged = m >= objective.numel  # the whole space: exact
            break
        if invariant:  # fewer than k values so far (else converged): a fresh direction
            w = _orthogonalize(objective.random(generator, "gaussian"), basis)
            q, beta = w / torch.linalg.vector_norm(w), 0.0
        else:
            q = w / beta
        basis.append(q)
        betas.append(beta)
    return Krylov(alphas, betas, basis, theta, ritz, converged)
