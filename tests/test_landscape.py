"""``gcsam.landscape`` on a tiny conv net with BatchNorm and on a linear least-squares model
whose loss is known in closed form."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from gcsam import landscape as ls
from gcsam.landscape import Landscape

Batches = list[tuple[Tensor, Tensor]]


def tiny_net(seed: int, width: int = 3) -> nn.Module:
    """Conv + BatchNorm + linear, with non-trivial running statistics; left in train mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 4, 3),
    )
    with torch.no_grad():
        model[1].bias.uniform_(-0.5, 0.5)  # trained-like, not the all-zero initialization
        for _ in range(3):
            model(torch.randn(8, 1, 4, 4) * 2 + 0.5)  # moves the running statistics
    return model.train()


@pytest.fixture
def model() -> nn.Module:
    return tiny_net(0)


@pytest.fixture
def batches() -> Batches:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 1, 4, 4, generator=generator),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in (6, 6, 4)  # uneven: the loss average must weight by batch size
    ]


def own_metrics(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """The model's sample-weighted mean loss and accuracy in eval mode, computed directly."""
    model = copy.deepcopy(model).eval()
    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss += F.cross_entropy(out, y).double().item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss / total, correct / total


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    for key in ("params", "buffers", "grads"):
        for name, value in before[key].items():  # type: ignore[union-attr]
            other = after[key][name]  # type: ignore[index]
            if value is None:
                assert other is None, (key, name)
            else:
                assert torch.equal(value, other) and value.dtype == other.dtype, (key, name)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]


# ---------------------------------------------------------------------------------------------
# directions


def filter_norms(tensor: Tensor) -> Tensor:
    return tensor.reshape(tensor.shape[0], -1).norm(dim=1)


def test_filter_normalization(model: nn.Module) -> None:
    params = list(model.parameters())
    zeroed = ls.random_directions(model, seed=3)
    kept = ls.random_directions(model, seed=3, ignore_1d="keep")
    assert [d.shape for d in zeroed] == [p.shape for p in params]
    for p, dz, dk in zip(params, zeroed, kept, strict=True):
        assert dz.dtype == p.dtype
        if p.dim() > 1:
            torch.testing.assert_close(filter_norms(dz), filter_norms(p), rtol=1e-6, atol=0)
            assert torch.equal(dz, dk)  # ignore_1d only concerns 1-D tensors
        else:
            assert not dz.any()
            assert dk.abs().sum() > 0
            torch.testing.assert_close(dk.norm(), p.detach().norm(), rtol=1e-6, atol=0)
    for p, d in zip(
        params, ls.random_directions(model, seed=3, normalization="layer"), strict=True
    ):
        if p.dim() > 1:
            torch.testing.assert_close(d.norm(), p.detach().norm(), rtol=1e-6, atol=0)
            assert not torch.allclose(filter_norms(d), filter_norms(p), rtol=1e-3)
    raw = ls.random_directions(model, seed=3, normalization="none", ignore_1d="keep")
    generator = torch.Generator().manual_seed(3)
    for p, d in zip(params, raw, strict=True):  # the plain Gaussian stream, in parameter order
        assert torch.equal(d, torch.randn(p.shape, generator=generator))


def test_directions_are_seeded(model: nn.Module) -> None:
    first = ls.random_directions(model, seed=5)
    again = ls.random_directions(model, seed=5)
    other = ls.random_directions(model, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


# ---------------------------------------------------------------------------------------------
# line and plane


def test_grid_shapes_and_origin(model: nn.Module, batches: Batches) -> None:
    loss, accuracy = own_metrics(model, batches)
    line = ls.line(model, F.cross_entropy, batches, points=5, span=0.5, progress=False)
    assert line.kind == "line" and line.axes == ("alpha",)
    assert line.loss.shape == line.accuracy.shape == (5,)
    np.testing.assert_array_equal(line.coordinates[0], [-0.5, -0.25, 0.0, 0.25, 0.5])
    plane = ls.plane(model, F.cross_entropy, batches, grid=5, progress=False)
    assert plane.loss.shape == plane.accuracy.shape == (5, 5)
    assert [len(c) for c in plane.coordinates] == [5, 5]
    for landscape, center in ((line, (2,)), (plane, (2, 2))):
        assert landscape.loss[center] == pytest.approx(loss, abs=1e-6)
        assert landscape.origin_loss == landscape.loss[center]
        assert landscape.accuracy[center] == accuracy == landscape.origin_accuracy
        assert landscape.settings["samples"] == 16 and landscape.settings["batches"] == 3
    assert np.all(plane.loss >= 0) and np.all((plane.accuracy >= 0) & (plane.accuracy <= 1))
    assert plane.settings | {"samples": 0} == {
        "span": 1.0, "grid": 5, "seed": 0, "normalization": "filter", "ignore_1d": "zero",
        "samples": 0, "batches": 3,
    }  # fmt: skip
    # Even counts: 0 is not on the grid, so the origin is evaluated separately.
    even = ls.plane(model, F.cross_entropy, batches, grid=4, progress=False)
    assert even.loss.shape == (4, 4) and 0.0 not in even.coordinates[0]
    assert even.origin_loss == pytest.approx(loss, abs=1e-6)
    assert ls.line(model, F.cross_entropy, batches, points=2).origin_accuracy == accuracy


def test_line_is_the_plane_axis(model: nn.Module, batches: Batches) -> None:
    """The plane's row beta = 0 is the line along d1 (seed), its column alpha = 0 the line
    along d2 (seed + 1): checks the [beta, alpha] indexing."""
    plane = ls.plane(model, F.cross_entropy, batches, grid=3, seed=7)
    along_d1 = ls.line(model, F.cross_entropy, batches, points=3, seed=7)
    along_d2 = ls.line(model, F.cross_entropy, batches, points=3, seed=8)
    np.testing.assert_allclose(plane.loss[1, :], along_d1.loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(plane.loss[:, 1], along_d2.loss, rtol=0, atol=1e-12)
    assert not np.allclose(plane.loss[1, :], plane.loss[:, 1])


class LeastSquares(nn.Module):
    """``x @ W^T``: the mean squared error is a quadratic in ``W``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.2]]).double())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


def test_quadratic_model_matches_closed_form() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(11, 2, generator=generator, dtype=torch.float64)
    batches = [(x[:4], y[:4]), (x[4:9], y[4:9]), (x[9:], y[9:])]
    model = LeastSquares()
    w = model.weight.detach().clone()
    d1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    d2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)

    def closed_form(alpha: float, beta: float) -> float:
        residual = x @ (w + alpha * d1 + beta * d2).T - y
        return float(residual.square().mean())

    plane = ls.plane(model, F.mse_loss, batches, directions=([d1], [d2]), span=2.0, grid=5)
    alphas, betas = plane.coordinates
    for j, beta in enumerate(betas):
        for i, alpha in enumerate(alphas):
            assert plane.loss[j, i] == pytest.approx(closed_form(alpha, beta), rel=1e-12)
    assert np.isnan(plane.accuracy).all()  # float targets: no accuracy
    assert plane.settings["normalization"] == "given"
    line = ls.line(model, F.mse_loss, batches, direction=[d2], span=1.5, points=7)
    expected = [closed_form(0.0, beta) for beta in line.coordinates[0]]
    np.testing.assert_allclose(line.loss, expected, rtol=1e-12)
    # The default direction is the seeded, filter-normalized one.
    (d,) = ls.random_directions(model, seed=4)
    default = ls.line(model, F.mse_loss, batches, seed=4, points=3)
    for alpha, value in zip(default.coordinates[0], default.loss, strict=True):
        residual = x @ (w + alpha * d).T - y
        assert value == pytest.approx(float(residual.square().mean()), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# interpolation


def test_interpolation_endpoints_and_midpoint(model: nn.Module, batches: Batches) -> None:
    other = tiny_net(1)
    loss_a, acc_a = own_metrics(model, batches)
    loss_b, acc_b = own_metrics(other, batches)
    exact = ls.interpolate(model, other, F.cross_entropy, batches, points=5, extend=0.0)
    np.testing.assert_array_equal(exact.coordinates[0], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert exact.loss[0] == pytest.approx(loss_a, abs=1e-6)
    assert exact.loss[-1] == pytest.approx(loss_b, abs=1e-6)
    assert exact.origin_loss == (exact.loss[0], exact.loss[-1])
    assert exact.origin_accuracy == (acc_a, acc_b) == (exact.accuracy[0], exact.accuracy[-1])

    # Midpoint: weights and running statistics averaged; the step counter is model_a's.
    middle = copy.deepcopy(model)
    with torch.no_grad():
        for (name, t), s in zip(
            middle.state_dict().items(), other.state_dict().values(), strict=True
        ):
            if t.is_floating_point():
                t.copy_(torch.lerp(t, s, 0.5))
            else:
                assert name.endswith("num_batches_tracked")
    assert exact.loss[2] == pytest.approx(own_metrics(middle, batches)[0], abs=1e-6)

    # 0 and 1 off the grid: evaluated on their own. Outside [0, 1] the statistics stay put.
    extended = ls.interpolate(model, other, F.cross_entropy, batches, points=6, extend=0.25)
    assert extended.loss.shape == (6,) and extended.coordinates[0][0] == -0.25
    assert extended.origin_loss == pytest.approx((loss_a, loss_b), abs=1e-6)
    assert extended.settings["extend"] == 0.25 and extended.settings["points"] == 6
    before = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(before.parameters(), other.parameters(), strict=True):
            p.copy_(torch.lerp(p, q, -0.25))
    assert extended.loss[0] == pytest.approx(own_metrics(before, batches)[0], abs=1e-6)


def test_interpolation_needs_one_architecture(model: nn.Module, batches: Batches) -> None:
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(3, 1, 3, 3\)"):
        ls.interpolate(model, tiny_net(1, width=4), F.cross_entropy, batches)
    renamed = nn.Sequential()
    for name, module in model.named_children():
        renamed.add_module(f"layer{name}", copy.deepcopy(module))
    with pytest.raises(ValueError, match=r"model_b has no parameter '0\.weight'"):
        ls.interpolate(model, renamed, F.cross_entropy, batches)
    without_bn = tiny_net(1)
    without_bn[1] = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"model_b has no buffer '1\.running_mean'"):
        ls.interpolate(model, without_bn, F.cross_entropy, batches)


# ---------------------------------------------------------------------------------------------
# safety, files, errors


def test_callers_model_is_unchanged(model: nn.Module, batches: Batches) -> None:
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()  # grads must survive too
    model[5].bias.requires_grad_(False)
    before = snapshot(model)
    assert model.training
    ls.random_directions(model, seed=0, ignore_1d="keep")
    assert_unchanged(model, before)
    ls.line(model, F.cross_entropy, batches, points=3)
    assert_unchanged(model, before)
    ls.plane(model, F.cross_entropy, batches, grid=2, ignore_1d="keep")
    assert_unchanged(model, before)
    other = tiny_net(2)
    other_before = snapshot(other)
    ls.interpolate(model, other, F.cross_entropy, batches, points=3)
    assert_unchanged(model, before)
    assert_unchanged(other, other_before)


def test_save_load_round_trip(model: nn.Module, batches: Batches, tmp_path: Path) -> None:
    plane = ls.plane(model, F.cross_entropy, batches, grid=3)
    interpolation = ls.interpolate(model, tiny_net(1), F.cross_entropy, batches, points=3)
    nan_accuracy = Landscape("line", [np.array([-1.0, 1.0])], np.ones(2), np.full(2, np.nan))
    for landscape, name in ((plane, "a/plane"), (interpolation, "interp.v1"), (nan_accuracy, "n")):
        paths = landscape.save(tmp_path / name)
        assert paths == {"npz": tmp_path / f"{name}.npz", "json": tmp_path / f"{name}.json"}
        meta = json.loads(paths["json"].read_text(), parse_constant=pytest.fail)  # strict JSON
        assert meta == landscape.to_json() and meta["kind"] == landscape.kind
        assert "loss" not in meta and meta["shape"] == list(landscape.loss.shape)
        loaded = Landscape.load(tmp_path / name)
        assert loaded.kind == landscape.kind and loaded.settings == landscape.settings
        for got, want in zip(loaded.coordinates, landscape.coordinates, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(loaded.loss, landscape.loss)
        np.testing.assert_array_equal(loaded.accuracy, landscape.accuracy)
        assert loaded.origin_loss == landscape.origin_loss or math.isnan(landscape.origin_loss)
        assert type(loaded.origin_loss) is type(landscape.origin_loss)
    with np.load(tmp_path / "a/plane.npz") as arrays:
        assert sorted(arrays.files) == ["accuracy", "alpha", "beta", "loss"]


def test_progress_bar_shows_on_request(
    model: nn.Module, batches: Batches, capsys: pytest.CaptureFixture[str]
) -> None:
    ls.line(model, F.cross_entropy, batches, points=3, progress=True)
    assert "line:" in capsys.readouterr().err  # a tqdm bar named after the sweep
    ls.line(model, F.cross_entropy, batches, points=3, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments(model: nn.Module, batches: Batches) -> None:
    loss = F.cross_entropy
    direction = ls.random_directions(model, seed=0)
    short, misshapen = direction[:-1], [*direction[:-1], torch.zeros(2)]
    cases = [
        (lambda: ls.line(model, loss, batches, span=0.0), "span"),
        (lambda: ls.plane(model, loss, batches, span=-1.0), "span"),
        (lambda: ls.line(model, loss, batches, points=1), "points"),
        (lambda: ls.plane(model, loss, batches, grid=1), "grid"),
        (lambda: ls.interpolate(model, model, loss, batches, points=1), "points"),
        (lambda: ls.interpolate(model, model, loss, batches, extend=-0.1), "extend"),
        (lambda: ls.line(model, loss, []), "batches"),
        (lambda: ls.plane(model, loss, iter([])), "batches"),
        (lambda: ls.interpolate(model, model, loss, []), "batches"),
        (lambda: ls.line(model, loss, [(torch.ones(0, 1, 4, 4), torch.ones(0))]), "no examples"),
        (lambda: ls.line(model, loss, [(batches[0][0], 1)]), "pair of tensors"),
        (lambda: ls.line(model, loss, batches, direction=short), "direction"),
        (lambda: ls.line(model, loss, batches, direction=misshapen), "direction"),
        (lambda: ls.plane(model, loss, batches, directions=[direction]), "directions"),
        (lambda: ls.plane(model, loss, batches, directions=[direction, short]), "directions"),
        (lambda: ls.random_directions(model, seed=0, normalization="unit"), "normalization"),
        (lambda: ls.random_directions(model, seed=0, ignore_1d="drop"), "ignore_1d"),
    ]  # fmt: skip
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_empty_batches_are_left_out(model: nn.Module, batches: Batches) -> None:
    """An empty batch has no mean loss (NaN) and no weight: it changes nothing."""
    empty = (torch.ones(0, 1, 4, 4), torch.ones(0, dtype=torch.long))
    padded = ls.line(model, F.cross_entropy, [empty, *batches, empty], points=3)
    plain = ls.line(model, F.cross_entropy, batches, points=3)
    np.testing.assert_array_equal(padded.loss, plain.loss)
    assert padded.settings["batches"] == 3 and padded.settings["samples"] == 16
