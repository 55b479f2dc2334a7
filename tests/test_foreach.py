"""The multi-tensor (foreach) path gives the same weights as the single-tensor path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from devices import assert_runs_match, on_device
from torch import nn

from gcsam import GCSAM
from gcsam.optim import _functional

COMBOS = list(
    itertools.product(["all", "conv", "none"], ["centralized", "raw"], [False, True], [2, math.inf])
)
COMBO_IDS = [f"{s}-{n}-{'asam' if a else 'sam'}-p{p}" for s, n, a, p in COMBOS]


class Mixed(nn.Module):
    """Many parameter tensors of ndim 1 to 5, a (C, 1) weight, a float64 tensor and an
    unused parameter (its grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # 4-D + 1-D
        self.bn = nn.BatchNorm2d(4)  # 1-D, training mode
        self.conv1d = nn.Conv1d(4, 3, 3, padding=1)  # 3-D + 1-D
        self.ln = nn.LayerNorm(3)  # 1-D
        self.lin = nn.Linear(15, 4)  # 2-D + 1-D
        self.col = nn.Linear(1, 4, bias=False)  # (4, 1): GC makes its ascent gradient 0
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.table = nn.Parameter(torch.randn(2, 3, 4))  # 3-D, not a convolution
        self.kernel5 = nn.Parameter(torch.randn(2, 2, 2, 2, 2))  # 5-D
        self.wide = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=3)  # (N, 4, 5)
        h = self.ln(self.conv1d(h).transpose(1, 2)).flatten(1)  # (N, 15)
        out = self.lin(h) * self.scale + self.col(x.mean(dim=(1, 2, 3)).unsqueeze(1))
        return out

    def penalty(self) -> torch.Tensor:
        return 0.05 * (
            (self.table**3).sum() + self.kernel5.sin().sum() + (self.wide**3).sum().float()
        )


def data(device: str):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 2, 5, 5, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    return on_device(device, (x, y))


def train(
    foreach: bool | None,
    device: str,
    steps: int = 4,
    base=torch.optim.SGD,
    groups=None,
    **settings,
):
    torch.manual_seed(0)
    model = Mixed().to(device)
    x, y = data(device)
    params = groups(model) if groups else model.parameters()
    base_kwargs = dict(lr=0.05, momentum=0.9) if base is torch.optim.SGD else dict(lr=0.01)
    opt = GCSAM(params, base, foreach=foreach, **settings, **base_kwargs)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + model.penalty()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(steps)]
    assert model.unused.grad is None
    return model, losses


def assert_same(a: nn.Module, b: nn.Module, exact: bool = False) -> None:
    """The same weights: within float tolerance, or bit for bit (``exact``, on the CPU)."""
    if exact:
        assert_runs_match(list(a.parameters()), list(b.parameters()))
        return
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("gc_scope", "normalize_by", "adaptive", "p"), COMBOS, ids=COMBO_IDS)
def test_foreach_matches_single_tensor(gc_scope, normalize_by, adaptive, p, device):
    settings = dict(gc_scope=gc_scope, normalize_by=normalize_by, adaptive=adaptive, p=p)
    settings["rho"] = 0.5 if adaptive else 0.05
    fast, losses_fast = train(True, device, **settings)
    slow, losses_slow = train(False, device, **settings)
    assert_same(fast, slow)
    assert losses_fast == pytest.approx(losses_slow, rel=1e-5)
    # The runs really trained: the weights left their initial values.
    torch.manual_seed(0)
    init = Mixed().to(device)
    assert not torch.allclose(fast.conv.weight, init.conv.weight)
    assert torch.equal(fast.unused, init.unused)


@pytest.mark.parametrize("settings", [dict(gc_descent=True), dict(adaptive=True, rho=0.5)])
def test_foreach_matches_with_adam_and_gc_descent(settings, device):
    fast, _ = train(True, device, base=torch.optim.Adam, **settings)
    slow, _ = train(False, device, base=torch.optim.Adam, **settings)
    assert_same(fast, slow)


def test_foreach_per_group_flags(device):
    def groups(model: nn.Module):
        names = {"conv.weight", "conv.bias", "kernel5", "wide"}
        first = [p for n, p in model.named_parameters() if n in names]
        rest = [p for n, p in model.named_parameters() if n not in names]
        return [
            {"params": first, "rho": 0.1, "gc_scope": "conv"},
            {"params": rest, "rho": 0.02, "p": math.inf, "adaptive": True},
        ]

    fast, _ = train(True, device, groups=groups)
    slow, _ = train(False, device, groups=groups)
    assert_same(fast, slow)


def test_default_foreach_on_cpu_is_the_foreach_path(device):
    """On CUDA too, the default is the foreach path."""
    auto, _ = train(None, device)
    fast, _ = train(True, device)
    assert_same(auto, fast, exact=True)


def test_functional_multi_tensor_paths_match_single_tensor_paths(device):
    """The helpers themselves, on fp16/bf16/fp32/fp64 tensors of 1 to 4 dims."""
    gen = torch.Generator().manual_seed(0)
    layout = [
        ((4, 3, 3, 3), torch.float32),
        ((7,), torch.float32),
        ((5,), torch.float64),
        ((2, 5), torch.float64),
        ((3, 4), torch.float16),
        ((6,), torch.bfloat16),
    ]

    def tensors() -> list[torch.Tensor]:
        return [torch.randn(shape, generator=gen).to(device, dtype) for shape, dtype in layout]

    weights, directions = tensors(), tensors()
    for p, adaptive in itertools.product([2, math.inf], [False, True]):
        moved = {}
        for foreach in (True, False):
            moved[foreach] = [w.clone() for w in weights]
            _functional.perturb_(
                moved[foreach], directions, scale=0.3, p=p, adaptive=adaptive, foreach=foreach
            )
        for fast, slow, w in zip(moved[True], moved[False], weights, strict=True):
            torch.testing.assert_close(fast, slow)
            assert not torch.equal(fast, w)

    exact = math.sqrt(sum(float(d.double().square().sum()) for d in directions))
    for foreach in (True, False):
        terms = _functional.squared_norms(directions, foreach=foreach, precise=False)
        assert _functional.total_norm(terms) == pytest.approx(exact, rel=1e-6)
        backups = [torch.empty_like(w) for w in weights]
        _functional.copy_(backups, weights, foreach=foreach)
        assert all(torch.equal(b, w) for b, w in zip(backups, weights, strict=True))
    assert _functional.total_norm([]) == 0.0
