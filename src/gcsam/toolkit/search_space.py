"""A tuned study's search spaces and budget: the ``tune`` section of a study file, checked.

A study file's ``tune`` section gives every optimizer a search space and one trial budget::

    tune:
      trials: 8                 # per optimizer and value of the knob, the same for all
      sampler: tpe              # or grid (every setting a list; at most its product of trials)
      sampler_seed: 0           # the sampler's draws (tpe) or order (grid); another gives others
      space:
        "*":   {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}   # every optimizer
        sam:   {rho: [0.02, 0.05, 0.1, 0.2]}
        gcsam: {rho: [0.02, 0.05, 0.1, 0.2]}

A list is a categorical setting (and the grid's points); ``{low, high, log}`` a range. Every
optimizer gets the same number of trials, so a budget above an optimizer's finite space is
refused; an optimizer with nothing to tune runs once, at its defaults.

``prune`` (off unless given; ``true`` takes the defaults) stops unpromising trials early with
Optuna's median pruner on each epoch's best validation score so far::

    tune:
      prune: {startup_trials: 3, warmup_epochs: 2}

A trial is stopped after an epoch when its score is below the median of the finished trials'
scores at that epoch; the first ``startup_trials`` (default 5) trials of each optimizer, and
every trial's first ``warmup_epochs`` (default 0) epochs, are never stopped. A stopped trial
counts against the budget, as in Optuna, and is never picked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._util.validate import check_choice, check_int
from .config import CHECKS, ConfigError
from .optimizers import OPTIMIZERS

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("tpe", "grid")
TUNABLE = (
    "rho", "lr", "weight_decay", "momentum", "label_smoothing", "every", "look_alpha",
    "ae_threshold", "ascent_fraction", "dropout", "warmup_epochs", "ema_decay", "swa_start",
    "feature_penalty", "head_penalty",
)  # fmt: skip
"""Settings a search space may tune (those a run has; the knob is never one)."""
ALL = "*"
"""The space key whose settings every optimizer tunes."""

_INTEGER_SETTINGS = ("every",)
_TUNE_FIELDS = ("trials", "sampler", "sampler_seed", "seed", "space", "prune")


@dataclass(frozen=True)
class Param:
    """One setting's range: ``choices`` (a list: categorical, and the grid's points) or
    ``low`` to ``high`` (``log``: sampled on a log scale)."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.name in _INTEGER_SETTINGS:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    @property
    def points(self) -> int | None:
        """How many distinct values it holds (None: a continuous range)."""
        if self.choices is not None:
            return len(self.choices)
        if self.name in _INTEGER_SETTINGS:
            return int(self.high) - int(self.low) + 1
        return None

    def to_json(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Pruning:
    """Optuna's median pruner: ``startup_trials`` finished trials of an optimizer before any of
    its trials is stopped, and ``warmup_epochs`` epochs of each trial before it may be."""

    startup_trials: int = 5
    warmup_epochs: int = 0

    def pruner(self) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.MedianPruner(
            n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs
        )

    def to_json(self) -> dict[str, int]:
        return {"startup_trials": self.startup_trials, "warmup_epochs": self.warmup_epochs}


@dataclass(frozen=True)
class Tuning:
    """A study's tuning: ``trials`` per (value, optimizer), the sampler, the run seed of the
    trials (None: the study's first seed), each optimizer's space (:data:`ALL` for all), the
    pruning of trials (None: every trial trains to its end) and the seed of the sampler's own
    draws (the same in every cell)."""

    trials: int
    sampler: str = "tpe"
    seed: int | None = None
    space: Mapping[str, Mapping[str, Param]] = field(default_factory=dict)
    prune: Pruning | None = None
    sampler_seed: int = 0

    def space_for(self, optimizer: str) -> dict[str, Param]:
        return {**self.space.get(ALL, {}), **self.space.get(optimizer, {})}

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": self.trials,
            "sampler": self.sampler,
            "seed": self.seed,
            "space": {
                key: {name: p.to_json() for name, p in params.items()}
                for key, params in self.space.items()
            },
            # only when set: a study tuned without them keeps the definition it had before
            **({"prune": self.prune.to_json()} if self.prune is not None else {}),
            **({"sampler_seed": self.sampler_seed} if self.sampler_seed else {}),
        }


def tuning_from_mapping(value: Any, optimizers: tuple[str, ...], knob: str) -> Tuning:
    """A checked :class:`Tuning` from a study's ``tune`` mapping, or a :class:`ConfigError`
    naming the bad entry."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"tune must be a mapping ({', '.join(_TUNE_FIELDS)}), got {value!r}")
    unknown = sorted(set(value) - set(_TUNE_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown tune field(s) {', '.join(unknown)}; known: {', '.join(_TUNE_FIELDS)}"
        )
    if "trials" not in value:
        raise ConfigError("tune needs trials: the budget of every optimizer (an integer >= 1)")
    trials = check_int("tune.trials", value["trials"], 1, ConfigError)
    sampler = check_choice("tune.sampler", value.get("sampler", "tpe"), SAMPLERS, ConfigError)
    seed = value.get("seed")
    if seed is not None:
        seed = check_int("tune.seed", seed, 0, ConfigError)
    sampler_seed = check_int("tune.sampler_seed", value.get("sampler_seed", 0), 0, ConfigError)
    space_value = value.get("space", {})
    if not isinstance(space_value, Mapping):
        raise ConfigError(f"tune.space must map optimizers to settings, got {space_value!r}")
    space: dict[str, dict[str, Param]] = {}
    for key, settings in space_value.items():
        if key != ALL and key not in OPTIMIZERS and key not in optimizers:
            raise ConfigError(
                f"tune.space names an unknown optimizer {key!r}; choose from "
                f"{', '.join(optimizers)} (the study's), or {ALL!r} for every optimizer"
            )
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(f"tune.space.{key} must map settings to ranges, got {settings!r}")
        space[key] = {
            name: _param(f"tune.space.{key}.{name}", name, spec, knob)
            for name, spec in settings.items()
        }
    prune = _pruning(value.get("prune", False))
    tuning = Tuning(trials, sampler, seed, space, prune, sampler_seed)
    check_tuning(tuning, optimizers)
    return tuning


def _pruning(value: Any) -> Pruning | None:
    if value is False or value is None:
        return None
    if value is True:
        return Pruning()
    if not isinstance(value, Mapping):
        raise ConfigError(
            "tune.prune must be true, false or {startup_trials: N, warmup_epochs: N}, "
            f"got {value!r}"
        )
    known = [f.name for f in dataclasses.fields(Pruning)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown tune.prune key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(known)}")  # fmt: skip
    return Pruning(**{key: check_int(f"tune.prune.{key}", v, 0, ConfigError)
                      for key, v in value.items()})  # fmt: skip


def check_tuning(tuning: Tuning, optimizers: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` when ``tuning`` does not fit the study's ``optimizers``: a
    space for an optimizer it does not run, or a budget above an optimizer's space."""
    for key in tuning.space:
        if key != ALL and key not in optimizers:
            raise ConfigError(
                f"tune.space names {key!r}, which the study does not run; its optimizers: "
                f"{', '.join(optimizers)}"
            )
    for optimizer in optimizers:
        _check_budget(tuning, optimizer)


def _param(where: str, name: str, spec: Any, knob: str) -> Param:
    if name == knob:
        raise ConfigError(f"{where}: {name} is the study's knob; it is swept, not tuned")
    check_choice(where.rsplit(".", 1)[0] + " setting", name, TUNABLE, ConfigError)
    if isinstance(spec, list | tuple):
        if not spec:
            raise ConfigError(f"{where} must list at least one value")
        choices = tuple(CHECKS[name](where, v) for v in spec)
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where} must not repeat values, got {list(spec)}")
        return Param(name, choices=choices)
    if not isinstance(spec, Mapping) or not {"low", "high"} <= set(spec):
        raise ConfigError(
            f"{where} must be a list of values or {{low: L, high: H, log: true|false}}, "
            f"got {spec!r}"
        )
    extra = sorted(set(spec) - {"low", "high", "log"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known: low, high, log")
    low = CHECKS[name](f"{where}.low", spec["low"])
    high = CHECKS[name](f"{where}.high", spec["high"])
    if not low < high:
        raise ConfigError(f"{where}: the range is empty or inverted (low {low} >= high {high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if name in _INTEGER_SETTINGS and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: {name} is an integer; give integer low and high")
    return Param(name, low=float(low), high=float(high), log=log)


def _check_budget(tuning: Tuning, optimizer: str) -> None:
    params = tuning.space_for(optimizer)
    if not params:
        return  # untuned: one trial, of its defaults
    if tuning.sampler == "grid":
        ranges = [p.name for p in params.values() if p.choices is None]
        if ranges:
            raise ConfigError(
                f"tune.sampler grid needs a list of values for every setting; {optimizer}'s "
                f"{', '.join(ranges)} is a range (list its points, or use sampler tpe)"
            )
    points = math.prod(p.points or math.inf for p in params.values())
    if tuning.trials > points:
        raise ConfigError(
            f"tune.trials ({tuning.trials}) is more than the {points} distinct settings of "
            f"{optimizer}'s space: every optimizer needs the same budget, so lower trials or "
            "widen that space"
        )
