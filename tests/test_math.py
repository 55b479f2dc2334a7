"""Exact math of GCSAM / SAM / ASAM against the float64 reference in ``reference.py``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from devices import assert_runs_match, on_device
from reference import (
    F64,
    Cfg,
    RefAdam,
    RefSGD,
    centralize,
    classification_loss,
    conv_data,
    conv_model,
    gradients,
    linear_data,
    linear_model,
    model_loss_fn,
    perturbations,
    regression_loss,
    run_reference,
)
from torch import nn

from gcsam import GCSAM, SAM

INF = math.inf
COMBOS = list(
    itertools.product(["all", "conv", "none"], ["centralized", "raw"], [False, True], [2, INF])
)
COMBO_IDS = [f"{s}-{n}-{'asam' if a else 'sam'}-p{p}" for s, n, a, p in COMBOS]


# float64 everywhere: the only differences with the reference are summation orders.
EPS_TOL = dict(rtol=1e-9, atol=1e-14)
STEP_TOL = dict(rtol=1e-9, atol=1e-12)


def setup(kind: str, dtype: torch.dtype = F64, seed: int = 0, device: str = "cpu"):
    """``(model, loss)`` on ``device``, where ``loss(forward)`` works with ``model`` itself as
    ``forward``. The reference runs on ``setup(kind)``: the same weights and data on the CPU."""
    if kind == "conv":
        model, loss, data = conv_model(dtype, seed), classification_loss, conv_data(dtype)
    elif kind == "linear":
        model, loss, data = linear_model(dtype, seed), regression_loss, linear_data(dtype)
    else:
        raise AssertionError(kind)
    return model.to(device), loss(*on_device(device, data))


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def first_step_eps(model, loss, opt) -> list[torch.Tensor]:
    """Run ``first_step`` at the current weights and return ``w_after - w``."""
    w = snapshot(model)
    opt.zero_grad()
    loss(model).backward()
    opt.first_step()
    return [p.detach() - w0 for p, w0 in zip(model.parameters(), w, strict=True)]


def reference_eps(kind: str, cfgs) -> list[torch.Tensor | None]:
    """The reference's eps at the start of ``setup(kind)``, on the CPU."""
    model, loss = setup(kind)
    w = snapshot(model)
    _, g = gradients(model_loss_fn(model, loss), w)
    return perturbations(w, g, cfgs)


def train(model, loss, opt, steps: int, style: str) -> list[torch.Tensor]:
    """``steps`` full steps; returns the first-pass losses."""
    losses = []
    for _ in range(steps):
        if style == "closure":

            def closure():
                opt.zero_grad()
                value = loss(model)
                value.backward()
                return value

            losses.append(opt.step(closure))
        else:
            opt.zero_grad()
            value = loss(model)
            value.backward()
            opt.first_step(zero_grad=True)
            loss(model).backward()
            opt.second_step(zero_grad=True)
            losses.append(value.detach())
    return losses


def assert_weights(model, expected, **tol):
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach().cpu(), e.to(p.dtype), **(tol or STEP_TOL))


# --------------------------------------------------------------------------------------------
# The perturbation eps.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize(("gc_scope", "normalize_by", "adaptive", "p"), COMBOS, ids=COMBO_IDS)
def test_perturbation_matches_reference(kind, gc_scope, normalize_by, adaptive, p, device):
    model, loss = setup(kind, device=device)
    settings = dict(adaptive=adaptive, p=p, normalize_by=normalize_by, gc_scope=gc_scope)
    expected = reference_eps(kind, [Cfg(rho=0.07, **settings)] * len(snapshot(model)))
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, **settings)
    got = first_step_eps(model, loss, opt)
    assert opt.perturbed
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, **EPS_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("gc_scope", ["all", "conv", "none"])
def test_centralized_norm_equals_rho(dtype, kind, gc_scope, device):
    model, loss = setup(kind, dtype, device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.03, lr=0.1, gc_scope=gc_scope)
    eps = first_step_eps(model, loss, opt)
    norm = torch.cat([e.double().flatten() for e in eps]).norm().item()
    assert norm == pytest.approx(0.03, rel=1e-6 if dtype == F64 else 1e-4)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_adaptive_centralized_scaled_norm_equals_rho(kind, device):
    # ASAM: eps = rho T^2 d / ||T d||, so ||eps / T|| = rho.
    model, loss = setup(kind, device=device)
    w = snapshot(model)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, adaptive=True)
    eps = first_step_eps(model, loss, opt)
    scaled = torch.cat([(e / w0.abs()).flatten() for e, w0 in zip(eps, w, strict=True)])
    assert scaled.norm().item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("gc_scope", ["all", "conv", "none"])
def test_raw_norm_at_most_rho(kind, gc_scope, device):
    model, loss = setup(kind, device=device)
    opt = GCSAM(
        model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, gc_scope=gc_scope, normalize_by="raw"
    )
    eps = first_step_eps(model, loss, opt)
    norm = torch.cat([e.flatten() for e in eps]).norm().item()
    if gc_scope == "none" or (gc_scope == "conv" and kind == "linear"):
        assert norm == pytest.approx(0.05, rel=1e-9)  # nothing centralized: d == g
    else:
        assert norm < 0.05 * (1 - 1e-6)  # GC removed part of the gradient


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("gc_scope", ["all", "none"])
def test_inf_norm_equals_rho(kind, gc_scope, device):
    model, loss = setup(kind, device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.04, lr=0.1, p=INF, gc_scope=gc_scope)
    eps = torch.cat([e.flatten() for e in first_step_eps(model, loss, opt)])
    assert eps.abs().max().item() == pytest.approx(0.04, rel=1e-9)
    # Every entry moves by +-rho, or 0 where the direction is exactly 0.
    moved = eps[eps.abs() > 1e-9].abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.04), rtol=1e-9, atol=1e-15)


def test_ascent_gradient_holds_centralized_gradient_after_first_step(device):
    reference_model, reference_loss = setup("conv")
    _, g = gradients(model_loss_fn(reference_model, reference_loss), snapshot(reference_model))
    model, loss = setup("conv", device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, gc_scope="conv")
    first_step_eps(model, loss, opt)
    for p, gi in zip(model.parameters(), g, strict=True):
        torch.testing.assert_close(p.grad.cpu(), centralize(gi, "conv"), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# Full steps.
# --------------------------------------------------------------------------------------------

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1), lambda: RefSGD(0.1)),
    "momentum": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda: RefSGD(0.05, momentum=0.9, weight_decay=1e-3),
    ),
    "adam": (torch.optim.Adam, dict(lr=0.01), lambda: RefAdam(0.01)),
}
SETTINGS = {
    "gcsam": dict(),
    "conv-raw": dict(gc_scope="conv", normalize_by="raw"),
    "asam-gc": dict(adaptive=True, rho=0.5),
    "inf-asam": dict(p=INF, adaptive=True, gc_scope="none", rho=0.1),
    "inf-gc-raw": dict(p=INF, normalize_by="raw", rho=0.01),
}


@pytest.mark.parametrize("style", ["closure", "two_step"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("settings", sorted(SETTINGS))
def test_full_steps_match_reference(style, base, settings, device):
    model, loss = setup("conv", device=device)
    base_cls, base_kwargs, ref_base = BASES[base]
    kwargs = dict(SETTINGS[settings])
    rho = kwargs.pop("rho", 0.05)
    n = len(snapshot(model))
    expected = run_reference(*setup("conv"), [Cfg(rho=rho, **kwargs)] * n, ref_base(), steps=3)
    opt = GCSAM(model.parameters(), base_cls, rho=rho, **kwargs, **base_kwargs)
    train(model, loss, opt, 3, style)
    assert not opt.perturbed
    assert_weights(model, expected)


@pytest.mark.parametrize("base", sorted(BASES))
def test_closure_and_two_step_styles_agree_exactly(base, device):
    base_cls, base_kwargs, _ = BASES[base]
    results = []
    for style in ("closure", "two_step"):
        model, loss = setup("conv", device=device)
        opt = GCSAM(model.parameters(), base_cls, rho=0.05, **base_kwargs)
        losses = train(model, loss, opt, 3, style)
        results.append((snapshot(model), losses))
    (w1, l1), (w2, l2) = results
    assert_runs_match(w1, w2)
    assert_runs_match(l1, l2)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gc_descent_matches_reference(kind, device):
    model, loss = setup(kind, device=device)
    n = len(snapshot(model))
    cfg = Cfg(rho=0.05, gc_descent=True)
    expected = run_reference(*setup(kind), [cfg] * n, RefSGD(0.1, momentum=0.9), steps=3)
    without = run_reference(*setup(kind), [Cfg(rho=0.05)] * n, RefSGD(0.1, momentum=0.9), 3)
    opt = GCSAM(
        model.parameters(), torch.optim.SGD, rho=0.05, gc_descent=True, lr=0.1, momentum=0.9
    )
    train(model, loss, opt, 3, "closure")
    assert_weights(model, expected)
    # ... and gc_descent makes a real difference here.
    assert any(
        not torch.allclose(e, w, rtol=1e-6, atol=1e-9)
        for e, w in zip(expected, without, strict=True)
    )


def test_gc_descent_centralizes_the_gradient_the_base_optimizer_sees(device):
    model, loss = setup("conv", device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, gc_descent=True)
    opt.zero_grad()
    loss(model).backward()
    opt.first_step(zero_grad=True)
    loss(model).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, g in zip(model.parameters(), raw, strict=True):
        torch.testing.assert_close(p.grad, centralize(g), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# Param groups.
# --------------------------------------------------------------------------------------------


def two_groups(model: nn.Module):
    conv, *rest = [m for m in model if any(True for _ in m.parameters(recurse=False))]
    return list(conv.parameters()), [p for m in rest for p in m.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("normalize_by", ["centralized", "raw"])
def test_per_group_rho_and_scope_share_one_norm(adaptive, normalize_by, device):
    model, loss = setup("conv", device=device)
    first, second = two_groups(model)
    cfg_a = Cfg(rho=0.1, gc_scope="all", adaptive=adaptive, normalize_by=normalize_by)
    cfg_b = Cfg(rho=0.02, gc_scope="none", adaptive=adaptive, normalize_by=normalize_by)
    cfgs = [cfg_a] * len(first) + [cfg_b] * len(second)
    expected = reference_eps("conv", cfgs)
    opt = GCSAM(
        [{"params": first, "rho": 0.1}, {"params": second, "rho": 0.02, "gc_scope": "none"}],
        torch.optim.SGD,
        lr=0.1,
        adaptive=adaptive,
        normalize_by=normalize_by,
    )
    eps = first_step_eps(model, loss, opt)
    for g, e in zip(eps, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, **EPS_TOL)
    if not adaptive and normalize_by == "centralized":
        # One global norm: (||eps_a|| / rho_a)^2 + (||eps_b|| / rho_b)^2 == 1, each term < 1.
        a = torch.cat([e.flatten() for e in eps[: len(first)]]).norm().item() / 0.1
        b = torch.cat([e.flatten() for e in eps[len(first) :]]).norm().item() / 0.02
        assert a**2 + b**2 == pytest.approx(1.0, rel=1e-9)
        assert 0 < a < 1 and 0 < b < 1


def test_per_group_full_steps_match_reference(device):
    model, loss = setup("conv", device=device)
    first, second = two_groups(model)
    cfgs = [Cfg(rho=0.1, gc_scope="conv")] * len(first) + [
        Cfg(rho=0.02, gc_scope="all", gc_descent=True)
    ] * len(second)
    expected = run_reference(*setup("conv"), cfgs, RefSGD(0.1, momentum=0.9), steps=3)
    opt = GCSAM(
        [
            {"params": first, "rho": 0.1, "gc_scope": "conv"},
            {"params": second, "rho": 0.02, "gc_descent": True},
        ],
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
    )
    train(model, loss, opt, 3, "closure")
    assert_weights(model, expected)


def test_p_inf_group_is_left_out_of_the_l2_norm(device):
    model, loss = setup("conv", device=device)
    first, second = two_groups(model)
    cfgs = [Cfg(rho=0.1)] * len(first) + [Cfg(rho=0.01, p=INF)] * len(second)
    expected = reference_eps("conv", cfgs)
    opt = GCSAM(
        [{"params": first}, {"params": second, "rho": 0.01, "p": INF}],
        torch.optim.SGD,
        rho=0.1,
        lr=0.1,
    )
    eps = first_step_eps(model, loss, opt)
    for g, e in zip(eps, expected, strict=True):
        torch.testing.assert_close(g.cpu(), e, **EPS_TOL)
    l2 = torch.cat([e.flatten() for e in eps[: len(first)]]).norm().item()
    assert l2 == pytest.approx(0.1, rel=1e-9)


# --------------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gc_scope", "normalize_by", "adaptive", "p"), COMBOS, ids=COMBO_IDS)
def test_zero_gradient_gives_zero_perturbation(gc_scope, normalize_by, adaptive, p, device):
    model, _ = setup("conv", device=device)
    x = conv_data()[0].to(device)
    settings = dict(adaptive=adaptive, p=p, normalize_by=normalize_by, gc_scope=gc_scope)
    opt = GCSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.1, **settings)
    w = snapshot(model)

    def zero_loss():
        opt.zero_grad()
        value = 0.0 * model(x).sum()
        value.backward()
        return value

    zero_loss()
    opt.first_step()
    for p_, w0 in zip(model.parameters(), w, strict=True):
        assert torch.equal(p_, w0)
        assert torch.isfinite(p_.grad).all() and not p_.grad.any()
    opt.second_step()
    assert not opt.perturbed
    for _ in range(2):
        opt.step(zero_loss)
    for p_, w0 in zip(model.parameters(), w, strict=True):
        assert torch.equal(p_, w0)


@pytest.mark.parametrize("base", sorted(BASES))
def test_params_without_grad_are_left_untouched(base, device):
    model, loss = setup("linear", device=device)
    reference_model, reference_loss = setup("linear")
    unused = nn.Parameter(torch.randn(3, 3, dtype=F64).to(device))
    model.register_parameter("unused", unused)  # registered, never used in forward
    reference_model.register_parameter("unused", nn.Parameter(unused.detach().cpu().clone()))
    before = unused.detach().clone()
    base_cls, base_kwargs, ref_base = BASES[base]
    n = len(snapshot(model))
    cfgs = [Cfg(rho=0.05)] * n
    expected = run_reference(reference_model, reference_loss, cfgs, ref_base(), steps=3)
    opt = GCSAM(model.parameters(), base_cls, rho=0.05, **base_kwargs)
    train(model, loss, opt, 3, "closure")
    assert unused.grad is None
    assert torch.equal(unused, before)
    assert_weights(model, expected)


@pytest.mark.parametrize("foreach", [False, True])
def test_p_inf_group_without_gradients_is_left_untouched(foreach, device):
    """A p = inf group's step is rho whatever the gradient: with no gradient at all (a frozen
    group) it moves nothing, and the other group still steps."""
    model, loss = setup("linear", device=device)
    frozen = nn.Parameter(torch.randn(3, 3, dtype=F64).to(device))
    before = frozen.detach().clone()
    groups = [{"params": list(model.parameters())}, {"params": [frozen], "p": INF}]
    opt = GCSAM(groups, torch.optim.SGD, rho=0.05, lr=0.1, foreach=foreach)
    w = snapshot(model)
    train(model, loss, opt, 2, "closure")
    assert frozen.grad is None and torch.equal(frozen, before)
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(model), w, strict=True))


def test_step_returns_first_pass_loss(device):
    model, loss = setup("conv", device=device)
    with torch.no_grad():
        loss_at_w = loss(model).item()
    calls = []

    def closure():
        opt.zero_grad()
        value = loss(model)
        value.backward()
        calls.append(value)
        return value

    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    returned = opt.step(closure)
    assert len(calls) == 2
    assert returned is calls[0]
    assert returned.item() == pytest.approx(loss_at_w, rel=1e-12)
    assert calls[1].item() > calls[0].item()  # the second pass is at the ascent point w + eps


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("settings", [dict(), dict(adaptive=True, p=INF, normalize_by="raw")])
def test_rho_zero_is_exactly_the_base_optimizer(base, settings, device):
    base_cls, base_kwargs, _ = BASES[base]
    model_a, loss = setup("conv", device=device)
    model_b, _ = setup("conv", device=device)
    opt = GCSAM(model_a.parameters(), base_cls, rho=0.0, **settings, **base_kwargs)
    plain = base_cls(model_b.parameters(), **base_kwargs)
    train(model_a, loss, opt, 3, "closure")
    for _ in range(3):
        plain.zero_grad()
        loss(model_b).backward()
        plain.step()
    assert_runs_match(list(model_a.parameters()), list(model_b.parameters()))


@pytest.mark.parametrize(("adaptive", "p"), [(False, 2), (True, 2), (False, INF), (True, INF)])
@pytest.mark.parametrize("normalize_by", ["centralized", "raw"])
def test_sam_equals_gcsam_without_centralization(adaptive, p, normalize_by, device):
    settings = dict(adaptive=adaptive, p=p, normalize_by=normalize_by, lr=0.05, momentum=0.9)
    model_a, loss = setup("conv", device=device)
    model_b, _ = setup("conv", device=device)
    train(model_a, loss, SAM(model_a.parameters(), torch.optim.SGD, 0.05, **settings), 3, "closure")
    opt_b = GCSAM(model_b.parameters(), torch.optim.SGD, 0.05, gc_scope="none", **settings)
    train(model_b, loss, opt_b, 3, "closure")
    assert_runs_match(list(model_a.parameters()), list(model_b.parameters()))


def test_sam_matches_textbook_sam(device):
    # SAM (Foret et al.): eps = rho g / ||g||; checked against the reference with no GC.
    model, loss = setup("conv", device=device)
    n = len(snapshot(model))
    cfg = Cfg(rho=0.05, gc_scope="none")
    expected = run_reference(*setup("conv"), [cfg] * n, RefSGD(0.1), steps=3)
    train(model, loss, SAM(model.parameters(), torch.optim.SGD, 0.05, lr=0.1), 3, "closure")
    assert_weights(model, expected)


@pytest.mark.parametrize("gc_scope", ["all", "none", "conv"])
def test_sam_rejects_gc_scope(gc_scope):
    model, _ = setup("linear")
    with pytest.raises(TypeError, match="gc_scope"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, gc_scope=gc_scope)


def test_instance_base_optimizer_equals_class_form(device):
    model_a, loss = setup("conv", device=device)
    model_b, _ = setup("conv", device=device)
    opt_a = GCSAM(model_a.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    opt_b = GCSAM(None, torch.optim.Adam(model_b.parameters(), lr=0.01), rho=0.05)
    train(model_a, loss, opt_a, 3, "closure")
    train(model_b, loss, opt_b, 3, "two_step")
    assert_runs_match(list(model_a.parameters()), list(model_b.parameters()))


@pytest.mark.parametrize("form", ["class", "instance"])
def test_base_optimizer_with_its_own_rho_is_refused(form):
    """Adadelta keeps a 'rho' (decay rate) in the param groups GCSAM shares: refuse, loudly."""
    model, _ = setup("linear")
    with pytest.raises(ValueError, match="'rho'"):
        if form == "class":
            GCSAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
        else:
            GCSAM(None, torch.optim.Adadelta(model.parameters(), lr=1.0), rho=0.05)


def test_rewrapping_an_instance_takes_the_new_settings(device):
    model, loss = setup("linear", device=device)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    GCSAM(None, base, rho=0.3, gc_scope="all")
    sam = SAM(None, base, rho=0.05)
    assert all(g["gc_scope"] == "none" and g["rho"] == 0.05 for g in sam.param_groups)
    expected = reference_eps("linear", [Cfg(rho=0.05, gc_scope="none")] * len(snapshot(model)))
    eps = first_step_eps(model, loss, sam)
    for got, want in zip(eps, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, **EPS_TOL)


@pytest.mark.parametrize("scale", [1e20, 1e-24])
@pytest.mark.parametrize("gc_scope", ["all", "none"])
def test_huge_and_tiny_fp32_gradients_still_give_norm_rho(scale, gc_scope, device):
    """fp32 squares overflow above ~1e19 and underflow below ~1e-19: the norm falls back to fp64."""
    w = nn.Parameter(torch.zeros(8, 8, device=device))
    w.grad = (torch.randn(8, 8) * scale).to(device)
    opt = GCSAM([w], torch.optim.SGD, rho=0.05, gc_scope=gc_scope, lr=0.1)
    opt.first_step()
    assert w.detach().double().norm().item() == pytest.approx(0.05, rel=1e-5)


def test_empty_weight_is_skipped(device):
    empty = nn.Parameter(torch.zeros(0, 5, device=device))
    full = nn.Parameter(torch.zeros(3, 5, device=device))
    empty.grad, full.grad = torch.zeros(0, 5, device=device), torch.randn(3, 5).to(device)
    descent = torch.randn(3, 5).to(device)
    opt = GCSAM([empty, full], torch.optim.SGD, rho=0.05, lr=0.1)
    opt.first_step()
    assert full.detach().norm().item() == pytest.approx(0.05, rel=1e-6)
    empty.grad, full.grad = torch.zeros(0, 5, device=device), descent.clone()
    opt.second_step()
    assert not opt.perturbed
    torch.testing.assert_close(full.detach(), -0.1 * descent)  # restored to 0, then SGD
