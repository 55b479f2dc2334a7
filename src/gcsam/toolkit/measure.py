"""Measurements of finished runs: flatness (Hessian spectrum, SAM sharpness) written to
``RUN_DIR/sharpness.json`` and the summary, and loss-landscape files and figures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .config import ConfigError, TrainConfig
from .data import DataSplits, Split, iterate_batches
from .optimizers import OPTIMIZERS
from .run_inputs import build_run_model, prepare_data
from .rundir import load_checkpoint, read_json, read_run_config, write_json_atomic


def load_trained(
    run_dir: str | Path, checkpoint: str = "final.pt"
) -> tuple[TrainConfig, DataSplits, nn.Module]:
    """Rebuild a finished run's config, data splits and model (with the checkpoint's weights,
    in eval mode, on the CPU) from its run directory."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir).resolved()
    path = run_dir / checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {checkpoint}: the run has not finished; "
            f"finish it with 'gcsam resume {run_dir}'"
        )
    data, _ = prepare_data(cfg)
    model = build_run_model(cfg, data)
    model.load_state_dict(load_checkpoint(path)["model"])
    return cfg, data, model.eval()


def prepared_batches(
    data: DataSplits, split: str, batch_size: int, max_samples: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Normalized ``(x, y)`` batches of a split (no augmentation), for evaluation-style work;
    the first ``max_samples`` examples when given (in the split's fixed order)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test; got {split!r}")
    chosen: Split = getattr(data, split)
    count = len(chosen) if max_samples is None else min(max_samples, len(chosen))
    if count < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples!r}")
    return [
        (data.normalize(images), labels)
        for images, labels in iterate_batches(
            chosen, batch_size, shuffle=False, indices=torch.arange(count)
        )
    ]


def _registry_position(run_dir: Path) -> tuple[int, str]:
    """Sort key of a run: its optimizer's place in the registry (the report's order)."""
    optimizer = read_json(run_dir / "config.json").get("optimizer", "")
    order = list(OPTIMIZERS)
    return (order.index(optimizer) if optimizer in order else len(order)), str(run_dir)


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
    from ..analysis import sharpness

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


def add_flatness(
    run_dir: Path, progress: bool | None = None, settings: dict[str, Any] | None = None
) -> None:
    """Measure a run's flatness with ``settings`` (:func:`run_sharpness` arguments; default
    :data:`FLATNESS_SETTINGS`) and add it, the settings and the seconds it took to its summary.
    ``trace_samples=0`` skips the Hessian trace (then None)."""
    settings = dict(FLATNESS_SETTINGS if settings is None else settings)
    start = time.perf_counter()
    record = run_sharpness(run_dir, progress=progress, **settings)
    summary = read_json(run_dir / "summary.json")
    summary |= {
        "top_eigenvalue": record["top_eigenvalues"]["values"][0],
        "hessian_trace": record["trace"]["trace"] if "trace" in record else None,
        "sam_sharpness": record["sam_sharpness"]["sharpness"],
        "flatness_settings": settings,
        "flatness_time_s": time.perf_counter() - start,
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
    if dim not in (1, 2):
        raise ConfigError(f"dim must be 1 or 2, got {dim!r}")
    if between and len(run_dirs) != 2:
        raise ConfigError(f"--between needs exactly two runs, got {len(run_dirs)}")
    if not run_dirs:
        raise ConfigError("no run directories given")
    dirs = [Path(d) for d in run_dirs]
    if not between:
        dirs.sort(key=_registry_position)  # Adam, SAM, GCSAM left to right, as in Figure 3
    out = Path(out_dir) if out_dir else (dirs[0] if len(dirs) == 1 else dirs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [load_trained(d) for d in dirs]
    configs = [cfg for cfg, _, _ in loaded]
    batches = prepared_batches(loaded[0][1], split, batch_size, max_samples)
    if between:
        return _interpolation(loaded, configs, batches, grid, out, progress)
    settings = dict(span=span, seed=seed, normalization=normalization, ignore_1d=ignore_1d)
    return _landscapes(dirs, loaded, configs, batches, dim, grid, settings, out, progress)


def _interpolation(
    loaded: list[tuple[TrainConfig, DataSplits, nn.Module]],
    configs: list[TrainConfig],
    batches: list[tuple[Tensor, Tensor]],
    points: int,
    out: Path,
    progress: bool | None,
) -> dict[str, Path]:
    """The straight path between two runs: its files and its 1-D plot in ``out``."""
    from ..analysis import landscape, plotting

    (cfg_a, _, model_a), (cfg_b, _, model_b) = loaded
    found = landscape.interpolate(
        model_a, model_b, F.cross_entropy, batches, points=points, progress=progress
    )
    name = f"interpolation-{cfg_a.optimizer}-seed{cfg_a.seed}-{cfg_b.optimizer}-seed{cfg_b.seed}"
    written = {f"{name}.{k}": p for k, p in found.save(out / name).items()}
    label = f"{_run_label(cfg_a, configs)} -> {_run_label(cfg_b, configs)}"
    written[f"{name}.png"] = plotting.plot_line({label: found}, out / f"{name}.png")
    return written


def _landscapes(
    dirs: list[Path],
    loaded: list[tuple[TrainConfig, DataSplits, nn.Module]],
    configs: list[TrainConfig],
    batches: list[tuple[Tensor, Tensor]],
    dim: int,
    grid: int,
    settings: dict[str, Any],
    out: Path,
    progress: bool | None,
) -> dict[str, Path]:
    """One line or plane per run (files and plots in its run directory), then the
    side-by-side figures on one colour scale in ``out``."""
    from ..analysis import landscape, plotting

    written: dict[str, Path] = {}
    found_by_label: dict[str, Any] = {}
    for run_dir, (cfg, _, model) in zip(dirs, loaded, strict=True):
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
            written[f"{run_dir.name}.contour"] = plotting.plot_contour(
                found, f"{prefix}-contour.png", title=label
            )
            written[f"{run_dir.name}.surface"] = plotting.plot_surface(
                found, f"{prefix}-surface.png", title=label
            )
        found_by_label[label] = found
    if dim == 1:
        written["comparison"] = plotting.plot_line(found_by_label, out / "landscape-1d.png")
        return written
    for kind in ("contour", "surface"):
        written[f"comparison-{kind}"] = plotting.plot_comparison(
            found_by_label, out / f"landscape-2d-{kind}.png", kind=kind
        )
    return written
