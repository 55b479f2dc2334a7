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
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._json import strict_json

if TYPE_CHECKING:
    import numpy as np

NORMALIZATIONS = ("filter", "layer", "none")
IGNORE_1D = ("zero", "keep")
KINDS = ("line", "plane", "interpolation")
AXES: dict[str, tuple[str, ...]] = {
    "line": ("alpha",),
    "plane": ("alpha", "beta"),
    "interpolation": ("t",),
}
"""Names of each kind's coordinates, in the order of :attr:`Landscape.coordinates`."""
_EPS = 1e-10  # keeps an all-zero direction filter from dividing by zero (Li et al.'s constant)
_FORMAT = 1  # version of the saved files
_LossFn = Callable[[Tensor, Tensor], Tensor]
_Batch = tuple[Tensor, Tensor, int]


@dataclass(eq=False)
class Landscape:
    """Loss and accuracy on a 1-D or 2-D grid of weights.

    Attributes:
        kind: ``"line"``, ``"plane"`` or ``"interpolation"``.
        coordinates: 1-D float64 arrays: ``[alphas]``, ``[alphas, betas]`` or ``[ts]``.
        loss: float64, shape ``(points,)``, or ``(grid, grid)`` indexed
            ``[beta_index, alpha_index]`` for a plane (see the module docstring).
        accuracy: fraction of ``argmax == label``, same shape as ``loss``; NaN where the targets
            are not class indices (e.g. a regression loss).
        settings: how it was computed (span, points or grid, seed, normalization, ...,
            ``samples``: the number of samples each point was evaluated on).
        origin_loss: loss at the unperturbed weights (line, plane), or the pair at ``t = 0`` and
            ``t = 1`` (interpolation: each model's own loss).
        origin_accuracy: the accuracy at the same weights.
    """

    kind: str
    coordinates: list[np.ndarray]
    loss: np.ndarray
    accuracy: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    origin_loss: float | tuple[float, float] = math.nan
    origin_accuracy: float | tuple[float, float] = math.nan

    @property
    def axes(self) -> tuple[str, ...]:
        """Names of the coordinates: ``("alpha",)``, ``("alpha", "beta")`` or ``("t",)``."""
        return AXES[self.kind]

    def to_json(self) -> dict[str, Any]:
        """The metadata as a strict-JSON-ready dict (no arrays; NaN becomes None)."""
        return strict_json(
            {
                "format": _FORMAT,
                "kind": self.kind,
                "axes": list(self.axes),
                "shape": list(self.loss.shape),
                "origin_loss": self.origin_loss,
                "origin_accuracy": self.origin_accuracy,
                "loss_min": _nan_reduce(self.loss, min),
                "loss_max": _nan_reduce(self.loss, max),
                "settings": self.settings,
            }
        )

    def save(self, path_prefix: str | Path) -> dict[str, Path]:
        """Write ``<prefix>.npz`` (coordinates, loss, accuracy) and ``<prefix>.json`` (metadata);
        returns their paths under ``"npz"`` and ``"json"``."""
        import numpy as np

        npz, meta = Path(f"{path_prefix}.npz"), Path(f"{path_prefix}.json")
        npz.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(zip(self.axes, self.coordinates, strict=True))
        with open(npz, "wb") as handle:  # a file object: numpy would not append to the name
            np.savez(handle, loss=self.loss, accuracy=self.accuracy, **arrays)
        meta.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return {"npz": npz, "json": meta}

    @classmethod
    def load(cls, path_prefix: str | Path) -> Landscape:
        """Read what :meth:`save` wrote under ``path_prefix``."""
        import numpy as np

        meta = json.loads(Path(f"{path_prefix}.json").read_text())
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{path_prefix}.json: unknown landscape kind {kind!r}")
        with np.load(Path(f"{path_prefix}.npz"), allow_pickle=False) as arrays:
            coordinates = [np.asarray(arrays[name], dtype=np.float64) for name in AXES[kind]]
            loss = np.asarray(arrays["loss"], dtype=np.float64)
            accuracy = np.asarray(arrays["accuracy"], dtype=np.float64)
        return cls(
            kind=kind,
            coordinates=coordinates,
            loss=loss,
            accuracy=accuracy,
            settings=meta.get("settings", {}),
            origin_loss=_from_json(meta.get("origin_loss")),
            origin_accuracy=_from_json(meta.get("origin_accuracy")),
        )


def _from_json(value: Any) -> float | tuple[float, float]:
    if isinstance(value, list):
        return tuple(math.nan if v is None else float(v) for v in value)  # type: ignore[return-value]
    return math.nan if value is None else float(value)


def _nan_reduce(values: np.ndarray, reduce: Callable[..., float]) -> float:
    finite = [float(v) for v in values.ravel() if math.isfinite(v)]
    return reduce(finite) if finite else math.nan


# ---------------------------------------------------------------------------------------------
# directions


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def random_directions(
    model: nn.Module, *, seed: int, normalization: str = "filter", ignore_1d: str = "zero"
) -> list[Tensor]:
    """One random direction: a Gaussian tensor per parameter of ``model`` (same shapes, dtypes
    and devices, in ``model.parameters()`` order), drawn from a CPU ``torch.Generator`` seeded
    with ``seed``, so the same seed gives the same direction on any device.

    Args:
        normalization: ``"filter"`` scales each output filter (row ``d[i]`` of a tensor with
            ndim > 1) to the norm of the weights' filter ``w[i]``; ``"layer"`` scales each whole
            tensor to the weights' norm; ``"none"`` keeps the raw Gaussian.
        ignore_1d: ``"zero"`` (Li et al.'s default) leaves 1-D and 0-D tensors (biases,
            BatchNorm scales and shifts) unperturbed; ``"keep"`` perturbs them too, each scaled
            as one whole vector to the tensor's norm (unless ``normalization="none"``).
    """
    _check_choice("normalization", normalization, NORMALIZATIONS)
    _check_choice("ignore_1d", ignore_1d, IGNORE_1D)
    generator = torch.Generator().manual_seed(int(seed))
    directions = []
    for param in model.parameters():
        weight = param.detach().to(torch.float64 if param.dtype == torch.float64 else torch.float32)
        # Drawn for every tensor, zeroed or not, so that a tensor's direction does not depend
        # on ignore_1d.
        direction = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        direction = direction.to(weight.device)
        if weight.dim() <= 1 and ignore_1d == "zero":
            direction.zero_()
        elif normalization == "filter" and weight.dim() > 1:
            dims = tuple(range(1, weight.dim()))
            target = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
            direction.mul_(
                target / (torch.linalg.vector_norm(direction, dim=dims, keepdim=True) + _EPS)
            )
        elif normalization != "none":  # "layer", or a 1-D tensor kept under "filter"
            target = torch.linalg.vector_norm(weight)
            direction.mul_(target / (torch.linalg.vector_norm(direction) + _EPS))
        directions.append(direction.to(param.dtype))
    return directions


def _named_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    named = list(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters to perturb")
    return named


def _check_direction(
    direction: Sequence[Tensor], named: list[tuple[str, Tensor]], arg: str
) -> list[Tensor]:
    """``direction`` as detached tensors on each parameter's device and dtype."""
    direction = list(direction)
    if len(direction) != len(named):
        raise ValueError(
            f"{arg} has {len(direction)} tensors, the model has {len(named)} parameters"
        )
    checked = []
    for i, (tensor, (name, param)) in enumerate(zip(direction, named, strict=True)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{arg}[{i}] is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != param.shape:
            raise ValueError(
                f"{arg}[{i}] has shape {tuple(tensor.shape)}, parameter {name!r} has shape "
                f"{tuple(param.shape)}"
            )
        tensor = tensor.detach().to(device=param.device, dtype=param.dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{arg}[{i}] (parameter {name!r}) has non-finite values")
        checked.append(tensor)
    return checked


# ---------------------------------------------------------------------------------------------
# evaluation


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _prepare_batches(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> list[_Batch]:
    """The batches once, on ``device``, with their sizes (the weights of the loss average)."""
    data = []
    for inputs, targets in batches:
        size = int(targets.shape[0]) if targets.dim() > 0 else int(inputs.shape[0])
        data.append((inputs.to(device), targets.to(device), size))
    if not data:
        raise ValueError("batches is empty")
    if sum(size for _, _, size in data) == 0:
        raise ValueError("batches hold no samples")
    return data


def _working_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters need no gradient."""
    work = copy.deepcopy(model).eval()
    for param in work.parameters():
        param.requires_grad_(False)
    return work


def _evaluate(model: nn.Module, loss_fn: _LossFn, data: list[_Batch]) -> tuple[float, float]:
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


def _progress(total: int, show: bool | None, desc: str) -> Any:
    """A tqdm bar on stderr; ``show=None`` shows it only when stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if show is None else not show, desc=desc, leave=False)


def _sweep(
    work: nn.Module,
    loss_fn: _LossFn,
    data: list[_Batch],
    points: list[tuple[float, ...]],
    apply: Callable[..., None],
    progress: bool | None,
    desc: str,
) -> tuple[list[float], list[float]]:
    """Loss and accuracy after ``apply(*point)`` for each point."""
    losses, accuracies = [], []
    with torch.no_grad(), _progress(len(points), progress, desc) as bar:
        for point in points:
            apply(*point)
            loss, accuracy = _evaluate(work, loss_fn, data)
            losses.append(loss)
            accuracies.append(accuracy)
            bar.update()
    return losses, accuracies


def _symmetric(span: float, count: int) -> np.ndarray:
    """``linspace(-span, span, count)`` with an exact 0 in the middle of an odd count."""
    import numpy as np

    steps = 2 * np.arange(count, dtype=np.float64) - (count - 1)
    return span * steps / (count - 1) + 0.0  # + 0.0 turns -0.0 into 0.0


def _check_span(span: float, count: int, count_name: str) -> None:
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"{count_name} must be an integer >= 2, got {count!r}")


def _settings(data: list[_Batch], **values: Any) -> dict[str, Any]:
    return {**values, "samples": sum(size for _, _, size in data), "batches": len(data)}


def line(
    model: nn.Module,
    loss_fn: _LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
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
    _check_span(span, points, "points")
    named = _named_parameters(model)
    if direction is None:
        direction = random_directions(
            model, seed=seed, normalization=normalization, ignore_1d=ignore_1d
        )
        source: dict[str, Any] = {
            "seed": seed,
            "normalization": normalization,
            "ignore_1d": ignore_1d,
        }
    else:
        source = {"seed": None, "normalization": "given", "ignore_1d": None}
    d = _check_direction(direction, named, "direction")
    data = _prepare_batches(batches, _model_device(model))
    work = _working_copy(model)
    params = list(work.parameters())
    base = [param.detach() for _, param in named]  # read only: the caller's weights

    def apply(alpha: float) -> None:
        # From the base every time: no drift, and alpha = 0 gives the weights bit for bit.
        torch._foreach_copy_(params, base)
        torch._foreach_add_(params, d, alpha=alpha)

    alphas = _symmetric(span, points)
    grid = [(float(a),) for a in alphas]
    if points % 2 == 0:
        grid.append((0.0,))
    losses, accuracies = _sweep(work, loss_fn, data, grid, apply, progress, "line")
    return _finish(
        "line",
        [alphas],
        losses,
        accuracies,
        (points,),
        _settings(data, span=float(span), points=points, **source),
    )


def plane(
    model: nn.Module,
    loss_fn: _LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
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
    _check_span(span, grid, "grid")
    named = _named_parameters(model)
    if directions is None:
        directions = [
            random_directions(model, seed=s, normalization=normalization, ignore_1d=ignore_1d)
            for s in (seed, seed + 1)
        ]
        source: dict[str, Any] = {
            "seed": seed,
            "normalization": normalization,
            "ignore_1d": ignore_1d,
        }
    else:
        source = {"seed": None, "normalization": "given", "ignore_1d": None}
    directions = list(directions)
    if len(directions) != 2:
        raise ValueError(f"directions must be a pair of directions, got {len(directions)}")
    d1 = _check_direction(directions[0], named, "directions[0]")
    d2 = _check_direction(directions[1], named, "directions[1]")
    data = _prepare_batches(batches, _model_device(model))
    work = _working_copy(model)
    params = list(work.parameters())
    base = [param.detach() for _, param in named]

    def apply(alpha: float, beta: float) -> None:
        torch._foreach_copy_(params, base)
        torch._foreach_add_(params, d1, alpha=alpha)
        torch._foreach_add_(params, d2, alpha=beta)

    coords = _symmetric(span, grid)
    # Row-major over [beta, alpha]: the flat results reshape to the documented (grid, grid).
    points = [(float(a), float(b)) for b in coords for a in coords]
    if grid % 2 == 0:
        points.append((0.0, 0.0))
    losses, accuracies = _sweep(work, loss_fn, data, points, apply, progress, "plane")
    return _finish(
        "plane",
        [coords, coords.copy()],
        losses,
        accuracies,
        (grid, grid),
        _settings(data, span=float(span), grid=grid, **source),
    )


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
    loss_fn: _LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
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
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    if not (isinstance(extend, (int, float)) and math.isfinite(extend) and extend >= 0):
        raise ValueError(f"extend must be a finite number >= 0, got {extend!r}")
    import numpy as np

    param_pairs, buffer_pairs = _matching_tensors(model_a, model_b)
    data = _prepare_batches(batches, _model_device(model_a))
    work = _working_copy(model_a)
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


# ---------------------------------------------------------------------------------------------
# plots


def _loss_range(
    surfaces: Iterable[np.ndarray], vmin: float | None, vmax: float | None, log: bool
) -> tuple[float, float]:
    """``(vmin, vmax)``: the given values, else the finite extremes of all surfaces (positive
    ones under ``log``)."""
    import numpy as np

    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in surfaces])
    values = values[np.isfinite(values)]
    if log:
        values = values[values > 0]
    if values.size == 0:
        raise ValueError("the landscape has no finite loss values" + (" > 0" if log else ""))
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    if log and low <= 0:
        raise ValueError(f"vmin must be > 0 on a log scale, got {low}")
    if not high > low:
        high = low * (1 + 1e-6) + 1e-12  # a flat landscape still needs increasing levels
    return low, high


def _levels(low: float, high: float, levels: int, log: bool) -> np.ndarray:
    import numpy as np

    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    return np.geomspace(low, high, levels) if log else np.linspace(low, high, levels)


def _extend(surfaces: Iterable[np.ndarray], low: float, high: float) -> str:
    """contourf's ``extend``: which ends of the colour scale also cover values beyond it."""
    import numpy as np

    values = np.concatenate([np.asarray(s).ravel() for s in surfaces])
    below = bool(np.any(values[np.isfinite(values)] < low))
    above = bool(np.any(values[np.isfinite(values)] > high))
    return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (below, above), "both"
    )


def _check_planes(landscapes: dict[str, Landscape]) -> None:
    if not landscapes:
        raise ValueError("landscapes is empty")
    for name, landscape in landscapes.items():
        if landscape.kind != "plane":
            raise ValueError(f"landscapes[{name!r}] is a {landscape.kind}, not a plane")


def _check_plane(landscape: Landscape) -> None:
    if landscape.kind != "plane":
        raise ValueError(f"landscape is a {landscape.kind}, not a plane: draw it with plot_line")


def _contour_panel(
    ax: Any, landscape: Landscape, levels: np.ndarray, norm: Any, extend: str, cmap: str
) -> Any:
    """Filled contours, thin contour lines and the trained weights as a star; returns the
    filled contour set (for the colorbar)."""
    import numpy as np

    alphas, betas = landscape.coordinates
    loss = np.ma.masked_invalid(landscape.loss)
    filled = ax.contourf(alphas, betas, loss, levels=levels, norm=norm, cmap=cmap, extend=extend)
    ax.contour(
        alphas, betas, loss, levels=levels, norm=norm, colors="k", linewidths=0.4, alpha=0.45
    )
    ax.plot([0], [0], marker="*", color="white", markeredgecolor="k", markersize=11, zorder=5)
    ax.set_xlabel(r"$\alpha$ (direction 1)")
    ax.set_ylabel(r"$\beta$ (direction 2)")
    ax.set_box_aspect(1)  # both directions have the same scale
    _few_ticks(ax, "x", "y")
    return filled


def _few_ticks(ax: Any, *names: str) -> None:
    """At most 5 ticks on the named axes, so that side-by-side panels' labels do not collide."""
    from matplotlib.ticker import MaxNLocator

    for name in names:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(5))


def _colorbar(
    fig: Any, mappable: Any, ax: Any, low: float, high: float, log: bool, **kw: Any
) -> Any:
    """A colorbar with round ticks (not the contour levels) inside ``[low, high]``."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator

    if log:
        subs = (1.0,) if high / low > 1e3 else (1.0, 2.0, 5.0)
        ticks = LogLocator(subs=subs).tick_values(low, high)
    else:
        ticks = MaxNLocator(7).tick_values(low, high)
    bar = fig.colorbar(mappable, ax=ax, **kw)
    bar.set_ticks([t for t in ticks if low <= t <= high])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bar.ax.minorticks_off()
    return bar


def _norm(low: float, high: float, log: bool) -> Any:
    from matplotlib.colors import LogNorm, Normalize

    return LogNorm(low, high) if log else Normalize(low, high)


def _origin_text(landscape: Landscape) -> str:
    origin = landscape.origin_loss
    if isinstance(origin, tuple):
        return f"loss {origin[0]:.3g} / {origin[1]:.3g} at t = 0 / 1"
    return f"loss {origin:.3g} at the star"


def plot_contour(
    landscape: Landscape,
    path: str | Path,
    *,
    title: str | None = None,
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """Filled contours of a plane's loss with contour lines and a colorbar (log-spaced levels
    and colours with ``log``); values beyond ``vmin``/``vmax`` take the end colours."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open windows

    _check_plane(landscape)
    path = Path(path)
    low, high = _loss_range([landscape.loss], vmin, vmax, log)
    level_values = _levels(low, high, levels, log)
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    ax = fig.subplots()
    filled = _contour_panel(
        ax,
        landscape,
        level_values,
        _norm(low, high, log),
        _extend([landscape.loss], low, high),
        cmap,
    )
    _colorbar(fig, filled, ax, low, high, log, label="loss" + (" (log scale)" if log else ""))
    ax.set_title(title or f"Loss landscape ({_origin_text(landscape)})", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _surface_panel(
    ax: Any, landscape: Landscape, low: float, high: float, log: bool, cmap: str
) -> Any:
    """A 3-D surface of the loss clipped to ``[low, high]`` (log10 of it with ``log``)."""
    import numpy as np

    alphas, betas = landscape.coordinates
    mesh_a, mesh_b = np.meshgrid(alphas, betas)  # (grid, grid), [beta, alpha] like the loss
    z = np.clip(landscape.loss, low, high)
    if log:
        z, low, high = np.log10(z), math.log10(low), math.log10(high)
    surface = ax.plot_surface(
        mesh_a,
        mesh_b,
        np.ma.masked_invalid(z),
        cmap=cmap,
        vmin=low,
        vmax=high,
        rstride=1,
        cstride=1,
        linewidth=0.1,
        edgecolor="none",
        antialiased=True,
    )
    ax.set_zlim(low, high)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\beta$")
    _few_ticks(ax, "x", "y", "z")
    ax.view_init(elev=35, azim=-55)
    return surface


def plot_surface(
    landscape: Landscape,
    path: str | Path,
    *,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """A 3-D surface of a plane's loss; the loss is clipped to ``[vmin, vmax]`` (default: its
    range) and drawn as ``log10`` with ``log``."""
    from matplotlib.figure import Figure

    _check_plane(landscape)
    path = Path(path)
    low, high = _loss_range([landscape.loss], vmin, vmax, log)
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    _surface_panel(ax, landscape, low, high, log, cmap)
    ax.set_zlabel("log10 loss" if log else "loss")
    ax.set_title(title or f"Loss surface ({_origin_text(landscape)})", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_line(
    landscapes: dict[str, Landscape],
    path: str | Path,
    *,
    title: str | None = None,
    accuracy: bool = True,
    log: bool = False,
) -> Path:
    """1-D landscapes (lines and interpolations) on one axis: loss solid (left axis), accuracy
    dashed (right axis, in %, where defined); dotted verticals at the models (0, and 1 for an
    interpolation)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if not landscapes:
        raise ValueError("landscapes is empty")
    for name, landscape in landscapes.items():
        if landscape.kind == "plane":
            raise ValueError(f"landscapes[{name!r}] is a plane; draw it with plot_contour")
    path = Path(path)
    cmap = colormaps["tab10"]
    fig = Figure(figsize=(8.4, 4.4), layout="constrained")
    ax = fig.subplots()
    acc_ax = None
    kinds = {landscape.kind for landscape in landscapes.values()}
    for x in (0.0, 1.0) if "interpolation" in kinds else (0.0,):
        ax.axvline(x, color="0.5", linestyle=":", linewidth=1)
    handles = []
    for i, (name, landscape) in enumerate(landscapes.items()):
        color = cmap(i % 10)
        (x,) = landscape.coordinates
        handles += ax.plot(x, landscape.loss, color=color, linewidth=1.8, label=name)
        if accuracy and np.isfinite(landscape.accuracy).any():
            if acc_ax is None:
                acc_ax = ax.twinx()
                acc_ax.set_ylabel("accuracy (%), dashed")
            acc_ax.plot(x, 100 * landscape.accuracy, color=color, linestyle="--", linewidth=1.3)
    if log:
        ax.set_yscale("log")
    names = {"line": r"$\alpha$ (along the direction)", "interpolation": "t (model a to model b)"}
    ax.set_xlabel(names[next(iter(kinds))] if len(kinds) == 1 else r"$\alpha$ or t")
    ax.set_ylabel("loss" + (" (log scale)" if log else "") + ", solid")
    ax.grid(alpha=0.3)
    if acc_ax is not None:  # one entry per run (its colour) and one per line style
        handles += ax.plot([], [], color="0.3", linewidth=1.8, label="loss")
        handles += ax.plot([], [], color="0.3", linestyle="--", linewidth=1.3, label="accuracy")
    # Outside the axes: the curves fill the plot from edge to edge.
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.12, 1.0))
    ax.set_title(title or "Loss along 1-D slices", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_comparison(
    landscapes: dict[str, Landscape],
    path: str | Path,
    *,
    kind: str = "contour",
    title: str | None = None,
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """Planes of several runs side by side (e.g. ``{"adam": ..., "sam": ..., "gcsam": ...}``, like
    Li et al.'s Figure 3) on one shared colour scale: the same levels, ``vmin`` and ``vmax``
    (default: the extremes over all panels) and one colorbar. ``kind="surface"`` draws 3-D
    surfaces with a shared z range instead."""
    from matplotlib.figure import Figure

    _check_choice("kind", kind, ("contour", "surface"))
    _check_planes(landscapes)
    path = Path(path)
    surfaces = [landscape.loss for landscape in landscapes.values()]
    low, high = _loss_range(surfaces, vmin, vmax, log)
    count = len(landscapes)
    if kind == "contour":
        level_values = _levels(low, high, levels, log)
        norm, extend = _norm(low, high, log), _extend(surfaces, low, high)
        fig = Figure(figsize=(3.9 * count + 1.4, 5.0), layout="constrained")
        axes = fig.subplots(1, count, sharex=True, sharey=True, squeeze=False)[0]
        for ax, (name, landscape) in zip(axes, landscapes.items(), strict=True):
            filled = _contour_panel(ax, landscape, level_values, norm, extend, cmap)
            ax.set_title(f"{name}\n{_origin_text(landscape)}", fontsize="medium")
            ax.label_outer()
        label = "loss" + (" (log scale)" if log else "")
        _colorbar(fig, filled, list(axes), low, high, log, label=label)
    else:
        from matplotlib.cm import ScalarMappable

        fig = Figure(figsize=(4.6 * count + 1.2, 4.8), layout="constrained")
        axes = [fig.add_subplot(1, count, i + 1, projection="3d") for i in range(count)]
        for ax, (name, landscape) in zip(axes, landscapes.items(), strict=True):
            _surface_panel(ax, landscape, low, high, log, cmap)
            ax.set_title(f"{name}\n{_origin_text(landscape)}", fontsize="medium")
        scale = (math.log10(low), math.log10(high)) if log else (low, high)
        mappable = ScalarMappable(norm=_norm(*scale, log=False), cmap=cmap)
        label = "log10 loss" if log else "loss"
        _colorbar(fig, mappable, axes, *scale, log=False, shrink=0.7, label=label)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
