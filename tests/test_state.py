"""Checkpoints, param-group sharing and LR schedulers.

``state_dict()`` is the base optimizer's state dict; its param groups also carry the SAM
settings. Resuming from it must reproduce an uninterrupted run bit for bit.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import assert_runs_match, on_device
from torch import nn

from gcsam import GCSAM, SAM, SharpnessAwareOptimizer

SAM_KEYS = ("rho", "adaptive", "p", "normalize_by", "gc_scope", "gc_descent")
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3)),
}
BASE_STATE_KEYS = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq", "step"}}


def make_model(seed: int = 0, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)


def make_batches(n: int, seed: int = 1, device: str = "cpu") -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        on_device(
            device, (torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        )
        for _ in range(n)
    ]


def split_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    return weights, biases


def build(
    family: type[SharpnessAwareOptimizer], model: nn.Module, base: str, decoy: bool = False
) -> SharpnessAwareOptimizer:
    """Two param groups with their own settings. ``decoy=True`` builds the same structure with
    different settings everywhere, so that a resumed run is right only if the loaded state
    dict brings every hyperparameter back."""
    base_cls, base_kwargs = BASES[base]
    weights, biases = split_groups(model)
    if decoy:
        groups = [{"params": weights}, {"params": biases}]
        kwargs = {k: v * 3 if isinstance(v, float) else v for k, v in base_kwargs.items()}
        return family(groups, base_cls, rho=0.5, **kwargs)
    groups = [
        {"params": weights, "rho": 0.08, "lr": base_kwargs["lr"] / 2},
        {"params": biases, "rho": 0.02, "normalize_by": "raw"},
    ]
    extra = {} if family is SAM else {"gc_scope": "all"}
    return family(groups, base_cls, rho=0.05, **extra, **base_kwargs)


def closure_for(opt: SharpnessAwareOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def train(opt: SharpnessAwareOptimizer, model: nn.Module, batches, style: str = "closure") -> None:
    for x, y in batches:
        if style == "closure":
            opt.step(closure_for(opt, model, x, y))
        else:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_state_dict_round_trip_carries_base_state(base: str, device: str) -> None:
    model = make_model(device=device)
    opt = build(GCSAM, model, base)
    train(opt, model, make_batches(3, device=device))
    saved = opt.state_dict()

    in_group_order = [p for group in opt.param_groups for p in group["params"]]
    assert len(saved["state"]) == len(in_group_order) == len(list(model.parameters()))
    for index, param in enumerate(in_group_order):
        entry = saved["state"][index]
        assert set(entry) == BASE_STATE_KEYS[base]  # no transient backup of w in the checkpoint
        for key, value in entry.items():
            assert torch.equal(value, opt.base_optimizer.state[param][key])
    if base == "adam":
        assert all(float(saved["state"][i]["step"]) == 3.0 for i in saved["state"])

    fresh_model = make_model(seed=7, device=device)
    fresh = build(GCSAM, fresh_model, base, decoy=True)
    fresh.load_state_dict(saved)
    for old, new in zip(model.parameters(), fresh_model.parameters(), strict=True):
        old_state = opt.base_optimizer.state[old]
        new_state = fresh.base_optimizer.state[new]
        assert set(new_state) == BASE_STATE_KEYS[base]
        for key in BASE_STATE_KEYS[base]:
            assert torch.equal(new_state[key], old_state[key])


def test_state_dict_round_trip_carries_every_hyperparameter_per_group() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    groups = [
        {
            "params": model[0].parameters(),
            "rho": 0.2,
            "gc_scope": "conv",
            "lr": 0.05,
            "adaptive": True,
            "normalize_by": "raw",
        },
        {
            "params": model[2].parameters(),
            "rho": 0.01,
            "p": math.inf,
            "gc_descent": True,
            "foreach": False,  # the base optimizer's own setting
            "momentum": 0.5,
            "weight_decay": 1e-2,
        },
    ]
    opt = GCSAM(groups, torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9, nesterov=True)
    saved = opt.state_dict()
    expected = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for saved_group, settings in zip(saved["param_groups"], expected, strict=True):
        base_keys = ("lr", "momentum", "weight_decay", "nesterov", "dampening", "foreach")
        for key in (*SAM_KEYS, *base_keys):
            assert saved_group[key] == settings[key], key

    fresh_model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fresh = GCSAM(
        [{"params": fresh_model[0].parameters()}, {"params": fresh_model[2].parameters()}],
        torch.optim.SGD,
        rho=0.9,
        gc_scope="none",
        lr=1.0,
    )
    fresh.load_state_dict(saved)
    assert fresh.param_groups is fresh.base_optimizer.param_groups
    for group, settings in zip(fresh.param_groups, expected, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == settings
    assert [g["params"] for g in fresh.param_groups] == [
        list(fresh_model[0].parameters()),
        list(fresh_model[2].parameters()),
    ]
    assert fresh.param_groups[0]["rho"] == 0.2 and fresh.param_groups[1]["rho"] == 0.01
    assert fresh.param_groups[0]["gc_scope"] == "conv" and fresh.param_groups[1]["p"] == math.inf


def test_loading_a_plain_base_state_dict_fills_in_sam_defaults() -> None:
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model(torch.randn(4, 5)).sum().backward()
    plain.step()
    opt = GCSAM(make_model(1).parameters(), torch.optim.SGD, rho=0.11, gc_scope="conv", lr=0.1)
    opt.load_state_dict(plain.state_dict())
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and group["momentum"] == 0.9
    assert group["rho"] == 0.11 and group["gc_scope"] == "conv" and group["adaptive"] is False
    assert opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.parametrize("style", ["closure", "two_step"])
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("family", [GCSAM, SAM], ids=["gcsam", "sam"])
def test_bit_identical_resume(
    family: type[SharpnessAwareOptimizer], base: str, style: str, tmp_path, device: str
) -> None:
    total, split = 6, 2
    batches = make_batches(total, device=device)

    model = make_model(device=device)
    opt = build(family, model, base)
    train(opt, model, batches, style)
    straight = snapshot(model)

    model = make_model(device=device)
    opt = build(family, model, base)
    train(opt, model, batches[:split], style)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    del model, opt

    checkpoint = torch.load(path, weights_only=True)
    model = make_model(seed=123, device=device)
    opt = build(family, model, base, decoy=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert opt.param_groups is opt.base_optimizer.param_groups
    train(opt, model, batches[split:], style)

    start = snapshot(make_model(device=device))
    assert all(not torch.equal(a, b) for a, b in zip(straight, start, strict=True))
    assert_runs_match(snapshot(model), straight)


def _record_base_lr(opt: GCSAM) -> list[float]:
    seen: list[float] = []
    opt.base_optimizer.register_step_pre_hook(
        lambda base, args, kwargs: seen.append(base.param_groups[0]["lr"])
    )
    return seen


@pytest.mark.parametrize("built", ["before_load", "after_load"])
@pytest.mark.parametrize("on", ["gcsam", "base"])
def test_scheduler_drives_base_lr_after_load_state_dict(on: str, built: str, device) -> None:
    batches = make_batches(3, device=device)
    model = make_model(device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    train(opt, model, batches[:1])
    saved = opt.state_dict()

    model2 = make_model(device=device)
    model2.load_state_dict(model.state_dict())
    opt2 = GCSAM(model2.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)

    def scheduler() -> torch.optim.lr_scheduler.StepLR:
        target = opt2 if on == "gcsam" else opt2.base_optimizer
        return torch.optim.lr_scheduler.StepLR(target, step_size=1, gamma=0.5)

    if built == "before_load":
        schedule = scheduler()
    opt2.load_state_dict(saved)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    if built == "after_load":
        schedule = scheduler()
    assert opt2.param_groups[0]["lr"] == 0.1

    seen = _record_base_lr(opt2)
    descent: list[list[torch.Tensor]] = []
    opt2.base_optimizer.register_step_pre_hook(
        lambda base, args, kwargs: descent.append([p.grad.clone() for p in model2.parameters()])
    )
    for x, y in batches[1:]:
        before = snapshot(model2)
        train(opt2, model2, [(x, y)])
        # plain SGD: w <- w - lr * grad L(w + eps), with the lr the scheduler set
        for w0, p, g in zip(before, model2.parameters(), descent[-1], strict=True):
            torch.testing.assert_close(p.detach(), w0 - seen[-1] * g, rtol=0, atol=1e-7)
        schedule.step()
    assert seen == [0.1, 0.05]
    assert opt2.param_groups[0]["lr"] == opt2.base_optimizer.param_groups[0]["lr"] == 0.025


def _scheduler_order_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if "lr_scheduler.step()" in str(w.message) or "overridden" in str(w.message)
    ]


@pytest.mark.parametrize("style", ["closure", "two_step"])
@pytest.mark.parametrize("on", ["gcsam", "base"])
def test_scheduler_sees_the_optimizer_step(on: str, style: str) -> None:
    model = make_model()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule = torch.optim.lr_scheduler.StepLR(
            opt if on == "gcsam" else opt.base_optimizer, step_size=1, gamma=0.5
        )
        for batch in make_batches(2):
            train(opt, model, [batch], style)
            schedule.step()
    assert _scheduler_order_warnings(caught) == []
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_scheduler_order_warning_still_fires_without_a_step() -> None:
    # Control for the test above: the detection it relies on is live.
    model = make_model()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)"):
        schedule.step()


def test_state_dict_while_perturbed_raises(device: str) -> None:
    model = make_model(device=device)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = make_batches(1, device=device)[0]
    train(opt, model, [(x, y)])
    saved = opt.state_dict()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert opt.perturbed
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.load_state_dict(saved)
    assert opt.perturbed
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}
    opt.load_state_dict(saved)


@pytest.mark.parametrize("family", [GCSAM, SAM], ids=["gcsam", "sam"])
def test_add_param_group_reaches_both_objects_with_defaults(
    family: type[SharpnessAwareOptimizer],
) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = family(model[0].parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": model[2].parameters(), "rho": 0.2, "lr": 0.01})

    base = opt.base_optimizer
    assert opt.param_groups is base.param_groups
    assert len(base.param_groups) == 2
    group = base.param_groups[1]
    assert group["params"] == list(model[2].parameters())
    assert group["rho"] == 0.2 and group["lr"] == 0.01  # given
    expected_scope = "none" if family is SAM else "all"
    assert group["gc_scope"] == expected_scope  # SAM defaults
    assert group["adaptive"] is False and group["p"] == 2 and group["gc_descent"] is False
    assert group["normalize_by"] == "centralized"
    assert group["momentum"] == 0.9 and group["dampening"] == 0  # base defaults
    assert group["weight_decay"] == 0 and group["nesterov"] is False

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before = snapshot(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    perturbed = snapshot(model)
    assert not torch.equal(perturbed[2], before[2])  # the new group is perturbed too
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for param in model[2].parameters():
        assert "momentum_buffer" in base.state[param]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(opt.state_dict()["param_groups"]) == 2


def test_sam_refuses_a_gcsam_checkpoint_and_keeps_its_settings() -> None:
    checkpoint = GCSAM(make_model().parameters(), torch.optim.SGD, lr=0.1).state_dict()
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="gc_scope"):
        opt.load_state_dict(checkpoint)
    assert all(group["gc_scope"] == "none" for group in opt.param_groups)
    x, y = make_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    raw = model[0].weight.grad.clone()
    opt.first_step()
    assert torch.equal(model[0].weight.grad, raw)  # SAM's ascent direction is g itself


@pytest.mark.parametrize(("key", "value"), [("rho", -1.0), ("p", 3), ("gc_scope", "rows")])
def test_load_state_dict_rejects_invalid_settings(key: str, value) -> None:
    opt = GCSAM(make_model().parameters(), torch.optim.SGD, lr=0.1)
    checkpoint = opt.state_dict()
    checkpoint["param_groups"][0][key] = value
    with pytest.raises(ValueError):
        opt.load_state_dict(checkpoint)
