"""Cheap sharpness-aware modes (Periodic, LookSAM, MomentumAscent, AdaptiveAscent) against a
reference written from their formulas, and the guarantees of the full step in every mode:
closure and two-step styles agree, ``rho=0`` is the base optimizer, resume is bit for bit,
GradScaler, exception safety, bad input and (slow) DDP.

The reference (:class:`Reference`) runs none of the library's code (it reads only the mode
objects' settings): it takes gradients with ``torch.autograd`` on a copy of the model, writes
the perturbation, LookSAM's ``g_v`` and AdaptiveAscent's statistics by hand, and steps a fresh
``torch.optim`` base optimizer on the copy.
"""

from __future__ import annotations

import copy
import io
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import test_distributed as ddp_helpers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from devices import assert_runs_match, on_device
from reference import (
    F64,
    centralize,
    classification_loss,
    conv_data,
    conv_model,
    linear_data,
    linear_model,
    regression_loss,
)
from torch import Tensor, nn

from gcsam import (
    GCSAM,
    SAM,
    AdaptiveAscent,
    LookSAM,
    MomentumAscent,
    Periodic,
    SharpnessAwareOptimizer,
    frozen_bn_stats,
)

MODES = {
    "periodic": Periodic(every=3),
    "looksam": LookSAM(every=3, alpha=0.7),
    "momentum": MomentumAscent(),
    "adaptive": AdaptiveAscent(decay=0.5, threshold=0.0),
}
FAMILIES = {"gcsam": (GCSAM, "all"), "sam": (SAM, "none")}
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
}
MOMENTUM_KEYS = {"sgd": "momentum_buffer", "adam": "exp_avg"}
RHO_WEIGHTS, RHO_BIASES = 0.1, 0.03  # two param groups, two radii, one norm
STEPS = 7
TOL = {"rtol": 1e-9, "atol": 1e-12}  # float64: only summation orders differ
INIT_SCALE = 2.0**10

Loss = Any  # ``loss(forward) -> Tensor``, as in reference.py


# Models, data and the two styles of step ------------------------------------------------------


def make_model(kind: str, dtype: torch.dtype = F64, device: str = "cpu") -> nn.Module:
    """``conv`` (a Conv2d: GC matters per output channel) or ``linear``, no BatchNorm."""
    model = conv_model(dtype, bn=False) if kind == "conv" else linear_model(dtype)
    return model.to(device)


def loss_at(kind: str, step: int, dtype: torch.dtype = F64, device: str = "cpu") -> Loss:
    """A new batch every step, so that AdaptiveAscent sees ``||g||^2`` move up and down."""
    if kind == "conv":
        return classification_loss(*on_device(device, conv_data(dtype, seed=10 + step)))
    return regression_loss(*on_device(device, linear_data(dtype, seed=10 + step)))


def build(
    model: nn.Module, mode: object, family: str = "gcsam", base: str = "sgd", **kwargs: Any
) -> SharpnessAwareOptimizer:
    """Weights and biases in two groups with their own ``rho``."""
    cls, _ = FAMILIES[family]
    base_cls, base_kwargs = BASES[base]
    groups = [
        {"params": [p for p in model.parameters() if p.dim() > 1], "rho": RHO_WEIGHTS},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "rho": RHO_BIASES},
    ]
    return cls(groups, base_cls, mode=mode, **{**base_kwargs, **kwargs})


def closure_step(
    opt: SharpnessAwareOptimizer,
    model: nn.Module,
    loss: Loss,
    scaler: torch.amp.GradScaler | None = None,
    poison: bool = False,
) -> int:
    """One ``step(closure)``; returns how many times the closure ran. ``poison`` puts an inf
    in the first parameter's gradient."""
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        with frozen_bn_stats(model, enabled=opt.descending):
            value = loss(model)
        (value if scaler is None else scaler.scale(value)).backward()
        if poison:
            next(model.parameters()).grad.view(-1)[0] = math.inf
        return value

    opt.step(closure, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return calls


def two_step(
    opt: SharpnessAwareOptimizer,
    model: nn.Module,
    loss: Loss,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """One step in the documented two-step style; returns the number of forward/backward
    passes."""

    def backward() -> None:
        value = loss(model)
        (value if scaler is None else scaler.scale(value)).backward()

    with opt.ascent_pass():
        backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    passes = 1
    if opt.descending:
        with frozen_bn_stats(model):
            backward()
        passes = 2
    opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return passes


def snapshot(model: nn.Module) -> list[Tensor]:
    """Weights and buffers (BatchNorm statistics)."""
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def assert_equal(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), index


def passes_of(mode: object, steps: int = STEPS) -> list[int]:
    """Forward/backward passes per step under Periodic or LookSAM (or MomentumAscent: one)."""
    if isinstance(mode, Periodic):
        return [2 if t % mode.every == 0 else 1 for t in range(steps)]
    return [1] * steps


# The reference ---------------------------------------------------------------------------------


def dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


class Reference:
    """The modes from their formulas, on a CPU copy of the model (give it CPU losses). Step
    ``t`` counts the completed steps; ``eps = rho * GC(g) / ||GC(g)||`` with one norm over
    every parameter."""

    def __init__(
        self, model: nn.Module, mode: object, family: str, base: str, gc_descent: bool = False
    ) -> None:
        self.gc_descent = gc_descent
        self.model = copy.deepcopy(model).cpu()
        self.params = list(self.model.parameters())
        base_cls, base_kwargs = BASES[base]
        self.base = base_cls(self.params, **base_kwargs)
        self.momentum_key = MOMENTUM_KEYS[base]
        self.scope = FAMILIES[family][1]
        self.rhos = [RHO_WEIGHTS if p.dim() > 1 else RHO_BIASES for p in self.params]
        self.mode = mode
        self.t = 0
        self.mean = self.var = 0.0  # AdaptiveAscent
        self.g_v: list[Tensor] | None = None  # LookSAM
        self.g_v_norm = 0.0

    def grad_at(self, point: list[Tensor], loss: Loss) -> list[Tensor]:
        with torch.no_grad():
            for p, value in zip(self.params, point, strict=True):
                p.copy_(value)
        return list(torch.autograd.grad(loss(self.model), self.params))

    def shifted(self, w: list[Tensor], direction: list[Tensor]) -> list[Tensor]:
        """``w + rho * GC(direction) / ||GC(direction)||`` (``w`` for a zero direction)."""
        d = [centralize(x, self.scope).to(x.dtype) for x in direction]
        norm = math.sqrt(dot(d, d))
        if norm == 0:
            return list(w)
        return [wi + rho * di / norm for wi, di, rho in zip(w, d, self.rhos, strict=True)]

    def decide(self, g: list[Tensor]) -> bool:
        if isinstance(self.mode, Periodic):  # LookSAM too
            return self.t % self.mode.every == 0
        if isinstance(self.mode, AdaptiveAscent):
            s, decay = dot(g, g), self.mode.decay
            self.mean = decay * self.mean + (1 - decay) * s
            self.var = decay * self.var + (1 - decay) * (s - self.mean) ** 2
            return s >= self.mean + self.mode.threshold * math.sqrt(self.var)
        return True

    def step(self, loss: Loss) -> int:
        """One step; returns the passes it took (2: it ascended)."""
        w = [p.detach().clone() for p in self.params]
        if isinstance(self.mode, MomentumAscent):
            momenta = [self.base.state[p].get(self.momentum_key) for p in self.params]
            point = w if momenta[0] is None else self.shifted(w, [-m for m in momenta])
            descent, passes = self.grad_at(point, loss), 1
        else:
            g = self.grad_at(w, loss)
            if self.decide(g):
                descent, passes = self.grad_at(self.shifted(w, g), loss), 2
                if isinstance(self.mode, LookSAM):
                    c = dot(g, descent) / dot(g, g)
                    self.g_v = [gs - c * gi for gs, gi in zip(descent, g, strict=True)]
                    self.g_v_norm = math.sqrt(dot(self.g_v, self.g_v))
            else:
                descent, passes = g, 1
                if isinstance(self.mode, LookSAM) and self.g_v is not None:
                    scale = self.mode.alpha * math.sqrt(dot(g, g)) / self.g_v_norm
                    descent = [gi + scale * v for gi, v in zip(g, self.g_v, strict=True)]
        if self.gc_descent:
            descent = [centralize(d, self.scope).to(d.dtype) for d in descent]
        with torch.no_grad():
            for p, wi, d in zip(self.params, w, descent, strict=True):
                p.copy_(wi)
                p.grad = d
        self.base.step()
        self.t += 1
        return passes

    def weights(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]


# 1. Each mode against the reference ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mode_matches_reference(family: str, base: str, mode: str, kind: str, device) -> None:
    model = make_model(kind, device=device)
    reference = Reference(model, MODES[mode], family, base)
    opt = build(model, MODES[mode], family, base)
    got, expected = [], []
    for t in range(STEPS):
        got.append(closure_step(opt, model, loss_at(kind, t, device=device)))
        expected.append(reference.step(loss_at(kind, t)))
        for p, e in zip(model.parameters(), reference.weights(), strict=True):
            torch.testing.assert_close(p.detach().cpu(), e, **TOL)
    assert got == expected  # the same steps ascended
    if mode == "adaptive":  # the threshold gives a mix
        assert 1 in expected and 2 in expected, expected
    else:
        assert expected == passes_of(MODES[mode])
    start = make_model(kind, device=device)
    assert not any(
        torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True)
    )


@pytest.mark.parametrize("mode", ["periodic", "looksam", "momentum"])
def test_gc_descent_centralizes_the_final_descent_gradient(mode: str, device) -> None:
    """With ``gc_descent``, the base step gets GC of the descent gradient (LookSAM's
    ``g + alpha ||g|| / ||g_v|| g_v`` included); ``g_v`` itself is built from the raw ones."""
    model = make_model("conv", device=device)
    reference = Reference(model, MODES[mode], "gcsam", "sgd", gc_descent=True)
    opt = build(model, MODES[mode], gc_descent=True)
    for t in range(STEPS):
        passes = closure_step(opt, model, loss_at("conv", t, device=device))
        assert passes == reference.step(loss_at("conv", t))
    for p, e in zip(model.parameters(), reference.weights(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), e, **TOL)


def test_momentum_ascent_pass_runs_at_the_momentum_perturbed_point(device) -> None:
    """Inside ``ascent_pass`` the weights are ``w + rho GC(-m) / ||GC(-m)||``; ``first_step``
    puts back ``w`` bit for bit and keeps the gradients taken there."""
    model = make_model("conv", device=device)
    opt = build(model, MomentumAscent())
    closure_step(opt, model, loss_at("conv", 0, device=device))
    reference = Reference(model, MomentumAscent(), "gcsam", "sgd")
    w = [p.detach().clone() for p in model.parameters()]
    momenta = [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    expected = reference.shifted(w, [-m for m in momenta])
    opt.zero_grad()
    with opt.ascent_pass():
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e, **TOL)
        loss_at("conv", 1, device=device)(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g, e in zip(grads, reference.grad_at(expected, loss_at("conv", 1)), strict=True):
        torch.testing.assert_close(g.cpu(), e, **TOL)
    opt.first_step(zero_grad=True)  # ignored: the pass's gradients are the descent gradients
    assert not opt.descending and not opt.perturbed
    assert_equal([p.detach() for p in model.parameters()], w)
    assert_equal([p.grad for p in model.parameters()], grads)
    opt.second_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("foreach", [False, True])
def test_momentum_ascent_with_p_inf_starts_without_momentum(foreach: bool, device) -> None:
    """Step 0 has no momentum to perturb along: its pass runs at w, p = inf included."""
    model = make_model("conv", device=device)
    opt = GCSAM(
        model.parameters(), torch.optim.SGD, rho=0.01, p=math.inf, lr=0.1, momentum=0.9,
        mode=MomentumAscent(), foreach=foreach,
    )  # fmt: skip
    w = snapshot(model)
    plain = make_model("conv", device=device)
    closure_step(opt, model, loss_at("conv", 0, device=device))
    base = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    loss_at("conv", 0, device=device)(plain).backward()
    base.step()
    assert_runs_match(snapshot(model), snapshot(plain))  # the base step from g(w)
    # step 1 perturbs along the momentum
    closure_step(opt, model, loss_at("conv", 1, device=device))
    assert not any(torch.equal(a, b) for a, b in zip(snapshot(model), w, strict=True))


def test_plain_step_keeps_the_gradients_for_second_step(device) -> None:
    model = make_model("linear", device=device)
    opt = build(model, Periodic(every=2))
    closure_step(opt, model, loss_at("linear", 0, device=device))  # t = 0 ascends
    opt.zero_grad()
    with opt.ascent_pass():
        loss_at("linear", 1, device=device)(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    assert not opt.descending and not opt.perturbed
    assert_equal([p.detach() for p in model.parameters()], w)
    assert_equal([p.grad for p in model.parameters()], grads)
    opt.second_step(zero_grad=True)
    assert opt.state_dict()["sharpness_aware"]["steps"] == 2


@pytest.mark.parametrize("mode", [None, "full"])
def test_full_mode_is_the_default_step(mode: str | None, device) -> None:
    runs = []
    for kwargs in ({}, {"mode": mode}):
        model = make_model("conv", device=device)
        groups = [{"params": list(model.parameters())}]
        opt = GCSAM(groups, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, **kwargs)
        passes = [closure_step(opt, model, loss_at("conv", t, device=device)) for t in range(3)]
        assert passes == [2, 2, 2]
        runs.append(snapshot(model))
        assert opt.mode is None and opt.state_dict()["sharpness_aware"]["mode"] == "full"
    assert_runs_match(runs[1], runs[0])


# 2. Closure and two-step styles ---------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("base", list(BASES))
def test_closure_and_two_step_are_bit_identical(base: str, mode: str, device) -> None:
    runs, passes = [], []
    for style in (closure_step, two_step):
        model = make_model("conv", device=device)
        opt = build(model, MODES[mode], base=base)
        passes.append([style(opt, model, loss_at("conv", t, device=device)) for t in range(STEPS)])
        runs.append(snapshot(model))
    assert_runs_match(runs[1], runs[0])
    assert passes[0] == passes[1]
    if mode != "adaptive":
        assert passes[0] == passes_of(MODES[mode])  # 1 + 1/k passes per step, or exactly 1


# 3. rho = 0 is the base optimizer, BatchNorm included -----------------------------------------


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(), nn.Linear(6, 3),
    )  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("base", "style"), [("sgd", closure_step), ("adam", two_step)], ids=["sgd", "adam"]
)
def test_rho_zero_is_the_base_optimizer(base: str, style, mode: str, device) -> None:
    base_cls, base_kwargs = BASES[base]
    losses = [
        classification_loss(*on_device(device, conv_data(torch.float32, seed=t)))
        for t in range(STEPS)
    ]
    plain_model = bn_model().to(device)
    plain = base_cls(plain_model.parameters(), **base_kwargs)
    for loss in losses:
        plain.zero_grad()
        loss(plain_model).backward()
        plain.step()

    model = bn_model().to(device)
    opt = GCSAM(model.parameters(), base_cls, rho=0.0, mode=MODES[mode], **base_kwargs)
    for loss in losses:
        style(opt, model, loss)
    assert_runs_match(snapshot(model), snapshot(plain_model))
    assert int(model[1].num_batches_tracked) == STEPS


# 4. Kill and resume -----------------------------------------------------------------------------


def round_trip(state: dict[str, Any], how: str) -> dict[str, Any]:
    if how == "deepcopy":
        return copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("base", "how"), [("sgd", "deepcopy"), ("adam", "torch_save")])
def test_resume_is_bit_identical(base: str, how: str, mode: str, device) -> None:
    split = 4  # Periodic/LookSAM: mid-cycle (t = 4, 5 reuse the full step of t = 3)
    losses = [loss_at("conv", t, device=device) for t in range(STEPS)]
    model = make_model("conv", device=device)
    opt = build(model, MODES[mode], base=base)
    straight = [closure_step(opt, model, losses[t]) for t in range(STEPS)]
    expected = snapshot(model)

    model = make_model("conv", device=device)
    opt = build(model, MODES[mode], base=base)
    passes = [closure_step(opt, model, losses[t]) for t in range(split)]
    saved = round_trip({"model": model.state_dict(), "opt": opt.state_dict()}, how)
    del model, opt

    entry = saved["opt"]["sharpness_aware"]
    assert entry["mode"] == mode and entry["steps"] == split
    own = {"looksam": {"look_norm", "look_valid", "look_direction"}, "adaptive": {"adaptive_stats"}}
    assert set(entry) == {"mode", "steps"} | own.get(mode, set())  # each mode saves its own state
    if mode == "looksam":
        assert entry["look_valid"] and entry["look_direction"]
    if mode == "adaptive":
        assert entry["adaptive_stats"][0] > 0

    model = conv_model(F64, seed=123, bn=False).to(device)  # another start
    opt = build(model, MODES[mode], base=base)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    passes += [closure_step(opt, model, losses[t]) for t in range(split, STEPS)]
    assert passes == straight
    assert_runs_match(snapshot(model), expected)


def test_loading_another_mode_raises_before_any_change() -> None:
    model = make_model("linear")
    opt = build(model, Periodic(every=3))
    closure_step(opt, model, loss_at("linear", 0))
    saved = opt.state_dict()
    for other in (None, LookSAM(every=3), MomentumAscent(), AdaptiveAscent()):
        fresh = build(make_model("linear"), other, lr=0.5)
        with pytest.raises(ValueError, match=r"'periodic'.*build it with the same mode"):
            fresh.load_state_dict(saved)
        assert fresh.param_groups[0]["lr"] == 0.5
        assert not fresh.base_optimizer.state
    # Periodic with another period is the same mode: it loads (its own period applies).
    build(make_model("linear"), Periodic(every=5)).load_state_dict(saved)


@pytest.mark.parametrize("mode", list(MODES))
def test_old_state_dict_without_the_mode_entry_loads(mode: str, device) -> None:
    model = make_model("conv", device=device)
    opt = build(model, MODES[mode])
    for t in range(4):
        closure_step(opt, model, loss_at("conv", t, device=device))
    saved = copy.deepcopy(opt.state_dict())
    del saved["sharpness_aware"]
    fresh = build(make_model("conv", device=device), MODES[mode])
    fresh.load_state_dict(saved)
    restored = fresh.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value)
    # the mode starts afresh: step 0 (Periodic and LookSAM ascend), no statistics, no g_v
    entry = restored["sharpness_aware"]
    assert entry["steps"] == 0 and entry.get("adaptive_stats", [0.0, 0.0]) == [0.0, 0.0]
    assert not entry.get("look_valid") and not entry.get("look_direction")


# 5. GradScaler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", [closure_step, two_step], ids=["closure", "two_step"])
@pytest.mark.parametrize("mode", list(MODES))
def test_grad_scaler_matches_the_unscaled_run(mode: str, style, device) -> None:
    losses = [loss_at("conv", t, torch.float32, device) for t in range(STEPS)]
    runs, passes = [], []
    for scaled in (False, True):
        model = make_model("conv", torch.float32, device)
        opt = build(model, MODES[mode])
        scaler = (
            torch.amp.GradScaler(device, init_scale=INIT_SCALE, enabled=True) if scaled else None
        )
        passes.append([style(opt, model, loss, scaler) for loss in losses])
        runs.append(snapshot(model))
        if scaler is not None:
            assert scaler.get_scale() == INIT_SCALE  # nothing overflowed
    assert passes[0] == passes[1]  # AdaptiveAscent's ||g||^2 is unscaled
    for a, b in zip(runs[1], runs[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_grad_scaler_skips_an_inf_gradient_on_a_step_without_ascent(mode: str, device) -> None:
    model = make_model("conv", torch.float32, device)
    opt = build(model, MODES[mode])
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE, enabled=True)
    loss = loss_at("conv", 0, torch.float32, device)
    for t in range(2):
        passes = closure_step(opt, model, loss, scaler)
        if mode != "adaptive":
            assert passes == passes_of(MODES[mode])[t]  # t = 2 is a step without ascent
    weights, base = snapshot(model), copy.deepcopy(opt.base_optimizer.state_dict())

    # One pass, whatever the mode: AdaptiveAscent sends a non-finite ||g||^2 to the ascent
    # path, which skips the step without the second pass.
    assert closure_step(opt, model, loss, scaler, poison=True) == 1
    assert_equal(snapshot(model), weights)
    for index, entry in base["state"].items():
        for key, value in entry.items():
            assert torch.equal(opt.base_optimizer.state_dict()["state"][index][key], value)
    assert scaler.get_scale() == INIT_SCALE / 2
    assert not opt.descending and not opt.perturbed

    closure_step(opt, model, loss, scaler)
    assert not torch.equal(next(model.parameters()), weights[0])  # it trains again


# 6. Exception safety ---------------------------------------------------------------------------


class InjectedError(Exception):
    pass


@pytest.mark.parametrize("mode", ["periodic", "looksam", "adaptive"])
def test_failed_descent_pass_leaves_w(mode: str, device) -> None:
    """A descent pass that raises, in closure and in two-step style, on an ascent step (t = 3
    in each of these modes): the weights are back at ``w`` bit for bit, the step count and
    AdaptiveAscent's statistics are those before the step, and the run goes on as if the
    failed steps never happened."""
    model = make_model("conv", device=device)
    opt = build(model, MODES[mode])
    reference = Reference(make_model("conv"), MODES[mode], "gcsam", "sgd")
    for t in range(3):
        passes = closure_step(opt, model, loss_at("conv", t, device=device))
        assert passes == reference.step(loss_at("conv", t))
    before = copy.deepcopy(opt.state_dict()["sharpness_aware"])
    w, loss = snapshot(model), loss_at("conv", 3, device=device)
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            assert opt.perturbed
            raise InjectedError
        opt.zero_grad()
        value = loss(model)
        value.backward()
        return value

    with pytest.raises(InjectedError):
        opt.step(closure)
    assert calls == 2
    assert_equal(snapshot(model), w)
    assert not opt.descending and not opt.perturbed

    opt.zero_grad()
    with opt.ascent_pass():
        loss(model).backward()
    opt.first_step(zero_grad=True)
    assert opt.perturbed  # the second forward would fail here: the user restores
    opt.restore()
    assert_equal(snapshot(model), w)

    after = opt.state_dict()["sharpness_aware"]
    assert after["steps"] == before["steps"] == 3
    assert after.get("adaptive_stats") == before.get("adaptive_stats")
    for t in range(3, 6):
        passes = closure_step(opt, model, loss_at("conv", t, device=device))
        assert passes == reference.step(loss_at("conv", t))
    for p, e in zip(model.parameters(), reference.weights(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), e, **TOL)


@pytest.mark.parametrize("style", ["closure", "two_step"])
def test_failed_momentum_pass_leaves_w(style: str, device) -> None:
    model, straight = make_model("conv", device=device), make_model("conv", device=device)
    opt, opt_straight = build(model, MomentumAscent()), build(straight, MomentumAscent())
    losses = [loss_at("conv", t, device=device) for t in range(4)]
    for t in range(2):  # momentum exists: the pass runs away from w
        closure_step(opt, model, losses[t])
        closure_step(opt_straight, straight, losses[t])
    w = snapshot(model)
    moved = []
    if style == "closure":

        def closure() -> Tensor:
            moved.append(not torch.equal(next(model.parameters()), w[0]))
            raise InjectedError

        with pytest.raises(InjectedError):
            opt.step(closure)
    else:
        with pytest.raises(InjectedError), opt.ascent_pass():
            moved.append(not torch.equal(next(model.parameters()), w[0]))
            losses[2](model).backward()
            raise InjectedError
        opt.zero_grad()
    assert moved == [True]
    assert_equal(snapshot(model), w)
    assert not opt.perturbed

    for t in range(2, 4):
        closure_step(opt, model, losses[t])
        closure_step(opt_straight, straight, losses[t])
    assert_runs_match(snapshot(model), snapshot(straight))


def test_first_step_without_ascent_pass_under_momentum_ascent_raises(device) -> None:
    model = make_model("linear", device=device)
    opt = build(model, MomentumAscent())
    closure_step(opt, model, loss_at("linear", 0, device=device))
    loss_at("linear", 1, device=device)(model).backward()
    w = snapshot(model)
    with pytest.raises(RuntimeError, match="ascent_pass"):
        opt.first_step()
    assert_equal(snapshot(model), w)
    assert not opt.descending


# 7. Bad input, refused before anything changes --------------------------------------------------


@pytest.mark.parametrize("mode", ["Periodic", "sam", "", "every=5", 5, Periodic])
def test_unknown_mode_raises_listing_the_names(mode: object) -> None:
    base = torch.optim.SGD(make_model("linear").parameters(), lr=0.1, momentum=0.9)
    groups = settings_of(base)
    with pytest.raises(ValueError, match=r"'periodic', 'looksam', 'momentum', 'adaptive'"):
        GCSAM(None, base, mode=mode)
    assert settings_of(base) == groups  # the instance was not touched


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Periodic(every=0), r"every.*integer >= 1"),
        (lambda: Periodic(every=2.0), r"every.*integer >= 1"),
        (lambda: LookSAM(every=0), r"every.*integer >= 1"),
        (lambda: LookSAM(alpha=-1), r"alpha.*non-negative"),
        (lambda: LookSAM(alpha=math.nan), r"alpha.*non-negative"),
        (lambda: AdaptiveAscent(decay=1.0), r"decay.*\[0, 1\)"),
        (lambda: AdaptiveAscent(decay=-0.1), r"decay.*\[0, 1\)"),
        (lambda: AdaptiveAscent(threshold=math.inf), r"threshold.*finite"),
    ],
)
def test_bad_mode_settings_raise(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def settings_of(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def rmsprop(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)


def sgd_without_momentum_in_one_group(model: nn.Module) -> torch.optim.Optimizer:
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": weights}, {"params": biases, "momentum": 0.0}], lr=0.1, momentum=0.9
    )


@pytest.mark.parametrize(
    "make_base",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        sgd_without_momentum_in_one_group,
        rmsprop,
        lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    ],
    ids=["sgd", "sgd_one_group", "rmsprop", "adagrad"],
)
def test_momentum_ascent_needs_a_base_with_momentum(make_base) -> None:
    base = make_base(make_model("linear"))
    groups = settings_of(base)
    bases = r"SGD with momentum > 0, Adam, AdamW, NAdam, RAdam or Adamax"
    with pytest.raises(ValueError, match=bases):
        GCSAM(None, base, mode=MomentumAscent())
    assert settings_of(base) == groups  # refused before the groups took the SAM settings
    with pytest.raises(ValueError, match=bases):
        GCSAM(make_model("linear").parameters(), type(base), lr=0.1, mode="momentum")


@pytest.mark.parametrize(
    "base", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam]
)
def test_momentum_ascent_takes_adam_family_bases(base: type[torch.optim.Optimizer], device):
    model = make_model("linear", device=device)
    opt = GCSAM(model.parameters(), base, lr=1e-2, mode=MomentumAscent())
    for t in range(2):
        closure_step(opt, model, loss_at("linear", t, device=device))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("periodic", Periodic(every=5)),
        ("looksam", LookSAM(every=5, alpha=0.7)),
        ("momentum", MomentumAscent()),
        ("adaptive", AdaptiveAscent(decay=0.9, threshold=0.0)),
        ("full", None),
        (None, None),
    ],
)
def test_mode_names_give_the_defaults(name: str | None, expected: object) -> None:
    opt = build(make_model("linear"), name)
    assert opt.mode == expected and type(opt.mode) is type(expected)


# 8. DDP (spawned gloo workers, with the helpers of test_distributed.py) -----------------------


def ddp_step(opt: SharpnessAwareOptimizer, ddp: nn.Module, data: tuple[Tensor, Tensor], style: str):
    def closure() -> Tensor:
        opt.zero_grad()
        value = F.cross_entropy(ddp(data[0]), data[1])
        value.backward()
        return value

    if style == "closure":
        opt.step(closure)
        return
    with opt.ascent_pass():
        F.cross_entropy(ddp(data[0]), data[1]).backward()
    opt.first_step(zero_grad=True)
    if opt.descending:
        F.cross_entropy(ddp(data[0]), data[1]).backward()
    opt.second_step(zero_grad=True)


def scenario_modes(rank: int) -> dict[str, Any]:
    """Periodic(every=2) and MomentumAscent with ascent="local", all-reduces counted per step;
    LookSAM and AdaptiveAscent built with both ascents."""
    result: dict[str, Any] = {}
    for name, mode in (("periodic", Periodic(every=2)), ("momentum", MomentumAscent())):
        for style in ("closure", "two_step"):
            ddp = ddp_helpers.wrap(ddp_helpers.make_net())
            hook = ddp_helpers.CountingHook()
            ddp.register_comm_hook(None, hook.hook)
            opt = ddp_helpers.make_opt(ddp, model=ddp, ascent="local", mode=mode)
            per_step = []
            for step in range(ddp_helpers.STEPS):
                before = hook.calls
                ddp_step(opt, ddp, ddp_helpers.half(step, rank), style)
                per_step.append(hook.calls - before)
            result[name, style] = {"per_step": per_step, "weights": ddp_helpers.weights(ddp.module)}
    refused = {}
    for name, mode in (("looksam", LookSAM(every=2)), ("adaptive", AdaptiveAscent())):
        ddp = ddp_helpers.wrap(ddp_helpers.make_net())
        try:
            ddp_helpers.make_opt(ddp, model=ddp, ascent="local", mode=mode)
        except ValueError as error:
            refused[name] = str(error)
        ddp_helpers.make_opt(ddp, model=ddp, ascent="global", mode=mode)  # accepted
    result["refused"] = refused
    return result


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=ddp_helpers.WORLD,
        timeout=timedelta(seconds=30),  # a hang fails the test instead of stalling it
    )
    try:
        torch.save(scenario_modes(rank), Path(out) / f"{rank}.pt")
        dist.barrier()  # no worker leaves while a peer still has collectives in flight
    finally:
        dist.destroy_process_group()


def simulate_periodic_local(every: int, steps: int) -> list[Tensor]:
    """Periodic under local-ascent DDP, by hand: on ascent steps each half-batch (worker)
    perturbs with its own centralized gradient and the descent gradients are averaged; on the
    others, the mean gradient at ``w``."""
    h = ddp_helpers
    model = h.make_net()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=h.LR, momentum=h.MOMENTUM)

    def grad_at(point: list[Tensor], rank: int, step: int) -> list[Tensor]:
        return h.gradient_at(model, point, *h.half(step, rank))

    for step in range(steps):
        w = h.weights(model)
        ranks = range(h.WORLD)
        if step % every == 0:
            per_rank = [grad_at(h.ascent_point(w, grad_at(w, r, step)), r, step) for r in ranks]
        else:
            per_rank = [grad_at(w, r, step) for r in ranks]
        with torch.no_grad():
            for p, v, *grads in zip(params, w, *per_rank, strict=True):
                p.copy_(v)
                p.grad = torch.stack(grads).mean(0)
        base.step()
    return h.weights(model)


@pytest.mark.slow  # worker processes
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_modes_under_ddp(tmp_path: Path) -> None:
    h = ddp_helpers
    mp.spawn(_worker, args=(h.free_port(), str(tmp_path)), nprocs=h.WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(h.WORLD)]
    expected = simulate_periodic_local(2, h.STEPS)
    once = simulate_periodic_local(h.STEPS, h.STEPS)  # control: the ascent of t = 2 matters
    assert max((a - b).abs().max().item() for a, b in zip(expected, once, strict=True)) > 1e-3
    momentum = results[0]["momentum", "closure"]["weights"]
    for rank, result in enumerate(results):
        for style in ("closure", "two_step"):
            # One gradient all-reduce per step: the descent pass of an ascent step (the local
            # ascent runs under no_sync), the only pass of the others.
            assert result["periodic", style]["per_step"] == [1] * h.STEPS, (rank, style)
            assert result["momentum", style]["per_step"] == [1] * h.STEPS, (rank, style)
            h.assert_close(result["periodic", style]["weights"], expected)
            assert_equal(result["momentum", style]["weights"], momentum)  # every worker, style
        assert set(result["refused"]) == {"looksam", "adaptive"}
        assert all("ascent='global'" in message for message in result["refused"].values())
    assert not torch.equal(momentum[0], h.make_net()[0].weight)  # it trained


def test_assigning_a_mode_checks_it_like_the_constructor() -> None:
    model = nn.Linear(3, 2)
    opt = GCSAM(model.parameters(), torch.optim.RMSprop, lr=0.1)
    with pytest.raises(ValueError, match="SGD with momentum > 0, Adam"):
        opt.mode = MomentumAscent()
    assert opt.mode is None
    with pytest.raises(ValueError, match="mode must be None"):
        opt.mode = "sometimes"
    opt.mode = "periodic"
    assert opt.mode == Periodic()
    model(torch.ones(1, 3)).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between steps"):
        opt.mode = None
    opt.second_step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("mode", [None, *MODES.values()], ids=["full", *MODES])
def test_a_closure_without_backward_changes_nothing_in_every_mode(mode, foreach: bool, device):
    """No gradient at all, as when a closure forgets ``backward()``: every mode does nothing,
    as torch's own optimizers do (LookSAM failed inside torch on its empty tensor lists), and
    trains normally once gradients come."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(device)
    opt = GCSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.1, mode=mode, foreach=foreach)
    x = torch.randn(8, 3).to(device)
    before = [p.detach().clone() for p in model.parameters()]

    def forgets_backward() -> Tensor:
        opt.zero_grad()
        return model(x).square().sum()

    for _ in range(4):
        opt.step(forgets_backward)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    def closure() -> Tensor:
        loss = forgets_backward()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
