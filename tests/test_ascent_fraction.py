"""``AscentFraction``: the ascent from the first ``round(f n)`` samples of the batch, the descent
from all of them, against a float64 reference; ``opt.pass_batch`` on every batch structure; the
guarantees of every mode (exact restore, GradScaler, BatchNorm, state_dict, DDP)."""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import test_distributed as ddp_helpers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from devices import on_device
from reference import F64, centralize, conv_data, conv_model, linear_data, linear_model
from test_modes import BASES, FAMILIES, RHO_BIASES, RHO_WEIGHTS, TOL, assert_equal, build, dot
from torch import Tensor, nn

from gcsam import AscentFraction, frozen_bn_stats

STEPS = 5
N = 8  # samples per batch


def data(kind: str, step: int, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    make = conv_data if kind == "conv" else linear_data
    return make(dtype, n=N, seed=20 + step)


def loss_of(kind: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out, y) if kind == "conv" else F.mse_loss(out, y)


def make_model(kind: str, dtype: torch.dtype = F64, bn: bool = False) -> nn.Module:
    """The reference models; with ``bn``, its BatchNorm in training mode (moving statistics)."""
    if kind == "conv":
        return conv_model(dtype, bn=bn).train(bn)
    return linear_model(dtype)


def closure_step(opt: Any, model: nn.Module, kind: str, batch: tuple[Tensor, Tensor], scaler=None):
    """One ``step(closure)``; returns the sizes of the batches the passes ran on."""
    sizes = []

    def closure() -> Tensor:
        opt.zero_grad()
        x, y = opt.pass_batch(batch)
        sizes.append(len(x))
        with frozen_bn_stats(model, enabled=opt.descending):
            value = loss_of(kind, model, x, y)
        (value if scaler is None else scaler.scale(value)).backward()
        return value

    opt.step(closure, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return sizes


def two_step(opt: Any, model: nn.Module, kind: str, batch: tuple[Tensor, Tensor], scaler=None):
    sizes = []

    def backward() -> None:
        x, y = opt.pass_batch(batch)
        sizes.append(len(x))
        value = loss_of(kind, model, x, y)
        (value if scaler is None else scaler.scale(value)).backward()

    with opt.ascent_pass():
        backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    assert opt.descending  # every step ascends
    with frozen_bn_stats(model):
        backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return sizes


STYLES = {"closure": closure_step, "two_step": two_step}


class Reference:
    """``w <- base_step(w, grad L_all(w + rho GC(g_m) / ||GC(g_m)||))``, ``g_m`` the gradient
    on the first ``m`` samples; one norm over both param groups, each with its own rho. It runs
    on a CPU copy of the model."""

    def __init__(self, model: nn.Module, family: str, base: str, fraction: float) -> None:
        self.model = copy.deepcopy(model).cpu()
        self.params = list(self.model.parameters())
        base_cls, base_kwargs = BASES[base]
        self.base = base_cls(self.params, **base_kwargs)
        self.scope = FAMILIES[family][1]
        self.rhos = [RHO_WEIGHTS if p.dim() > 1 else RHO_BIASES for p in self.params]
        self.fraction = fraction

    def grad_at(self, point: list[Tensor], kind: str, x: Tensor, y: Tensor) -> list[Tensor]:
        with torch.no_grad():
            for p, value in zip(self.params, point, strict=True):
                p.copy_(value)
        return list(torch.autograd.grad(loss_of(kind, self.model, x, y), self.params))

    def step(self, kind: str, x: Tensor, y: Tensor) -> None:
        m = max(1, round(self.fraction * len(x)))
        w = [p.detach().clone() for p in self.params]
        d = [centralize(g, self.scope) for g in self.grad_at(w, kind, x[:m], y[:m])]
        norm = math.sqrt(dot(d, d))
        shifted = [wi + rho * di / norm for wi, di, rho in zip(w, d, self.rhos, strict=True)]
        descent = self.grad_at(shifted, kind, x, y)
        with torch.no_grad():
            for p, wi, g in zip(self.params, w, descent, strict=True):
                p.copy_(wi)
                p.grad = g
        self.base.step()

    def weights(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]


# The math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("fraction", [0.5, 0.3])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_the_reference(
    family: str, base: str, kind: str, fraction: float, style: str, device: str
):
    model = make_model(kind).to(device)
    reference = Reference(model, family, base, fraction)
    opt = build(model, AscentFraction(fraction), family, base)
    m = max(1, round(fraction * N))
    for t in range(STEPS):
        assert STYLES[style](opt, model, kind, on_device(device, data(kind, t))) == [m, N]
        reference.step(kind, *data(kind, t))
        for p, e in zip(model.parameters(), reference.weights(), strict=True):
            torch.testing.assert_close(p.detach().cpu(), e, **TOL)
    assert opt.state_dict()["sharpness_aware"] == {"mode": "fraction", "steps": STEPS}


def test_the_ascent_from_fewer_samples_is_another_step() -> None:
    """Control: the fraction changes the trajectory (the test above would catch a no-op)."""
    runs = []
    for mode in (AscentFraction(0.25), None):
        model = make_model("conv")
        opt = build(model, mode)
        for t in range(STEPS):
            closure_step(opt, model, "conv", data("conv", t))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(*runs, strict=True)) > 1e-6


@pytest.mark.parametrize("style", list(STYLES))
def test_fraction_one_is_the_full_step_bit_for_bit(style: str) -> None:
    runs = []
    for mode in (AscentFraction(1.0), None):
        model = make_model("conv", bn=True)
        opt = build(model, mode)
        for t in range(STEPS):
            STYLES[style](opt, model, "conv", data("conv", t))
        runs.append([t.detach().clone() for t in [*model.parameters(), *model.buffers()]])
    assert_equal(*runs)


def test_at_least_one_sample_ascends() -> None:
    model = make_model("linear")
    opt = build(model, AscentFraction(0.01))
    assert closure_step(opt, model, "linear", data("linear", 0)) == [1, N]


# pass_batch --------------------------------------------------------------------------------


Pair = namedtuple("Pair", "x y")


def test_pass_batch_takes_every_structure() -> None:
    opt = build(make_model("linear"), AscentFraction(0.5))
    x, y, scalar = torch.arange(8.0), torch.arange(8), torch.tensor(3.0)
    first = opt.pass_batch({"x": x, "pair": Pair(x, [y, "label"]), "scale": scalar, "n": 8})
    assert set(first) == {"x", "pair", "scale", "n"}
    assert torch.equal(first["x"], x[:4]) and isinstance(first["pair"], Pair)
    assert torch.equal(first["pair"].y[0], y[:4]) and first["pair"].y[1] == "label"
    assert first["scale"] is scalar and first["n"] == 8  # no batch dimension: kept
    assert torch.equal(opt.pass_batch(x), x[:4])
    assert torch.equal(opt.pass_batch((x, y))[1], y[:4])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ((torch.ones(8), torch.ones(6)), r"first \(batch\) dimension; got \[6, 8\]"),
        ({"a": 1, "b": "text"}, "got no tensors"),
        (torch.tensor(1.0), "got no tensors"),
    ],
)
def test_pass_batch_refuses_what_has_no_batch(batch: Any, message: str) -> None:
    opt = build(make_model("linear"), AscentFraction(0.5))
    with pytest.raises(ValueError, match=message):
        opt.pass_batch(batch)


def test_pass_batch_is_the_whole_batch_in_other_modes_and_in_the_descent_pass() -> None:
    x = torch.arange(8.0)
    assert build(make_model("linear"), None).pass_batch(x) is x
    model = make_model("linear")
    opt = build(model, AscentFraction(0.5))
    xs, ys = data("linear", 0)
    with opt.ascent_pass():
        a, b = opt.pass_batch((xs, ys))
        loss_of("linear", model, a, b).backward()
    opt.first_step(zero_grad=True)
    assert opt.pass_batch(x) is x
    opt.restore()


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, math.nan, True, "half"])
def test_bad_fractions_raise(fraction: Any) -> None:
    with pytest.raises(ValueError, match=r"AscentFraction\(fraction=...\) must be in \(0, 1\]"):
        AscentFraction(fraction)


@pytest.mark.parametrize("style", list(STYLES))
def test_a_first_pass_without_pass_batch_raises_and_changes_nothing(style: str) -> None:
    model = make_model("linear")
    opt = build(model, AscentFraction(0.5))
    x, y = data("linear", 0)
    w = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss_of("linear", model, x, y)
        value.backward()
        return value

    with pytest.raises(RuntimeError, match=r"opt\.pass_batch\(batch\)"):
        if style == "closure":
            opt.step(closure)
        else:
            with opt.ascent_pass():
                closure()
            opt.first_step()
    assert_equal([p.detach() for p in model.parameters()], w)
    assert not opt.perturbed and not opt.descending
    closure_step(opt, model, "linear", data("linear", 0))  # the next step runs
    assert opt.state_dict()["sharpness_aware"]["steps"] == 1


# The guarantees of every mode ------------------------------------------------------------


def test_batchnorm_moves_on_the_fraction_only() -> None:
    """The first pass updates the statistics with the m samples it ran on; the second leaves
    them."""
    model = make_model("conv", bn=True)
    opt = build(model, AscentFraction(0.5))
    x, y = data("conv", 0)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected(x[:4])
    closure_step(opt, model, "conv", (x, y))
    assert_equal(list(model.buffers()), list(expected.buffers()))
    assert not torch.equal(model[1].running_mean, make_model("conv", bn=True)[1].running_mean)


def test_a_failed_second_pass_leaves_w() -> None:
    model = make_model("conv")
    opt = build(model, AscentFraction(0.5))
    closure_step(opt, model, "conv", data("conv", 0))
    w = [p.detach().clone() for p in model.parameters()]
    x, y = data("conv", 1)

    def closure() -> Tensor:
        opt.zero_grad()
        xb, yb = opt.pass_batch((x, y))
        if opt.descending:
            raise KeyError("second pass")
        value = loss_of("conv", model, xb, yb)
        value.backward()
        return value

    with pytest.raises(KeyError):
        opt.step(closure)
    assert_equal([p.detach() for p in model.parameters()], w)
    closure_step(opt, model, "conv", data("conv", 1))
    assert opt.state_dict()["sharpness_aware"]["steps"] == 2


@pytest.mark.parametrize("style", list(STYLES))
def test_grad_scaler_matches_the_unscaled_run(style: str, device: str) -> None:
    runs = []
    for scaled in (False, True):
        model = make_model("conv", torch.float32).to(device)
        opt = build(model, AscentFraction(0.5))
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10) if scaled else None
        for t in range(STEPS):
            batch = on_device(device, data("conv", t, torch.float32))
            STYLES[style](opt, model, "conv", batch, scaler)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_identical() -> None:
    model = make_model("conv", bn=True)
    opt = build(model, AscentFraction(0.5), base="adam")
    for t in range(STEPS):
        closure_step(opt, model, "conv", data("conv", t))
    expected = [p.detach().clone() for p in model.parameters()]

    model = make_model("conv", bn=True)
    opt = build(model, AscentFraction(0.5), base="adam")
    for t in range(2):
        closure_step(opt, model, "conv", data("conv", t))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    model = make_model("conv", bn=True)
    opt = build(model, AscentFraction(0.5), base="adam")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for t in range(2, STEPS):
        closure_step(opt, model, "conv", data("conv", t))
    assert_equal([p.detach() for p in model.parameters()], expected)


# DDP (spawned gloo workers) ----------------------------------------------------------------


def ddp_step(opt: Any, ddp: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    def closure() -> Tensor:
        opt.zero_grad()
        x, y = opt.pass_batch(batch)
        value = F.cross_entropy(ddp(x), y)
        value.backward()
        return value

    opt.step(closure)


def scenario_fraction(rank: int) -> dict[str, Any]:
    """Both ascents: all-reduces per step counted, and the weights."""
    h = ddp_helpers
    result: dict[str, Any] = {}
    for ascent in ("local", "global"):
        ddp = h.wrap(h.make_net())
        hook = h.CountingHook()
        ddp.register_comm_hook(None, hook.hook)
        opt = h.make_opt(ddp, model=ddp, ascent=ascent, mode=AscentFraction(0.5))
        per_step = []
        for step in range(h.STEPS):
            before = hook.calls

            ddp_step(opt, ddp, h.half(step, rank))
            per_step.append(hook.calls - before)
        result[ascent] = {"per_step": per_step, "weights": h.weights(ddp.module)}
    return result


def simulate_global(steps: int) -> list[Tensor]:
    """One process: the ascent from the first half of each worker's samples (the mean of the
    workers' gradients), the descent from all of them."""
    h = ddp_helpers
    model = h.make_net()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=h.LR, momentum=h.MOMENTUM)

    keep = h.HALF // 2
    for step in range(steps):
        w = h.weights(model)
        halves = [h.half(step, r) for r in range(h.WORLD)]
        x = torch.cat([xs[:keep] for xs, _ in halves])
        y = torch.cat([ys[:keep] for _, ys in halves])
        shifted = h.ascent_point(w, h.gradient_at(model, w, x, y))
        descent = h.gradient_at(model, shifted, *h.batch(step))
        with torch.no_grad():
            for p, v, g in zip(params, w, descent, strict=True):
                p.copy_(v)
                p.grad = g
        base.step()
    return h.weights(model)


def _worker(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=ddp_helpers.WORLD, timeout=timedelta(seconds=30),
    )  # fmt: skip
    try:
        torch.save(scenario_fraction(rank), Path(out) / f"{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # worker processes
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_under_ddp(tmp_path: Path) -> None:
    h = ddp_helpers
    mp.spawn(_worker, args=(h.free_port(), str(tmp_path)), nprocs=h.WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(h.WORLD)]
    for result in results:
        assert result["local"]["per_step"] == [1] * h.STEPS  # the ascent runs under no_sync
        assert result["global"]["per_step"] == [2] * h.STEPS
        for ascent in ("local", "global"):
            assert_equal(result[ascent]["weights"], results[0][ascent]["weights"])
    h.assert_close(results[0]["global"]["weights"], simulate_global(h.STEPS))
