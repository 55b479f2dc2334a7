"""rho schedules: ``LambdaRho`` and ``ProportionalRho`` set every param group's ``rho`` exactly as
their formulas say, resume from state dicts, and refuse bad input before changing anything."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler

from gcsam import GCSAM, SAM, LambdaRho, ProportionalRho, SharpnessAwareOptimizer

RHOS = (0.1, 0.02)  # per group
LRS = (0.1, 0.05)
STEPS = 6


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def make_opt(model: nn.Module, rhos: tuple[float, float] = RHOS) -> GCSAM:
    """Weights and biases in two groups with their own ``rho`` and ``lr``."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    groups = [
        {"params": weights, "rho": rhos[0], "lr": LRS[0]},
        {"params": biases, "rho": rhos[1], "lr": LRS[1]},
    ]
    return GCSAM(groups, torch.optim.SGD, momentum=0.9)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train_step(opt: SharpnessAwareOptimizer, model: nn.Module, step: int) -> None:
    x, y = batch(step)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)


def warm_up(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def rhos_of(opt: torch.optim.Optimizer) -> list[float]:
    return [group["rho"] for group in opt.param_groups]


def cosine(opt: torch.optim.Optimizer) -> LRScheduler:
    return CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-3)


def halving(opt: torch.optim.Optimizer) -> LRScheduler:
    return LambdaLR(opt, lambda step: 0.5**step)


# Formulas ------------------------------------------------------------------------------------


def test_lambda_rho_sets_each_group_by_the_lambda() -> None:
    model = make_model()
    opt = make_opt(model)
    scheduler = LambdaRho(opt, warm_up)
    assert rhos_of(opt) == [rho * warm_up(0) for rho in RHOS]
    for step in range(1, STEPS + 1):
        train_step(opt, model, step)
        scheduler.step()
        expected = [rho * warm_up(step) for rho in RHOS]
        assert rhos_of(opt) == expected == scheduler.get_last_rho()
    assert rhos_of(opt) == list(RHOS)  # warmed up
    assert [g["initial_rho"] for g in opt.param_groups] == list(RHOS)


@pytest.mark.parametrize("make_lr", [cosine, halving])
@pytest.mark.parametrize(("min_rho", "min_lr"), [(0.0, 0.0), (0.005, 1e-3)])
def test_proportional_rho_follows_the_lr(
    make_lr: Callable[[torch.optim.Optimizer], LRScheduler], min_rho: float, min_lr: float
) -> None:
    model = make_model()
    opt = make_opt(model)
    lr_scheduler = make_lr(opt)
    scheduler = ProportionalRho(opt, min_rho=min_rho, min_lr=min_lr)
    assert rhos_of(opt) == list(RHOS)  # lr == initial_lr
    for step in range(STEPS):
        train_step(opt, model, step)
        lr_scheduler.step()
        scheduler.step()
        lrs = lr_scheduler.get_last_lr()
        assert [g["lr"] for g in opt.param_groups] == lrs
        expected = [
            min_rho + (rho0 - min_rho) * ((lr - min_lr) / (lr0 - min_lr))
            for rho0, lr, lr0 in zip(RHOS, lrs, LRS, strict=True)
        ]
        assert rhos_of(opt) == expected
    assert rhos_of(opt)[0] < RHOS[0] / 2  # the lr came down, and rho with it


def test_scheduled_rho_is_the_radius_of_the_next_ascent() -> None:
    """GCSAM's ``||eps|| == rho`` (one group, ``normalize_by="centralized"``) with the ``rho``
    the schedule set."""
    model = make_model()
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    scheduler = LambdaRho(opt, lambda step: 0.25 * (step + 1))
    for step in range(3):
        x, y = batch(step)
        w = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        eps = torch.cat(
            [(p.detach() - w0).flatten() for p, w0 in zip(model.parameters(), w, strict=True)]
        )
        assert math.isclose(eps.norm().item(), 0.2 * 0.25 * (step + 1), rel_tol=1e-5)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        scheduler.step()


# Resume -----------------------------------------------------------------------------------------


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def schedulers(opt: GCSAM, kind: str) -> list[Any]:
    """The LR scheduler (first, as it must step first) and the rho scheduler."""
    if kind == "lambda":
        return [halving(opt), LambdaRho(opt, warm_up)]
    return [cosine(opt), ProportionalRho(opt, min_rho=0.005, min_lr=1e-3)]


@pytest.mark.parametrize("kind", ["lambda", "proportional"])
def test_resume_continues_the_schedule_bit_for_bit(kind: str) -> None:
    split = 3
    model = make_model()
    opt = make_opt(model)
    scheds = schedulers(opt, kind)
    straight = []
    for step in range(STEPS):
        train_step(opt, model, step)
        for scheduler in scheds:
            scheduler.step()
        straight.append(rhos_of(opt))
    expected = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = make_opt(model)
    scheds = schedulers(opt, kind)
    resumed = []
    for step in range(split):
        train_step(opt, model, step)
        for scheduler in scheds:
            scheduler.step()
        resumed.append(rhos_of(opt))
    saved = round_trip(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "scheds": [scheduler.state_dict() for scheduler in scheds],
        }
    )
    del model, opt, scheds

    model = make_model(seed=5)
    opt = make_opt(model, rhos=(0.7, 0.3))  # another start: only the checkpoint knows RHOS
    scheds = schedulers(opt, kind)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for scheduler, state in zip(scheds, saved["scheds"], strict=True):
        scheduler.load_state_dict(state)
    assert rhos_of(opt) == resumed[-1]
    for step in range(split, STEPS):
        train_step(opt, model, step)
        for scheduler in scheds:
            scheduler.step()
        resumed.append(rhos_of(opt))
    assert resumed == straight
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_initial_rho_and_lr_survive_the_optimizer_state_dict() -> None:
    opt = make_opt(make_model())
    LambdaRho(opt, lambda step: 0.5)
    saved = round_trip(opt.state_dict())
    assert [g["initial_rho"] for g in saved["param_groups"]] == list(RHOS)
    assert [g["initial_lr"] for g in saved["param_groups"]] == list(LRS)

    fresh = make_opt(make_model(), rhos=(0.7, 0.3))
    fresh.load_state_dict(saved)
    assert [g["initial_rho"] for g in fresh.param_groups] == list(RHOS)
    assert [g["initial_lr"] for g in fresh.param_groups] == list(LRS)
    scheduler = LambdaRho(fresh, lambda step: 0.25)  # keeps the loaded start
    assert rhos_of(fresh) == [rho * 0.25 for rho in RHOS]
    assert [g["initial_rho"] for g in fresh.param_groups] == list(RHOS)
    scheduler.step()
    assert rhos_of(fresh) == [rho * 0.25 for rho in RHOS]


# Bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_bad_rho_from_the_lambda_raises_before_any_group_changes(bad: float) -> None:
    opt = make_opt(make_model())
    factors = {0: 1.0, 1: 0.5, 2: bad}
    scheduler = LambdaRho(opt, factors.__getitem__)
    scheduler.step()
    before = rhos_of(opt)
    assert before == [rho * 0.5 for rho in RHOS]
    with pytest.raises(ValueError, match=r"LambdaRho gave rho = .* param group 0 at step 2"):
        scheduler.step()
    assert rhos_of(opt) == before
    assert scheduler.last_step == 1 and scheduler.state_dict() == {"last_step": 1}
    factors[2] = 0.25  # fixed: the schedule goes on from where it was
    scheduler.step()
    assert rhos_of(opt) == [rho * 0.25 for rho in RHOS]


def test_negative_rho_in_a_later_group_changes_no_group() -> None:
    """ProportionalRho below ``min_lr`` in group 1 only: group 0, checked first and fine, is not
    written either."""
    opt = make_opt(make_model())
    scheduler = ProportionalRho(opt, min_rho=0.0, min_lr=0.01)
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[1]["lr"] = 0.001  # below min_lr: a negative rho
    with pytest.raises(ValueError, match=r"param group 1 at step 1"):
        scheduler.step()
    assert rhos_of(opt) == list(RHOS)
    opt.param_groups[1]["lr"] = 0.03
    scheduler.step()
    fractions = [(0.05 - 0.01) / (LRS[0] - 0.01), (0.03 - 0.01) / (LRS[1] - 0.01)]
    assert rhos_of(opt) == [rho * fraction for rho, fraction in zip(RHOS, fractions, strict=True)]


def test_bad_loaded_step_changes_nothing() -> None:
    opt = make_opt(make_model())
    scheduler = LambdaRho(opt, lambda step: 1.0 - step)
    with pytest.raises(ValueError, match="param group 0 at step 2"):
        scheduler.load_state_dict({"last_step": 2})
    assert rhos_of(opt) == list(RHOS) and scheduler.last_step == 0


@pytest.mark.parametrize(
    "make", [lambda opt: LambdaRho(opt, warm_up), lambda opt: ProportionalRho(opt)]
)
def test_schedulers_refuse_an_optimizer_without_rho(make) -> None:
    plain = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="build it on a GCSAM or SAM optimizer"):
        make(plain)
    assert "initial_rho" not in plain.param_groups[0]


def test_lambda_rho_needs_a_function() -> None:
    with pytest.raises(TypeError, match="factor must be a function"):
        LambdaRho(make_opt(make_model()), 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("group", [0, 1])
def test_proportional_rho_refuses_min_lr_equal_to_a_group_lr(group: int) -> None:
    opt = make_opt(make_model())
    with pytest.raises(ValueError, match=rf"param group {group}'s learning rate"):
        ProportionalRho(opt, min_lr=LRS[group])
    assert all("initial_rho" not in g for g in opt.param_groups)  # nothing written


@pytest.mark.parametrize("kwargs", [{"min_rho": -0.1}, {"min_lr": math.nan}, {"min_rho": True}])
def test_proportional_rho_refuses_bad_minimums(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ProportionalRho(make_opt(make_model()), **kwargs)


def test_schedules_work_on_sam_too() -> None:
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.08, lr=0.1)
    scheduler = LambdaRho(opt, warm_up)
    train_step(opt, model, 0)
    scheduler.step()
    assert rhos_of(opt) == [0.08 * warm_up(1)]
    assert copy.deepcopy(scheduler.state_dict()) == {"last_step": 1}
