"""A comparison: several optimizers x several seeds, everything else equal, then a report."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._util.progress import progress_bar
from .._util.validate import check_int
from .config import CHECKS, ConfigError, TrainConfig
from .measure import add_flatness
from .metrics import time_to_target
from .optimizers import OPTIMIZERS
from .report import format_report, load_runs, summarize, write_report
from .run_inputs import check_regimes
from .rundir import default_compare_dir, read_history, run_lock, write_json_atomic
from .trainer import Diverged, train
from .world import is_main_process

DEFAULT_OPTIMIZERS = ("adam", "sam", "gcsam")
DEFAULT_SEEDS = (0, 1, 2)


Entry = str | Mapping[str, Any]
"""One method of a comparison: a registered optimizer's name, or a variant: a mapping with a
``label`` of its own, an ``optimizer`` and any other settings it changes (``{label: adam-2x,
optimizer: adam, epochs: 30}``: Adam given the passes of a two-pass method)."""


def entry_settings(entry: Any, where: str = "optimizers") -> tuple[str, dict[str, Any]]:
    """(row label, settings) of one :data:`Entry`; a :class:`ConfigError` naming the problem."""
    if isinstance(entry, str):
        if entry not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {entry!r} in {where}; choose from {', '.join(OPTIMIZERS)}"
            )
        return entry, {"optimizer": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{where} must list optimizer names or variants {{label, optimizer, settings...}}, "
            f"got {entry!r}"
        )
    missing = [key for key in ("label", "optimizer") if key not in entry]
    if missing:
        raise ConfigError(f"a variant in {where} needs {' and '.join(missing)}, got {dict(entry)}")
    label, settings = entry["label"], dict(entry)
    TrainConfig(label=label).resolved()  # a label that can name a folder
    if label in OPTIMIZERS:
        raise ConfigError(
            f"variant label {label!r} in {where} is an optimizer's name; give the variant a name "
            "of its own (the report would mix it up with that optimizer)"
        )
    unknown = sorted(set(settings) - set(CHECKS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {where} variant {label}")
    if "seed" in settings:
        raise ConfigError(f"variant {label} in {where} must not set seed: seeds are listed apart")
    return label, settings


def run_configs(
    settings: dict[str, Any], optimizers: Sequence[Entry], seeds: Sequence[int]
) -> list[TrainConfig]:
    """One config per (seed, method), seeds outermost so partial results stay balanced; a
    variant's settings override ``settings``."""
    if not isinstance(optimizers, list | tuple):
        raise ConfigError(f"optimizers must be a list of names, got {optimizers!r}")
    if not isinstance(seeds, list | tuple):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    for seed in seeds:
        check_int("seeds", seed, 0, ConfigError)
    rows = [entry_settings(entry) for entry in optimizers]
    labels = [label for label, _ in rows]
    if len(set(labels)) != len(labels) or len(set(seeds)) != len(seeds):
        raise ConfigError("optimizers and seeds must not repeat")
    if not optimizers or not seeds:
        raise ConfigError("compare needs at least one optimizer and one seed")
    return [TrainConfig(**{**settings, **own, "seed": seed}) for seed in seeds for _, own in rows]


def row_labels(optimizers: Sequence[Entry]) -> list[str]:
    """The report's name of every entry of ``optimizers``."""
    return [entry_settings(entry)[0] for entry in optimizers]


def _check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix a finished run made with other settings into this comparison. A setting
    the run's ``config.json`` lacks is newer than the run, which had its default."""
    saved = json.loads((run_dir / "config.json").read_text())
    wanted = cfg.resolved().to_json()
    defaults = TrainConfig().to_json()
    differ = sorted(k for k, v in wanted.items() if saved.get(k, defaults[k]) != v)
    if differ:
        raise ConfigError(
            f"{run_dir} was trained with other settings ({', '.join(differ)}); "
            "pass another --out or delete that folder"
        )


def apply_common_target(run_dirs: list[Path], target: float | None) -> float:
    """Write epochs and time to ``target`` validation accuracy into every run's summary.

    Without a target, it is the lowest best validation accuracy of all runs, so that every run
    reaches it and the comparison measures convergence speed, not final accuracy.
    """
    summaries = {d: json.loads((d / "summary.json").read_text()) for d in run_dirs}
    histories = {d: read_history(d) for d in run_dirs}
    if target is None:
        target = min(max(r["val_accuracy"] for r in histories[d]) for d in run_dirs)
    for run_dir, summary in summaries.items():
        epochs, seconds = time_to_target(histories[run_dir], target)
        summary |= {
            "target_val_accuracy": target,
            "epochs_to_target": epochs,
            "time_to_target_s": seconds,
        }
        write_json_atomic(run_dir / "summary.json", summary)
    return target


def compare(
    settings: dict[str, Any],
    *,
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out_dir: str | Path | None = None,
    plots: bool = True,
    sharpness: bool = False,
    progress: bool | None = None,
) -> str:
    """Train every (optimizer, seed) into ``out_dir/<optimizer>-seed<k>``, resuming unfinished
    runs and keeping finished and diverged ones, then write the report there; returns it as
    Markdown. A run that diverges does not stop the others: the report lists it apart. With
    ``sharpness``, the report also shows the top Hessian eigenvalue, the Hessian trace and the
    SAM sharpness of each final model (see :func:`add_flatness`). Rank 0 holds the lock of
    ``out_dir`` throughout (:func:`run_lock`)."""
    configs = run_configs(settings, optimizers, seeds)
    first = configs[0].resolved()
    check_regimes(configs)
    out = Path(out_dir) if out_dir else default_compare_dir(first)
    with run_lock(out) if is_main_process() else contextlib.nullcontext():
        with progress_bar(configs, desc="compare", show=progress) as bar:
            run_dirs = [train_or_keep(cfg, out, progress) for cfg in bar]
        if not is_main_process():
            return ""  # under torchrun, rank 0 alone measures and reports
        finished = [run.path for run in load_runs(run_dirs) if not run.diverged]
        if finished:
            apply_common_target(finished, first.target_accuracy)
        if sharpness:
            for run_dir in finished:
                add_flatness(run_dir, progress=progress)
        return _report(run_dirs, optimizers, out, plots)


def comparison_run_dir(cfg: TrainConfig, out: Path) -> Path:
    """Where a comparison (or a study's value) keeps the run of ``cfg``."""
    return out / f"{cfg.row}-seed{cfg.seed}"


def reference_optimizer(optimizers: Sequence[Entry]) -> str:
    """The method a report tests the others against: GCSAM when present, else the last."""
    labels = row_labels(optimizers)
    return "gcsam" if "gcsam" in labels else labels[-1]


def train_or_keep(cfg: TrainConfig, out: Path, progress: bool | None) -> Path:
    """Train (or resume) one run of the comparison unless it already finished or diverged."""
    run_dir = comparison_run_dir(cfg, out)
    if (run_dir / "config.json").exists():
        _check_same_settings(run_dir, cfg)
    if not (run_dir / "summary.json").exists():
        try:
            train(cfg, run_dir, resume=True, progress=progress)
        except Diverged as error:  # its summary.json records it; the other runs go on
            warnings.warn(f"{run_dir}: {error}", stacklevel=3)
    return run_dir


def _report(run_dirs: list[Path], optimizers: Sequence[str], out: Path, plots: bool) -> str:
    reference = reference_optimizer(optimizers)
    data = summarize(load_runs(run_dirs), reference=reference)
    write_report(data, out, plots=plots)
    return format_report(data)
