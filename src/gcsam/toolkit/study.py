"""Running a study (:mod:`.study_spec` says what one is): every run of its grid trained, or
first tuned (:mod:`.tuning`), then one report with a table per value, a plot of accuracy against
the knob and the flatness of every final model.

Layout of the output folder ``OUT``::

    OUT/study.json                          the study as last run
    OUT/<knob>-<value>/<optimizer>-seed<k>/ one run (as gcsam train writes it)
    OUT/<knob>-<value>/report.md, ...       that value's comparison report
    OUT/report.md, study.csv, study.png     the study's report

Rerunning a study continues it: finished runs and measurements are kept, a stopped run resumes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._util.validate import check_int
from .compare import apply_common_target, comparison_run_dir, reference_optimizer, train_or_keep
from .config import ConfigError, TrainConfig
from .jobs import helpers
from .measure import FLATNESS_SETTINGS, add_flatness
from .report import load_runs, summarize, write_report
from .report.study import StudyData, format_study_report, write_study_report
from .run_inputs import check_regimes
from .rundir import RunBusyError, read_summary, run_lock, write_json_atomic
from .study_spec import Study, cells, check_study, tuning_corners, value_dir
from .tuning import Picked, reuse_trial_run, run_tuning, tuning_cells, tuning_record
from .tuning_storage import default_storage
from .world import is_main_process


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
    grid = cells(study, tuning_corners(study))
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
        clock = _Clock(study, len(grid), show=progress is not False and main, jobs=jobs)
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
            _measure_flatness(study, run_dirs, clock, progress, jobs)
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
    study: Study,
    run_dirs: dict[Any, list[Path]],
    clock: _Clock,
    progress: bool | None,
    jobs: int,
) -> None:
    """Flatness of every finished run that has none yet (so a rerun measures only the rest),
    shared with ``jobs - 1`` helpers through the runs' locks."""
    todo = []
    for dirs in run_dirs.values():
        for run_dir in dirs:
            summary = read_summary(run_dir) or {}
            if summary.get("status") != "diverged" and "top_eigenvalue" not in summary:
                todo.append(run_dir)
    settings = dict(FLATNESS_SETTINGS) | dict(study.flatness or {})
    with helpers(measure_free_runs, (todo, settings), min(jobs, len(todo)), "flatness"):
        for k, run_dir in enumerate(todo, start=1):
            with contextlib.suppress(RunBusyError):  # a helper measures it
                announce = functools.partial(clock.flatness, k, len(todo), run_dir)
                _measure_unless_measured(run_dir, settings, progress, announce)


def measure_free_runs(todo: list[Path], settings: dict[str, Any]) -> None:
    """A ``--jobs`` helper of a study: measure, quietly, the flatness of every run of ``todo``
    not measured yet and not held by another process."""
    for run_dir in todo:
        with contextlib.suppress(RunBusyError):
            _measure_unless_measured(run_dir, settings, progress=False)


def _measure_unless_measured(
    run_dir: Path,
    settings: dict[str, Any],
    progress: bool | None,
    announce: Callable[[], None] | None = None,
) -> None:
    """Under the run's lock, :func:`add_flatness` unless the run has its flatness already (a
    process before this one measured it), calling ``announce`` just before."""
    with run_lock(run_dir):
        if "top_eigenvalue" not in (read_summary(run_dir) or {}):
            if announce is not None:
                announce()
            add_flatness(run_dir, progress=progress, settings=settings)


class _Clock:
    """The progress lines of a study: which run of the grid is next, the time spent and an
    estimate of the time left, from the runs that finished (in this call or an earlier one),
    shared by ``jobs`` processes."""

    def __init__(self, study: Study, total: int, show: bool, jobs: int = 1) -> None:
        self.study, self.total, self.show, self.jobs = study, total, show, jobs
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
        seconds = sum(g for g in guesses if g is not None) / self.jobs
        if self.study.flatness is None:
            return f"about {_duration(seconds)} left"
        if not self.flatness_seconds:
            return f"about {_duration(seconds)} left, then the flatness measurements"
        unmeasured = self.total - len(self.flatness_seconds)
        seconds += unmeasured * sum(self.flatness_seconds) / len(self.flatness_seconds) / self.jobs
        return f"about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
