"""A comparison: several optimizers x several seeds, everything else equal, then a report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._progress import progress_bar
from .config import ConfigError, TrainConfig
from .measure import add_flatness
from .metrics import time_to_target
from .optimizers import OPTIMIZERS
from .report import format_report, load_runs, summarize, write_report
from .rundir import read_history, write_json_atomic
from .trainer import train
from .world import is_main_process

DEFAULT_OPTIMIZERS = ("adam", "sam", "gcsam")
DEFAULT_SEEDS = (0, 1, 2)


def run_configs(
    settings: dict[str, Any], optimizers: Sequence[str], seeds: Sequence[int]
) -> list[TrainConfig]:
    """One config per (seed, optimizer), seeds outermost so partial results stay balanced."""
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
    runs and keeping finished ones, then write the report there; returns it as Markdown. With
    ``sharpness``, the report also shows the top Hessian eigenvalue, the Hessian trace and the
    SAM sharpness of each final model (see :func:`add_flatness`)."""
    configs = run_configs(settings, optimizers, seeds)
    first = configs[0].resolved()
    out = Path(out_dir) if out_dir else Path(f"runs/compare-{first.dataset}-{first.model}")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    with progress_bar(total=len(configs), desc="compare", show=progress) as bar:
        for cfg in configs:
            run_dir = out / f"{cfg.optimizer}-seed{cfg.seed}"
            run_dirs.append(run_dir)
            if (run_dir / "config.json").exists():
                _check_same_settings(run_dir, cfg)
            if not (run_dir / "summary.json").exists():
                train(cfg, run_dir, resume=True, progress=progress)
            bar.update(1)
    if not is_main_process():
        return ""  # under torchrun, rank 0 alone measures and reports
    apply_common_target(run_dirs, settings.get("target_accuracy"))
    if sharpness:
        for run_dir in run_dirs:
            add_flatness(run_dir, progress=progress)
    reference = "gcsam" if "gcsam" in optimizers else optimizers[-1]
    data = summarize(load_runs(run_dirs), reference=reference)
    write_report(data, out, plots=plots)
    return format_report(data)
