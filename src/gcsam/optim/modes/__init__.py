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

:class:`AscentFraction` (``fraction = f``; m-sharpness, Andriushchenko & Flammarion, ICML 2022)
    The full step every step, with the ascent gradient from the first :math:`m =
    \max(1, \mathrm{round}(f n))` of the batch's :math:`n` samples,
    :math:`g_m = \nabla L_{1..m}(w)`, and the descent gradient from all of them:
    :math:`w \leftarrow \mathrm{base\_step}(w, \nabla L_{1..n}(w + \rho\,\mathrm{GC}(g_m) /
    \lVert \mathrm{GC}(g_m) \rVert))`. Ascents over fewer examples generalize better in the
    paper's experiments. The passes take their part of the batch from ``opt.pass_batch(batch)``
    (a tensor, or a tuple, list or dict of them); BatchNorm statistics move in the first pass,
    on the :math:`m` samples. :math:`1 + f` passes' worth of compute per step.

Defaults, and where they come from (the toolkit's ``--help`` names the same):
:class:`Periodic` ``every=5`` and :class:`LookSAM` ``every=5, alpha=0.7`` are Liu et al.'s
(ViT with AdamW); :class:`MomentumAscent` has no setting of its own, and its radius in Becker et
al.'s official code is :math:`\rho = 3` (CIFAR-100 with SGD) or 10 (ViT with AdamW), about 60
times SAM's 0.05: the toolkit's ``m-gcsam`` defaults to 3; :class:`AdaptiveAscent`
``decay=0.9, threshold=0`` are ours (the paper schedules the threshold from 1 to -1);
:class:`AscentFraction` ``fraction=0.5`` is ours (the paper finds smaller ascent batches
generalize better). Most sources trained with SGD: with Adam (the toolkit's default base) their
radius is a value to start tuning from.

Every mode keeps the guarantees of the full step: exact restore, BatchNorm (``descending`` is
True only in a second pass), GradScaler, non-finite skips, and a ``state_dict`` that holds the
step count, :math:`g_v` and the statistics, so a resumed run continues bit for bit.

The protocol
------------
A mode is a strategy the optimizer consults: a frozen dataclass of settings, a subclass of
:class:`~gcsam.optim.modes.base.Mode`, whose hooks say what a step does. What it keeps between
steps (the step count, LookSAM's :math:`g_v`, AE-SAM's statistics) is an explicit state object,
the mode's :attr:`~Mode.State`, that the optimizer holds and hands to every hook, as optax's
transformations keep theirs: so a mode is shared, compared and replaced between steps like any
setting. The optimizer calls, with the hook's default (the full step) after it:

================================  =============================================  ==============
where                             hook                                           full step
================================  =============================================  ==============
construction, ``opt.mode = m``    ``check_base(base)``, ``check_ddp(local)``     accept
                                  ``init_state(previous)``                       keep the count
``ascent_pass()``                 ``plans_ascent(state)``: no_sync if local      True
                                  ``before_first_pass(host, state)``             nothing
``opt.pass_batch(batch)``         ``pass_batch(state, batch, ...)``              the whole batch
``first_step``                    ``ascends(host, state, scaler)``               True
                                  ``before_ascent(host, state, groups)``         nothing
``second_step``                   ``end_step(state)``                            count the step
                                  ``correct_descent(host, state, ...)``          nothing
``restore()``                     ``abort_step(state)``                          nothing
``state_dict`` / load             ``save(host, state)`` / ``load(host, entry)``  ``steps``
================================  =============================================  ==============

``host`` is the optimizer, seen through :class:`~gcsam.optim.modes.base.Host`: its param
groups, base optimizer, FSDP2 shards, and the move to a perturbed point with its exact backup.
A mode never touches the weights otherwise, so restore, skips and AMP stay the optimizer's.

A new mode is one module here with one class, plus its entry in :data:`MODES`; nothing in
:mod:`gcsam.optim.sam` changes (the README's Development section has the recipe).
"""

from __future__ import annotations

from typing import Any

from .adaptive import AdaptiveAscent
from .base import FullStep, Host, Mode, ModeState
from .fraction import AscentFraction
from .looksam import LookSAM
from .momentum import MomentumAscent
from .periodic import Periodic

__all__ = [
    "MODES",
    "AdaptiveAscent",
    "AscentFraction",
    "LookSAM",
    "Mode",
    "MomentumAscent",
    "Periodic",
]

MODES: dict[str, type[Mode]] = {
    "full": FullStep,
    "periodic": Periodic,
    "looksam": LookSAM,
    "momentum": MomentumAscent,
    "adaptive": AdaptiveAscent,
    "fraction": AscentFraction,
}
"""Every mode by the name that ``mode=`` takes and a ``state_dict`` records."""


def resolve_mode(mode: object) -> Mode | None:
    """``mode`` as a mode object (``None``: the full step every step); a name in :data:`MODES`
    gives that mode with its default settings."""
    if mode is None or mode == "full" or isinstance(mode, FullStep):
        return None
    if isinstance(mode, str) and mode in MODES:
        return MODES[mode]()
    if isinstance(mode, Mode):
        if type(mode) not in MODES.values():
            raise ValueError(
                f"{type(mode).__name__} is not a registered mode: add it to "
                "gcsam.optim.modes.MODES under the name its state dicts record"
            )
        return mode
    raise ValueError(
        f"mode must be None or one of {', '.join(repr(name) for name in MODES)}, or an "
        "instance such as gcsam.Periodic(every=5) or gcsam.LookSAM(every=5, alpha=0.7); got "
        f"{mode!r}"
    )


def mode_name(mode: Mode) -> str:
    """The name a ``state_dict`` records for ``mode``."""
    return next(name for name, cls in MODES.items() if type(mode) is cls)


def load_mode_state(mode: Mode, host: Host, entry: Any) -> ModeState:
    """The state in ``state_dict()["sharpness_aware"]``, checked against the optimizer's mode
    (``ValueError`` for another mode or a damaged entry)."""
    if not isinstance(entry, dict) or "mode" not in entry:
        raise ValueError(
            "the optimizer state's sharpness_aware entry must be a dict with a 'mode', got "
            f"{type(entry).__name__}: the checkpoint is damaged, or was not written by gcsam"
        )
    if entry["mode"] != mode_name(mode):
        raise ValueError(
            f"this state dict was saved with mode {entry['mode']!r}, and this optimizer runs "
            f"{mode_name(mode)!r}: build it with the same mode to resume"
        )
    return mode.load(host, entry)
