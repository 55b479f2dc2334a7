"""Mixed precision: bf16 autocast, the fp16 GradScaler recipe, fp16/bf16 parameters, and the
non-finite-gradient skip without a scaler. Every test runs on the CPU and, where there is a GPU,
on CUDA (the ``device`` fixture), with ``torch.amp.GradScaler(device)``.

CPU fp16 autocast works in the torch this package targets, so the GradScaler tests run both
with fp16 autocast ("fp16") and with fp32 compute on the scaled loss ("fp32"). In fp32 the
scale is a power of two, so scaling and unscaling are exact and the scaled run must match the
unscaled one bit for bit.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import assert_runs_match, on_device
from torch import nn

from gcsam import GCSAM

COMPUTE = ["fp16", "fp32"]
STYLES = ["two_step", "closure"]
INIT_SCALE = 2.0**10  # small enough that scaled fp16 gradients do not overflow


def make_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device, dtype)


def make_data(seed: int = 1, n: int = 32, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return on_device(device, (x, y))


def make_opt(model: nn.Module, base: str = "sgd") -> GCSAM:
    if base == "adam":
        return GCSAM(model.parameters(), torch.optim.Adam, rho=0.1, lr=1e-2)
    return GCSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def base_state(opt: GCSAM) -> dict:
    return copy.deepcopy(opt.base_optimizer.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        assert entry.keys() == b["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)
    assert a["param_groups"] == b["param_groups"]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compute: str) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=compute == "fp16"):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def amp_step(
    opt: GCSAM,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    style: str,
    compute: str,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """One GCSAM step with the documented AMP recipe (``scaler=None``: no scaling at all)."""

    def backward(loss: torch.Tensor) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    if style == "closure":

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model, *data, compute)
            backward(loss)
            return loss

        opt.step(closure, scaler=scaler)
    else:
        backward(loss_of(model, *data, compute))
        opt.first_step(zero_grad=True, scaler=scaler)
        backward(loss_of(model, *data, compute))
        opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


def poison(param: nn.Parameter, on_call: int, value: float = float("inf")):
    """Make the gradient of ``param`` non-finite on its ``on_call``-th backward (0-based)."""
    calls = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return grad * value if calls[0] - 1 == on_call else grad

    handle = param.register_hook(hook)
    return handle, calls


def record_base_grads(opt: GCSAM) -> list[list[torch.Tensor]]:
    seen: list[list[torch.Tensor]] = []
    opt.base_optimizer.register_step_pre_hook(
        lambda base, args, kwargs: seen.append(
            [p.grad.clone() for g in base.param_groups for p in g["params"]]
        )
    )
    return seen


# (a) bf16 autocast ---------------------------------------------------------------------------


def _bf16_closure(opt: GCSAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_bf16_autocast_training_decreases_the_loss(device: str) -> None:
    model = make_model(device=device)
    opt = make_opt(model)
    x, y = make_data(device=device)
    losses = [opt.step(_bf16_closure(opt, model, x, y, bf16=True)).item() for _ in range(25)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert losses[-1] < min(losses[:10])
    assert not opt.perturbed


def test_bf16_autocast_step_is_close_to_the_fp32_step(device: str) -> None:
    x, y = make_data(device=device)
    results = []
    for bf16 in (False, True):
        model = make_model(device=device)
        opt = make_opt(model)
        opt.step(_bf16_closure(opt, model, x, y, bf16=bf16))
        results.append(snapshot(model))
    start = snapshot(make_model(device=device))
    for fp32, bf16, w0 in zip(*results, start, strict=True):
        assert not torch.equal(fp32, w0)
        # the step is ~lr * grad ~ 1e-2; bf16 keeps ~3 significant digits of the gradient
        torch.testing.assert_close(bf16, fp32, rtol=0, atol=2e-3)
        assert (bf16 - fp32).norm() < 0.1 * (fp32 - w0).norm()


# (b) fp16 GradScaler recipe ------------------------------------------------------------------


def _assert_params_match(actual: list[torch.Tensor], expected: list[torch.Tensor], compute: str):
    if compute == "fp32":
        assert_runs_match(actual, expected)
        return
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("style", STYLES)
def test_scaler_step_matches_the_unscaled_step(style: str, compute: str, device: str) -> None:
    data = make_data(device=device)
    runs = []
    for use_scaler in (False, True):
        model = make_model(device=device)
        opt = make_opt(model)
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE) if use_scaler else None
        for _ in range(3):
            amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)
        assert not opt.perturbed
        runs.append(snapshot(model))
        if scaler is not None:
            assert scaler.get_scale() == INIT_SCALE  # no overflow was recorded
    start = snapshot(make_model(device=device))
    assert all(not torch.equal(a, b) for a, b in zip(runs[1], start, strict=True))
    _assert_params_match(runs[1], runs[0], compute)


@pytest.mark.parametrize("compute", COMPUTE)
def test_scaler_unscales_each_pass_exactly_once(compute: str, device: str) -> None:
    data = make_data(device=device)
    ascent, descent, perturbed = [], [], []
    for use_scaler in (False, True):
        model = make_model(device=device)
        opt = make_opt(model)
        seen = record_base_grads(opt)
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE) if use_scaler else None

        def backward(loss, scaler=scaler):
            (loss if scaler is None else scaler.scale(loss)).backward()

        backward(loss_of(model, *data, compute))
        opt.first_step(zero_grad=False, scaler=scaler)
        ascent.append([p.grad.clone() for p in model.parameters()])  # GC(g), unscaled
        perturbed.append(snapshot(model))
        opt.zero_grad()
        backward(loss_of(model, *data, compute))
        opt.second_step(zero_grad=True, scaler=scaler)
        if scaler is not None:
            scaler.update()
        assert len(seen) == 1
        descent.append(seen[0])  # what the base optimizer stepped with
    for pass_grads in (ascent, descent):
        plain, scaled = pass_grads
        # a gradient unscaled twice (or never) would be off by a factor INIT_SCALE
        _assert_params_match(scaled, plain, compute)
        assert max(g.abs().max() for g in scaled) < 10
    _assert_params_match(perturbed[1], perturbed[0], compute)


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_scaler_skips_the_whole_step_on_nonfinite_ascent(
    style: str, compute: str, bad, device: str
) -> None:
    data = make_data(device=device)
    model = make_model(device=device)
    opt = make_opt(model, base="adam")
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)  # builds base state
    weights, state = snapshot(model), base_state(opt)

    handle, calls = poison(model[0].weight, on_call=0, value=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler is in charge: no warning
        amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)
    handle.remove()

    assert calls[0] == (1 if style == "closure" else 2)  # closure style: no second pass
    assert not opt.perturbed
    for w, p in zip(weights, model.parameters(), strict=True):
        assert torch.equal(p, w)
    assert_same_state(base_state(opt), state)
    assert scaler.get_scale() == INIT_SCALE / 2

    amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)
    assert all(not torch.equal(p, w) for w, p in zip(weights, model.parameters(), strict=True))
    assert scaler.get_scale() == INIT_SCALE / 2


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("style", STYLES)
def test_scaler_skips_the_base_step_on_nonfinite_descent(
    style: str, compute: str, device: str
) -> None:
    data = make_data(device=device)
    model = make_model(device=device)
    opt = make_opt(model, base="adam")
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)
    weights, state = snapshot(model), base_state(opt)

    handle, calls = poison(model[2].bias, on_call=1)
    amp_step(opt, model, data, style=style, compute=compute, scaler=scaler)
    handle.remove()

    assert calls[0] == 2
    assert not opt.perturbed  # w was restored before the scaler skipped the base step
    for w, p in zip(weights, model.parameters(), strict=True):
        assert torch.equal(p, w)
    assert_same_state(base_state(opt), state)
    assert scaler.get_scale() == INIT_SCALE / 2


@pytest.mark.parametrize("style", STYLES)
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(style: str, device: str) -> None:
    """A real overflow, not a poisoned gradient: at a scale of 2**30 the scaled gradients of the
    fp16 autocast region pass 65504, so the scaler skips the whole step (the weights and the
    base optimizer's state stay as they were) and halves its scale."""
    data = make_data(device=device)
    model = make_model(device=device)
    opt = make_opt(model, base="adam")
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    amp_step(opt, model, data, style=style, compute="fp16", scaler=scaler)  # builds base state
    assert scaler.get_scale() == INIT_SCALE  # this scale does not overflow
    weights, state = snapshot(model), base_state(opt)

    scaler = torch.amp.GradScaler(device, init_scale=2.0**30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler is in charge: no warning
        amp_step(opt, model, data, style=style, compute="fp16", scaler=scaler)
    assert not opt.perturbed
    for w, p in zip(weights, model.parameters(), strict=True):
        assert torch.equal(p, w)
    assert_same_state(base_state(opt), state)
    assert scaler.get_scale() == 2.0**29


@pytest.mark.parametrize("compute", COMPUTE)
def test_scaler_with_clipping_before_second_step(compute: str, device: str) -> None:
    """The documented recipe: ``scaler.unscale_(opt.base_optimizer)``, clip, ``second_step``."""
    data = make_data(device=device)
    max_norm = 0.05
    runs, totals = [], []
    for use_scaler in (False, True):
        model = make_model(device=device)
        opt = make_opt(model)
        seen = record_base_grads(opt)
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE) if use_scaler else None

        def backward(loss, scaler=scaler):
            (loss if scaler is None else scaler.scale(loss)).backward()

        backward(loss_of(model, *data, compute))
        opt.first_step(zero_grad=True, scaler=scaler)
        backward(loss_of(model, *data, compute))
        if scaler is not None:
            scaler.unscale_(opt.base_optimizer)
        totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.second_step(zero_grad=True, scaler=scaler)  # must not unscale a second time
        if scaler is not None:
            scaler.update()
            assert scaler.get_scale() == INIT_SCALE
        stepped = torch.cat([g.flatten() for g in seen[0]]).norm().item()
        assert stepped == pytest.approx(max_norm, rel=1e-4)
        runs.append(snapshot(model))
    assert totals[0] > 5 * max_norm  # clipping was active
    assert totals[1] == pytest.approx(totals[0], rel=1e-3)  # clipped the unscaled gradient
    _assert_params_match(runs[1], runs[0], compute)


# (c) fp16 / bf16 parameters ------------------------------------------------------------------

LOW = [torch.float16, torch.bfloat16]


def _set_grads(model: nn.Module, scale: float, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype)


@pytest.mark.parametrize("scale", [0.0, 1e-7], ids=["zero", "tiny"])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision_first_step_is_finite_with_norm_rho(
    dtype: torch.dtype, scale: float, device: str
):
    rho = 0.05
    model = make_model(dtype=dtype, device=device)
    with torch.no_grad():
        # Zero weights: w + eps then holds eps with the dtype's relative precision, so ||eps||
        # can be read back from the weights (eps only depends on the gradient here).
        for p in model.parameters():
            p.zero_()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    _set_grads(model, scale)
    if scale:
        assert all(p.grad.any() for p in model.parameters())  # representable, not flushed to 0
    opt.first_step()
    eps = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert torch.isfinite(eps).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if scale == 0:
        assert not opt.perturbed
        assert not eps.any()
    else:
        assert opt.perturbed
        assert eps.norm().item() == pytest.approx(rho, rel=1e-2)
    opt.second_step()  # base step with the gradients still in .grad
    assert not opt.perturbed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if scale == 0:
        assert all(not p.any() for p in model.parameters())  # zero gradient: nothing moves


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("scale", [0.0, 1e-7], ids=["zero", "tiny"])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision_full_steps_stay_finite(
    dtype: torch.dtype, scale: float, adaptive: bool, device: str
):
    model = make_model(dtype=dtype, device=device)
    x, y = make_data(device=device)
    x = x.to(dtype)
    rho = 0.5  # large enough that eps read back through the weights' rounding is accurate
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    start = snapshot(model)
    eps_norms: list[float] = []

    def closure() -> torch.Tensor:
        if opt.perturbed:
            # ||eps / T|| with T = |w| for ASAM, 1 otherwise: rho in both cases
            eps = []
            for p, w in zip(model.parameters(), start, strict=True):
                step = p.detach().float() - w.float()
                eps.append((step / w.float().abs() if adaptive else step).flatten())
            eps_norms.append(torch.cat(eps).norm().item())
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():  # rescale: largest entry == scale (1e-7 is an fp16 subnormal)
            grad = p.grad.float()
            p.grad = (grad / grad.abs().max().clamp_min(1e-30) * scale).to(dtype)
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if scale == 0:
        assert eps_norms == []  # no ascent direction: no perturbation, no second pass at w + eps
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), start, strict=True))
    else:
        # read back through the weights' rounding, hence the loose tolerance
        assert eps_norms[0] == pytest.approx(rho, rel=0.05)
    for _ in range(2):
        assert torch.isfinite(opt.step(closure))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())


# (d) non-finite ascent without a scaler ------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_ascent_without_scaler_warns_and_skips(
    style: str, bad: float, device: str
) -> None:
    data = make_data(device=device)
    model = make_model(device=device)
    opt = make_opt(model, base="adam")
    amp_step(opt, model, data, style=style, compute="fp32", scaler=None)
    weights, state = snapshot(model), base_state(opt)

    handle, _ = poison(model[0].bias, on_call=0, value=bad)
    with pytest.warns(RuntimeWarning, match="not finite"):
        amp_step(opt, model, data, style=style, compute="fp32", scaler=None)
    handle.remove()

    assert not opt.perturbed
    for w, p in zip(weights, model.parameters(), strict=True):
        assert torch.equal(p, w)
    assert_same_state(base_state(opt), state)
    amp_step(opt, model, data, style=style, compute="fp32", scaler=None)
    assert all(not torch.equal(p, w) for w, p in zip(weights, model.parameters(), strict=True))


def test_nonfinite_ascent_warning_points_at_the_caller_of_first_step(device: str) -> None:
    model = make_model(device=device)
    opt = make_opt(model)
    x, y = make_data(device=device)
    F.cross_entropy(model(x), y).backward()
    model[0].bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="GCSAM: the ascent gradient is not finite") as caught:
        opt.first_step()
    assert [w.filename for w in caught] == [__file__]
    opt.second_step()
    assert not opt.perturbed
