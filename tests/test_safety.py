"""Failure safety (the weights are never left at w + eps), gradient clipping and gradient
accumulation inside the closure."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import assert_runs_match, on_device
from torch import nn

import gcsam.optim._functional
from gcsam import GCSAM

RHO, LR = 0.1, 0.1


def make_model(seed: int = 0, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(device)


def make_data(seed: int = 1, n: int = 32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return on_device(device, (x, y))


def make_opt(model: nn.Module) -> GCSAM:
    # two groups, so that a failure can hit after one group has been perturbed
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": weights}, {"params": biases, "rho": RHO / 2}]
    return GCSAM(groups, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_weights(model: nn.Module, expected: list[torch.Tensor]) -> None:
    """The weights are ``expected`` bit for bit (put back from a copy, on every device)."""
    for param, value in zip(model.parameters(), expected, strict=True):
        assert torch.equal(param, value)


def good_closure(opt: GCSAM, model: nn.Module, data) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(data[0]), data[1])
        loss.backward()
        return loss

    return closure


def momentum_buffers(opt: GCSAM) -> list[torch.Tensor]:
    base = opt.base_optimizer
    return [
        base.state[p]["momentum_buffer"].clone() for g in base.param_groups for p in g["params"]
    ]


def pair(device: str) -> tuple[nn.Module, GCSAM, nn.Module, GCSAM]:
    """Two identical (model, optimizer) pairs on ``device``, each after one ordinary step."""
    data = make_data(seed=5, device=device)
    out = []
    for _ in range(2):
        model = make_model(device=device)
        opt = make_opt(model)
        opt.step(good_closure(opt, model, data))
        out += [model, opt]
    return tuple(out)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_closure_failing_on_second_pass_leaves_w(error: type[BaseException], device) -> None:
    model, opt, ref_model, ref_opt = pair(device)
    data = make_data(device=device)
    weights, buffers = snapshot(model), momentum_buffers(opt)
    seen_perturbed: list[bool] = []
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        seen_perturbed.append(opt.perturbed)
        if calls[0] == 2:
            assert not torch.equal(model[0].weight, weights[0])  # really at w + eps
            raise error("second pass failed")
        return good_closure(opt, model, data)()

    with pytest.raises(error, match="second pass failed"):
        opt.step(closure)
    assert seen_perturbed == [False, True]
    assert not opt.perturbed
    assert_weights(model, weights)
    for buffer, expected in zip(momentum_buffers(opt), buffers, strict=True):
        assert torch.equal(buffer, expected)  # the base optimizer did not step

    # the next step works, exactly as if the failed one had never happened
    opt.step(good_closure(opt, model, data))
    ref_opt.step(good_closure(ref_opt, ref_model, data))
    assert_runs_match(snapshot(model), snapshot(ref_model))
    assert not torch.equal(model[0].weight, weights[0])


def test_closure_failing_on_first_pass_changes_nothing(device: str) -> None:
    model, opt, _, _ = pair(device)
    weights = snapshot(model)

    def closure() -> torch.Tensor:
        raise RuntimeError("first pass failed")

    with pytest.raises(RuntimeError, match="first pass failed"):
        opt.step(closure)
    assert not opt.perturbed
    assert_weights(model, weights)


def test_restore_after_first_step_is_exact(device: str) -> None:
    model, opt, _, _ = pair(device)
    x, y = make_data(device=device)
    weights = snapshot(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert opt.perturbed
    assert all(not torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    opt.restore()
    assert not opt.perturbed
    assert_weights(model, weights)
    opt.restore()  # a second restore is a no-op
    assert_weights(model, weights)

    # and a new step can start from there
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert not opt.perturbed
    assert not torch.equal(model[0].weight, weights[0])


def test_restore_stays_exact_after_the_model_changes_dtype(device: str) -> None:
    model = make_model(device=device)
    x, y = make_data(device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.0)  # lr=0: w must not move

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x.to(model[0].weight.dtype)), y)
        loss.backward()
        return loss

    opt.step(closure)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-12)  # bits that fp32 cannot hold
    weights = snapshot(model)
    opt.step(closure)
    assert_weights(model, weights)


@pytest.fixture
def failing_perturb(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Once armed, ``perturb_`` moves the first group fully, then half of the second group, then
    raises; later calls work again."""
    real = gcsam.optim._functional.perturb_
    control = {"armed": False, "calls": 0}

    def flaky(params, grads, **kwargs) -> None:
        if control["armed"]:
            control["calls"] += 1
            if control["calls"] == 2:
                real(params[:1], grads[:1], **kwargs)
                raise RuntimeError("perturbation failed")
        real(params, grads, **kwargs)

    monkeypatch.setattr(gcsam.optim._functional, "perturb_", flaky)
    return control


@pytest.mark.parametrize("style", ["two_step", "closure"])
def test_failure_inside_the_perturbation_leaves_w(failing_perturb: dict, style: str, device):
    model, opt, _, _ = pair(device)
    data = make_data(device=device)
    weights, buffers = snapshot(model), momentum_buffers(opt)
    failing_perturb["armed"] = True
    with pytest.raises(RuntimeError, match="perturbation failed"):
        if style == "closure":
            opt.step(good_closure(opt, model, data))
        else:
            F.cross_entropy(model(data[0]), data[1]).backward()
            opt.first_step()
    assert failing_perturb["calls"] == 2  # the first group had been perturbed when it failed
    assert not opt.perturbed
    assert_weights(model, weights)
    for buffer, expected in zip(momentum_buffers(opt), buffers, strict=True):
        assert torch.equal(buffer, expected)

    opt.step(good_closure(opt, model, data))  # works again once perturb stops failing
    assert failing_perturb["calls"] == 4
    assert not opt.perturbed
    assert not torch.equal(model[0].weight, weights[0])


# Gradient clipping ---------------------------------------------------------------------------


def _grads_at(model: nn.Module, values: list[torch.Tensor], data) -> list[torch.Tensor]:
    with torch.no_grad():
        for param, value in zip(model.parameters(), values, strict=True):
            param.copy_(value)
    model.zero_grad()
    F.cross_entropy(model(data[0]), data[1]).backward()
    return [p.grad.clone() for p in model.parameters()]


def _clip(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    total = torch.cat([g.flatten() for g in grads]).norm()
    coef = min(1.0, max_norm / (total.item() + 1e-6))  # clip_grad_norm_'s rule
    return [g * coef for g in grads]


def reference_clipped_step(data, max_norm: float) -> tuple[list, list, float]:
    """One plain-SGD GCSAM step (gc_scope="all", one rho) by hand on the CPU, descent gradient
    clipped. Returns (w_new, w + eps, ||descent gradient|| before clipping)."""
    model = make_model()
    w = snapshot(model)
    g1 = _grads_at(model, w, data)
    d = [g - g.mean(dim=1, keepdim=True) if g.dim() > 1 else g for g in g1]
    norm = torch.cat([t.flatten() for t in d]).norm()
    w_eps = [wi + RHO * di / norm for wi, di in zip(w, d, strict=True)]
    g2 = _grads_at(model, w_eps, data)
    descent_norm = torch.cat([g.flatten() for g in g2]).norm().item()
    w_new = [wi - LR * gi for wi, gi in zip(w, _clip(g2, max_norm), strict=True)]
    return w_new, w_eps, descent_norm


@pytest.mark.parametrize("clip_ascent", [True, False])
@pytest.mark.parametrize("style", ["closure", "two_step"])
def test_gradient_clipping_matches_hand_reference(style: str, clip_ascent: bool, device) -> None:
    max_norm = 0.05
    expected, expected_eps, descent_norm = reference_clipped_step(make_data(), max_norm)
    assert descent_norm > 5 * max_norm  # clipping is active

    data = make_data(device=device)
    model = make_model(device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    at_eps: list[list[torch.Tensor]] = []

    def backward_and_clip(clip: bool) -> torch.Tensor:
        loss = F.cross_entropy(model(data[0]), data[1])
        loss.backward()
        if clip:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            assert total > max_norm
        return loss

    if style == "closure":

        def closure() -> torch.Tensor:
            if opt.perturbed:
                at_eps.append(snapshot(model))
            opt.zero_grad()
            # the ascent eps is invariant to a uniform scaling of g: clipping only matters on
            # the second pass, so clip on both (clip_ascent) or only on the second pass
            return backward_and_clip(clip_ascent or opt.perturbed)

        opt.step(closure)
    else:
        backward_and_clip(clip_ascent)
        opt.first_step(zero_grad=True)
        at_eps.append(snapshot(model))
        backward_and_clip(True)
        opt.second_step(zero_grad=True)

    for actual, want in zip(at_eps[0], expected_eps, strict=True):
        torch.testing.assert_close(actual.cpu(), want, rtol=1e-6, atol=1e-7)
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.detach().cpu(), want, rtol=1e-6, atol=1e-7)
    # and clipping made a difference to the step
    unclipped, _, _ = reference_clipped_step(make_data(), max_norm=1e9)
    assert not torch.allclose(model[0].weight.cpu(), unclipped[0], atol=1e-4)


# Gradient accumulation -----------------------------------------------------------------------


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulation_in_closure_equals_the_full_batch_step(micro_batches: int, device) -> None:
    x, y = make_data(n=32, device=device)
    runs = []
    for accumulate in (False, True):
        model = make_model(device=device)
        opt = GCSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)

        def closure(model=model, opt=opt, accumulate=accumulate) -> torch.Tensor:
            opt.zero_grad()
            if not accumulate:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            total = torch.zeros((), device=device)
            for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                loss = F.cross_entropy(model(xb), yb) / micro_batches
                loss.backward()
                total += loss.detach()
            return total

        losses = [opt.step(closure).item() for _ in range(3)]
        runs.append((snapshot(model), losses))
    (full, full_losses), (accumulated, accumulated_losses) = runs
    assert accumulated_losses == pytest.approx(full_losses, abs=1e-6)
    assert not torch.equal(full[0], make_model(device=device)[0].weight)
    for a, b in zip(accumulated, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
