"""Flatness measures against dense references on a ~30-parameter network: Hessian-vector
products, Lanczos eigenvalues and Ritz vectors, Hutchinson trace, SLQ density, SAM sharpness
(against a brute-force maximum on a quadratic) and m-sharpness; the model comes back untouched."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

from gcsam.sharpness import (
    Density,
    Eigenvalues,
    MSharpness,
    SamSharpness,
    Trace,
    hessian_trace,
    hessian_vector_product,
    m_sharpness,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)

SIZES = (7, 5, 4)  # batches of different sizes: N = 16


def make_net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def make_batches(dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, generator=generator, dtype=dtype), torch.randint(0, 3, (n,)))
        for n in SIZES
    ]


def dense_hessian(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The (n, n) Hessian of the batch-size weighted loss over the trainable parameters."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    total = sum(x.shape[0] for x, _ in batches)

    def loss(flat: Tensor) -> Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        params = {name: c.view(s) for (name, _), c, s in zip(named, chunks, shapes, strict=True)}
        return sum(
            F.cross_entropy(functional_call(model, params, (x,)), y) * (x.shape[0] / total)
            for x, y in batches
        )

    was_training = model.training
    model.eval()
    try:
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        model.train(was_training)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """(net, batches, dense Hessian, its eigenvalues ascending)."""
    net = make_net()
    batches = make_batches()
    hessian = dense_hessian(net, batches)
    return net, batches, hessian, torch.linalg.eigvalsh(hessian)


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class Quadratic(nn.Module):
    """``forward`` gives ``0.5 w^T A w`` for each example; the loss is its mean."""

    def __init__(self, matrix: Tensor, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: Tensor) -> Tensor:
        value = 0.5 * self.weight @ self.matrix @ self.weight
        return value.expand(x.shape[0])


def mean_loss(output: Tensor, target: Tensor) -> Tensor:
    return output.mean()


QUADRATIC_DATA = [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3))]


# --------------------------------------------------------------------------- Hessian


def test_hvp_matches_dense_hessian(setup) -> None:
    net, batches, hessian, _ = setup
    generator = torch.Generator().manual_seed(2)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in net.parameters()]
    hv = hessian_vector_product(net, F.cross_entropy, iter(batches), vector)
    assert [h.shape for h in hv] == [p.shape for p in net.parameters()]
    torch.testing.assert_close(flat(hv), hessian @ flat(vector), rtol=0, atol=1e-10)


def test_hvp_on_a_parameter_subset(setup) -> None:
    net, batches, hessian, _ = setup
    last = list(net[2].parameters())  # the last 15 of 31 entries
    vector = [torch.ones_like(p) for p in last]
    hv = hessian_vector_product(net, F.cross_entropy, batches, vector, params=last)
    block = hessian[-15:, -15:]
    torch.testing.assert_close(
        flat(hv), block @ torch.ones(15, dtype=torch.float64), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_eigenvalues_match_dense(setup, k: int) -> None:
    net, batches, _, eigenvalues = setup
    result = top_eigenvalues(net, F.cross_entropy, batches, k=k)
    expected = eigenvalues.flip(0)[:k]
    assert result.converged
    assert result.values == sorted(result.values, reverse=True)
    torch.testing.assert_close(
        torch.tensor(result.values, dtype=torch.float64), expected, rtol=1e-4, atol=0
    )
    assert result.hvp_count == result.iterations <= 31
    assert result.vectors is None


def test_ritz_vectors_are_unit_eigenvectors(setup) -> None:
    net, batches, hessian, _ = setup
    result = top_eigenvalues(net, F.cross_entropy, batches, k=3, return_vectors=True)
    assert result.vectors is not None and len(result.vectors) == 3
    for value, vector in zip(result.values, result.vectors, strict=True):
        assert [v.shape for v in vector] == [p.shape for p in net.parameters()]
        y = flat(vector)
        assert abs(float(y.norm()) - 1) < 1e-12
        # Residual <= tol * |lambda| by the stopping rule (with rounding slack).
        assert float((hessian @ y - value * y).norm()) <= 2e-4 * abs(value)


def test_lanczos_exhausts_a_small_space(setup) -> None:
    """With max_iter >= n Lanczos sees the whole space: every value is exact."""
    net, batches, _, eigenvalues = setup
    result = top_eigenvalues(net, F.cross_entropy, batches, k=3, tol=1e-14, max_iter=500)
    assert result.iterations <= 31
    torch.testing.assert_close(
        torch.tensor(result.values, dtype=torch.float64),
        eigenvalues.flip(0)[:3],
        rtol=1e-9,
        atol=0,
    )


def test_lanczos_restarts_in_an_invariant_subspace() -> None:
    """diag(2, 2, 1): the Krylov space of any start vector has dimension 2, so k = 3 needs a
    restart; the repeated eigenvalue then shows up twice."""
    model = Quadratic(
        torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)),
        torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
    )
    result = top_eigenvalues(model, mean_loss, QUADRATIC_DATA, k=3, return_vectors=True)
    assert result.converged and result.iterations == 3
    assert result.values == pytest.approx([2.0, 2.0, 1.0], abs=1e-12)
    assert result.vectors is not None
    gram = torch.stack([flat(v) for v in result.vectors])
    torch.testing.assert_close(gram @ gram.T, torch.eye(3, dtype=torch.float64))


def test_not_converged_is_reported(setup) -> None:
    net, batches, _, _ = setup
    result = top_eigenvalues(net, F.cross_entropy, batches, k=2, max_iter=3, tol=1e-12)
    assert not result.converged and result.iterations == 3 and result.hvp_count == 3


def test_float32_model() -> None:
    """Krylov vectors in fp32: the top eigenvalue still matches the fp64 reference."""
    batches = [(x.float(), y) for x, y in make_batches()]
    reference = dense_hessian(make_net(), [(x.double(), y) for x, y in batches])
    expected = float(torch.linalg.eigvalsh(reference)[-1])
    result = top_eigenvalues(make_net(torch.float32), F.cross_entropy, batches)
    assert result.converged
    assert result.values[0] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- trace


def test_trace_within_three_standard_errors(setup) -> None:
    net, batches, hessian, _ = setup
    result = hessian_trace(net, F.cross_entropy, batches, samples=40)
    assert result.std_error > 0
    assert abs(result.trace - float(hessian.trace())) <= 3 * result.std_error
    again = hessian_trace(net, F.cross_entropy, batches, samples=40)
    assert again == result  # same seed, same probes, same numbers
    other = hessian_trace(net, F.cross_entropy, batches, samples=40, seed=1)
    assert other.trace != result.trace


@pytest.mark.slow  # 1100 Hessian-vector products
def test_trace_converges(setup) -> None:
    """Many probes: within 3 (smaller) standard errors, and the per-probe variance is the
    Rademacher estimator's exact one, 2 * sum_{i != j} H_ij^2."""
    net, batches, hessian, _ = setup
    few = hessian_trace(net, F.cross_entropy, batches, samples=100)
    many = hessian_trace(net, F.cross_entropy, batches, samples=1000)
    assert many.std_error < few.std_error
    assert abs(many.trace - float(hessian.trace())) <= 3 * many.std_error
    off_diagonal = hessian - torch.diag(hessian.diag())
    variance = 2 * float(off_diagonal.square().sum())
    assert many.std_error**2 * many.samples == pytest.approx(variance, rel=0.25)


def test_trace_is_exact_for_a_diagonal_hessian() -> None:
    matrix = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))
    model = Quadratic(matrix, torch.tensor([0.3, 0.7], dtype=torch.float64))
    result = hessian_trace(model, mean_loss, QUADRATIC_DATA, samples=5)
    assert result.trace == pytest.approx(2.0, abs=1e-14)
    assert result.std_error == pytest.approx(0.0, abs=1e-14)


# --------------------------------------------------------------------------- density


def test_spectral_density(setup) -> None:
    net, batches, _, eigenvalues = setup
    result = spectral_density(net, F.cross_entropy, batches, lanczos_steps=10, probes=3)
    grid = torch.tensor(result.grid, dtype=torch.float64)
    density = torch.tensor(result.density, dtype=torch.float64)
    assert len(result.grid) == len(result.density) == 200
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    assert bool((density >= 0).all())
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    margin = 1e-9 * (high - low)
    assert len(result.eigenvalue_nodes) == len(result.weights) == 3
    for nodes, weights in zip(result.eigenvalue_nodes, result.weights, strict=True):
        assert len(nodes) == len(weights) == 10
        assert all(low - margin <= node <= high + margin for node in nodes)
        assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    # The extreme nodes approach the extreme eigenvalues.
    top = max(max(nodes) for nodes in result.eigenvalue_nodes)
    assert top == pytest.approx(high, rel=1e-2)


def test_spectral_density_quadrature_is_exact_on_the_whole_space(setup) -> None:
    """With as many steps as parameters the quadrature is exact:
    sum_j tau_j theta_j = v^T H v for the unit probe v."""
    net, batches, hessian, _ = setup
    result = spectral_density(net, F.cross_entropy, batches, lanczos_steps=31, probes=2, sigma=0.05)
    assert result.sigma == 0.05
    generator = torch.Generator().manual_seed(0)  # the probes: the seed's Rademacher draws
    for nodes, weights in zip(result.eigenvalue_nodes, result.weights, strict=True):
        z = torch.randint(0, 2, (31,), generator=generator).double() * 2 - 1
        quadrature = math.fsum(w * t for w, t in zip(weights, nodes, strict=True))
        assert quadrature == pytest.approx(float(z @ hessian @ z) / 31, abs=1e-10)


# --------------------------------------------------------------------------- SAM sharpness


def brute_force_max(matrix: Tensor, weight: Tensor, rho: float, scale: Tensor) -> float:
    """max over ||u|| = rho of L(w + scale * u) - L(w) for L = 0.5 w^T A w (a PSD A puts the
    maximum of the convex increase on the boundary)."""
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    u = rho * torch.stack([angles.cos(), angles.sin()], dim=1)
    eps = u * scale
    gradient = matrix @ weight
    increase = eps @ gradient + 0.5 * ((eps @ matrix) * eps).sum(dim=1)
    return float(increase.max())


MATRIX = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
WEIGHT = torch.tensor([0.5, -1.0], dtype=torch.float64)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("step_size", [None, 1.0])
def test_sam_sharpness_on_a_quadratic(adaptive: bool, step_size: float | None) -> None:
    rho = 0.8 if adaptive else 0.5
    model = Quadratic(MATRIX, WEIGHT)
    scale = WEIGHT.abs() if adaptive else torch.ones(2, dtype=torch.float64)
    exact = brute_force_max(MATRIX, WEIGHT, rho, scale)
    first = sam_sharpness(model, mean_loss, QUADRATIC_DATA, rho=rho, adaptive=adaptive, steps=1)
    result = sam_sharpness(
        model,
        mean_loss,
        QUADRATIC_DATA,
        rho=rho,
        adaptive=adaptive,
        steps=10,
        step_size=None if step_size is None else step_size * rho,
    )
    # The first-order point, by hand: eps = rho T^2 g / ||T g||.
    gradient = MATRIX @ WEIGHT
    eps = rho * scale**2 * gradient / (scale * gradient).norm()
    by_hand = float(eps @ gradient + 0.5 * eps @ MATRIX @ eps)
    assert first.sharpness == pytest.approx(by_hand, rel=1e-12)
    assert first.loss == pytest.approx(float(0.5 * WEIGHT @ MATRIX @ WEIGHT), rel=1e-14)
    assert 0 < first.sharpness < result.sharpness <= exact * (1 + 1e-9)  # grid resolution
    assert result.sharpness == pytest.approx(exact, rel=1e-3)
    assert result.perturbed_loss - result.loss == result.sharpness
    assert torch.equal(model.weight.detach(), WEIGHT)


def test_sam_sharpness_at_a_critical_point_uses_a_random_start() -> None:
    """At w = 0 the gradient vanishes; the ascent still finds rho^2 lambda_max / 2."""
    model = Quadratic(MATRIX, torch.zeros(2, dtype=torch.float64))
    rho = 0.3
    result = sam_sharpness(model, mean_loss, QUADRATIC_DATA, rho=rho, steps=10, seed=3)
    expected = rho**2 * float(torch.linalg.eigvalsh(MATRIX)[-1]) / 2
    assert 0 < result.sharpness <= expected * (1 + 1e-12)
    assert result.sharpness == pytest.approx(expected, rel=1e-3)


def test_sam_sharpness_on_the_net(setup) -> None:
    net, batches, _, _ = setup
    plain = sam_sharpness(net, F.cross_entropy, batches)
    one_step = sam_sharpness(net, F.cross_entropy, batches, steps=1)
    adaptive = sam_sharpness(net, F.cross_entropy, batches, adaptive=True)
    assert plain.sharpness >= one_step.sharpness > 0
    assert adaptive.sharpness > 0 and adaptive.sharpness != plain.sharpness
    assert plain.loss == one_step.loss == adaptive.loss
    zero = sam_sharpness(net, F.cross_entropy, batches, rho=0)
    assert zero.sharpness == 0


def test_m_sharpness(setup) -> None:
    net, batches, _, _ = setup
    whole = m_sharpness(net, F.cross_entropy, batches, m=16)
    single = sam_sharpness(net, F.cross_entropy, batches, steps=1)
    assert whole.per_chunk == [whole.sharpness] and whole.dropped == 0
    assert whole.sharpness == pytest.approx(single.sharpness, rel=1e-10)

    chunks = m_sharpness(net, F.cross_entropy, batches, m=5, steps=2)
    assert len(chunks.per_chunk) == 16 // 5 and chunks.dropped == 1
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    second = sam_sharpness(net, F.cross_entropy, [(inputs[5:10], targets[5:10])], steps=2)
    assert chunks.per_chunk[1] == pytest.approx(second.sharpness, rel=1e-12)
    assert chunks.sharpness == pytest.approx(sum(chunks.per_chunk) / 3, rel=1e-14)


# --------------------------------------------------------------------------- model untouched


def bn_net() -> nn.Module:
    """Training mode, a BatchNorm layer, a frozen bias, existing gradients, a submodule in eval
    mode, and running statistics that moved away from their initial values."""
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 3)
    ).double()
    net.train()
    for x, _ in make_batches():
        net(x)  # move the running statistics
    net[0].bias.requires_grad_(False)
    net[3].eval()
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    net[4].bias.grad = None
    return net


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert [m.training for m in model.modules()] == before["training"]
    for p, saved in zip(model.parameters(), before["grads"], strict=True):
        if saved is None:
            assert p.grad is None
        else:
            assert p.grad is saved[0] and torch.equal(p.grad, saved[1])


def _vector(model: nn.Module) -> list[Tensor]:
    return [torch.ones_like(p) for p in model.parameters() if p.requires_grad]


CALLS: dict[str, Callable[..., Any]] = {
    "hvp": lambda m, b, **kw: hessian_vector_product(m, F.cross_entropy, b, _vector(m), **kw),
    "eigenvalues": lambda m, b, **kw: top_eigenvalues(
        m, F.cross_entropy, b, k=2, return_vectors=True, **kw
    ),
    "trace": lambda m, b, **kw: hessian_trace(m, F.cross_entropy, b, samples=3, **kw),
    "density": lambda m, b, **kw: spectral_density(
        m, F.cross_entropy, b, lanczos_steps=4, probes=2, **kw
    ),
    "sam": lambda m, b, **kw: sam_sharpness(m, F.cross_entropy, b, steps=3, **kw),
    "asam": lambda m, b, **kw: sam_sharpness(m, F.cross_entropy, b, adaptive=True, **kw),
    "m_sharpness": lambda m, b, **kw: m_sharpness(m, F.cross_entropy, b, m=5, steps=2, **kw),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("name", list(CALLS))
def test_model_unchanged(name: str, train_mode: bool) -> None:
    model = bn_net()
    before = snapshot(model)
    with torch.no_grad():  # the caller's grad mode does not matter
        result = CALLS[name](model, make_batches(), train_mode=train_mode)
    assert_unchanged(model, before)
    if name == "hvp":
        assert len(result) == 5  # of 6: the frozen bias is left out
    else:
        assert result.train_mode is train_mode


def test_frozen_parameter_given_explicitly() -> None:
    model = bn_net()
    before = snapshot(model)
    params = list(model.parameters())  # includes the frozen net[0].bias
    hv = hessian_vector_product(
        model, F.cross_entropy, make_batches(), [torch.ones_like(p) for p in params], params=params
    )
    assert len(hv) == len(params) and bool(hv[1].abs().sum() > 0)
    assert_unchanged(model, before)


def test_weights_restored_when_the_loss_fails_mid_ascent() -> None:
    model = bn_net()
    before = snapshot(model)
    calls = 0

    def failing(output: Tensor, target: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls > 4:  # after the gradient at w, inside the ball
            raise RuntimeError("boom")
        return F.cross_entropy(output, target)

    with pytest.raises(RuntimeError, match="boom"):
        sam_sharpness(model, failing, make_batches(), steps=3)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- errors and JSON


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, b: top_eigenvalues(m, F.cross_entropy, []), "no batches"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, iter([])), "no batches"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, [(b[0][0][:0], b[0][1][:0])]), "examples"),
        (lambda m, b: sam_sharpness(m, F.cross_entropy, [b[0][0]]), "pair of tensors"),
        (lambda m, b: top_eigenvalues(m, F.cross_entropy, b, k=0), "k must"),
        (lambda m, b: top_eigenvalues(m, F.cross_entropy, b, k=1000), "k must"),
        (lambda m, b: top_eigenvalues(m, F.cross_entropy, b, k=3, max_iter=2), "max_iter"),
        (lambda m, b: top_eigenvalues(m, F.cross_entropy, b, tol=0), "tol"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, b, samples=0), "samples"),
        (lambda m, b: spectral_density(m, F.cross_entropy, b, lanczos_steps=0), "lanczos_steps"),
        (lambda m, b: spectral_density(m, F.cross_entropy, b, sigma=-1.0), "sigma"),
        (lambda m, b: sam_sharpness(m, F.cross_entropy, b, rho=-0.1), "rho"),
        (lambda m, b: sam_sharpness(m, F.cross_entropy, b, rho=math.nan), "rho"),
        (lambda m, b: sam_sharpness(m, F.cross_entropy, b, steps=0), "steps"),
        (lambda m, b: m_sharpness(m, F.cross_entropy, b, m=17), "m must"),
        (lambda m, b: m_sharpness(m, F.cross_entropy, b, m=0), "m must"),
        (lambda m, b: hessian_vector_product(m, F.cross_entropy, b, [torch.ones(2)]), "vector"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, b, params=[torch.ones(2)]), "params"),
        (
            lambda m, b: sam_sharpness(m, lambda o, t: F.cross_entropy(o, t) * math.inf, b),
            "not finite",
        ),
        (
            lambda m, b: top_eigenvalues(
                m, lambda o, t: F.cross_entropy(o, t, reduction="none"), b
            ),
            "scalar",
        ),
    ],
)
def test_bad_arguments(call: Callable[..., Any], match: str) -> None:
    model = bn_net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model, make_batches())
    assert_unchanged(model, before)


def test_empty_batches_are_left_out(setup) -> None:
    """An empty batch has no mean loss and no weight: the measures do not see it."""
    net, batches, _, _ = setup
    empty = (batches[0][0][:0], batches[0][1][:0])
    padded = [empty, *batches, empty]
    assert hessian_trace(net, F.cross_entropy, padded, samples=3) == hessian_trace(
        net, F.cross_entropy, batches, samples=3
    )
    whole = m_sharpness(net, F.cross_entropy, padded, m=16)
    assert whole.dropped == 0 and len(whole.per_chunk) == 1


def test_no_trainable_parameters() -> None:
    model = make_net().requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        hessian_trace(model, F.cross_entropy, make_batches())


def test_to_json_round_trips(setup) -> None:
    net, batches, _, _ = setup
    results = [
        top_eigenvalues(net, F.cross_entropy, batches, k=2, return_vectors=True),
        hessian_trace(net, F.cross_entropy, batches, samples=1),
        spectral_density(net, F.cross_entropy, batches, lanczos_steps=4, probes=2),
        sam_sharpness(net, F.cross_entropy, batches, steps=2),
        m_sharpness(net, F.cross_entropy, batches, m=8),
    ]
    kinds = (Eigenvalues, Trace, Density, SamSharpness, MSharpness)
    for result, kind in zip(results, kinds, strict=True):
        assert isinstance(result, kind)
        data = result.to_json()
        assert json.loads(json.dumps(data, allow_nan=False)) == data
    eigen, trace, density, sam, msharp = (r.to_json() for r in results)
    assert "vectors" not in eigen and eigen["k"] == 2 and eigen["tol"] == 1e-4
    assert trace["std_error"] is None and trace["samples"] == 1  # one probe: no spread
    assert density["probes"] == 2 and len(density["grid"]) == 200
    assert sam["rho"] == 0.05 and sam["steps"] == 2 and sam["adaptive"] is False
    assert msharp["m"] == 8 and len(msharp["per_chunk"]) == 2


def test_progress_bar(setup, capsys: pytest.CaptureFixture[str]) -> None:
    net, batches, _, _ = setup
    hessian_trace(net, F.cross_entropy, batches, samples=3, progress=True)
    assert "Hutchinson" in capsys.readouterr().err
    hessian_trace(net, F.cross_entropy, batches, samples=3, progress=False)
    assert capsys.readouterr().err == ""
