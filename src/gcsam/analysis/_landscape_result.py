"""What a landscape sweep returns: :class:`Landscape`, a grid of losses and accuracies, and its
files (``.npz`` arrays beside ``.json`` metadata). Its own module so that the sweeps
(:mod:`~gcsam.analysis.landscape`) and the figures (:mod:`~gcsam.analysis.plotting`) both read
it without importing each other."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._util.strict_json import strict_json

if TYPE_CHECKING:
    import numpy as np

KINDS = ("line", "plane", "interpolation")
AXES: dict[str, tuple[str, ...]] = {
    "line": ("alpha",),
    "plane": ("alpha", "beta"),
    "interpolation": ("t",),
}
"""Names of each kind's coordinates, in the order of :attr:`Landscape.coordinates`."""
_FORMAT = 1  # version of the saved files


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
# evaluation
