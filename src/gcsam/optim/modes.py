r"""Cheap sharpness-aware modes: which steps take the ascent, and where they perturb.

The full step (``mode=None``) takes two forward/backward passes every step. Each mode here keeps
part of its effect for fewer passes. Step :math:`t = 0, 1, \dots` counts the optimizer's
completed steps (``second_step`` calls, those a non-finite gradient skipped included, so every
DDP worker counts alike), :math:`g = \nabla L(w)` is the gradient at the weights, and ``ascent`` is
the full step of :class:`~gcsam.SharpnessAwareOptimizer`,
:math:`w \leftarrow \mathrm{base\_step}(w, \nabla L(w + \epsilon))` with
:math:`\epsilon = \rho\,\mathrm{GC}(g) / \lVert \mathrm{GC}(g) \rVert`.

:class:`Periodic` (``every = k``; MosaicML Composer's ``interval``; RST, Zhao et al., 2022)
    The full step when :math:`t \bmod k = 0`, a plain base step with :math:`g` otherwise.
    :math:`1 + 1/k` passes per step.

:class:`LookSAM` (``every = k``, ``alpha``; Liu et al., CVPR 2022)
    On the full steps (:math:`t \bmod k = 0`), with :math:`g_s = \nabla L(w + \epsilon)`, keep
    the part of :math:`g_s` orthogonal to :math:`g`,

    .. math:: g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2}\, g;

    on the others, descend with one pass along
    :math:`g + \alpha\,\frac{\lVert g \rVert}{\lVert g_v \rVert}\, g_v`. Norms and the inner
    product run over every parameter. :math:`1 + 1/k` passes per step; one extra copy of the
    parameters (:math:`g_v`).

:class:`MomentumAscent` (Momentum-SAM; Becker, Altrock, Risse, 2024, arXiv 2401.12033)
    Perturb along the negative normalized (centralized) momentum *before* the forward, and take
    the step's only gradient there:

    .. math::
        d = \mathrm{GC}(-m), \qquad
        w \leftarrow \mathrm{base\_step}\bigl(w, \nabla L(w + \rho\, d / \lVert d \rVert)\bigr)

    with :math:`m` the base optimizer's momentum buffer (SGD's ``momentum_buffer``, Adam's
    ``exp_avg``; in PyTorch's sign, :math:`m` follows :math:`+g`), after the base step of
    :math:`t - 1`. No perturbation at :math:`t = 0` (no momentum yet). One pass per step.

:class:`AdaptiveAscent` (``decay = delta``, ``threshold = c``; AE-SAM, Jiang et al., ICLR 2023)
    With :math:`s = \lVert g \rVert^2` (all parameters) and running statistics that start at 0,

    .. math::
        \mu \leftarrow \delta\mu + (1 - \delta)s, \qquad
        \sigma^2 \leftarrow \delta\sigma^2 + (1 - \delta)(s - \mu)^2,

    take the full step when :math:`s \ge \mu + c\,\sigma`, a plain base step with :math:`g`
    otherwise: the ascent goes to the steps whose gradient is large for this stage of training
    (a sharp region). :math:`c = 0` ascends on about half the steps; the paper moves
    :math:`c` from 1 to -1 over training (set ``opt.mode = AdaptiveAscent(...)`` between steps
    to schedule it). Non-finite :math:`s` takes the ascent path, which skips the step.

Every mode keeps the guarantees of the full step: exact restore, BatchNorm (``descending`` is
True only in a second pass), GradScaler, non-finite skips, and a ``state_dict`` that holds the
step count, :math:`g_v` and the statistics, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from .._util.validate import check_int, check_number

__all__ = ["AdaptiveAscent", "LookSAM", "Mode", "MomentumAscent", "Periodic"]


@dataclass(frozen=True)
class Periodic:
    """The full step every ``every``-th step (the first included), the base step otherwise."""

    every: int = 5

    def __post_init__(self) -> None:
        check_int(f"{type(self).__name__}(every=...)", self.every, 1)

    def ascends(self, step: int) -> bool:
        """Whether step ``step`` (0-based count of completed steps) takes the ascent."""
        return step % self.every == 0


@dataclass(frozen=True)
class LookSAM(Periodic):
    """:class:`Periodic`, with the steps between reusing the last full step's ``g_v``."""

    alpha: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("LookSAM(alpha=...)", self.alpha, zero=True)


@dataclass(frozen=True)
class MomentumAscent:
    """One pass per step, at the point the base optimizer's momentum leads away from."""


@dataclass(frozen=True)
class AdaptiveAscent:
    """The full step when the squared gradient norm is large against its running statistics."""

    decay: float = 0.9
    threshold: float = 0.0

    def __post_init__(self) -> None:
        ok = isinstance(self.decay, int | float) and not isinstance(self.decay, bool)
        if not ok or not 0 <= self.decay < 1:
            raise ValueError(f"AdaptiveAscent(decay=...) must be in [0, 1), got {self.decay!r}")
        finite = isinstance(self.threshold, int | float) and not isinstance(self.threshold, bool)
        if not finite or not math.isfinite(self.threshold):
            raise ValueError(
                f"AdaptiveAscent(threshold=...) must be a finite number, got {self.threshold!r}"
            )

    def update(self, mean: float, var: float, squared_norm: float) -> tuple[float, float, bool]:
        """The new ``(mean, var)`` after ``squared_norm``, and whether this step ascends."""
        mean = self.decay * mean + (1 - self.decay) * squared_norm
        var = self.decay * var + (1 - self.decay) * (squared_norm - mean) ** 2
        return mean, var, squared_norm >= mean + self.threshold * math.sqrt(var)


Mode = Periodic | LookSAM | MomentumAscent | AdaptiveAscent

MODE_NAMES: dict[str, type] = {
    "periodic": Periodic,
    "looksam": LookSAM,
    "momentum": MomentumAscent,
    "adaptive": AdaptiveAscent,
}


def resolve_mode(mode: object) -> Mode | None:
    """``mode`` as a mode object (``None``: the full step every step); a name in
    :data:`MODE_NAMES` gives that mode with its default settings."""
    if mode is None or mode == "full":
        return None
    if isinstance(mode, str) and mode in MODE_NAMES:
        return MODE_NAMES[mode]()
    if isinstance(mode, tuple(MODE_NAMES.values())):
        return mode
    raise ValueError(
        "mode must be None or 'full' (the ascent every step), one of "
        f"{', '.join(repr(name) for name in MODE_NAMES)}, or an instance such as "
        f"gcsam.Periodic(every=5) or gcsam.LookSAM(every=5, alpha=0.7); got {mode!r}"
    )


def mode_name(mode: Mode | None) -> str:
    """The name a ``state_dict`` records for ``mode``."""
    if mode is None:
        return "full"
    return next(name for name, cls in MODE_NAMES.items() if type(mode) is cls)


_MOMENTUM_SOURCES: tuple[tuple[tuple[type[Optimizer], ...], str], ...] = (
    ((torch.optim.SGD,), "momentum_buffer"),
    (
        (
            torch.optim.Adam,
            torch.optim.AdamW,
            torch.optim.NAdam,
            torch.optim.RAdam,
            torch.optim.Adamax,
        ),
        "exp_avg",
    ),
)


def momentum_key(base: Optimizer) -> str:
    """The state key of ``base``'s momentum buffer; ``ValueError`` naming the bases that have
    one when it has none."""
    for classes, key in _MOMENTUM_SOURCES:
        if isinstance(base, classes):
            if key == "momentum_buffer" and not all(g["momentum"] > 0 for g in base.param_groups):
                break
            return key
    raise ValueError(
        f"MomentumAscent perturbs along the base optimizer's momentum, and {type(base).__name__}"
        f"{' without momentum' if isinstance(base, torch.optim.SGD) else ''} keeps none: use "
        "SGD with momentum > 0, Adam, AdamW, NAdam, RAdam or Adamax, or another mode "
        "(Periodic, LookSAM, AdaptiveAscent) for this base"
    )
