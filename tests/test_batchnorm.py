"""``frozen_bn_stats``: running statistics come back bit for bit, batch statistics still
normalize, and inside a GCSAM step only the first pass moves the statistics."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import assert_runs_match, on_device
from torch import nn

from gcsam import GCSAM, frozen_bn_stats

STATS = ("running_mean", "running_var", "num_batches_tracked")

# (layer factory, input shape)
TRACKING: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d": (lambda: nn.BatchNorm1d(4), (8, 4)),
    "bn1d_seq": (lambda: nn.BatchNorm1d(4), (8, 4, 5)),
    "bn1d_cumulative": (lambda: nn.BatchNorm1d(4, momentum=None), (8, 4)),
    "bn2d": (lambda: nn.BatchNorm2d(3), (8, 3, 5, 5)),
    "bn2d_cumulative": (lambda: nn.BatchNorm2d(3, momentum=None, affine=False), (8, 3, 4, 4)),
    "bn3d": (lambda: nn.BatchNorm3d(2), (4, 2, 3, 3, 3)),
    "in1d": (lambda: nn.InstanceNorm1d(4, track_running_stats=True), (8, 4, 10)),
    "in2d": (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (8, 3, 5, 5)),
    "sync_bn": (lambda: nn.SyncBatchNorm(4), (8, 4)),  # plain BN without a process group
}
NOT_TRACKING: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bn1d": (lambda: nn.BatchNorm1d(4, track_running_stats=False), (8, 4)),
    "bn2d": (lambda: nn.BatchNorm2d(3, track_running_stats=False), (8, 3, 5, 5)),
    "in1d": (lambda: nn.InstanceNorm1d(4), (8, 4, 10)),
    "in2d_affine": (lambda: nn.InstanceNorm2d(3, affine=True), (8, 3, 5, 5)),
}


def stats(model: nn.Module) -> list[torch.Tensor]:
    return [
        getattr(m, name).clone()
        for m in model.modules()
        if getattr(m, "track_running_stats", False)
        for name in STATS
    ]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Statistics put back bit for bit (on every device)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def forwards_counted(name: str) -> bool:
    """InstanceNorm updates running_mean/var but never num_batches_tracked."""
    return not name.startswith("in")


def warmed_up(
    name: str, seed: int = 0, device: str = "cpu"
) -> tuple[nn.Module, tuple[int, ...], torch.Generator]:
    """A model on ``device`` holding the layer, after two training forwards (non-trivial
    statistics), and the CPU generator of its inputs."""
    factory, shape = TRACKING[name]
    torch.manual_seed(seed)
    model = nn.Sequential(factory()).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(2):
        model(torch.randn(shape, generator=gen).to(device) * 3 + 1)
    return model, shape, gen


@pytest.mark.parametrize("name", list(TRACKING))
def test_stats_restored_bit_exactly(name: str, device: str) -> None:
    model, shape, gen = warmed_up(name, device=device)
    before = stats(model)
    counted = forwards_counted(name)
    assert int(before[2]) == (2 if counted else 0)
    with frozen_bn_stats(model):
        for _ in range(3):
            model(torch.randn(shape, generator=gen).to(device) * 2 - 1)
        inside = stats(model)
        assert int(inside[2]) == (5 if counted else 0)  # the block really did update them
        assert not torch.equal(inside[0], before[0])
        assert not torch.equal(inside[1], before[1])
    assert_same(stats(model), before)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("name", ["bn1d", "bn2d_cumulative", "in2d"])
def test_stats_restored_when_the_block_raises(name: str, error: type[BaseException], device):
    model, shape, gen = warmed_up(name, device=device)
    before = stats(model)
    with pytest.raises(error, match="inside"), frozen_bn_stats(model):
        model(torch.randn(shape, generator=gen).to(device))
        assert not torch.equal(stats(model)[0], before[0])
        raise error("inside")
    assert_same(stats(model), before)


@pytest.mark.parametrize("name", list(TRACKING))
def test_disabled_lets_the_stats_update(name: str, device: str) -> None:
    model, shape, gen = warmed_up(name, device=device)
    twin = copy.deepcopy(model)
    before = stats(model)
    x = torch.randn(shape, generator=gen).to(device)
    with frozen_bn_stats(model, enabled=False):
        model(x)
    twin(x)
    after = stats(model)
    assert_runs_match(after, stats(twin))
    assert int(after[2]) == (3 if forwards_counted(name) else 0)
    assert not torch.equal(after[0], before[0])


@pytest.mark.parametrize("name", list(NOT_TRACKING))
def test_layers_without_running_stats_are_fine(name: str, device: str) -> None:
    factory, shape = NOT_TRACKING[name]
    torch.manual_seed(0)
    model = nn.Sequential(factory(), nn.Tanh()).to(device)
    x = torch.randn(shape).to(device)
    buffers_before = dict(model.named_buffers())
    with frozen_bn_stats(model):
        inside = model(x)
    assert_runs_match([inside], [model(x)])
    assert dict(model.named_buffers()).keys() == buffers_before.keys()
    assert stats(model) == []


@pytest.mark.parametrize("name", list(TRACKING))
def test_forward_inside_uses_batch_statistics(name: str, device: str) -> None:
    model, shape, gen = warmed_up(name, device=device)
    twin = copy.deepcopy(model)
    x = torch.randn(shape, generator=gen).to(device) * 2 + 0.5
    x_twin = x.clone().requires_grad_()
    x.requires_grad_()
    with frozen_bn_stats(model):
        out = model(x)
    expected = twin(x_twin)
    assert_runs_match([out], [expected])
    # batch statistics, not the running ones
    assert not torch.allclose(out, copy.deepcopy(twin).eval()(x.detach()), atol=1e-3)
    # a backward after the block (the usual closure layout) still works and is unaffected
    weights = torch.randn(out.shape, generator=gen).to(device)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_runs_match([x.grad], [x_twin.grad])
    assert_runs_match([p.grad for p in model.parameters()], [q.grad for q in twin.parameters()])


def test_eval_mode_inside_the_block_is_harmless(device: str) -> None:
    model, shape, gen = warmed_up("bn2d", device=device)
    before = stats(model)
    model.eval()
    x = torch.randn(shape, generator=gen).to(device)
    with frozen_bn_stats(model):
        out = model(x)
    assert_runs_match([out], [model(x)])
    assert_same(stats(model), before)


def test_lazy_batchnorm_before_its_first_forward(device: str) -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d()).to(device)
    with frozen_bn_stats(model):
        model(torch.randn(8, 3).to(device))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(4, device=device))
    assert torch.equal(bn.running_var, torch.ones(4, device=device))


# Inside a GCSAM step ------------------------------------------------------------------------


def bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
        nn.Linear(8, 3),
    )  # fmt: skip


def _data(device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen) * 2 + 1, torch.randint(0, 3, (16,), generator=gen)
    return on_device(device, (x, y))


def _one_forward_stats(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)
    return stats(twin)


@pytest.mark.parametrize("freeze", [True, False])
def test_gcsam_closure_moves_the_stats_on_the_first_pass_only(freeze: bool, device) -> None:
    model = bn_model().to(device)
    x, y = _data(device)
    expected = _one_forward_stats(model, x)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    passes: list[bool] = []

    def closure() -> torch.Tensor:
        passes.append(opt.descending)
        opt.zero_grad()
        with frozen_bn_stats(model, enabled=freeze and opt.descending):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    weight = model[0].weight.detach().clone()
    opt.step(closure)
    assert passes == [False, True]
    assert not torch.equal(model[0].weight, weight)
    if freeze:
        assert_runs_match(stats(model), expected)
    else:  # control: without the context the perturbed pass moves them as well
        assert int(stats(model)[2]) == 2
        assert not torch.equal(stats(model)[0], expected[0])


def test_gcsam_two_step_with_frozen_second_pass(device: str) -> None:
    model = bn_model().to(device)
    x, y = _data(device)
    expected = _one_forward_stats(model, x)
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.second_step(zero_grad=True)
    assert_runs_match(stats(model), expected)
