"""A study: one setting (the knob) swept over values x optimizers x seeds, everything else equal,
then one report with a table per value, a plot of accuracy against the knob and the flatness of
every final model.

:data:`STUDIES` holds the built-in studies, which stand in for the paper's small, noisy medical
data with Fashion-MNIST; a YAML, TOML or JSON file defines any other (:func:`read_study_file`).

Layout of the output folder ``OUT``::

    OUT/study.json                          the study as last run
    OUT/<knob>-<value>/<optimizer>-seed<k>/ one run (as gcsam train writes it)
    OUT/<knob>-<value>/report.md, ...       that value's comparison report
    OUT/report.md, study.csv, study.png     the study's report

Rerunning a study continues it: finished runs and measurements are kept, a stopped run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util.validate import check_choice, check_int
from .compare import (
    DEFAULT_OPTIMIZERS,
    DEFAULT_SEEDS,
    Entry,
    apply_common_target,
    comparison_run_dir,
    entry_settings,
    reference_optimizer,
    row_labels,
    run_configs,
    train_or_keep,
)
from .config import CHECKS, ConfigError, TrainConfig, check_plain
from .flags import read_mapping_file
from .jobs import helpers
from .measure import FLATNESS_SETTINGS, add_flatness
from .report import load_runs, summarize, write_report
from .report.study import StudyData, format_study_report, write_study_report
from .run_inputs import check_regimes
from .rundir import RunBusyError, read_summary, run_lock, write_json_atomic
from .search_space import Tuning, check_tuning, tuning_from_mapping
from .tuning import (
    Picked,
    default_storage,
    reuse_trial_run,
    run_tuning,
    tuning_cells,
    tuning_record,
)
from .world import is_main_process

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
    for value, cfg in cells(study, _corners(study)):
        try:
            cfg.resolved()
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"study {study.name}, {study.knob}={value}: {error}") from None
    return study


def _corners(study: Study) -> dict[tuple[Any, str], dict[str, Any]] | None:
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
# Running a study
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


def run_study(
    study: Study,
    out_dir: str | Path | None = None,
    *,
    plots: bool = True,
    progress: bool | None = None,
    storage: str | None = None,
    jobs: int = 1,
    tune_only: bool = False,
) -> str:
    """Train every run of ``study`` not yet finished, measure the flatness of every final model
    not yet measured, and write the report; returns it as Markdown ("" on torchrun's workers
    other than rank 0). Rank 0 holds the lock of ``out_dir`` throughout.

    A study with ``tune`` first runs its trials (:mod:`.tuning`) in ``storage`` (default
    ``out_dir/optuna.db``), then trains the picked settings; ``tune_only`` stops after the
    trials (a helper worker of a study shared by machines). ``jobs`` processes share the trials
    and the runs, each on its share of the CPU threads."""
    study = check_study(study)
    out = Path(out_dir) if out_dir else Path(f"runs/study-{study.name}")
    check_int("jobs", jobs, 1, ConfigError)
    if study.tune is None and (storage is not None or tune_only):
        raise ConfigError(
            "--storage and --tune-only tune a study: give it a tune section (see "
            "gcsam study --help)"
        )
    grid = cells(study, _corners(study))
    check_regimes([cfg for _, cfg in grid])
    main = is_main_process()
    with run_lock(out) if main else contextlib.nullcontext():
        tuned: dict[tuple[Any, str], Picked] = {}
        record = None
        if study.tune is not None:
            tuned = run_tuning(study, out, storage or default_storage(out), jobs, progress)
            if tune_only:
                return ""
            grid = cells(study, {key: p.params for key, p in tuned.items()})
            record = tuning_record(study, tuned)
        if main:
            write_json_atomic(out / "study.json", study.to_json())
            if record is not None:
                write_json_atomic(out / "tuning.json", record)
        clock = _Clock(study, len(grid), show=progress is not False and main)
        trial_cells = {(c.value, c.optimizer): c for c in tuning_cells(study, out)} if tuned else {}
        runs = [(cfg, value_dir(out, study, value)) for value, cfg in grid]
        if main:  # before any helper starts, so that no two processes copy one run
            for (value, cfg), (_, folder) in zip(grid, runs, strict=True):
                cell = trial_cells.get((value, cfg.row))
                if cell is not None:
                    reuse_trial_run(
                        cell,
                        tuned[value, cfg.row].params,
                        cfg.seed,
                        comparison_run_dir(cfg, folder),
                    )
        with helpers(train_free_runs, (runs,), jobs if main else 1, "study"):
            for (value, cfg), (_, folder) in zip(grid, runs, strict=True):
                run_dir = comparison_run_dir(cfg, folder)
                clock.announce(value, cfg, run_dir)
                with contextlib.suppress(RunBusyError):  # a helper trains it
                    train_or_keep(cfg, folder, progress)
                clock.done(value, cfg, run_dir)
        run_dirs: dict[Any, list[Path]] = {value: [] for value in study.values}
        for (value, _), (cfg, folder) in zip(grid, runs, strict=True):
            # what a helper trained is kept; what a failed helper left is trained here
            run_dirs[value].append(train_or_keep(cfg, folder, progress))
        if not main:
            return ""
        if study.flatness is not None:
            _measure_flatness(study, run_dirs, clock, progress)
        data, frontiers = {}, {}
        target = grid[0][1].resolved().target_accuracy  # shared, unless it is the knob
        for value, dirs in run_dirs.items():
            finished = [run.path for run in load_runs(dirs) if not run.diverged]
            if finished:
                apply_common_target(finished, value if study.knob == "target_accuracy" else target)
            data[value] = summarize(load_runs(dirs), reference_optimizer(study.optimizers))
            folder = value_dir(out, study, value)
            if "frontier" in write_report(data[value], folder, plots=plots):
                frontiers[value] = f"{folder.name}/frontier.png"
        result = StudyData(study.to_json(), data, record, frontiers)
        write_study_report(result, out, plots=plots)
        return format_study_report(result)


def train_free_runs(runs: list[tuple[TrainConfig, Path]]) -> None:
    """A ``--jobs`` helper of a study: train, quietly, every run not finished and not held by
    another process."""
    for cfg, folder in runs:
        if read_summary(comparison_run_dir(cfg, folder)) is None:
            with contextlib.suppress(RunBusyError):
                train_or_keep(cfg, folder, progress=False)


def _measure_flatness(
    study: Study, run_dirs: dict[Any, list[Path]], clock: _Clock, progress: bool | None
) -> None:
    """Flatness of every finished run that has none yet (so a rerun measures only the rest)."""
    todo = []
    for dirs in run_dirs.values():
        for run_dir in dirs:
            summary = read_summary(run_dir) or {}
            if summary.get("status") != "diverged" and "top_eigenvalue" not in summary:
                todo.append(run_dir)
    settings = dict(FLATNESS_SETTINGS) | dict(study.flatness or {})
    for k, run_dir in enumerate(todo, start=1):
        clock.flatness(k, len(todo), run_dir)
        add_flatness(run_dir, progress=progress, settings=settings)


class _Clock:
    """The progress lines of a study: which run of the grid is next, the time spent and an
    estimate of the time left, from the runs that finished (in this call or an earlier one)."""

    def __init__(self, study: Study, total: int, show: bool) -> None:
        self.study, self.total, self.show = study, total, show
        self.start = time.monotonic()
        self.position = 0
        self.seconds: dict[tuple[Any, str], list[float]] = {}
        self.pending: list[tuple[Any, str]] = [(value, cfg.row) for value, cfg in cells(study)]
        self.flatness_seconds: list[float] = []

    def _print(self, text: str) -> None:
        if self.show:
            print(text, file=sys.stderr, flush=True)

    def announce(self, value: Any, cfg: TrainConfig, run_dir: Path) -> None:
        self.position += 1
        summary = read_summary(run_dir)
        state = "done" if summary else "training"
        left = self._left(exclude_next=bool(summary))
        self._print(
            f"study {self.study.name} [{self.position}/{self.total}] {self.study.knob}={value} "
            f"{cfg.row} seed {cfg.seed}: {state}; {_duration(time.monotonic() - self.start)} "
            f"elapsed, {left}"
        )

    def done(self, value: Any, cfg: TrainConfig, run_dir: Path) -> None:
        self.pending.remove((value, cfg.row))
        summary = read_summary(run_dir)
        if summary and summary.get("total_time_s") is not None:
            self.seconds.setdefault((value, cfg.row), []).append(summary["total_time_s"])
            if "flatness_time_s" in summary:
                self.flatness_seconds.append(summary["flatness_time_s"])

    def flatness(self, k: int, total: int, run_dir: Path) -> None:
        self._print(
            f"study {self.study.name}: flatness {k}/{total} ({run_dir}); "
            f"{_duration(time.monotonic() - self.start)} elapsed"
        )

    def _predict(self, value: Any, optimizer: str) -> float | None:
        """Seconds a run will take: the mean of finished runs of the same value and optimizer,
        else of the same value, else of the same optimizer, else of all."""
        for match in (
            lambda v, o: (v, o) == (value, optimizer),
            lambda v, o: v == value,
            lambda v, o: o == optimizer,
            lambda v, o: True,
        ):
            times = [t for (v, o), ts in self.seconds.items() if match(v, o) for t in ts]
            if times:
                return sum(times) / len(times)
        return None

    def _left(self, exclude_next: bool) -> str:
        pending = self.pending[1:] if exclude_next else self.pending
        guesses = [self._predict(v, o) for v, o in pending]
        if any(g is None for g in guesses):
            return "time left estimated after the first run"
        seconds = sum(g for g in guesses if g is not None)
        if self.study.flatness is None:
            return f"about {_duration(seconds)} left"
        if not self.flatness_seconds:
            return f"about {_duration(seconds)} left, then the flatness measurements"
        unmeasured = self.total - len(self.flatness_seconds)
        seconds += unmeasured * sum(self.flatness_seconds) / len(self.flatness_seconds)
        return f"about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
