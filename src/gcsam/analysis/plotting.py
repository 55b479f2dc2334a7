"""Figures of :mod:`gcsam.landscape` results: contours and surfaces of planes, 1-D slices, and
several runs side by side on one colour scale. The only module of gcsam that needs matplotlib.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: no global
backend, no open windows, safe in threads and on headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator

from .._util.validate import check_choice, check_int
from ._landscape_result import Landscape

__all__ = ["plot_comparison", "plot_contour", "plot_line", "plot_surface"]


def _loss_range(
    surfaces: Iterable[np.ndarray], vmin: float | None, vmax: float | None, log: bool
) -> tuple[float, float]:
    """``(vmin, vmax)``: the given values, else the finite extremes of all surfaces (positive
    ones under ``log``)."""
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in surfaces])
    values = values[np.isfinite(values)]
    if log:
        values = values[values > 0]
    if values.size == 0:
        raise ValueError("the landscape has no finite loss values" + (" > 0" if log else ""))
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    if log and low <= 0:
        raise ValueError(f"vmin must be > 0 on a log scale, got {low}")
    if not high > low:
        high = low * (1 + 1e-6) + 1e-12  # a flat landscape still needs increasing levels
    return low, high


def _levels(low: float, high: float, levels: int, log: bool) -> np.ndarray:
    check_int("levels", levels, 2)
    return np.geomspace(low, high, levels) if log else np.linspace(low, high, levels)


def _extend(surfaces: Iterable[np.ndarray], low: float, high: float) -> str:
    """contourf's ``extend``: which ends of the colour scale also cover values beyond it."""
    values = np.concatenate([np.asarray(s).ravel() for s in surfaces])
    below = bool(np.any(values[np.isfinite(values)] < low))
    above = bool(np.any(values[np.isfinite(values)] > high))
    return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (below, above), "both"
    )


def _check_planes(landscapes: dict[str, Landscape]) -> None:
    if not landscapes:
        raise ValueError("landscapes is empty")
    for name, landscape in landscapes.items():
        if landscape.kind != "plane":
            raise ValueError(f"landscapes[{name!r}] is a {landscape.kind}, not a plane")


def _check_plane(landscape: Landscape) -> None:
    if landscape.kind != "plane":
        raise ValueError(f"landscape is a {landscape.kind}, not a plane: draw it with plot_line")


def _contour_panel(
    ax: Any, landscape: Landscape, levels: np.ndarray, norm: Any, extend: str, cmap: str
) -> Any:
    """Filled contours, thin contour lines and the trained weights as a star; returns the
    filled contour set (for the colorbar)."""
    alphas, betas = landscape.coordinates
    loss = np.ma.masked_invalid(landscape.loss)
    filled = ax.contourf(alphas, betas, loss, levels=levels, norm=norm, cmap=cmap, extend=extend)
    ax.contour(
        alphas, betas, loss, levels=levels, norm=norm, colors="k", linewidths=0.4, alpha=0.45
    )
    ax.plot([0], [0], marker="*", color="white", markeredgecolor="k", markersize=11, zorder=5)
    ax.set_xlabel(r"$\alpha$ (direction 1)")
    ax.set_ylabel(r"$\beta$ (direction 2)")
    ax.set_box_aspect(1)  # both directions have the same scale
    _few_ticks(ax, "x", "y")
    return filled


def _few_ticks(ax: Any, *names: str) -> None:
    """At most 5 ticks on the named axes, so that side-by-side panels' labels do not collide."""
    for name in names:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(5))


def _colorbar(
    fig: Any, mappable: Any, ax: Any, low: float, high: float, log: bool, **kw: Any
) -> Any:
    """A colorbar with round ticks (not the contour levels) inside ``[low, high]``."""
    if log:
        subs = (1.0,) if high / low > 1e3 else (1.0, 2.0, 5.0)
        ticks = LogLocator(subs=subs).tick_values(low, high)
    else:
        ticks = MaxNLocator(7).tick_values(low, high)
    bar = fig.colorbar(mappable, ax=ax, **kw)
    bar.set_ticks([t for t in ticks if low <= t <= high])
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bar.ax.minorticks_off()
    return bar


def _norm(low: float, high: float, log: bool) -> Any:
    return LogNorm(low, high) if log else Normalize(low, high)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _origin_text(landscape: Landscape) -> str:
    origin = landscape.origin_loss
    if isinstance(origin, tuple):
        return f"loss {origin[0]:.3g} / {origin[1]:.3g} at t = 0 / 1"
    return f"loss {origin:.3g} at the star"


def plot_contour(
    landscape: Landscape,
    path: str | Path,
    *,
    title: str | None = None,
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """Filled contours of a plane's loss with contour lines and a colorbar (log-spaced levels
    and colours with ``log``); values beyond ``vmin``/``vmax`` take the end colours."""
    _check_plane(landscape)
    path = Path(path)
    low, high = _loss_range([landscape.loss], vmin, vmax, log)
    level_values = _levels(low, high, levels, log)
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    ax = fig.subplots()
    filled = _contour_panel(
        ax,
        landscape,
        level_values,
        _norm(low, high, log),
        _extend([landscape.loss], low, high),
        cmap,
    )
    _colorbar(fig, filled, ax, low, high, log, label="loss" + (" (log scale)" if log else ""))
    ax.set_title(title or f"Loss landscape ({_origin_text(landscape)})", fontsize="medium")
    return _save(fig, path)


def _surface_panel(
    ax: Any, landscape: Landscape, low: float, high: float, log: bool, cmap: str
) -> Any:
    """A 3-D surface of the loss clipped to ``[low, high]`` (log10 of it with ``log``)."""
    alphas, betas = landscape.coordinates
    mesh_a, mesh_b = np.meshgrid(alphas, betas)  # (grid, grid), [beta, alpha] like the loss
    z = np.clip(landscape.loss, low, high)
    if log:
        z, low, high = np.log10(z), math.log10(low), math.log10(high)
    surface = ax.plot_surface(
        mesh_a,
        mesh_b,
        np.ma.masked_invalid(z),
        cmap=cmap,
        vmin=low,
        vmax=high,
        rstride=1,
        cstride=1,
        linewidth=0.1,
        edgecolor="none",
        antialiased=True,
    )
    ax.set_zlim(low, high)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\beta$")
    _few_ticks(ax, "x", "y", "z")
    ax.view_init(elev=35, azim=-55)
    return surface


def plot_surface(
    landscape: Landscape,
    path: str | Path,
    *,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """A 3-D surface of a plane's loss; the loss is clipped to ``[vmin, vmax]`` (default: its
    range) and drawn as ``log10`` with ``log``."""
    _check_plane(landscape)
    path = Path(path)
    low, high = _loss_range([landscape.loss], vmin, vmax, log)
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    _surface_panel(ax, landscape, low, high, log, cmap)
    ax.set_zlabel("log10 loss" if log else "loss")
    ax.set_title(title or f"Loss surface ({_origin_text(landscape)})", fontsize="medium")
    return _save(fig, path)


def plot_line(
    landscapes: dict[str, Landscape],
    path: str | Path,
    *,
    title: str | None = None,
    accuracy: bool = True,
    log: bool = False,
) -> Path:
    """1-D landscapes (lines and interpolations) on one axis: loss solid (left axis), accuracy
    dashed (right axis, in %, where defined); dotted verticals at the models (0, and 1 for an
    interpolation)."""
    if not landscapes:
        raise ValueError("landscapes is empty")
    for name, landscape in landscapes.items():
        if landscape.kind == "plane":
            raise ValueError(f"landscapes[{name!r}] is a plane; draw it with plot_contour")
    path = Path(path)
    cmap = colormaps["tab10"]
    fig = Figure(figsize=(8.4, 4.4), layout="constrained")
    ax = fig.subplots()
    acc_ax = None
    kinds = {landscape.kind for landscape in landscapes.values()}
    for x in (0.0, 1.0) if "interpolation" in kinds else (0.0,):
        ax.axvline(x, color="0.5", linestyle=":", linewidth=1)
    handles = []
    for i, (name, landscape) in enumerate(landscapes.items()):
        color = cmap(i % 10)
        (x,) = landscape.coordinates
        handles += ax.plot(x, landscape.loss, color=color, linewidth=1.8, label=name)
        if accuracy and np.isfinite(landscape.accuracy).any():
            if acc_ax is None:
                acc_ax = ax.twinx()
                acc_ax.set_ylabel("accuracy (%), dashed")
            acc_ax.plot(x, 100 * landscape.accuracy, color=color, linestyle="--", linewidth=1.3)
    if log:
        ax.set_yscale("log")
    names = {"line": r"$\alpha$ (along the direction)", "interpolation": "t (model a to model b)"}
    ax.set_xlabel(names[next(iter(kinds))] if len(kinds) == 1 else r"$\alpha$ or t")
    ax.set_ylabel("loss" + (" (log scale)" if log else "") + ", solid")
    ax.grid(alpha=0.3)
    if acc_ax is not None:  # one entry per run (its colour) and one per line style
        handles += ax.plot([], [], color="0.3", linewidth=1.8, label="loss")
        handles += ax.plot([], [], color="0.3", linestyle="--", linewidth=1.3, label="accuracy")
    # Outside the axes: the curves fill the plot from edge to edge.
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.12, 1.0))
    ax.set_title(title or "Loss along 1-D slices", fontsize="medium")
    return _save(fig, path)


def plot_comparison(
    landscapes: dict[str, Landscape],
    path: str | Path,
    *,
    kind: str = "contour",
    title: str | None = None,
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    cmap: str = "viridis",
) -> Path:
    """Planes of several runs side by side (e.g. ``{"adam": ..., "sam": ..., "gcsam": ...}``, like
    Li et al.'s Figure 3) on one shared colour scale: the same levels, ``vmin`` and ``vmax``
    (default: the extremes over all panels) and one colorbar. ``kind="surface"`` draws 3-D
    surfaces with a shared z range instead."""
    check_choice("kind", kind, ("contour", "surface"))
    _check_planes(landscapes)
    path = Path(path)
    low, high = _loss_range([ls.loss for ls in landscapes.values()], vmin, vmax, log)
    if kind == "contour":
        fig = _contour_comparison(landscapes, low, high, levels, log, cmap)
    else:
        fig = _surface_comparison(landscapes, low, high, log, cmap)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _contour_comparison(
    landscapes: dict[str, Landscape], low: float, high: float, levels: int, log: bool, cmap: str
) -> Figure:
    """One contour panel per plane, one row, shared levels and one colorbar."""
    surfaces = [landscape.loss for landscape in landscapes.values()]
    level_values = _levels(low, high, levels, log)
    norm, extend = _norm(low, high, log), _extend(surfaces, low, high)
    count = len(landscapes)
    fig = Figure(figsize=(3.9 * count + 1.4, 5.0), layout="constrained")
    axes = fig.subplots(1, count, sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, landscape) in zip(axes, landscapes.items(), strict=True):
        filled = _contour_panel(ax, landscape, level_values, norm, extend, cmap)
        ax.set_title(f"{name}\n{_origin_text(landscape)}", fontsize="medium")
        ax.label_outer()
    label = "loss" + (" (log scale)" if log else "")
    _colorbar(fig, filled, list(axes), low, high, log, label=label)
    return fig


def _surface_comparison(
    landscapes: dict[str, Landscape], low: float, high: float, log: bool, cmap: str
) -> Figure:
    """One 3-D surface per plane, one row, a shared z range and one colorbar."""
    count = len(landscapes)
    fig = Figure(figsize=(4.6 * count + 1.2, 4.8), layout="constrained")
    axes = [fig.add_subplot(1, count, i + 1, projection="3d") for i in range(count)]
    for ax, (name, landscape) in zip(axes, landscapes.items(), strict=True):
        _surface_panel(ax, landscape, low, high, log, cmap)
        ax.set_title(f"{name}\n{_origin_text(landscape)}", fontsize="medium")
    # The surfaces are drawn in log10 units under log: a linear colour scale of those.
    scale = (math.log10(low), math.log10(high)) if log else (low, high)
    mappable = ScalarMappable(norm=_norm(*scale, log=False), cmap=cmap)
    label = "log10 loss" if log else "loss"
    _colorbar(fig, mappable, axes, *scale, log=False, shrink=0.7, label=label)
    return fig
