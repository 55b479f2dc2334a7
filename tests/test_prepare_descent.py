"""``prepare_descent`` (the step without the base optimizer's part, for trainers that take it)
and the settable ``model`` (for trainers that wrap the model in DDP after the optimizer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gcsam import GCSAM, SAM, AdaptiveAscent, LookSAM, Periodic


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(steps)
    ]


def two_passes(net: nn.Module, opt: GCSAM | SAM, x: Tensor, y: Tensor) -> None:
    """Both passes of one step, up to (not including) second_step / prepare_descent."""
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    if opt.descending:
        F.cross_entropy(net(x), y).backward()


SETTINGS = [
    dict(cls=GCSAM),
    dict(cls=SAM),
    dict(cls=GCSAM, gc_descent=True),
    dict(cls=GCSAM, mode=LookSAM(2, alpha=0.5)),
    dict(cls=GCSAM, mode=Periodic(3)),
    dict(cls=GCSAM, mode=AdaptiveAscent(threshold=0.0)),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: str(s))
def test_prepare_descent_then_the_base_step_is_second_step(settings: dict) -> None:
    settings = dict(settings)
    cls = settings.pop("cls")
    nets = [model(), model()]
    opts = [
        cls(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **settings)
        for net in nets
    ]
    for x, y in batches(6):
        for net, opt in zip(nets, opts, strict=True):
            before = [p.detach().clone() for p in net.parameters()]
            two_passes(net, opt, x, y)
            if opt is opts[0]:
                opt.second_step()
                continue
            assert opt.prepare_descent() is True
            assert not opt.descending and not opt.perturbed
            for p, b in zip(net.parameters(), before, strict=True):  # back at w, bit for bit
                assert torch.equal(p, b)
            opt.base_optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    ours, theirs = (opt.state_dict()["sharpness_aware"] for opt in opts)
    directions = ours.pop("look_direction", {}), theirs.pop("look_direction", {})
    assert ours == theirs
    assert directions[0].keys() == directions[1].keys()
    for key, value in directions[0].items():
        assert torch.equal(value, directions[1][key])


def test_a_skipped_step_returns_false_and_clears_the_gradients() -> None:
    net = model()
    opt = GCSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    net[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    assert opt.prepare_descent() is False
    assert all(p.grad is None for p in net.parameters())  # a trainer that steps changes nothing
    opt.base_optimizer.step()
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert opt.state_dict()["sharpness_aware"]["steps"] == 1  # counted, like second_step


def test_a_skipped_step_with_a_scaler_lets_update_lower_the_scale() -> None:
    net = model()
    opt = GCSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    net[2].bias.grad[0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scaler in charge: no warning
        opt.first_step(zero_grad=True, scaler=scaler)
    assert opt.prepare_descent(scaler) is False
    scaler.update()
    assert scaler.get_scale() == 2.0


# -- the model setter ----------------------------------------------------------------------------


def test_the_model_can_be_set_between_steps_only() -> None:
    net = model()
    opt = GCSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    assert opt.model is None
    opt.model = net
    assert opt.model is net
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        opt.model = "net"
    assert opt.model is net
    x, y = batches(1)[0]
    F.cross_entropy(net(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="only change between steps"):
        opt.model = None
    opt.second_step()
    opt.model = None
    assert opt.model is None


@pytest.fixture
def one_process_group(tmp_path: Path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
def test_a_ddp_model_set_later_controls_the_ascent_like_one_given_at_construction() -> None:
    net = model()
    ddp = DistributedDataParallel(net)
    opt = GCSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, ascent="local")
    opt.model = ddp
    assert opt.model is ddp
    with opt.ascent_pass():  # a local ascent: DDP does not all-reduce the first pass
        assert not ddp.require_backward_grad_sync
    with pytest.raises(ValueError, match=r"LookSAM under DDP needs ascent='global'"):
        GCSAM(net.parameters(), torch.optim.SGD, lr=0.1, mode="looksam", model=ddp)
    looking = GCSAM(net.parameters(), torch.optim.SGD, lr=0.1, mode="looksam")
    with pytest.raises(ValueError, match=r"LookSAM under DDP needs ascent='global'"):
        looking.model = ddp
    assert looking.model is None  # unchanged
