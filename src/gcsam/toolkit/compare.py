"""A comparison: several optimizers x several seeds, everything else equal, then a report."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util.progress import progress_bar
from .._util.validate import check_int
from .config import ConfigError, TrainConfig
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


def run_configs(
    settings: dict[str, Any], optimizers: Sequence[str], seeds: Sequence[int]
) -> list[TrainConfig]:
    """One config per (seed, optimizer), seeds outermost so partial results stay balanced."""
    if not isinstance(optimizers, list | tuple) or not all(isinstance(n, str) for n in optimizers):
        raise ConfigError(f"optimizers must be a list of names, got {optimizers!r}")
    if not isinstance(seeds, list | tuple):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    for seed in seeds:
        check_int("seeds", seed, 0, ConfigError)
    unknown = [name for name in optimizers if name not in OPTIMIZERS]
    if unknown:
        raise ConfigError(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(optimizers)) != len(optimizers) or len(set(seeds)) != len(seeds):
        raise ConfigError("optimizers and seeds must not repeat")
    if not optimizers or not seeds:
        raise ConfigError("compare needs at least one optimizer and one seed")
    return [
        TrainConfig(**{**settings, "optimizer": name, "seed": seed})
        for seed in seeds
        for name in optimizers
    ]


def _check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix a finished run made with other settings into this comparison."""
    saved = json.loads((run_dir / "config.json").read_text())
    wanted = cfg.resolved().to_json()
    differ = sorted(k for k, v in wanted.items() if saved.get(k) != v)
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
    return out / f"{cfg.optimizer}-seed{cfg.seed}"


def reference_optimizer(optimizers: Sequence[str]) -> str:
    """The optimizer a report tests the others against: GCSAM when present, else the last."""
    return "gcsam" if "gcsam" in optimizers else optimizers[-1]


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
