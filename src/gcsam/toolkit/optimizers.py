"""The optimizer registry: every name the ``gcsam`` command knows, and how its step runs.

:data:`OPTIMIZERS` is the single source of truth: the CLI's choices and help, the default
settings, the report's table order and the training loop all read it. Registration order is the
report's order (plain baselines first, the sharpness-aware methods last).

To add an optimizer:

1. write it in the library (``src/gcsam/``) if it is new math;
2. add one :class:`OptimizerSpec` with :func:`register_optimizer` at the bottom of this file
   (its ``build`` turns the resolved settings into the optimizer);
3. run ``pytest tests/test_registries.py``: it builds, trains one step of, and finds in
   ``--help`` and the report, every registered name.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import GCSAM, SAM, AdaptiveAscent, AscentFraction, LookSAM, MomentumAscent, Periodic
from ..optim.modes import Mode

if TYPE_CHECKING:
    from .config import TrainConfig


class StepKind(enum.Enum):
    """How the training loop runs one step of an optimizer."""

    PLAIN = "one forward/backward, then the optimizer's step"
    CENTRALIZED = "one forward/backward, gradient centralization, then the optimizer's step"
    SHARPNESS_AWARE = "optimizer.step(closure): the closure runs at w, then at w + eps"


@dataclass(frozen=True)
class BaseSpec:
    """A first-order optimizer the others build on, with its defaults."""

    name: str
    title: str
    cls: type[torch.optim.Optimizer]
    lr: float
    weight_decay: float
    takes_momentum: bool = False

    def kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """The constructor arguments a resolved config gives this base."""
        kwargs: dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.takes_momentum:
            kwargs["momentum"] = cfg.momentum
        return kwargs


BASES: dict[str, BaseSpec] = {
    spec.name: spec
    for spec in (
        BaseSpec("sgd", "SGD", torch.optim.SGD, 0.05, 5e-4, takes_momentum=True),
        BaseSpec("adam", "Adam", torch.optim.Adam, 1e-3, 0.0),
        BaseSpec("adamw", "AdamW", torch.optim.AdamW, 1e-3, 1e-2),
    )
}

# (parameters, the base, the resolved config, the DDP wrapper or None) -> the optimizer.
Builder = Callable[[Iterable[nn.Parameter], BaseSpec, "TrainConfig", "nn.Module | None"], Any]


@dataclass(frozen=True)
class OptimizerSpec:
    """One name of ``--optimizer``.

    ``base`` fixes the base optimizer (``gc-adam`` is Adam); ``None`` takes ``--base``.
    ``default_rho`` is the radius used when ``--rho`` is not given (``None``: no radius).
    ``defaults`` says where the default radius and the mode's settings come from, and on
    which base optimizer that source used them (shown in ``--help``). ``settings`` are the
    :class:`TrainConfig` fields of :data:`OPTIMIZER_SETTINGS` this optimizer reads: ``gcsam
    train`` refuses the others when given as flags, since they would change nothing.
    """

    name: str
    summary: str
    step: StepKind
    build: Builder
    base: str | None = None
    default_rho: float | None = None
    defaults: str = ""
    settings: frozenset[str] = frozenset()

    @property
    def sharpness_aware(self) -> bool:
        return self.step is StepKind.SHARPNESS_AWARE

    def base_spec(self, chosen: str) -> BaseSpec:
        """The base optimizer: fixed by this spec, else ``chosen`` (``--base``)."""
        return BASES[self.base or chosen]


OPTIMIZERS: dict[str, OptimizerSpec] = {}

_SAM_SETTINGS = frozenset({"base", "rho", "rho_schedule", "ascent"})
_GCSAM_SETTINGS = _SAM_SETTINGS | {"normalize_by", "gc_scope", "gc_descent"}
OPTIMIZER_SETTINGS = _GCSAM_SETTINGS | {"every", "look_alpha", "ascent_fraction", "ae_threshold"}
"""The settings that only some optimizers read (see :attr:`OptimizerSpec.settings`)."""


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to :data:`OPTIMIZERS` (after the others: the report's order)."""
    if spec.name in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    if spec.base is not None and spec.base not in BASES:
        raise ValueError(f"optimizer {spec.name!r}: unknown base {spec.base!r}")
    if not spec.settings <= OPTIMIZER_SETTINGS:
        unknown = sorted(spec.settings - OPTIMIZER_SETTINGS)
        raise ValueError(f"optimizer {spec.name!r}: unknown settings {unknown}")
    OPTIMIZERS[spec.name] = spec
    return spec


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, ddp: nn.Module | None = None
) -> torch.optim.Optimizer:
    """The optimizer a resolved config names, over ``model``'s parameters; sharpness-aware
    ones get the DDP wrapper ``ddp`` (under torchrun) for ``cfg.ascent``."""
    spec = OPTIMIZERS[cfg.optimizer]
    return spec.build(model.parameters(), spec.base_spec(cfg.base), cfg, ddp)


def _plain(params: Iterable[nn.Parameter], base: BaseSpec, cfg: TrainConfig, ddp: Any) -> Any:
    return base.cls(params, **base.kwargs(cfg))


def _sam(adaptive: bool) -> Builder:
    def build(params: Iterable[nn.Parameter], base: BaseSpec, cfg: TrainConfig, ddp: Any) -> Any:
        return SAM(
            params,
            base.cls,
            rho=cfg.rho,
            adaptive=adaptive,
            model=ddp,
            ascent=cfg.ascent,
            **base.kwargs(cfg),
        )

    return build


def _gcsam(mode: Callable[[TrainConfig], Mode | None]) -> Builder:
    """GCSAM in the mode ``mode`` makes from the config (``None``: the full step)."""

    def build(params: Iterable[nn.Parameter], base: BaseSpec, cfg: TrainConfig, ddp: Any) -> Any:
        return GCSAM(
            params,
            base.cls,
            rho=cfg.rho,
            normalize_by=cfg.normalize_by,
            gc_scope=cfg.gc_scope,
            gc_descent=cfg.gc_descent,
            model=ddp,
            ascent=cfg.ascent,
            mode=mode(cfg),
            **base.kwargs(cfg),
        )

    return build


for _base in BASES.values():
    register_optimizer(
        OptimizerSpec(_base.name, f"{_base.title} alone", StepKind.PLAIN, _plain, base=_base.name)
    )
for _base in BASES.values():
    register_optimizer(
        OptimizerSpec(
            f"gc-{_base.name}",
            f"{_base.title} with gradient centralization (GC alone, no ascent)",
            StepKind.CENTRALIZED,
            _plain,
            base=_base.name,
        )
    )
register_optimizer(
    OptimizerSpec(
        "sam",
        "SAM (Foret et al., 2021) on --base",
        StepKind.SHARPNESS_AWARE,
        _sam(adaptive=False),
        default_rho=0.05,
        defaults="rho 0.05: Foret et al.'s CIFAR-10 value, with SGD",
        settings=_SAM_SETTINGS,
    )
)
register_optimizer(
    OptimizerSpec(
        "asam",
        "adaptive SAM (Kwon et al., 2021) on --base",
        StepKind.SHARPNESS_AWARE,
        _sam(adaptive=True),
        default_rho=0.5,
        defaults="rho 0.5: Kwon et al.'s CIFAR-10 value, with SGD",
        settings=_SAM_SETTINGS,
    )
)
register_optimizer(
    OptimizerSpec(
        "gcsam",
        "gradient-centralized SAM (Hassan et al., 2025) on --base",
        StepKind.SHARPNESS_AWARE,
        _gcsam(lambda cfg: None),
        default_rho=0.05,
        defaults="rho 0.05: Hassan et al.'s, with Adam (lr 1e-4) as here",
        settings=_GCSAM_SETTINGS,
    )
)
# The cheap modes of GCSAM (gcsam.modes), each at its paper's or official code's settings; where
# the source has no radius of its own, GCSAM's. The sources mostly trained with SGD; gcsam's
# default base is Adam, so their radius is a starting point to tune, not a tuned value.
for _name, _summary, _mode, _rho, _defaults, _settings in (
    (
        "periodic-gcsam",
        "GCSAM's full step every --every steps, the base step between: 1 + 1/K passes",
        lambda cfg: Periodic(every=cfg.every),
        0.05,
        "rho 0.05: GCSAM's; every 5: LookSAM's k (Composer and RST give no k of their own)",
        {"every"},
    ),
    (
        "look-gcsam",
        "LookSAM (Liu et al., 2022) with GC: full step every --every, reuses g_v between",
        lambda cfg: LookSAM(every=cfg.every, alpha=cfg.look_alpha),
        0.05,
        "every 5, look-alpha 0.7: Liu et al.'s (ViT, AdamW); rho 0.05: GCSAM's",
        {"every", "look_alpha"},
    ),
    (
        "m-gcsam",
        "Momentum-SAM (Becker et al., 2024) with GC: perturbs along the momentum, 1 pass",
        lambda cfg: MomentumAscent(),
        3.0,
        "rho 3: Becker et al.'s official code for CIFAR-100 with SGD (10 for ViT with AdamW)",
        set(),
    ),
    (
        "ae-gcsam",
        "AE-SAM (Jiang et al., 2023) with GC: the full step when ||g||^2 is large",
        lambda cfg: AdaptiveAscent(threshold=cfg.ae_threshold),
        0.05,
        "ae-threshold 0 held fixed (Jiang et al. move c from 1 to -1 over training) and "
        "decay 0.9: ours; rho 0.05: SAM's",
        {"ae_threshold"},
    ),
    (
        "f-gcsam",
        "GCSAM with the ascent from --ascent-fraction of the batch (m-sharpness, "
        "Andriushchenko & Flammarion, 2022): 1 + f passes",
        lambda cfg: AscentFraction(fraction=cfg.ascent_fraction),
        0.05,
        "ascent-fraction 0.5: ours (the paper finds smaller ascent batches generalize "
        "better); rho 0.05: GCSAM's",
        {"ascent_fraction"},
    ),
):
    register_optimizer(
        OptimizerSpec(
            _name,
            _summary,
            StepKind.SHARPNESS_AWARE,
            _gcsam(_mode),
            default_rho=_rho,
            defaults=_defaults,
            settings=_GCSAM_SETTINGS | _settings,
        )
    )
del _base, _name, _summary, _mode, _rho, _defaults, _settings
