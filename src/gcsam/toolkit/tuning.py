"""Tuning a study's optimizers on Optuna, with the same budget for each.

A study file's ``tune`` section (:mod:`.search_space`) gives every optimizer a search space and
one trial budget.

Each (value of the knob, optimizer) is one Optuna study in the storage, named
``<study>/<knob>-<value>/<optimizer>``; each trial is one normal, resumable ``gcsam train`` run
(seed ``tune.seed``, default the study's first seed) in ``OUT/<knob>-<value>/trials/<optimizer>/``,
in a folder named by a hash of its setting, and scores the validation split (the run's
``select_by``: accuracy, or minus the loss, of the best-validation epoch). Test accuracy plays no
part in the choice: the picked setting then trains every seed of the study, and those runs are
reported on test as usual.

The budget counts *distinct* finished settings: a completed trial, one the pruner stopped (with
``prune``: Optuna's median pruner on each epoch's best validation score so far; never picked), or
one that diverged (Optuna's ``FAIL``, marked ``diverged``: a setting that diverges has spent its
budget). A trial whose worker died is failed, not counted, and its setting is queued again, so
the next worker resumes its run folder and loses at most the epoch under way. A setting asked for
twice trains once. The picked setting is the best of the first ``trials`` distinct settings in
the order they finished (ties: the earliest), read once no trial of it runs, so workers that
raced past the budget change nothing.

Storage: ``sqlite:///OUT/optuna.db`` by default, so a rerun continues; any database URL Optuna
supports lets several processes or machines share the tuning (``--storage``; ``--jobs N`` runs N
worker processes here). Each study records the study file's definition, written by the worker that
created it, and a worker refuses a study that records another. Heartbeats (every 30 s; stale after
120 s) let a worker fail the trials of a dead worker on another machine; on this machine a dead
worker's trials are found by their process id at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compare import entry_settings
from .config import ConfigError, TrainConfig
from .jobs import helpers
from .rundir import RunBusyError, read_summary
from .search_space import Param, Tuning
from .study_spec import Study, value_dir
from .trainer import Diverged, train
from .tuning_storage import check_definition, open_storage
from .world import is_main_process

if TYPE_CHECKING:
    import optuna


_POLL_S = 2.0  # how often a worker with nothing to start looks again at the trials in flight
_MAX_REPEATS = 20  # a sampler that proposes only known settings this many times in a row: done


@dataclass(frozen=True)
class Cell:
    """One (value of the knob, optimizer) of a tuned study: its Optuna study and space."""

    value: Any
    optimizer: str  # the row's label: the optimizer's name, or a variant's
    name: str  # the Optuna study's name
    folder: Path  # where its trials' runs go
    settings: dict[str, Any]  # the study's settings, the knob's value and the optimizer
    space: dict[str, Param]
    budget: int  # the study's trials; 1 for an optimizer with nothing to tune
    definition: str  # JSON: what must match for a storage's study to be this one

    def config(self, params: Mapping[str, Any], seed: int) -> TrainConfig:
        return TrainConfig(**{**self.settings, **params, "seed": seed})


def tuning_cells(study: Study, out: Path) -> list[Cell]:
    """Every (value, optimizer) of a tuned ``study``, values outermost."""
    tuning = study.tune
    assert tuning is not None
    cells = []
    for value in study.values:
        for entry in study.optimizers:
            optimizer, own = entry_settings(entry)
            settings = {**study.settings, study.knob: value, **own}
            space = tuning.space_for(optimizer)
            folder = value_dir(out, study, value)
            definition = json.dumps(
                {
                    "settings": settings,
                    "trials": tuning.trials,
                    "sampler": tuning.sampler,
                    "seed": tuning_seed(study),
                    "space": {name: p.to_json() for name, p in space.items()},
                    # only when set: the definition of a study tuned without them is unchanged
                    **({"prune": tuning.prune.to_json()} if tuning.prune else {}),
                    **({"sampler_seed": tuning.sampler_seed} if tuning.sampler_seed else {}),
                },
                sort_keys=True,
            )
            name = f"{study.name}/{folder.name}/{optimizer}"
            budget = tuning.trials if space else 1
            trials = folder / "trials" / optimizer
            cells.append(Cell(value, optimizer, name, trials, settings, space, budget, definition))
    return cells


def tuning_seed(study: Study) -> int:
    assert study.tune is not None
    return study.seeds[0] if study.tune.seed is None else study.tune.seed


def check_storage(storage: optuna.storages.RDBStorage, cells: list[Cell]) -> None:
    """Refuse, before anything is written, a storage that holds one of ``cells``' studies under
    another definition."""
    for cell in cells:
        try:
            study_id = storage.get_study_id_from_name(cell.name)
        except KeyError:
            continue
        check_definition(storage, study_id, cell.name, cell.definition)


def _open(storage: optuna.storages.RDBStorage, cell: Cell, tuning: Tuning) -> optuna.Study:
    """The cell's Optuna study: created and labelled with the cell's definition by the one
    worker whose creation the database accepts; every other worker checks that label."""
    import optuna

    if tuning.sampler == "grid" and cell.space:
        grid = {name: list(p.choices or ()) for name, p in cell.space.items()}
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(
            grid, seed=tuning.sampler_seed
        )
    else:
        sampler = optuna.samplers.TPESampler(
            seed=tuning.sampler_seed, n_startup_trials=min(10, tuning.trials)
        )
    pruner = tuning.prune.pruner() if tuning.prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=cell.name,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            storage=storage, study_name=cell.name, sampler=sampler, pruner=pruner
        )
        study_id = storage.get_study_id_from_name(cell.name)
        check_definition(storage, study_id, cell.name, cell.definition)
    else:
        study.set_user_attr("definition", cell.definition)
    return study


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


def setting_key(params: Mapping[str, Any]) -> str:
    """A short name for a setting (the folder of its trial run)."""
    text = json.dumps(dict(sorted(params.items())), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_run_dir(cell: Cell, params: Mapping[str, Any], seed: int) -> Path:
    return cell.folder / f"{setting_key(params)}-seed{seed}"


class _DivergedTrialError(Exception):
    """The trial's run diverged: Optuna records it as failed, and the budget counts it."""


def score(summary: Mapping[str, Any], select_by: str) -> float:
    """The validation score a run was selected by (higher is better)."""
    val = summary["val"]
    return float(val["accuracy"] if select_by == "val_accuracy" else -val["loss"])


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials the budget counts, in the order they finished: the first trial of each
    distinct setting that completed, was pruned or diverged."""
    import optuna

    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [
        t for t in study.get_trials(deepcopy=False)
        if t.state in ended
        or (t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("diverged"))
    ]  # fmt: skip
    done.sort(key=lambda t: (t.datetime_complete, t.number))
    seen: set[str] = set()
    first = []
    for trial in done:
        key = setting_key(trial.params)
        if key not in seen:
            seen.add(key)
            first.append(trial)
    return first


def _running(study: optuna.Study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def _fail_dead_trials(study: optuna.Study) -> None:
    """Fail, and queue again, the running trials of workers that died: on this machine found
    by their process id at once, elsewhere by Optuna's heartbeat."""
    import optuna

    _fail_dead_local_trials(study)
    optuna.storages.fail_stale_trials(study)


def _fail_dead_local_trials(study: optuna.Study) -> None:
    """Fail, and queue again, the running trials of workers on this machine that died."""
    import optuna

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get("host") != host or _alive(trial.user_attrs.get("pid")):
            continue
        try:
            changed = study._storage.set_trial_state_values(
                trial._trial_id, optuna.trial.TrialState.FAIL
            )
        except RuntimeError:  # another worker failed it first (Optuna's UpdateFinishedTrialError)
            continue
        if changed:
            optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _objective(
    cell: Cell, seed: int, progress: bool | None, prune: bool
) -> Callable[[optuna.Trial], float]:
    import optuna

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {name: p.suggest(trial) for name, p in cell.space.items()}
        cfg = cell.config(params, seed)
        run_dir = trial_run_dir(cell, params, seed)
        trial.set_user_attr("run", str(run_dir))
        if prune and _was_pruned(trial.study, params):  # a setting asked for twice trains once
            raise optuna.TrialPruned(f"{run_dir} was pruned before")

        def report(epoch: int, best: float) -> None:
            # The run's epochs so far, also those an earlier trial of the setting trained.
            trial.set_user_attr("epochs", epoch)
            # Step = epoch - 1: Optuna may stop a trial from step n_warmup_steps on, so this
            # keeps the first warmup_epochs epochs.
            trial.report(best, epoch - 1)
            # Never after the last epoch, which saves nothing.
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"{run_dir} pruned after epoch {epoch}")

        summary = read_summary(run_dir)
        if summary is None:
            try:
                summary = train(
                    cfg,
                    run_dir,
                    resume=True,
                    progress=progress,
                    after_epoch=report if prune else None,
                )
            except Diverged:
                summary = read_summary(run_dir)
        trial.set_user_attr("epochs", (summary or {}).get("epochs_run"))
        if summary is None or summary.get("status") == "diverged":
            trial.set_user_attr("diverged", True)
            raise _DivergedTrialError(f"{run_dir} diverged")
        return score(summary, cfg.resolved().select_by)

    return objective


def _was_pruned(study: optuna.Study, params: Mapping[str, Any]) -> bool:
    import optuna

    key = setting_key(params)
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    return any(setting_key(t.params) == key for t in pruned)


def tune_cells(
    study: Study, cells: list[Cell], storage_url: str, *, progress: bool | None = None,
    report: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Run trials until every cell's budget is counted: this worker starts a trial (a queued
    one first: the retry of a dead worker's) in the first cell whose counted and running trials
    are below its budget; when every unfinished cell's remaining trials run in other workers,
    it waits for them (a dead worker's trial is failed and queued again meanwhile)."""
    tuning = study.tune
    assert tuning is not None
    storage = open_storage(storage_url)
    seed = tuning_seed(study)
    pending = [
        (cell, _open(storage, cell, tuning), _objective(cell, seed, progress, bool(tuning.prune)))
        for cell in cells
    ]
    repeats = {cell.name: 0 for cell in cells}
    while pending:
        started = False
        for entry in list(pending):
            cell, optuna_study, objective = entry
            _fail_dead_trials(optuna_study)
            done = len(counted(optuna_study))
            if done >= cell.budget or repeats[cell.name] >= _MAX_REPEATS:
                pending.remove(entry)
                continue
            if done + _running(optuna_study) >= cell.budget:
                continue  # its remaining trials run in other workers: on to the next cell
            try:
                optuna_study.optimize(objective, n_trials=1, catch=(_DivergedTrialError,))
            except RunBusyError:
                # Another worker trains this very setting (Optuna failed this trial): that
                # worker's trial will count it.
                time.sleep(_POLL_S)
            after = len(counted(optuna_study))
            repeats[cell.name] = repeats[cell.name] + 1 if after == done else 0
            if report is not None and after > done:
                report(_trial_line(cell, counted(optuna_study)[-1], after))
            started = True
            break  # back to the first unfinished cell: cells finish in their order
        if pending and not started:
            time.sleep(_POLL_S)


def _trial_line(cell: Cell, trial: optuna.trial.FrozenTrial, k: int) -> str:
    state = _state(trial)
    value = f"val {trial.value:.4f}" if state == "complete" else state
    if state == "pruned":
        value += f" after epoch {trial.user_attrs.get('epochs')}"
    where = f"{cell.folder.parent.parent.name} {cell.optimizer}"
    return f"tune {where} {k}/{cell.budget}: {value} {json.dumps(trial.params, sort_keys=True)}"


def worker(study: Study, out: str, storage_url: str) -> None:
    """A ``--jobs`` helper process: tune every cell, quietly."""
    tune_cells(study, tuning_cells(study, Path(out)), storage_url, progress=False)


@dataclass(frozen=True)
class Picked:
    """A cell's tuning result: the picked setting and what it was picked from."""

    params: dict[str, Any]
    score: float
    # The counted trials: params, state (complete, pruned or diverged), score (None unless
    # complete), epochs trained, run folder.
    trials: list[dict[str, Any]]
    epochs_per_trial: int  # what each trial trains unless pruned or stopped early

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _settle(optuna_study: optuna.Study, cell: Cell, report: Callable[[str], None] | None) -> None:
    """Wait until no trial of the cell runs (one that another process started as the budget
    filled; a dead worker's is failed meanwhile). A trial's finishing time is taken before the
    database commits it, so one still running may yet sort ahead of a counted one: only then is
    the order of the first ``budget`` final, the same for every process."""
    reported = False
    while True:
        _fail_dead_trials(optuna_study)
        running = _running(optuna_study)
        if not running:
            return
        if report is not None and not reported:
            report(f"tune {cell.name}: waiting for {running} trial(s) running elsewhere")
            reported = True
        time.sleep(_POLL_S)


def picked(
    study: Study, cells: list[Cell], storage_url: str, report: Callable[[str], None] | None = None
) -> dict[tuple[Any, str], Picked]:
    """Each cell's best setting among the first ``trials`` counted trials, once none runs; a
    cell whose every trial diverged keeps its first setting (its runs then diverge in the
    report too)."""
    import optuna

    tuning = study.tune
    assert tuning is not None
    storage = open_storage(storage_url)
    result = {}
    for cell in cells:
        optuna_study = optuna.load_study(study_name=cell.name, storage=storage)
        _settle(optuna_study, cell, report)
        trials = counted(optuna_study)[: cell.budget]
        if not trials:
            raise ConfigError(f"tuning study {cell.name} has no finished trial yet; rerun it")
        # A pruned trial holds the score of the epoch it stopped at: never picked.
        scored = [t for t in trials if _state(t) == "complete"]
        best = max(scored, key=lambda t: t.value) if scored else trials[0]
        result[(cell.value, cell.optimizer)] = Picked(
            params=dict(best.params),
            score=float(best.value) if scored else math.nan,
            trials=[
                {"number": t.number, "params": dict(t.params), "state": _state(t),
                 "score": t.value if _state(t) == "complete" else None,
                 "epochs": t.user_attrs.get("epochs"), "run": t.user_attrs.get("run")}
                for t in trials
            ],
            epochs_per_trial=cell.config(dict(best.params), 0).resolved().epochs,
        )  # fmt: skip
    return result


def _state(trial: optuna.trial.FrozenTrial) -> str:
    """How a counted trial ended: complete, pruned or diverged."""
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, "diverged")


def reuse_trial_run(cell: Cell, params: Mapping[str, Any], seed: int, run_dir: Path) -> bool:
    """Copy the finished trial run of ``params`` at ``seed`` to ``run_dir`` (a final run of the
    picked setting) instead of training it again; False when there is none here."""
    source = trial_run_dir(cell, params, seed)
    if run_dir.exists() or read_summary(source) is None:
        return False
    partial = run_dir.with_name(run_dir.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(".gcsam.lock"))
    partial.rename(run_dir)
    return True


def run_tuning(
    study: Study, out: Path, storage: str, jobs: int, progress: bool | None
) -> dict[tuple[Any, str], Picked]:
    """Run the study's trials with ``jobs`` processes (this one included); the picked setting
    of every (value, optimizer)."""
    trial_cells = tuning_cells(study, out)
    check_storage(open_storage(storage), trial_cells)
    show = progress is not False and is_main_process()
    report = (lambda line: print(line, file=sys.stderr, flush=True)) if show else None
    with helpers(worker, (study, str(out), storage), jobs, "tuning"):
        tune_cells(study, trial_cells, storage, progress=False, report=report)
    return picked(study, trial_cells, storage, report)


def tuning_record(study: Study, tuned: Mapping[tuple[Any, str], Picked]) -> dict[str, Any]:
    """What ``tuning.json`` holds and the report shows: the budget, the space, and each
    (value, optimizer)'s picked setting with its counted trials."""
    assert study.tune is not None
    return {
        "tune": study.tune.to_json(),
        "selected_on": "the validation split (the run's select_by)",
        "cells": [
            {"value": value, "optimizer": optimizer, **result.to_json()}
            for (value, optimizer), result in tuned.items()
        ],
    }
