"""Complex parameters: GC, the norms and the perturbation treat each as its
``torch.view_as_real`` pair of real tensors; ``p = inf`` (no complex sign) is refused up front."""

from __future__ import annotations

import math

import pytest
import torch
from reference import centralize
from torch import Tensor, nn

from gcsam import GCSAM, SAM, centralize_gradient

BASES = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def crand(*shape: int, seed: int, dtype: torch.dtype = torch.complex128) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randn(*shape, 2, generator=gen, dtype=torch.float64)
    # The offset gives the rows a complex mean for GC to remove.
    return torch.view_as_complex(pairs + 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 3)])
def test_centralize_gradient_is_gc_of_real_and_imaginary_parts(shape, dtype) -> None:
    g = crand(*shape, seed=0, dtype=dtype)
    expected = torch.complex(centralize(g.real), centralize(g.imag))
    centralize_gradient(g)
    assert g.dtype == dtype
    tol = 1e-6 if dtype == torch.complex64 else 1e-14
    torch.testing.assert_close(g.to(torch.complex128), expected, rtol=0, atol=tol)


def loss_of(w: Tensor, b: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """A real loss of complex weights ``w (4, 3)``, ``b (4,)``."""
    z = x @ w.T + b
    return torch.log1p((z - t).abs().square()).mean()


def complex_run(base: str, steps: int, **settings) -> list[Tensor]:
    """``steps`` GCSAM steps on complex ``w``, ``b``; returns them as real pairs."""
    cls, kwargs = BASES[base]
    w, b = nn.Parameter(crand(4, 3, seed=1)), nn.Parameter(crand(4, seed=2))
    x, t = crand(8, 3, seed=3), crand(8, 4, seed=4)
    opt = GCSAM([w, b], cls, rho=0.1, **settings, **kwargs)
    for _ in range(steps):

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_of(w, b, x, t)
            loss.backward()
            return loss

        opt.step(closure)
    return [w.real, w.imag, b.real, b.imag]


def real_run(base: str, steps: int, **settings) -> list[Tensor]:
    """The same run on four real parameters: the real and imaginary parts, each its own tensor
    (GC per row of each part, one norm over all four)."""
    cls, kwargs = BASES[base]
    w, b = crand(4, 3, seed=1), crand(4, seed=2)
    parts = [nn.Parameter(p.clone()) for p in (w.real, w.imag, b.real, b.imag)]
    x, t = crand(8, 3, seed=3), crand(8, 4, seed=4)
    opt = GCSAM(parts, cls, rho=0.1, **settings, **kwargs)
    for _ in range(steps):

        def closure() -> Tensor:
            opt.zero_grad()
            wr, wi, br, bi = parts
            loss = loss_of(torch.complex(wr, wi), torch.complex(br, bi), x, t)
            loss.backward()
            return loss

        opt.step(closure)
    return list(parts)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("normalize_by", ["centralized", "raw"])
@pytest.mark.parametrize("foreach", [True, False])
def test_complex_parameters_step_like_their_real_pairs(base, normalize_by, foreach) -> None:
    settings = {"normalize_by": normalize_by, "foreach": foreach, "gc_descent": True}
    got = complex_run(base, 3, **settings)
    expected = real_run(base, 3, **settings)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize_by", ["centralized", "raw"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_adaptive_complex_perturbation(normalize_by, dtype) -> None:
    """ASAM with ``T = |w|``: ``eps = rho |w|^2 d / || |w| r ||``, computed on real parts."""
    w = nn.Parameter(crand(4, 3, seed=5, dtype=dtype))
    g = crand(4, 3, seed=6, dtype=dtype)
    w.grad = g.clone()
    w0 = w.detach().to(torch.complex128)
    g64 = g.to(torch.complex128)
    d = torch.complex(centralize(g64.real), centralize(g64.imag))
    r = d if normalize_by == "centralized" else g64
    t2 = w0.real.square() + w0.imag.square()  # |w|^2
    norm = (t2 * (r.real.square() + r.imag.square())).sum().sqrt()
    expected = w0 + 0.1 * t2 * d / norm
    opt = GCSAM([w], torch.optim.SGD, rho=0.1, lr=0.1, adaptive=True, normalize_by=normalize_by)
    opt.first_step()
    tol = 1e-6 if dtype == torch.complex64 else 1e-13
    torch.testing.assert_close(w.detach().to(torch.complex128), expected, rtol=tol, atol=tol)


def complex_params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(2, 3)), nn.Parameter(crand(4, 3, seed=7))]


@pytest.mark.parametrize("cls", [GCSAM, SAM])
def test_p_inf_refuses_complex_at_construction(cls) -> None:
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 .*complex.*p=2"):
        cls(complex_params(), torch.optim.SGD, p=math.inf, lr=0.1)


def test_p_inf_refuses_complex_in_add_param_group() -> None:
    opt = GCSAM([nn.Parameter(torch.randn(2, 3))], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .*complex"):
        opt.add_param_group({"params": [nn.Parameter(crand(2, seed=8))], "p": math.inf})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


def test_p_inf_set_later_refused_by_first_step_before_anything_changes() -> None:
    params = complex_params()
    for p in params:
        p.grad = torch.ones_like(p) + 0.5 * torch.arange(p.shape[-1])
    opt = GCSAM(params, torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["p"] = math.inf
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 .*complex"):
        opt.first_step()
    for p, (w, g) in zip(params, before, strict=True):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
    assert not opt.descending and not opt.perturbed
