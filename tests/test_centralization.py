"""Properties of ``centralize_gradient`` (gradient centralization, Yong et al. 2020)."""

from __future__ import annotations

import pytest
import torch
from reference import centralize

from gcsam import centralize_gradient

SHAPES = [(7,), (3, 5), (4, 1, 6), (6, 3, 3, 3), (2, 3, 2, 2, 2), (1, 9), (5, 2)]


def rand(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # A non-zero offset makes the row means large, so that GC has something to remove.
    return torch.randn(shape, generator=gen, dtype=dtype) + 0.7


def row_means(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], -1).mean(dim=1)


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) > 1])
def test_rows_have_zero_mean_and_match_reference(shape):
    g = rand(shape)
    expected = centralize(g, "all")
    out = centralize_gradient(g)
    assert row_means(g).abs().max() < 1e-14
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-14)
    assert out is g  # in place, returns its argument


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scope", ["all", "conv"])
def test_idempotent(shape, scope):
    g = rand(shape, seed=1)
    once = centralize_gradient(g.clone(), scope)
    twice = centralize_gradient(centralize_gradient(g.clone(), scope), scope)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-14)


@pytest.mark.parametrize("scope", ["all", "conv", "none"])
def test_one_dimensional_tensors_untouched(scope):
    g = rand((11,))
    before = g.clone()
    centralize_gradient(g, scope)
    assert torch.equal(g, before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_never_increases_the_norm(shape, seed):
    g = rand(shape, seed=seed)
    norm_before = g.norm()
    centralize_gradient(g)
    assert g.norm() <= norm_before * (1 + 1e-12)
    # Pythagoras: GC is an orthogonal projection, ||g||^2 = ||GC(g)||^2 + ||g - GC(g)||^2.
    if len(shape) > 1:
        h = rand(shape, seed=seed)
        removed = h - g
        torch.testing.assert_close(
            h.norm() ** 2, g.norm() ** 2 + removed.norm() ** 2, rtol=1e-12, atol=0
        )


@pytest.mark.parametrize(
    ("shape", "touched"),
    [
        ((7,), False),
        ((3, 5), False),
        ((4, 1, 6), False),
        ((6, 3, 3, 3), True),
        ((2, 3, 2, 2, 2), True),
    ],
)
def test_conv_scope_touches_only_ndim_above_three(shape, touched):
    g = rand(shape, seed=2)
    before = g.clone()
    centralize_gradient(g, "conv")
    if touched:
        torch.testing.assert_close(g, centralize(before, "all"), rtol=0, atol=1e-14)
        assert not torch.equal(g, before)
    else:
        assert torch.equal(g, before)


@pytest.mark.parametrize("shape", SHAPES)
def test_scope_none_is_a_no_op(shape):
    g = rand(shape, seed=3)
    before = g.clone()
    assert centralize_gradient(g, "none") is g
    assert torch.equal(g, before)


def test_list_with_none_entries():
    a, b, c = rand((3, 4), 4), rand((5,), 5), rand((2, 2, 3, 3), 6)
    expected = [centralize(a), b.clone(), centralize(c)]
    grads = [a, None, b, None, c]
    out = centralize_gradient(grads)
    assert out is grads
    assert grads[1] is None and grads[3] is None
    for got, want in zip([a, b, c], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_accepts_a_generator_of_grads():
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    weight_grad = model.weight.grad.clone()
    centralize_gradient(p.grad for p in model.parameters())
    torch.testing.assert_close(model.weight.grad, centralize(weight_grad).float())


def test_returns_its_argument_for_a_tensor():
    g = rand((3, 4))
    assert centralize_gradient(g) is g
    t = (rand((3, 4)),)
    assert centralize_gradient(t) is t


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, atol):
    g32 = rand((8, 4, 3, 3), seed=7, dtype=torch.float32)
    g = g32.to(dtype)
    expected = centralize(g, "all")  # GC of the same (rounded) values, in float64
    centralize_gradient(g)
    torch.testing.assert_close(g.double(), expected, rtol=0, atol=atol)
    # The row means are removed up to the rounding of the storage format.
    assert row_means(g).abs().max() < atol


def test_bad_scope_raises_value_error_naming_scope():
    with pytest.raises(ValueError, match="scope"):
        centralize_gradient(rand((3, 4)), "conv2d")
    with pytest.raises(ValueError, match="scope"):
        centralize_gradient(rand((3, 4)), None)


def test_sparse_raises():
    g = rand((3, 4)).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        centralize_gradient(g)


def test_column_weight_becomes_zero():
    # The paper's rule, kept as is: a weight of shape (C, 1) has a single element per output
    # unit, which is its own mean, so its centralized gradient is exactly zero.
    g = rand((6, 1))
    centralize_gradient(g)
    assert torch.equal(g, torch.zeros(6, 1, dtype=g.dtype))
    # The same holds for (C, 1, 1, 1) kernels (1x1 conv from one channel) under "conv".
    k = rand((4, 1, 1, 1))
    centralize_gradient(k, "conv")
    assert torch.equal(k, torch.zeros_like(k))
