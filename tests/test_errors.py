"""Argument checking (every error names the offending argument) and the package's surface: the
class hierarchy and what ``import gcsam`` loads."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from gcsam import GCSAM, SAM, SharpnessAwareOptimizer


def params():
    torch.manual_seed(0)
    return list(nn.Linear(3, 2).parameters())


def with_grads(ps):
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


@pytest.mark.parametrize(
    "rho", [-0.1, -1, "0.05", None, [0.05], math.nan, math.inf, True, torch.tensor(0.1)]
)
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        GCSAM(params(), torch.optim.SGD, rho=rho, lr=0.1)


@pytest.mark.parametrize("rho", [0, 0.0, 0.05, 2])
def test_good_rho(rho):
    opt = GCSAM(params(), torch.optim.SGD, rho=rho, lr=0.1)
    assert opt.param_groups[0]["rho"] == rho


@pytest.mark.parametrize("p", [1, 3, 0, -math.inf, "inf", "2", None])
def test_bad_p(p):
    with pytest.raises(ValueError, match=r"\bp\b"):
        GCSAM(params(), torch.optim.SGD, p=p, lr=0.1)


@pytest.mark.parametrize("p", [2, 2.0, math.inf, float("inf")])
def test_good_p(p):
    assert GCSAM(params(), torch.optim.SGD, p=p, lr=0.1).param_groups[0]["p"] == p


@pytest.mark.parametrize("normalize_by", ["centred", "Raw", "", None, "gradient"])
def test_bad_normalize_by(normalize_by):
    with pytest.raises(ValueError, match="normalize_by"):
        GCSAM(params(), torch.optim.SGD, normalize_by=normalize_by, lr=0.1)


@pytest.mark.parametrize("gc_scope", ["ALL", "conv2d", "linear", "", None, True])
def test_bad_gc_scope(gc_scope):
    with pytest.raises(ValueError, match="gc_scope"):
        GCSAM(params(), torch.optim.SGD, gc_scope=gc_scope, lr=0.1)


@pytest.mark.parametrize(
    "base",
    ["SGD", torch.optim.SGD.step, lambda ps, lr: torch.optim.SGD(ps, lr=lr), nn.Linear, None, 3],
    ids=["string", "method", "function", "module-class", "none", "int"],
)
def test_base_optimizer_neither_class_nor_instance(base):
    with pytest.raises(TypeError, match="base_optimizer"):
        GCSAM(params(), base, lr=0.1)


@pytest.mark.parametrize("cls", [GCSAM, SAM])
def test_step_without_closure(cls):
    opt = cls(with_grads(params()), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


def test_params_not_matching_the_instance():
    ps = params()
    base = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="params"):
        GCSAM(ps[:1], base)
    with pytest.raises(ValueError, match="params"):
        GCSAM(params(), base)  # same shapes, other tensors
    with pytest.raises(ValueError, match="params"):
        GCSAM([*ps, *params()], base)
    with pytest.raises(ValueError, match="params"):
        GCSAM([ps[0], ps[0]], base)  # right count, a tensor twice


def test_base_kwargs_with_an_instance():
    ps = params()
    with pytest.raises(TypeError, match="lr"):
        GCSAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.2)
    with pytest.raises(TypeError, match="momentum"):
        GCSAM(None, torch.optim.SGD(ps, lr=0.1), momentum=0.9)


def test_class_without_params():
    with pytest.raises(TypeError, match="params"):
        GCSAM(None, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("flag", ["adaptive", "gc_descent"])
@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_boolean_flags(flag, value):
    with pytest.raises(TypeError, match=flag):
        GCSAM(params(), torch.optim.SGD, lr=0.1, **{flag: value})


def test_first_step_twice():
    ps = with_grads(params())
    opt = GCSAM(ps, torch.optim.SGD, lr=0.1)
    opt.first_step()
    perturbed = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    # The failed call changed nothing; second_step still restores the original weights.
    assert all(torch.equal(p, q) for p, q in zip(ps, perturbed, strict=True))
    assert opt.perturbed


def test_sparse_gradient_in_first_step():
    ps = params()
    opt = GCSAM(ps, torch.optim.SGD, lr=0.1)
    ps[0].grad = torch.randn_like(ps[0]).to_sparse()
    ps[1].grad = torch.randn_like(ps[1])
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before, strict=True))
    assert not opt.perturbed


@pytest.mark.parametrize(
    ("group", "error", "name"),
    [
        ({"rho": -0.5}, ValueError, "rho"),
        ({"rho": "big"}, ValueError, "rho"),
        ({"p": 1}, ValueError, "p"),
        ({"normalize_by": "gc"}, ValueError, "normalize_by"),
        ({"gc_scope": "dense"}, ValueError, "gc_scope"),
        ({"adaptive": "yes"}, TypeError, "adaptive"),
        ({"gc_descent": 1}, TypeError, "gc_descent"),
    ],
)
def test_add_param_group_is_checked(group, error, name):
    opt = GCSAM(params(), torch.optim.SGD, lr=0.1)
    extra = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(error, match=name):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == 1
    assert len(opt.base_optimizer.param_groups) == 1


def test_add_param_group_valid_group_reaches_the_base_optimizer():
    opt = GCSAM(params(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    extra = nn.Parameter(torch.randn(4, 3))
    opt.add_param_group({"params": [extra], "rho": 0.2, "lr": 0.01})
    assert opt.param_groups is opt.base_optimizer.param_groups
    group = opt.param_groups[-1]
    assert group["rho"] == 0.2 and group["lr"] == 0.01  # given
    assert group["gc_scope"] == "all" and group["momentum"] == 0.9  # both sets of defaults


def test_group_level_invalid_setting_at_construction():
    ps = params()
    with pytest.raises(ValueError, match="rho"):
        GCSAM([{"params": ps[:1]}, {"params": ps[1:], "rho": -1}], torch.optim.SGD, lr=0.1)


def test_valid_construction_with_an_instance():
    ps = params()
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    for given in (None, ps, iter(ps), [{"params": ps}], list(reversed(ps))):
        opt = GCSAM(given, base, rho=0.1)
        assert opt.base_optimizer is base
        assert opt.param_groups is base.param_groups
        assert opt.param_groups[0]["rho"] == 0.1
        assert opt.param_groups[0]["lr"] == 0.1
    base = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    sam = SAM(None, base, rho=0.2)
    assert sam.param_groups[0]["gc_scope"] == "none"
    assert sam.param_groups[0]["rho"] == 0.2
    # And it works: a full step moves the weights.
    before = [p.detach().clone() for p in ps]
    x = torch.randn(5, 3)

    def closure():
        sam.zero_grad()
        loss = nn.functional.linear(x, ps[0], ps[1]).square().mean()
        loss.backward()
        return loss

    sam.step(closure)
    assert not any(torch.equal(p, q) for p, q in zip(ps, before, strict=True))


@pytest.mark.parametrize("foreach", [1, 0, 2, "yes", "auto"])
def test_foreach_must_be_a_bool_or_none(foreach):
    with pytest.raises(TypeError, match="foreach"):
        GCSAM(params(), torch.optim.SGD, foreach=foreach, lr=0.1)


def test_sam_param_group_cannot_ask_for_centralization():
    with pytest.raises(TypeError, match="gc_scope"):
        SAM([{"params": params(), "gc_scope": "all"}], torch.optim.SGD, lr=0.1)


def test_sparse_gradient_is_refused_before_any_gradient_is_touched():
    dense, sparse = nn.Linear(3, 2), nn.Embedding(5, 2, sparse=True)
    opt = GCSAM(
        [{"params": dense.parameters()}, {"params": sparse.parameters()}], torch.optim.SGD, lr=0.1
    )
    dense(torch.randn(4, 3)).sum().backward()
    sparse(torch.tensor([1, 2])).sum().backward()
    before = dense.weight.grad.clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert torch.equal(dense.weight.grad, before)


# The package -----------------------------------------------------------------------------------


def test_sam_and_gcsam_are_sibling_sharpness_aware_optimizers():
    gcsam_opt = GCSAM(params(), torch.optim.SGD, lr=0.1)
    sam_opt = SAM(params(), torch.optim.SGD, lr=0.1)
    assert isinstance(gcsam_opt, SharpnessAwareOptimizer)
    assert isinstance(sam_opt, SharpnessAwareOptimizer)
    assert not isinstance(sam_opt, GCSAM) and not isinstance(gcsam_opt, SAM)
    assert isinstance(gcsam_opt, torch.optim.Optimizer)
    for plain in (torch.optim.SGD(params(), lr=0.1), torch.optim.Adam(params())):
        assert not isinstance(plain, SharpnessAwareOptimizer)
    # ... nor is the base optimizer a wrapper holds
    assert not isinstance(sam_opt.base_optimizer, SharpnessAwareOptimizer)


def test_the_base_class_needs_an_explicit_gc_scope():
    with pytest.raises(TypeError, match="gc_scope"):
        SharpnessAwareOptimizer(params(), torch.optim.SGD, lr=0.1)
    opt = SharpnessAwareOptimizer(params(), torch.optim.SGD, gc_scope="conv", lr=0.1)
    assert opt.param_groups[0]["gc_scope"] == "conv"


# Run in a fresh interpreter. torch itself loads numpy and tqdm when they are installed, so the
# check is on the import statements that gcsam's own modules run (every one goes through
# builtins.__import__, loaded already or not) and on the modules loaded.
IMPORT_CHECK = """
import builtins, sys, torch
requested = set()
real_import = builtins.__import__

def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (globals or {}).get("__name__", "").startswith("gcsam"):
        requested.add(name.partition(".")[0])
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = spy
import gcsam
print(",".join(sorted(requested)))
print(",".join(sorted(m for m in sys.modules if m.startswith("gcsam"))))
print(",".join(sorted(gcsam.__all__)))
"""


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_import_gcsam_needs_torch_only():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    requested, modules, exported = (line.split(",") for line in result.stdout.splitlines())
    heavy = {"numpy", "matplotlib", "scipy", "sklearn", "tqdm", "yaml", "PIL"}
    assert not heavy & set(requested), requested
    assert set(requested) <= {"torch", *sys.stdlib_module_names}, requested
    assert not [m for m in modules if m.startswith("gcsam.toolkit")], modules
    assert exported == sorted(
        [
            "GCSAM", "SAM", "SharpnessAwareOptimizer", "centralize_gradient", "frozen_bn_stats",
            "Periodic", "LookSAM", "MomentumAscent", "AdaptiveAscent", "AscentFraction",
            "LambdaRho", "ProportionalRho",
        ]
    )  # fmt: skip
