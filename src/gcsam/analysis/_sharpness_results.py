"""What the flatness measures of :mod:`~gcsam.analysis.sharpness` return: one frozen dataclass
each, with the numbers and the settings that produced them (``to_json()`` for the files)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from .._util.strict_json import strict_json


@dataclass(frozen=True)
class SharpnessResult:
    """Base of the results: ``to_json()`` gives the numbers and the settings used."""

    def to_json(self) -> dict[str, Any]:
        """Every field except those marked ``json=False`` (tensors), as plain JSON values."""
        return {
            f.name: strict_json(getattr(self, f.name))
            for f in fields(self)
            if f.metadata.get("json", True)
        }


@dataclass(frozen=True)
class Eigenvalues(SharpnessResult):
    """Top-``k`` Hessian eigenvalues by Lanczos.

    ``values``: descending (algebraic); ``iterations``: Lanczos steps (size of ``T``);
    ``hvp_count``: Hessian-vector products used; ``converged``: every top-``k`` Ritz residual
    met ``tol`` (or the Krylov space became invariant). ``vectors``: unit Ritz vectors, one list
    of parameter-shaped tensors per value (``return_vectors=True``); not in ``to_json``.
    """

    values: list[float]
    iterations: int
    hvp_count: int
    converged: bool
    tol: float
    k: int
    max_iter: int
    seed: int
    train_mode: bool
    vectors: list[list[Tensor]] | None = field(
        default=None, repr=False, compare=False, metadata={"json": False}
    )


@dataclass(frozen=True)
class Trace(SharpnessResult):
    """Hutchinson estimate of ``tr H``; ``std_error`` is NaN (``None`` in JSON) for one sample."""

    trace: float
    std_error: float
    samples: int
    seed: int
    train_mode: bool


@dataclass(frozen=True)
class Density(SharpnessResult):
    """Stochastic Lanczos quadrature: per probe, the nodes (Ritz values) and their weights
    (summing to 1); the Gaussian-broadened density (per unit eigenvalue) on ``grid``."""

    eigenvalue_nodes: list[list[float]]
    weights: list[list[float]]
    grid: list[float]
    density: list[float]
    lanczos_steps: int
    probes: int
    seed: int
    sigma: float
    train_mode: bool


@dataclass(frozen=True)
class SamSharpness(SharpnessResult):
    """``sharpness = perturbed_loss - loss >= 0``: the largest loss found in the rho-ball
    (``w`` included) minus the loss at ``w``. ``step_size=None``: conditional-gradient jumps."""

    sharpness: float
    loss: float
    perturbed_loss: float
    rho: float
    adaptive: bool
    steps: int
    step_size: float | None
    seed: int | None
    train_mode: bool


@dataclass(frozen=True)
class MSharpness(SharpnessResult):
    """m-sharpness: ``sharpness`` is the mean of ``per_chunk`` (one SAM sharpness per chunk of
    ``m`` examples); ``dropped`` examples of the last partial chunk were left out."""

    sharpness: float
    per_chunk: list[float]
    m: int
    rho: float
    adaptive: bool
    steps: int
    seed: int
    dropped: int
    train_mode: bool
