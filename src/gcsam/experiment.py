"""A comparison: several optimizers x several seeds, everything else equal, then a report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import time_to_target
from .report import read_history
from .training import (
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    is_main_process,
    progress_bar,
    train,
    write_json_atomic,
)

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
    from .report import format_report, load_runs, summarize, write_report

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


def _canonical_position(run_dir: Path) -> tuple[int, str]:
    from .report import CANONICAL_ORDER

    optimizer = json.loads((run_dir / "config.json").read_text()).get("optimizer", "")
    rank = (
        CANONICAL_ORDER.index(optimizer) if optimizer in CANONICAL_ORDER else len(CANONICAL_ORDER)
    )
    return rank, str(run_dir)


def _run_label(cfg: TrainConfig, configs: Sequence[TrainConfig]) -> str:
    """The optimizer name, with the seed when several runs share an optimizer."""
    shared = sum(c.optimizer == cfg.optimizer for c in configs) > 1
    return f"{cfg.optimizer} seed {cfg.seed}" if shared else cfg.optimizer


def run_sharpness(
    run_dir: str | Path,
    *,
    split: str = "train",
    max_samples: int | None = 1000,
    batch_size: int = 256,
    top_k: int = 1,
    max_iter: int = 50,
    tol: float = 1e-3,
    trace_samples: int = 50,
    rho: float = 0.05,
    adaptive: bool = False,
    ascent_steps: int = 5,
    m: int | None = None,
    density: bool = False,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Flatness of a finished run's final weights, written to ``RUN_DIR/sharpness.json``."""
    import torch.nn.functional as F  # noqa: N812

    from . import sharpness
    from .training import load_trained, prepared_batches

    run_dir = Path(run_dir)
    cfg, data, model = load_trained(run_dir)
    batches = prepared_batches(data, split, batch_size, max_samples)
    loss_fn = F.cross_entropy
    common = dict(progress=progress)
    record: dict[str, Any] = {
        "run": str(run_dir),
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
        "split": split,
        "samples": sum(len(y) for _, y in batches),
        "top_eigenvalues": sharpness.top_eigenvalues(
            model, loss_fn, batches, k=top_k, max_iter=max_iter, tol=tol, seed=seed, **common
        ).to_json(),
        "sam_sharpness": sharpness.sam_sharpness(
            model, loss_fn, batches, rho=rho, adaptive=adaptive, steps=ascent_steps
        ).to_json(),
    }
    if trace_samples:
        record["trace"] = sharpness.hessian_trace(
            model, loss_fn, batches, samples=trace_samples, seed=seed, **common
        ).to_json()
    if m is not None:
        record["m_sharpness"] = sharpness.m_sharpness(
            model, loss_fn, batches, m=m, rho=rho, adaptive=adaptive, seed=seed
        ).to_json()
    if density:
        record["density"] = sharpness.spectral_density(model, loss_fn, batches, seed=seed).to_json()
    write_json_atomic(run_dir / "sharpness.json", record)
    return record


FLATNESS_SETTINGS = dict(split="train", max_samples=1000, trace_samples=50, rho=0.05)


def add_flatness(run_dir: Path, progress: bool | None = None) -> None:
    """Measure a run's flatness with :data:`FLATNESS_SETTINGS` and add it to its summary."""
    record = run_sharpness(run_dir, progress=progress, **FLATNESS_SETTINGS)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary |= {
        "top_eigenvalue": record["top_eigenvalues"]["values"][0],
        "hessian_trace": record["trace"]["trace"],
        "sam_sharpness": record["sam_sharpness"]["sharpness"],
        "flatness_settings": FLATNESS_SETTINGS,
    }
    write_json_atomic(run_dir / "summary.json", summary)


def run_landscapes(
    run_dirs: Sequence[str | Path],
    *,
    dim: int = 2,
    grid: int = 21,
    span: float = 1.0,
    split: str = "train",
    max_samples: int | None = 1000,
    batch_size: int = 256,
    seed: int = 0,
    normalization: str = "filter",
    ignore_1d: str = "zero",
    between: bool = False,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Loss landscapes of finished runs: per run ``RUN_DIR/landscape-<dim>d.{npz,json,png}``,
    and side-by-side figures on one colour scale in ``out_dir``. With ``between``, the linear
    interpolation between the first two runs instead."""
    import torch.nn.functional as F  # noqa: N812

    from . import landscape
    from .training import load_trained, prepared_batches

    if dim not in (1, 2):
        raise ConfigError(f"dim must be 1 or 2, got {dim!r}")
    if between and len(run_dirs) != 2:
        raise ConfigError(f"--between needs exactly two runs, got {len(run_dirs)}")
    if not run_dirs:
        raise ConfigError("no run directories given")
    dirs = [Path(d) for d in run_dirs]
    if not between:
        dirs.sort(key=_canonical_position)  # Adam, SAM, GCSAM left to right, as in Figure 3
    out = Path(out_dir) if out_dir else (dirs[0] if len(dirs) == 1 else dirs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [load_trained(d) for d in dirs]
    configs = [cfg for cfg, _, _ in loaded]
    batches = prepared_batches(loaded[0][1], split, batch_size, max_samples)
    written: dict[str, Path] = {}
    if between:
        (cfg_a, _, model_a), (cfg_b, _, model_b) = loaded
        found = landscape.interpolate(
            model_a, model_b, F.cross_entropy, batches, points=grid, progress=progress
        )
        name = (
            f"interpolation-{cfg_a.optimizer}-seed{cfg_a.seed}-{cfg_b.optimizer}-seed{cfg_b.seed}"
        )
        written |= {f"{name}.{k}": p for k, p in found.save(out / name).items()}
        label = f"{_run_label(cfg_a, configs)} -> {_run_label(cfg_b, configs)}"
        written[f"{name}.png"] = landscape.plot_line({label: found}, out / f"{name}.png")
        return written
    found_by_label: dict[str, Any] = {}
    for run_dir, (cfg, _, model) in zip(dirs, loaded, strict=True):
        settings = dict(span=span, seed=seed, normalization=normalization, ignore_1d=ignore_1d)
        if dim == 1:
            found = landscape.line(
                model, F.cross_entropy, batches, points=grid, progress=progress, **settings
            )
        else:
            found = landscape.plane(
                model, F.cross_entropy, batches, grid=grid, progress=progress, **settings
            )
        prefix = run_dir / f"landscape-{dim}d"
        written |= {f"{run_dir.name}.{k}": p for k, p in found.save(prefix).items()}
        label = _run_label(cfg, configs)
        if dim == 2:
            written[f"{run_dir.name}.contour"] = landscape.plot_contour(
                found, f"{prefix}-contour.png", title=label
            )
            written[f"{run_dir.name}.surface"] = landscape.plot_surface(
                found, f"{prefix}-surface.png", title=label
            )
        found_by_label[label] = found
    if dim == 1:
        written["comparison"] = landscape.plot_line(found_by_label, out / "landscape-1d.png")
    else:
        for kind in ("contour", "surface"):
            written[f"comparison-{kind}"] = landscape.plot_comparison(
                found_by_label, out / f"landscape-2d-{kind}.png", kind=kind
            )
    return written
