"""GCSAM with a ``torch.compile``d model.

The default backend (inductor) compiles this model in well under a minute on a 2-core CPU
machine with a C++ compiler, so it is used as is (no ``aot_eager`` fallback is needed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from devices import on_device
from torch import nn

from gcsam import GCSAM

pytestmark = [
    pytest.mark.slow,
    # emitted by torch's own modules while inductor compiles
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _subnormals_kept() -> Iterator[None]:
    """Loading inductor's CPU code on torch 2.4 left the process flushing subnormals to zero,
    which silently changed a later test's gradients: put IEEE arithmetic back."""
    yield
    torch.set_flush_denormal(False)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(),  # 4-D kernel: centralized per filter
        nn.Linear(4 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 3),
    )  # fmt: skip


def train(model: nn.Module, forward: nn.Module, data, steps: int) -> list[torch.Tensor]:
    """``steps`` GCSAM steps with ``forward`` (the model itself or its compiled wrapper);
    returns the first-pass losses."""
    x, y = data
    opt = GCSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        return loss

    return [opt.step(closure).detach() for _ in range(steps)]


def test_compiled_model_matches_eager_and_keeps_its_parameters(device: str) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    data = on_device(device, (x, y))

    eager = make_model().to(device)
    start = [p.detach().clone() for p in eager.parameters()]
    eager_losses = train(eager, eager, data, steps=3)

    model = make_model().to(device)
    compiled = torch.compile(model)
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    assert all(a is b for a, b in zip(compiled.parameters(), params, strict=True))
    compiled_losses = train(model, compiled, data, steps=3)

    # the optimizer wrote into the same storage: nothing was rebound through p.data
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert [p.data_ptr() for p in model.parameters()] == pointers
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses))
    for actual, expected, w0 in zip(model.parameters(), eager.parameters(), start, strict=True):
        assert not torch.equal(expected, w0)
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
