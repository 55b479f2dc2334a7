"""``descending``: the descent pass of a step, whatever ``rho``, so that
``frozen_bn_stats(model, enabled=opt.descending)`` makes ``rho=0`` exactly the base optimizer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam import GCSAM, frozen_bn_stats

BASES = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
}


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=gen) * 2 + 1, torch.randint(0, 3, (16,), generator=gen))
        for _ in range(steps)
    ]


def state(model: nn.Module) -> list[torch.Tensor]:
    """Weights and BatchNorm buffers (running_mean/var, num_batches_tracked)."""
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("flag", ["descending", "perturbed"])
def test_rho_zero_with_frozen_descent_pass_is_the_base_optimizer(base: str, flag: str) -> None:
    cls, kwargs = BASES[base]
    data = batches(3)
    plain_model = bn_model()
    plain = cls(plain_model.parameters(), **kwargs)
    for x, y in data:
        plain.zero_grad()
        F.cross_entropy(plain_model(x), y).backward()
        plain.step()

    model = bn_model()
    opt = GCSAM(model.parameters(), cls, rho=0.0, **kwargs)
    for x, y in data:

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            with frozen_bn_stats(model, enabled=getattr(opt, flag)):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    same = [torch.equal(a, b) for a, b in zip(state(model), state(plain_model), strict=True)]
    if flag == "descending":
        assert all(same)
    else:  # control: perturbed is False at rho=0, so the descent pass moved the statistics
        assert int(model[1].num_batches_tracked) == 2 * len(data)
        assert not all(same)


def with_grads(model: nn.Module, value: float = 1.0) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


def test_descending_from_first_step_to_second_step() -> None:
    model = with_grads(nn.Linear(3, 2))
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert not opt.descending
    opt.first_step()
    assert opt.descending and opt.perturbed
    opt.second_step()
    assert not opt.descending


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_descending_ends_with_restore(rho: float) -> None:
    model = with_grads(nn.Linear(3, 2))
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    opt.first_step()
    assert opt.descending
    assert opt.perturbed == (rho > 0)
    opt.restore()
    assert not opt.descending


def test_descending_after_a_skipped_nonfinite_first_step() -> None:
    model = with_grads(nn.Linear(3, 2), value=float("nan"))
    opt = GCSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.first_step()
    assert opt.descending and not opt.perturbed


def test_descending_is_read_only() -> None:
    opt = GCSAM(nn.Linear(3, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(AttributeError):
        opt.descending = True  # type: ignore[misc]


def test_first_step_twice_at_rho_zero_raises() -> None:
    """A second first_step inside one step is a bug at any rho, not only once weights moved."""
    model = with_grads(nn.Linear(3, 2))
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
