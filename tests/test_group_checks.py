"""Param-group checks that keep a step from being silently wrong: each parameter listed once,
settings validated again by every ``first_step`` (before anything changes), and a ``rho`` or
step scale that the weights' dtype cannot hold."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gcsam import GCSAM, SAM


def params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).to(dtype).parameters())


def with_grads(ps: list[nn.Parameter]) -> list[nn.Parameter]:
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def snapshot(ps: list[nn.Parameter]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in ps]


def assert_unchanged(ps: list[nn.Parameter], before) -> None:
    for p, (w, g) in zip(ps, before, strict=True):
        assert torch.equal(p, w)
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


# Duplicates ------------------------------------------------------------------------------------

TWICE = r"parameter 2 of param group 0 .* same tensor as parameter 0 of param group 0.*once"


@pytest.mark.parametrize("cls", [GCSAM, SAM])
def test_a_tensor_twice_in_one_group_raises(cls) -> None:
    w, b = params()
    with pytest.raises(ValueError, match=TWICE):
        cls([w, b, w], torch.optim.SGD, lr=0.1)


def test_a_tensor_in_two_groups_raises() -> None:
    w, b = params()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .* perturb it twice"):
        GCSAM([{"params": [w, b]}, {"params": [w], "rho": 0.1}], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("new", ["again", "twice_in_new"])
def test_add_param_group_with_a_duplicate_changes_nothing(new: str) -> None:
    w, b = params()
    extra = nn.Parameter(torch.zeros(2))
    opt = GCSAM([w], torch.optim.SGD, lr=0.1)
    group = {"params": [b, w]} if new == "again" else {"params": [extra, b, extra]}
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


def test_instance_base_with_a_duplicate_raises_before_changing_it() -> None:
    w, b = params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch only warns for this
        base = torch.optim.SGD([w, b, w], lr=0.1)
    with pytest.raises(ValueError, match=TWICE):
        GCSAM(None, base)
    assert "rho" not in base.param_groups[0]


def test_a_generator_of_params_is_read_once() -> None:
    model = nn.Linear(3, 2)
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": (p for p in nn.Linear(2, 2).parameters())})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]


# One device ------------------------------------------------------------------------------------

SEVERAL_DEVICES = r"parameter 2 of param group \d .* on meta, parameter 0 of param group 0 on cpu"


def test_parameters_on_several_devices_are_refused() -> None:
    w, b = params()
    elsewhere = nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match=SEVERAL_DEVICES + r".*one optimizer per device"):
        GCSAM([w, b, elsewhere], torch.optim.SGD, lr=0.1)
    base = torch.optim.SGD([w, b, elsewhere], lr=0.1)
    with pytest.raises(ValueError, match=SEVERAL_DEVICES):
        GCSAM(None, base)
    assert "rho" not in base.param_groups[0]


def test_a_group_on_another_device_changes_nothing() -> None:
    w, b = params()
    opt = GCSAM([w, b], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="several devices"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, device="meta"))]})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


@pytest.mark.parametrize("mode", [None, "looksam", "momentum"])
def test_a_parameter_on_another_device_added_later_is_refused_before_the_step(mode) -> None:
    ps = with_grads(params())
    opt = GCSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, mode=mode)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    elsewhere = nn.Parameter(torch.zeros(2, device="meta"))
    elsewhere.grad = torch.ones(2, device="meta")
    opt.param_groups[1]["params"][0] = elsewhere  # edited past add_param_group's check
    before = snapshot(ps)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .* is on meta"):
        opt.first_step()
    assert_unchanged(ps, before)
    assert not opt.perturbed


# Settings validated by first_step ---------------------------------------------------------------

BAD_SETTINGS = [
    ("rho", -0.1, ValueError),
    ("rho", math.nan, ValueError),
    ("rho", math.inf, ValueError),
    ("rho", 1e300, ValueError),  # |eps| = rho overflows the fp32 weights
    ("rho", "0.05", ValueError),
    ("p", 3, ValueError),
    ("normalize_by", "gradient", ValueError),
    ("gc_scope", "linear", ValueError),
    ("adaptive", "yes", TypeError),
    ("gc_descent", 1, TypeError),
]


@pytest.mark.parametrize(("key", "value", "error"), BAD_SETTINGS)
def test_first_step_validates_settings_set_after_construction(key, value, error) -> None:
    with pytest.raises(error) as at_construction:
        GCSAM(params(), torch.optim.SGD, lr=0.1, **{key: value})
    ps = with_grads(params())
    opt = GCSAM(ps, torch.optim.SGD, lr=0.1)
    opt.param_groups[0][key] = value
    before = snapshot(ps)
    with pytest.raises(error) as at_step:
        opt.first_step()
    assert str(at_step.value) == str(at_construction.value)
    assert key in str(at_step.value)
    assert_unchanged(ps, before)
    assert not opt.descending and not opt.perturbed


def test_sam_first_step_refuses_a_gc_scope_set_later() -> None:
    ps = with_grads(params())
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["gc_scope"] = "all"
    before = snapshot(ps)
    with pytest.raises(TypeError, match="gc_scope"):
        opt.first_step()
    assert_unchanged(ps, before)


def test_validation_comes_before_the_scaler_unscales() -> None:
    ps = with_grads(params())
    opt = GCSAM(ps, torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["rho"] = -1.0
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(ps)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step(scaler=scaler)
    assert_unchanged(ps, before)  # not divided by the scale


# rho and the step scale against the weights' dtype -------------------------------------------


def test_rho_beyond_the_weights_dtype() -> None:
    with pytest.raises(ValueError, match=r"rho must be at most 65504.*float16.*got 100000.0"):
        GCSAM(params(torch.float16), torch.optim.SGD, rho=1e5, lr=0.1)
    GCSAM(params(torch.float32), torch.optim.SGD, rho=1e5, lr=0.1)
    GCSAM(params(torch.float64), torch.optim.SGD, rho=1e300, lr=0.1)


def test_rho_checked_again_after_the_model_is_cast() -> None:
    model = nn.Linear(3, 2)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=1e5, lr=0.1)
    model.half()
    with_grads(list(model.parameters()))
    before = snapshot(list(model.parameters()))
    with pytest.raises(ValueError, match="rho must be at most 65504"):
        opt.first_step()
    assert_unchanged(list(model.parameters()), before)


def test_load_state_dict_checks_rho_against_the_dtypes() -> None:
    opt = GCSAM(params(torch.float16), torch.optim.SGD, lr=0.1)
    state = opt.state_dict()
    state["param_groups"][0]["rho"] = 1e6
    with pytest.raises(ValueError, match="rho must be at most"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["rho"] == 0.05


@pytest.mark.parametrize("foreach", [True, False])
def test_subnormal_fp32_gradient_still_gives_an_eps_of_norm_rho(foreach: bool) -> None:
    """rho / ||g|| exceeds fp32 here: taken in fp32 it is inf and the weights become inf."""
    w = nn.Parameter(torch.randn(4, 5))
    w.grad = torch.full_like(w, 1e-44) * torch.arange(1.0, 6.0)
    w0 = w.detach().clone()
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1, foreach=foreach)
    opt.first_step()
    eps = (w.detach() - w0).double()
    assert torch.isfinite(w).all()
    assert math.isclose(float(eps.norm()), 0.05, rel_tol=1e-5)


def test_a_scale_beyond_fp64_skips_the_step() -> None:
    """rho = 1e300 suits fp64 weights, but rho / ||g|| = 1e312 is inf even in fp64."""
    w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    w.grad = torch.full_like(w, 1e-12) * torch.arange(1.0, 6.0, dtype=torch.float64)
    w0 = w.detach().clone()
    opt = SAM([w], torch.optim.SGD, rho=1e300, lr=0.1)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.first_step()
    assert torch.equal(w, w0) and opt.descending
    w.grad = torch.ones_like(w)
    opt.second_step()
    assert torch.equal(w, w0)
