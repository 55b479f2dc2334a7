r"""Loss landscapes in the style of Li et al. (2018), "Visualizing the Loss Landscape of Neural
Nets": the loss and accuracy along random directions around trained weights, and along the line
between two trained models.

* :func:`line`: :math:`L(w + \alpha d)` for ``alpha`` in ``linspace(-span, span, points)``.
* :func:`plane`: :math:`L(w + \alpha d_1 + \beta d_2)` on a ``grid x grid`` mesh.
* :func:`interpolate`: :math:`L((1 - t) w_a + t w_b)` for ``t`` in
  ``linspace(-extend, 1 + extend, points)``.

The directions are Gaussian and, by default, filter-normalized (:func:`random_directions`): each
output filter of a direction has the norm of the corresponding filter of the weights, which makes
landscapes of differently scaled networks comparable, and 1-D tensors (biases, BatchNorm scales)
are not perturbed. Only parameters are perturbed; BatchNorm running statistics stay at the
model's values (except in :func:`interpolate`, which blends them too).

Grid convention: a plane's ``loss`` and ``accuracy`` are ``(grid, grid)`` arrays indexed
``[beta_index, alpha_index]``, i.e. ``loss[j, i]`` is the loss at ``(alphas[i], betas[j])``: rows
follow ``beta`` (the y axis), columns ``alpha`` (the x axis), as ``numpy.meshgrid(alphas, betas)``
and matplotlib's ``contour(alphas, betas, loss)`` expect.

Every function works on a ``copy.deepcopy`` of the model in eval mode under ``torch.no_grad``:
the caller's model is never modified. The batches are kept on the model's device for the whole
sweep, so pass a subset of the data (a few thousand samples draw a smooth landscape).

The plots are in :mod:`gcsam.plotting` (matplotlib is needed there only);
``landscape.plot_contour``, ``plot_surface``, ``plot_line`` and ``plot_comparison`` are
deprecated aliases of them, kept for one release.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._util.progress import progress_bar
from .._util.validate import check_int, check_number
from ._directions import IGNORE_1D, NORMALIZATIONS, random_directions, resolve_directions
from ._landscape_result import AXES, KINDS, Landscape
from ._measure import Batch, Batches, LossFn, model_device, prepare_batches, working_copy

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "AXES",
    "IGNORE_1D",
    "KINDS",
    "NORMALIZATIONS",
    "Landscape",
    "interpolate",
    "line",
    "plane",
    "random_directions",
]

_PLOTS = ("plot_comparison", "plot_contour", "plot_line", "plot_surface")


def __getattr__(name: str) -> Any:
    """Deprecated aliases, for one release: ``landscape.plot_*`` are now
    ``gcsam.plotting.plot_*``; imported on first use, so this module needs no matplotlib."""
    if name in _PLOTS:
        warnings.warn(
            f"gcsam.landscape.{name} moved to gcsam.plotting.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import plotting

        return getattr(plotting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _evaluate(model: nn.Module, loss_fn: LossFn, data: list[Batch]) -> tuple[float, float]:
    """Sample-weighted mean loss and accuracy (NaN without class-index targets) over ``data``.
    Sums stay on the device: one synchronization per call, not per batch."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=data[0][0].device)
    correct = torch.zeros((), dtype=torch.float64, device=loss_sum.device)
    total = 0
    classified = True
    for inputs, targets, size in data:
        outputs = model(inputs)
        loss_sum += loss_fn(outputs, targets).detach().double().to(loss_sum.device) * size
        total += size
        if (
            classified
            and outputs.dim() == 2
            and targets.dim() == 1
            and not targets.is_floating_point()
            and not targets.is_complex()
        ):
            correct += (outputs.argmax(dim=1) == targets).sum().to(correct.device)
        else:
            classified = False
    loss, hits = torch.stack((loss_sum, correct)).tolist()
    return loss / total, (hits / total if classified else math.nan)


def _sweep(
    work: nn.Module,
    loss_fn: LossFn,
    data: list[Batch],
    points: list[tuple[float, ...]],
    apply: Callable[..., None],
    progress: bool | None,
    desc: str,
) -> tuple[list[float], list[float]]:
    """Loss and accuracy of ``work`` after ``apply(*point)`` for each point."""
    losses, accuracies = [], []
    with torch.no_grad():
        for point in progress_bar(points, show=progress, desc=desc, leave=False):
            apply(*point)
            loss, accuracy = _evaluate(work, loss_fn, data)
            losses.append(loss)
            accuracies.append(accuracy)
    return losses, accuracies


def _sweep_directions(
    model: nn.Module,
    loss_fn: LossFn,
    data: list[Batch],
    directions: list[list[Tensor]],
    points: list[tuple[float, ...]],
    progress: bool | None,
    desc: str,
) -> tuple[list[float], list[float]]:
    """Loss and accuracy at ``w + sum_i point[i] directions[i]`` for each point, on a copy."""
    work = working_copy(model)
    params = list(work.parameters())
    base = [param.detach() for param in model.parameters()]  # read only: the caller's weights

    def apply(*coefficients: float) -> None:
        # From the base every time: no drift, and 0 gives the weights bit for bit.
        torch._foreach_copy_(params, base)
        for direction, coefficient in zip(directions, coefficients, strict=True):
            torch._foreach_add_(params, direction, alpha=coefficient)

    return _sweep(work, loss_fn, data, points, apply, progress, desc)


def _symmetric(span: float, count: int) -> np.ndarray:
    """``linspace(-span, span, count)`` with an exact 0 in the middle of an odd count."""
    import numpy as np

    steps = 2 * np.arange(count, dtype=np.float64) - (count - 1)
    return span * steps / (count - 1) + 0.0  # + 0.0 turns -0.0 into 0.0


def _settings(data: list[Batch], **values: Any) -> dict[str, Any]:
    return {**values, "samples": sum(size for _, _, size in data), "batches": len(data)}


def line(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    direction: Sequence[Tensor] | None = None,
    span: float = 1.0,
    points: int = 21,
    seed: int = 0,
    normalization: str = "filter",
    ignore_1d: str = "zero",
    progress: bool | None = None,
) -> Landscape:
    """The 1-D landscape ``L(w + alpha d)`` for ``alpha`` in ``linspace(-span, span, points)``.

    ``direction`` (one tensor per parameter) defaults to
    ``random_directions(model, seed=seed, normalization=..., ignore_1d=...)``. ``loss_fn`` is
    mean-reduced (like ``F.cross_entropy``); the loss is averaged over the batches weighted by
    their sizes. Cost: ``points`` forward passes over the batches (one more for ``origin_loss``
    when ``points`` is even, as 0 is then not on the grid).
    """
    check_number("span", span)
    check_int("points", points, 2)
    given = None if direction is None else [direction]
    directions, source = resolve_directions(
        model, given, ("direction",), seed=seed, normalization=normalization, ignore_1d=ignore_1d
    )
    data = prepare_batches(batches, model_device(model))
    alphas = _symmetric(span, points)
    grid = [(float(a),) for a in alphas]
    if points % 2 == 0:
        grid.append((0.0,))
    losses, accuracies = _sweep_directions(model, loss_fn, data, directions, grid, progress, "line")
    settings = _settings(data, span=float(span), points=points, **source)
    return _finish("line", [alphas], losses, accuracies, (points,), settings)


def plane(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    directions: Sequence[Sequence[Tensor]] | None = None,
    span: float = 1.0,
    grid: int = 21,
    seed: int = 0,
    normalization: str = "filter",
    ignore_1d: str = "zero",
    progress: bool | None = None,
) -> Landscape:
    """The 2-D landscape ``L(w + alpha d1 + beta d2)`` on a ``grid x grid`` mesh of
    ``linspace(-span, span, grid)``; ``loss[j, i]`` is at ``(alphas[i], betas[j])``.

    ``directions`` (a pair of per-parameter tensor lists) defaults to the random directions of
    seeds ``seed`` and ``seed + 1``; see :func:`line` for the rest. Cost: ``grid**2`` forward
    passes over the batches (one more when ``grid`` is even).
    """
    check_number("span", span)
    check_int("grid", grid, 2)
    if directions is not None:
        directions = list(directions)
        if len(directions) != 2:
            raise ValueError(f"directions must be a pair of directions, got {len(directions)}")
    pair, source = resolve_directions(
        model,
        directions,
        ("directions[0]", "directions[1]"),
        seed=seed,
        normalization=normalization,
        ignore_1d=ignore_1d,
    )
    data = prepare_batches(batches, model_device(model))
    coords = _symmetric(span, grid)
    # Row-major over [beta, alpha]: the flat results reshape to the documented (grid, grid).
    points = [(float(a), float(b)) for b in coords for a in coords]
    if grid % 2 == 0:
        points.append((0.0, 0.0))
    losses, accuracies = _sweep_directions(model, loss_fn, data, pair, points, progress, "plane")
    settings = _settings(data, span=float(span), grid=grid, **source)
    return _finish("plane", [coords, coords.copy()], losses, accuracies, (grid, grid), settings)


def _finish(
    kind: str,
    coordinates: list[np.ndarray],
    losses: list[float],
    accuracies: list[float],
    shape: tuple[int, ...],
    settings: dict[str, Any],
) -> Landscape:
    """The landscape of a line or plane sweep; an extra last point, if any, is the origin."""
    import numpy as np

    size = math.prod(shape)
    loss = np.asarray(losses[:size], dtype=np.float64).reshape(shape)
    accuracy = np.asarray(accuracies[:size], dtype=np.float64).reshape(shape)
    if len(losses) > size:
        origin = losses[size], accuracies[size]
    else:
        center = tuple(n // 2 for n in shape)  # odd counts: the exact 0 of _symmetric
        origin = float(loss[center]), float(accuracy[center])
    return Landscape(kind, coordinates, loss, accuracy, settings, *origin)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    points: int = 21,
    extend: float = 0.25,
    progress: bool | None = None,
) -> Landscape:
    """The 1-D landscape ``L((1 - t) w_a + t w_b)`` for ``t`` in
    ``linspace(-extend, 1 + extend, points)`` (Goodfellow et al.'s linear interpolation).

    The models must share an architecture: the same parameter and buffer names and shapes.
    Floating-point buffers (BatchNorm running statistics) are interpolated like the weights
    within ``[0, 1]`` and held at the nearer model's outside it (extrapolated variances could
    turn negative); integer buffers (``num_batches_tracked``) are ``model_a``'s.
    ``torch.lerp`` gives ``model_a``'s weights exactly at ``t = 0`` and ``model_b``'s at
    ``t = 1``. ``origin_loss`` is the pair of the models' own losses (evaluated separately when
    0 or 1 is not on the grid)."""
    check_int("points", points, 2)
    check_number("extend", extend, zero=True)
    import numpy as np

    param_pairs, buffer_pairs = _matching_tensors(model_a, model_b)
    data = prepare_batches(batches, model_device(model_a))
    work = working_copy(model_a)
    apply = _interpolator(work, param_pairs, buffer_pairs)
    ts = np.linspace(-float(extend), 1.0 + float(extend), points) + 0.0
    sweep = [(float(t),) for t in ts]
    ends_at = {}
    for end in (0.0, 1.0):
        hits = np.flatnonzero(ts == end)
        if hits.size:
            ends_at[end] = int(hits[0])
        else:
            ends_at[end] = len(sweep)
            sweep.append((end,))
    losses, accuracies = _sweep(work, loss_fn, data, sweep, apply, progress, "interpolation")
    settings = _settings(data, points=points, extend=float(extend))
    return Landscape(
        "interpolation",
        [ts],
        np.asarray(losses[:points], dtype=np.float64),
        np.asarray(accuracies[:points], dtype=np.float64),
        settings,
        (losses[ends_at[0.0]], losses[ends_at[1.0]]),
        (accuracies[ends_at[0.0]], accuracies[ends_at[1.0]]),
    )


def _interpolator(
    work: nn.Module,
    param_pairs: list[tuple[Tensor, Tensor]],
    buffer_pairs: list[tuple[Tensor, Tensor]],
) -> Callable[[float], None]:
    """``apply(t)``: ``work`` (a copy of model a) at ``lerp(a, b, t)``, its floating-point
    buffers at ``lerp(a, b, clip(t, 0, 1))``."""
    params = list(work.parameters())
    buffers = [b for b in work.buffers() if b.is_floating_point() or b.is_complex()]
    starts = [a.detach() for a, _ in param_pairs]  # read only: the caller's tensors
    ends = [b.detach().to(device=a.device, dtype=a.dtype) for a, b in param_pairs]
    buffer_starts = [a.detach() for a, _ in buffer_pairs]
    buffer_ends = [b.detach().to(device=a.device, dtype=a.dtype) for a, b in buffer_pairs]

    def apply(t: float) -> None:
        torch._foreach_copy_(params, starts)
        torch._foreach_lerp_(params, ends, t)
        if buffers:
            # Extrapolated running variances can turn negative (NaN losses): the statistics
            # stay at the nearer model's outside [0, 1].
            torch._foreach_copy_(buffers, buffer_starts)
            torch._foreach_lerp_(buffers, buffer_ends, min(max(t, 0.0), 1.0))

    return apply


def _matching_tensors(
    model_a: nn.Module, model_b: nn.Module
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """The parameter pairs and the floating-point buffer pairs of two models of one
    architecture, in ``model_a``'s order; ValueError on the first mismatch."""
    if not any(True for _ in model_a.parameters()):
        raise ValueError("model_a has no parameters to interpolate")
    found: dict[str, list[tuple[Tensor, Tensor]]] = {"parameter": [], "buffer": []}
    for kind, items_a, items_b in (
        ("parameter", model_a.named_parameters(), model_b.named_parameters()),
        ("buffer", model_a.named_buffers(), model_b.named_buffers()),
    ):
        named_a, named_b = dict(items_a), dict(items_b)
        for name, a in named_a.items():
            if name not in named_b:
                raise ValueError(f"model_b has no {kind} {name!r} (model_a has)")
            b = named_b[name]
            if a.shape != b.shape:
                raise ValueError(
                    f"{kind} {name!r} has shape {tuple(a.shape)} in model_a, "
                    f"{tuple(b.shape)} in model_b"
                )
            if a.is_floating_point() or a.is_complex():
                found[kind].append((a, b))
        extra = [name for name in named_b if name not in named_a]
        if extra:
            raise ValueError(f"model_a has no {kind} {extra[0]!r} (model_b has)")
    return found["parameter"], found["buffer"]
