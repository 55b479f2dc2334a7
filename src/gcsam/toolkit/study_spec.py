"""What a study is: :class:`Study` (one setting, the knob, swept over values x optimizers x
seeds, everything else equal), the built-in :data:`STUDIES`, reading a YAML, TOML or JSON study
file (:func:`read_study_file`) and checking one (:func:`check_study`), and where each run of its
grid goes (:func:`cells`, :func:`value_dir`). Running one is :mod:`.study`.

The built-in studies stand in for the paper's small, noisy medical data with Fashion-MNIST.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util.validate import check_choice, check_int
from .compare import (
    DEFAULT_OPTIMIZERS,
    DEFAULT_SEEDS,
    Entry,
    entry_settings,
    row_labels,
    run_configs,
)
from .config import CHECKS, ConfigError, TrainConfig, check_plain
from .flags import read_mapping_file
from .search_space import Tuning, check_tuning, tuning_from_mapping

# What a study sweeps must vary the run, not name it: the seed and the optimizer are the grid's
# other two axes.
_NOT_KNOBS = ("optimizer", "seed", "extra")
_FLATNESS_KEYS = ("max_samples", "trace_samples")

# Flatness for the built-in studies: the top eigenvalue on 1,000 training images takes about
# 15 s per Fashion-MNIST run; the trace's 50 Hessian-vector products (the compare default) take
# 2 min, so it is estimated from 10 here.
_STUDY_FLATNESS = {"max_samples": 1000, "trace_samples": 10}


@dataclass(frozen=True)
class Study:
    """A grid of runs: ``knob`` in ``values`` x ``optimizers`` x ``seeds``.

    Attributes:
        name: names the default output folder, ``runs/study-<name>``.
        knob: the :class:`TrainConfig` setting swept (``train_size``, ``label_noise``, ...).
        values: the knob's values, in the order of the report and the plot.
        settings: every other setting shared by all runs (``TrainConfig`` keys).
        optimizers, seeds: the other two axes; GCSAM (when present) is tested against the rest.
            An optimizer is a registered name or a variant with settings of its own
            (:data:`~gcsam.toolkit.compare.Entry`).
        flatness: ``max_samples`` and ``trace_samples`` of the flatness measured on every final
            model (:func:`~gcsam.toolkit.measure.add_flatness`); None measures none.
        description: one paragraph for the report and ``--list``.
        tune: each optimizer's search space and the trial budget (:mod:`.tuning`); None runs
            every optimizer at its settings.
    """

    name: str
    knob: str
    values: tuple[Any, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    optimizers: tuple[Entry, ...] = DEFAULT_OPTIMIZERS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    flatness: Mapping[str, Any] | None = field(default_factory=lambda: dict(_STUDY_FLATNESS))
    description: str = ""
    tune: Tuning | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "knob": self.knob,
            "values": list(self.values),
            "optimizers": [o if isinstance(o, str) else dict(o) for o in self.optimizers],
            "seeds": list(self.seeds),
            "settings": dict(self.settings),
            "flatness": dict(self.flatness) if self.flatness is not None else None,
            **({"tune": self.tune.to_json()} if self.tune is not None else {}),
        }

    @property
    def labels(self) -> tuple[str, ...]:
        """The report's name of every optimizer (a variant's label)."""
        return tuple(row_labels(self.optimizers))


_FASHION = {"dataset": "fashion-mnist", "model": "convnet", "val_fraction": 0.05}
_STUDY_OPTIMIZERS = ("adam", "sam", "gcsam", "m-gcsam")

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            name="small-data",
            knob="train_size",
            values=(500, 1000, 2000),
            settings={**_FASHION, "epochs": 20},
            optimizers=_STUDY_OPTIMIZERS,
            description="Fashion-MNIST with 500, 1,000 and 2,000 training images (stratified, "
            "seeded), the convnet default model for 20 epochs: a model that can memorize its "
            "training set, as on the paper's few-hundred-image ultrasound data. Validation "
            "(3,000) and test (10,000) splits are the full ones.",
        ),
        Study(
            name="noisy-labels",
            knob="label_noise",
            values=(0.0, 0.2, 0.4),
            settings={**_FASHION, "train_size": 2000, "epochs": 15},
            optimizers=_STUDY_OPTIMIZERS,
            description="Fashion-MNIST, 2,000 training images of which 0, 20 or 40 % carry a "
            "wrong label (symmetric noise), the convnet for 15 epochs; validation and test "
            "labels clean. Foret et al. (2021) report SAM far ahead of SGD under label noise.",
        ),
    )
}
"""The built-in studies, by name (``gcsam study --list``)."""


# --------------------------------------------------------------------------------------------
# Defining a study
# --------------------------------------------------------------------------------------------

_STUDY_FIELDS = tuple(f.name for f in dataclasses.fields(Study))


def study_from_mapping(values: Mapping[str, Any], default_name: str) -> Study:
    """A checked :class:`Study` from a mapping of its fields (a study file's content); ``name``
    defaults to ``default_name``. Raises :class:`ConfigError` naming the bad field."""
    unknown = sorted(set(values) - set(_STUDY_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown study field(s) {', '.join(unknown)}; known: {', '.join(_STUDY_FIELDS)}"
        )
    missing = [key for key in ("knob", "values", "settings") if key not in values]
    if missing:
        raise ConfigError(f"a study needs {', '.join(missing)} (see gcsam study --help)")
    flatness = values.get("flatness", _STUDY_FLATNESS)
    optimizers = _sequence("optimizers", values.get("optimizers", DEFAULT_OPTIMIZERS))
    tune = values.get("tune")
    study = Study(
        name=values.get("name", default_name),
        knob=values["knob"],
        values=_sequence("values", values["values"]),
        settings=values["settings"],
        optimizers=optimizers,
        seeds=_sequence("seeds", values.get("seeds", DEFAULT_SEEDS)),
        flatness=None if flatness is False else (_STUDY_FLATNESS if flatness is True else flatness),
        description=values.get("description", ""),
        tune=None
        if tune is None
        else tuning_from_mapping(tune, tuple(row_labels(optimizers)), values["knob"]),
    )
    return check_study(study)


def _sequence(name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{name} must be a non-empty list, got {value!r}")
    return tuple(value)


MAX_RUNS = 10_000
"""The most runs a study may hold (values x optimizers x seeds), counted before anything else
is built: a few hundred is already days of CPU."""


def check_study(study: Study) -> Study:
    """``study`` with its values in their canonical types (``"0.2"`` -> 0.2), or a
    :class:`ConfigError` naming the problem: a grid beyond :data:`MAX_RUNS`, an unknown or
    reserved knob, a knob also set in ``settings``, repeated values or seeds, any run's setting
    out of range (every run is checked, so nothing is written when one is wrong)."""
    sizes = [len(getattr(study, axis)) for axis in ("values", "optimizers", "seeds")]
    if math.prod(sizes) > MAX_RUNS:
        raise ConfigError(
            f"the study has {' x '.join(map(str, sizes))} = {math.prod(sizes)} runs (values x "
            f"optimizers x seeds), more than {MAX_RUNS}; split it into smaller studies"
        )
    for seed in study.seeds:
        check_int("seeds", seed, 0, ConfigError)
    if len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"seeds must not repeat, got {list(study.seeds)}")
    if not isinstance(study.name, str) or not re.fullmatch(r"[\w.+-]+", study.name):
        raise ConfigError(
            f"name must be letters, digits and . _ + - (it names a folder), got {study.name!r}"
        )
    if not isinstance(study.description, str):
        raise ConfigError(f"description must be text, got {study.description!r}")
    if study.knob in _NOT_KNOBS:
        raise ConfigError(
            f"knob {study.knob!r} cannot be swept: optimizers and seeds are the study's other "
            "axes (list them under optimizers and seeds)"
        )
    check_choice("knob", study.knob, [k for k in CHECKS if k not in _NOT_KNOBS], ConfigError)
    if not isinstance(study.settings, Mapping):
        raise ConfigError(
            f"settings must be a mapping of training settings, got {study.settings!r}"
        )
    check_plain("settings", dict(study.settings))
    unknown = sorted(set(study.settings) - set(CHECKS))
    if unknown:  # else TrainConfig(**settings) below raises a TypeError, not a ConfigError
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} in settings; known: {', '.join(CHECKS)}"
        )
    clash = sorted({study.knob, *_NOT_KNOBS} & set(study.settings))
    if clash:
        raise ConfigError(
            f"settings must not set {', '.join(clash)}: the knob is swept, and optimizers and "
            "seeds are listed apart"
        )
    values = tuple(_knob_value(study.knob, v) for v in study.values)
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"values of {study.knob} must not repeat, got {list(study.values)}")
    folders = [_value_folder(study.knob, v) for v in values]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"values of {study.knob} must not repeat, got {list(study.values)}")
    study = dataclasses.replace(study, values=values, flatness=_flatness(study.flatness))
    for entry in study.optimizers:
        label, own = entry_settings(entry)
        if study.knob in own:
            raise ConfigError(f"variant {label} must not set {study.knob}: it is the study's knob")
    if study.tune is not None:
        check_tuning(study.tune, study.labels)
    for value, cfg in cells(study, tuning_corners(study)):
        try:
            cfg.resolved()
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"study {study.name}, {study.knob}={value}: {error}") from None
    return study


def tuning_corners(study: Study) -> dict[tuple[Any, str], dict[str, Any]] | None:
    """A setting of every tuned optimizer from its space (the first value or the low end), so
    that checking the grid also checks what tuning adds to the settings."""
    if study.tune is None:
        return None
    corners = {}
    for label in study.labels:
        space = study.tune.space_for(label)
        setting = {n: p.choices[0] if p.choices else p.low for n, p in space.items()}
        corners |= {(value, label): setting for value in study.values}
    return corners


def _knob_value(knob: str, value: Any) -> Any:
    return None if value is None else CHECKS[knob](knob, value)


def _flatness(flatness: Any) -> dict[str, Any] | None:
    if flatness is None:
        return None
    if not isinstance(flatness, Mapping):
        raise ConfigError(
            f"flatness must be true, false or a mapping of {', '.join(_FLATNESS_KEYS)}, "
            f"got {flatness!r}"
        )
    unknown = sorted(set(flatness) - set(_FLATNESS_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown flatness setting(s) {', '.join(unknown)}; known: {', '.join(_FLATNESS_KEYS)}"
        )
    checked = dict(_STUDY_FLATNESS) | dict(flatness)
    for key, low in (("max_samples", 1), ("trace_samples", 0)):
        value = checked[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"flatness.{key} must be an integer >= {low}, got {value!r}")
    return checked


def read_study_file(path: str | Path) -> Study:
    """The study a YAML, TOML or JSON file defines; its name defaults to the file's stem.
    Raises :class:`ConfigError` starting with the path."""
    path = Path(path)
    try:
        return study_from_mapping(read_mapping_file(path), path.stem)
    except ConfigError as error:
        raise ConfigError(f"study file {path}: {error}") from None


def find_study(name_or_path: str) -> Study:
    """A built-in study by name, or the study in a file (a path ending .yaml, .yml, .toml or
    .json)."""
    if Path(name_or_path).suffix in (".yaml", ".yml", ".toml", ".json"):
        return read_study_file(name_or_path)
    if name_or_path not in STUDIES:
        raise ConfigError(
            f"unknown study {name_or_path!r}; built-in studies: {', '.join(STUDIES)}, or pass a "
            ".yaml, .toml or .json study file"
        )
    return STUDIES[name_or_path]


# --------------------------------------------------------------------------------------------
# Its runs and their folders
# --------------------------------------------------------------------------------------------


def cells(
    study: Study, tuned: Mapping[tuple[Any, str], Mapping[str, Any]] | None = None
) -> list[tuple[Any, TrainConfig]]:
    """(knob value, config) of every run, seeds outermost, then values, then optimizers: after
    the first seed every regime has one run of each optimizer, and the estimate of the time
    left has a measured run of each kind. ``tuned`` adds each (value, optimizer)'s picked
    setting."""
    out = []
    for seed in study.seeds:
        for value in study.values:
            settings = {**study.settings, study.knob: value}
            for cfg in run_configs(settings, study.optimizers, (seed,)):
                extra = (tuned or {}).get((value, cfg.row), {})
                out.append((value, dataclasses.replace(cfg, **extra)))
    return out


def _value_folder(knob: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    folder = f"{knob.replace('_', '-')}-{text}"
    if not re.fullmatch(r"[\w.+-]+", folder):
        raise ConfigError(
            f"value {value!r} of {knob} cannot name a folder; use letters, digits and . _ + -"
        )
    return folder


def value_dir(out: Path, study: Study, value: Any) -> Path:
    """The folder of the runs with ``knob = value``."""
    return out / _value_folder(study.knob, value)


def describe_studies(studies: Sequence[Study] | None = None) -> str:
    """``--list``: each built-in study's name, grid and description."""
    lines = []
    for study in studies if studies is not None else STUDIES.values():
        grid = (
            f"{study.knob} in {', '.join(map(str, study.values))} x "
            f"{', '.join(study.labels)} x seeds {', '.join(map(str, study.seeds))}"
        )
        lines += [f"{study.name}: {grid}", f"  {study.description}", ""]
    return "\n".join(lines).rstrip() + "\n"
