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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from ._json import strict_json
from .batchnorm import frozen_bn_stats

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

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SharpnessResult:
    """Base of the results: ``to_json()`` gives the numbers and the settings used."""

    def to_json(self) -> dict[str, Any]:
        """Every field except those marked ``json=False`` (tensors), as plain JSON values."""
        return {
            f.name: strict_json(getattr(self, f.name))
            for f in fields(self)
            if f.metadata.get("json", True)
        }


@dataclass(frozen=True)
class Eigenvalues(SharpnessResult):
    """Top-``k`` Hessian eigenvalues by Lanczos.

    ``values``: descending (algebraic); ``iterations``: Lanczos steps (size of ``T``);
    ``hvp_count``: Hessian-vector products used; ``converged``: every top-``k`` Ritz residual
    met ``tol`` (or the Krylov space became invariant). ``vectors``: unit Ritz vectors, one list
    of parameter-shaped tensors per value (``return_vectors=True``); not in ``to_json``.
    """

    values: list[float]
    iterations: int
    hvp_count: int
    converged: bool
    tol: float
    k: int
    max_iter: int
    seed: int
    train_mode: bool
    vectors: list[list[Tensor]] | None = field(
        default=None, repr=False, compare=False, metadata={"json": False}
    )


@dataclass(frozen=True)
class Trace(SharpnessResult):
    """Hutchinson estimate of ``tr H``; ``std_error`` is NaN (``None`` in JSON) for one sample."""

    trace: float
    std_error: float
    samples: int
    seed: int
    train_mode: bool


@dataclass(frozen=True)
class Density(SharpnessResult):
    """Stochastic Lanczos quadrature: per probe, the nodes (Ritz values) and their weights
    (summing to 1); the Gaussian-broadened density (per unit eigenvalue) on ``grid``."""

    eigenvalue_nodes: list[list[float]]
    weights: list[list[float]]
    grid: list[float]
    density: list[float]
    lanczos_steps: int
    probes: int
    seed: int
    sigma: float
    train_mode: bool


@dataclass(frozen=True)
class SamSharpness(SharpnessResult):
    """``sharpness = perturbed_loss - loss >= 0``: the largest loss found in the rho-ball
    (``w`` included) minus the loss at ``w``. ``step_size=None``: conditional-gradient jumps."""

    sharpness: float
    loss: float
    perturbed_loss: float
    rho: float
    adaptive: bool
    steps: int
    step_size: float | None
    seed: int | None
    train_mode: bool


@dataclass(frozen=True)
class MSharpness(SharpnessResult):
    """m-sharpness: ``sharpness`` is the mean of ``per_chunk`` (one SAM sharpness per chunk of
    ``m`` examples); ``dropped`` examples of the last partial chunk were left out."""

    sharpness: float
    per_chunk: list[float]
    m: int
    rho: float
    adaptive: bool
    steps: int
    seed: int
    dropped: int
    train_mode: bool


# --------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_positive(name: str, value: Any, *, zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        kind = "non-negative" if zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")


def _materialize(batches: Batches) -> list[tuple[Tensor, Tensor]]:
    """The batches as a list (read once), with a clear error for an empty iterable."""
    listed = list(batches)
    if not listed:
        raise ValueError("batches: no batches given (the iterable is empty)")
    for i, batch in enumerate(listed):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(f"batches: item {i} is not an (inputs, targets) pair")
    return [(x, y) for x, y in listed]


def _resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """The parameters to measure: ``params`` (all of them the model's) or every parameter of the
    model with ``requires_grad=True``."""
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = list(params)
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for p in chosen):
            raise ValueError("params: every tensor must be a parameter of model")
        if len({id(p) for p in chosen}) != len(chosen):
            raise ValueError("params: a parameter is listed twice")
    if not chosen:
        raise ValueError("params: no parameters to measure (none requires grad); pass params=...")
    if not all(p.is_floating_point() for p in chosen):
        raise ValueError("params: every parameter must be a floating-point tensor")
    return chosen


@contextmanager
def _measuring(model: nn.Module, params: list[Tensor], train_mode: bool) -> Iterator[None]:
    """Put the model in the measuring state (eval unless ``train_mode``, ``params`` requiring
    grad, grad enabled) and give back every flag, ``.grad`` and BN statistic afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # Only torch.autograd.grad runs here, which never accumulates into .grad; keeping the
    # tensors themselves also undoes anything a hook or loss_fn might attach.
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with frozen_bn_stats(model), torch.enable_grad():
            model.train(train_mode)
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for module, training in modes:
            module.training = training  # the flag itself: train() may be overridden to recurse
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        for p, grad in grads:
            p.grad = grad


# --------------------------------------------------------------------------- objective


class _Objective:
    """The loss over fixed batches as a function of ``params``: value, gradient and Hv."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[tuple[Tensor, Tensor]],
        params: list[Tensor],
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params: list[Tensor] = params
        device = params[0].device
        sized = []
        for x, y in batches:
            n = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else len(y)
            if n > 0:  # an empty batch has no mean loss and no weight
                sized.append((x.to(device), y.to(device), n))
        if not sized:
            raise ValueError("batches: no batches with examples (every batch is empty)")
        self.batches = sized
        self.total = sum(n for _, _, n in sized)
        # Krylov vectors: the widest parameter dtype, at least fp32.
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.device = device
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
                for grad, part in zip(grads, parts, strict=True):
                    if part is not None:
                        grad.add_(part, alpha=n / self.total)
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
                    for acc, part in zip(out, parts, strict=True):
                        if part is not None:
                            acc.add_(part, alpha=n / self.total)
            total += loss.detach().double() * (n / self.total)
        self._finite(total)
        self.hvp_count += 1
        return out

    # Flat vectors (length n, dtype self.dtype) for the Krylov methods.

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        chunks = flat.split([p.numel() for p in self.params])
        return [c.view(p.shape).to(p.dtype) for c, p in zip(chunks, self.params, strict=True)]

    def flat_hvp(self, flat: Tensor) -> Tensor:
        return self.flatten(self.hvp(self.unflatten(flat)))

    def random(self, generator: torch.Generator, kind: str) -> Tensor:
        """A length-n random vector drawn on the CPU (the same on every device)."""
        if kind == "rademacher":
            z = torch.randint(0, 2, (self.numel,), generator=generator).double().mul_(2).sub_(1)
        else:
            z = torch.randn(self.numel, generator=generator, dtype=torch.float64)
        return z.to(self.device, self.dtype)


# --------------------------------------------------------------------------- progress


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(total: int, show: bool | None, desc: str) -> Any:
    """A tqdm bar on stderr; ``show=None`` shows it only on a terminal (and without tqdm)."""
    if show is False:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if show:
            raise
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        disable=None if show is None else not show,
        dynamic_ncols=True,
        leave=False,
    )


# --------------------------------------------------------------------------- Lanczos


@dataclass
class _Krylov:
    alphas: list[float]
    betas: list[float]  # couplings between consecutive basis vectors (0 after a restart)
    basis: list[Tensor]
    theta: Tensor  # Ritz values, ascending (fp64)
    ritz: Tensor  # eigenvectors of T as columns (fp64)
    converged: bool


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


def _lanczos(
    objective: _Objective,
    start: Tensor,
    steps: int,
    *,
    k: int | None,
    tol: float,
    generator: torch.Generator,
    bar: Any,
) -> _Krylov:
    """Up to ``steps`` Lanczos steps with full re-orthogonalization from ``start``.

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
    converged = False
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
        coupling = 0.0 if invariant else beta
        if k is not None and m >= k:
            top = range(m - 1, m - 1 - k, -1)
            # The noise floor lets a (near-)zero eigenvalue converge too.
            if all(
                abs(coupling * float(ritz[m - 1, i])) <= max(tol * abs(float(theta[i])), noise)
                for i in top
            ):
                converged = True
                break
        if m >= steps or m >= objective.numel:
            converged = m >= objective.numel  # the whole space: exact
            break
        if invariant:
            if k is None:
                converged = True
                break
            # Fewer than k values so far (else the test above passed): a fresh direction.
            w = _orthogonalize(objective.random(generator, "gaussian"), basis)
            q = w / torch.linalg.vector_norm(w)
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)
        basis.append(q)
    return _Krylov(alphas, betas, basis, theta, ritz, converged)


# --------------------------------------------------------------------------- public API


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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    vector = list(vector)
    if len(vector) != len(chosen) or any(
        v.shape != p.shape for v, p in zip(vector, chosen, strict=True)
    ):
        raise ValueError(
            f"vector: expected {len(chosen)} tensors shaped like the parameters "
            f"{[tuple(p.shape) for p in chosen]}, got {[tuple(v.shape) for v in vector]}"
        )
    with _measuring(model, chosen, train_mode):
        objective = _Objective(model, loss_fn, listed, chosen)
        vector = [v.detach().to(p.device, p.dtype) for v, p in zip(vector, chosen, strict=True)]
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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    numel = sum(p.numel() for p in chosen)
    _check_int("k", k, 1)
    if k > numel:
        raise ValueError(f"k must be at most the number of parameters ({numel}), got {k}")
    _check_int("max_iter", max_iter, 1)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k ({k}), got {max_iter}")
    _check_positive("tol", tol)
    _check_int("seed", seed, 0)
    with _measuring(model, chosen, train_mode):
        objective = _Objective(model, loss_fn, listed, chosen)
        generator = torch.Generator().manual_seed(seed)
        start = objective.random(generator, "gaussian")
        with _bar(min(max_iter, numel), progress, "Lanczos") as bar:
            krylov = _lanczos(
                objective, start, max_iter, k=k, tol=tol, generator=generator, bar=bar
            )
        top = list(range(len(krylov.alphas) - 1, len(krylov.alphas) - 1 - k, -1))
        vectors = None
        if return_vectors:
            basis = torch.stack(krylov.basis)  # (m, n)
            coefficients = krylov.ritz[:, top].to(basis.dtype)  # (m, k)
            flats = (coefficients.T @ basis).unbind()
            vectors = [
                [t.detach() for t in objective.unflatten(y / torch.linalg.vector_norm(y))]
                for y in flats
            ]
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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    _check_int("samples", samples, 1)
    _check_int("seed", seed, 0)
    estimates: list[float] = []
    with _measuring(model, chosen, train_mode):
        objective = _Objective(model, loss_fn, listed, chosen)
        generator = torch.Generator().manual_seed(seed)
        with _bar(samples, progress, "Hutchinson") as bar:
            for _ in range(samples):
                z = objective.random(generator, "rademacher")
                estimates.append(float(torch.dot(z, objective.flat_hvp(z))))
                bar.update()
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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    _check_int("lanczos_steps", lanczos_steps, 1)
    _check_int("probes", probes, 1)
    _check_int("seed", seed, 0)
    _check_int("grid", grid, 2)
    if sigma is not None:
        _check_positive("sigma", sigma)
    nodes: list[Tensor] = []
    weights: list[Tensor] = []
    with _measuring(model, chosen, train_mode):
        objective = _Objective(model, loss_fn, listed, chosen)
        generator = torch.Generator().manual_seed(seed)
        with _bar(probes, progress, "SLQ probes") as bar:
            for _ in range(probes):
                start = objective.random(generator, "rademacher")
                krylov = _lanczos(
                    objective,
                    start,
                    lanczos_steps,
                    k=None,
                    tol=0.0,
                    generator=generator,
                    bar=_NoBar(),
                )
                nodes.append(krylov.theta)
                weights.append(krylov.ritz[0].square())
                bar.update()
    low = min(float(t.min()) for t in nodes)
    high = max(float(t.max()) for t in nodes)
    if sigma is None:
        span = high - low
        # One node (or all equal): fall back to the magnitude, then to 1 for a zero Hessian.
        sigma = 0.01 * (span if span > 0 else (max(abs(high), abs(low)) or 1.0))
    points = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid, dtype=torch.float64)
    density = torch.zeros(grid, dtype=torch.float64)
    for theta, tau in zip(nodes, weights, strict=True):
        gaussians = torch.exp(-0.5 * ((points[:, None] - theta[None, :]) / sigma) ** 2)
        density += (gaussians * tau[None, :]).sum(dim=1)
    density /= probes * sigma * math.sqrt(2 * math.pi)
    return Density(
        eigenvalue_nodes=[t.tolist() for t in nodes],
        weights=[w.tolist() for w in weights],
        grid=points.tolist(),
        density=density.tolist(),
        lanczos_steps=lanczos_steps,
        probes=probes,
        seed=seed,
        sigma=float(sigma),
        train_mode=train_mode,
    )


def _squared_norm(tensors: list[Tensor]) -> float:
    return math.fsum(float(t.double().square().sum()) for t in tensors)


def _ascent(
    objective: _Objective,
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
    scales = [w.abs() for w in origin] if adaptive else None  # T = |w|

    def scaled(tensors: list[Tensor]) -> list[Tensor]:
        """``T x``: the gradient in the coordinates ``u = T^-1 eps``."""
        if scales is None:
            return tensors
        return [t * s for t, s in zip(tensors, scales, strict=True)]

    direction = scaled(grad)
    norm = math.sqrt(_squared_norm(direction))
    if norm == 0 or not math.isfinite(norm):
        # At an exact critical point the gradient gives no direction: start from a random one.
        generator = torch.Generator().manual_seed(seed)
        direction = [
            torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device, p.dtype)
            for p in params
        ]
        norm = math.sqrt(_squared_norm(direction))
    u = [d * (rho / norm) for d in direction]
    best = loss
    try:
        for step in range(steps):
            with torch.no_grad():
                for p, w, eps in zip(params, origin, scaled(u), strict=True):
                    p.copy_(w + eps)
            if step == steps - 1:
                best = max(best, objective.loss())
                break
            value, grad = objective.loss_and_grad()
            best = max(best, value)
            direction = scaled(grad)
            norm = math.sqrt(_squared_norm(direction))
            if norm == 0:
                break  # stationary inside the ball: nowhere to climb
            if step_size is None:  # the first-order SAM point of the linearization at u
                u = [d * (rho / norm) for d in direction]
                continue
            u = [ui + d * (step_size / norm) for ui, d in zip(u, direction, strict=True)]
            length = math.sqrt(_squared_norm(u))
            if length > rho:
                u = [ui * (rho / length) for ui in u]
    finally:
        with torch.no_grad():
            for p, w in zip(params, origin, strict=True):
                p.copy_(w)
    return loss, best


def _check_sam_args(rho: Any, adaptive: Any, steps: Any, step_size: Any) -> None:
    _check_positive("rho", rho, zero=True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    _check_int("steps", steps, 1)
    if step_size is not None:
        _check_positive("step_size", step_size)


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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    _check_sam_args(rho, adaptive, steps, step_size)
    if seed is not None:
        _check_int("seed", seed, 0)
    with _measuring(model, chosen, train_mode):
        objective = _Objective(model, loss_fn, listed, chosen)
        origin = [p.detach().clone() for p in chosen]
        loss, best = _ascent(
            objective,
            origin,
            rho=float(rho),
            adaptive=adaptive,
            steps=steps,
            step_size=None if step_size is None else float(step_size),
            seed=0 if seed is None else seed,
        )
    return SamSharpness(
        sharpness=best - loss,
        loss=loss,
        perturbed_loss=best,
        rho=float(rho),
        adaptive=adaptive,
        steps=steps,
        step_size=None if step_size is None else float(step_size),
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
    listed = _materialize(batches)
    chosen = _resolve_params(model, params)
    _check_int("m", m, 1)
    _check_sam_args(rho, adaptive, steps, None)
    _check_int("seed", seed, 0)
    inputs = torch.cat([x for x, _ in listed])
    targets = torch.cat([y for _, y in listed])
    total = inputs.shape[0]
    if m > total:
        raise ValueError(f"m must be at most the number of examples ({total}), got {m}")
    chunks = total // m
    per_chunk: list[float] = []
    with _measuring(model, chosen, train_mode):
        origin = [p.detach().clone() for p in chosen]
        with _bar(chunks, progress, "m-sharpness") as bar:
            for i in range(chunks):
                part = slice(i * m, (i + 1) * m)
                objective = _Objective(model, loss_fn, [(inputs[part], targets[part])], chosen)
                loss, best = _ascent(
                    objective,
                    origin,
                    rho=float(rho),
                    adaptive=adaptive,
                    steps=steps,
                    step_size=None,
                    seed=seed,
                )
                per_chunk.append(best - loss)
                bar.update()
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
