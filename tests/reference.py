"""A deliberately simple reference for SAM / ASAM / GCSAM, written from the formulas alone.

Nothing here imports ``gcsam``. Everything is computed in float64 on fresh tensors (no in-place
tricks, no foreach kernels, no fused paths) so that it can serve as the ground truth:

* GC(g): for a tensor with ``ndim > 1`` ("all") or ``ndim > 3`` ("conv"), subtract from each
  slice ``g[i]`` its mean over all remaining dims; 1-D tensors are left alone.
* ``d = GC(g)``, ``T = |w|`` (adaptive) or ``1``, ``r = d`` ("centralized") or ``g`` ("raw").
* p = 2: ``eps = rho * T^2 * d / ||T r||_2`` with ONE norm over every p = 2 tensor of every group.
* p = inf: ``eps = rho * T * sign(d)``.
* The descent gradient is taken at ``w + eps`` (centralized too with ``gc_descent``), and the
  base optimizer steps from the exact ``w``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

F64 = torch.float64


@dataclass(frozen=True)
class Cfg:
    """The settings that apply to one parameter tensor (those of its param group)."""

    rho: float = 0.05
    adaptive: bool = False
    p: float = 2
    normalize_by: str = "centralized"
    gc_scope: str = "all"
    gc_descent: bool = False


def centralize(grad: Tensor, scope: str = "all") -> Tensor:
    """A new float64 tensor ``GC(grad)``; the input is not modified."""
    g = grad.detach().to(F64).clone()
    touched = (scope == "all" and g.dim() > 1) or (scope == "conv" and g.dim() > 3)
    if not touched:
        return g
    out = torch.empty_like(g)
    for i in range(g.shape[0]):  # one output unit at a time, on purpose
        out[i] = g[i] - g[i].mean()
    return out


def perturbations(
    weights: Sequence[Tensor], grads: Sequence[Tensor | None], cfgs: Sequence[Cfg]
) -> list[Tensor | None]:
    """``eps`` for each tensor (``None`` where the gradient is ``None``), in float64."""
    w64 = [w.detach().to(F64) for w in weights]
    g64 = [None if g is None else g.detach().to(F64) for g in grads]
    d = [None if g is None else centralize(g, c.gc_scope) for g, c in zip(g64, cfgs, strict=True)]

    def scaling(w: Tensor, c: Cfg) -> Tensor:
        return w.abs() if c.adaptive else torch.ones_like(w)

    total = 0.0
    for w, g, di, c in zip(w64, g64, d, cfgs, strict=True):
        if g is None or c.p != 2:
            continue
        r = di if c.normalize_by == "centralized" else g
        total += float(((scaling(w, c) * r) ** 2).sum())
    norm = math.sqrt(total)

    eps: list[Tensor | None] = []
    for w, di, c in zip(w64, d, cfgs, strict=True):
        if di is None:
            eps.append(None)
        elif c.p == 2:
            t = scaling(w, c)
            eps.append(torch.zeros_like(w) if norm == 0 else c.rho * t * t * di / norm)
        else:
            eps.append(c.rho * scaling(w, c) * torch.sign(di))
    return eps


# ---------------------------------------------------------------------------------------------
# Base optimizers as plain update rules (torch's documented formulas, defaults included).
# ---------------------------------------------------------------------------------------------


class RefSGD:
    """``b <- mu b + (1 - dampening) g`` (``b <- g`` at first), ``w <- w - lr b``;
    ``g <- g + wd w`` first."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[int, Tensor] = {}

    def update(self, weights: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        new = []
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            if g is None:
                new.append(w)
                continue
            g = g.to(F64) + self.weight_decay * w
            if self.momentum:
                b = self.buffers.get(i)
                b = g if b is None else self.momentum * b + g
                self.buffers[i] = b
                g = b
            new.append(w - self.lr * g)
        return new


class RefAdam:
    """Adam with bias correction: ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)``."""

    def __init__(
        self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.t: dict[int, int] = {}

    def update(self, weights: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        b1, b2 = self.betas
        new = []
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            if g is None:
                new.append(w)
                continue
            g = g.to(F64)
            t = self.t.get(i, 0) + 1
            m = b1 * self.m.get(i, torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * self.v.get(i, torch.zeros_like(g)) + (1 - b2) * g * g
            self.t[i], self.m[i], self.v[i] = t, m, v
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            new.append(w - self.lr * m_hat / (v_hat.sqrt() + self.eps))
        return new


Base = RefSGD | RefAdam


# ---------------------------------------------------------------------------------------------
# Full steps on a model, functionally (the module's own parameters are never touched).
# ---------------------------------------------------------------------------------------------


def model_loss_fn(
    model: nn.Module, loss: Callable[[Callable[..., Tensor]], Tensor]
) -> Callable[[list[Tensor]], Tensor]:
    """Turn ``loss(forward)`` (``forward(x)`` runs the model) into ``f(weights) -> loss`` where
    ``weights`` follow ``model.named_parameters()`` order."""
    names = [name for name, _ in model.named_parameters()]

    def f(weights: list[Tensor]) -> Tensor:
        params = dict(zip(names, weights, strict=True))

        def forward(*args: Tensor) -> Tensor:
            return functional_call(model, params, args)

        return loss(forward)

    return f


def gradients(f: Callable[[list[Tensor]], Tensor], weights: list[Tensor]):
    """``(loss, [dL/dw or None])`` at ``weights`` (float64 copies)."""
    leaves = [w.detach().to(F64).requires_grad_(True) for w in weights]
    value = f(leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), list(grads)


def sam_step(
    f: Callable[[list[Tensor]], Tensor],
    weights: list[Tensor],
    cfgs: Sequence[Cfg],
    base: Base,
) -> tuple[list[Tensor], Tensor]:
    """One SAM/GCSAM step: returns ``(new weights, loss at the unperturbed weights)``."""
    w = [t.detach().to(F64) for t in weights]
    loss, g = gradients(f, w)
    eps = perturbations(w, g, cfgs)
    perturbed = [wi if e is None else wi + e for wi, e in zip(w, eps, strict=True)]
    _, g2 = gradients(f, perturbed)
    descent = [
        None if gi is None else (centralize(gi, c.gc_scope) if c.gc_descent else gi)
        for gi, c in zip(g2, cfgs, strict=True)
    ]
    return base.update(w, descent), loss


def run_reference(
    model: nn.Module,
    loss: Callable,
    cfgs: Sequence[Cfg],
    base: Base,
    steps: int,
) -> list[Tensor]:
    """``steps`` reference steps starting from ``model``'s current weights; returns the
    final weights (float64), in ``model.parameters()`` order."""
    f = model_loss_fn(model, loss)
    weights = [p.detach().to(F64).clone() for p in model.parameters()]
    for _ in range(steps):
        weights, _ = sam_step(f, weights, cfgs, base)
    return weights


# ---------------------------------------------------------------------------------------------
# Small models and data shared by the tests.
# ---------------------------------------------------------------------------------------------


def conv_model(dtype: torch.dtype = F64, seed: int = 0, bn: bool = True) -> nn.Module:
    """Conv2d (4-D weight) -> [BatchNorm2d in eval mode] -> ReLU -> Linear (2-D weight), with
    biases (1-D). Input ``(N, 2, 5, 5)``, 3 outputs."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3, padding=1)]
    if bn:
        norm = nn.BatchNorm2d(4)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
        layers.append(norm)
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)]
    model = nn.Sequential(*layers).to(dtype)
    return model.eval()


def linear_model(dtype: torch.dtype = F64, seed: int = 0) -> nn.Module:
    """Linear -> Tanh -> Linear: 2-D weights and 1-D biases only. Input ``(N, 5)``, 2 outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def conv_data(dtype: torch.dtype = F64, n: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=gen, dtype=dtype), torch.randint(
        0, 3, (n,), generator=gen
    )


def linear_data(dtype: torch.dtype = F64, n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randn(
        n, 2, generator=gen, dtype=dtype
    )


def classification_loss(x: Tensor, y: Tensor) -> Callable[[Callable[..., Tensor]], Tensor]:
    return lambda forward: nn.functional.cross_entropy(forward(x), y)


def regression_loss(x: Tensor, y: Tensor) -> Callable[[Callable[..., Tensor]], Tensor]:
    return lambda forward: nn.functional.mse_loss(forward(x), y)
