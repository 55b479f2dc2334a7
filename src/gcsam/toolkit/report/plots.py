"""The report's figures: learning curves and test-metric bars.

matplotlib is imported inside the functions, so that the rest of the report works without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import Run
from .stats import ReportData
from .tables import METRIC_NAMES, TABLE_METRICS


def _colors(data: ReportData) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(data.optimizers)}


def _curve(
    runs: Sequence[Run], key: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, and the mean, min and max over runs of ``key`` at each epoch any run reached."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for position, record in enumerate(run.history, start=1):
            value = record.get(key)
            if value is not None and math.isfinite(value):
                by_epoch.setdefault(int(record.get("epoch", position)), []).append(float(value))
    epochs = sorted(by_epoch)
    return (
        epochs,
        [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def _curve_panel(
    ax: Any, data: ReportData, colors: dict[str, Any], key: str, scale: float, title: str
) -> None:
    """One history key per optimizer on ``ax``: the mean as a line, min to max as a band."""
    from matplotlib.ticker import MaxNLocator

    for label, group in data.groups.items():
        epochs, mean, low, high = _curve(group, key)
        if not epochs:
            continue
        reference = label == data.reference
        ax.plot(
            epochs,
            [scale * v for v in mean],
            color=colors[label],
            linewidth=2.4 if reference else 1.6,
            zorder=3 if reference else 2,
            label=f"{label} (n={len(group)})",
        )
        ax.fill_between(
            epochs,
            [scale * v for v in low],
            [scale * v for v in high],
            color=colors[label],
            alpha=0.18,
            linewidth=0,
        )
    if key == "val_accuracy":
        for target in data.meta["targets"]:
            ax.axhline(100 * target, color="0.4", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_learning_curves(data: ReportData, path: str | Path) -> Path:
    """Validation accuracy and loss per epoch: mean over seeds, band from min to max."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open windows

    path = Path(path)
    colors = _colors(data)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = fig.subplots(1, 2)
    _curve_panel(panels[0], data, colors, "val_accuracy", 100.0, "Validation accuracy (%)")
    _curve_panel(panels[1], data, colors, "val_loss", 1.0, "Validation loss")
    panels[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(
        "Mean over seeds; shaded: min to max"
        + (", dashed: target" if data.meta["targets"] else ""),
        fontsize="medium",
    )
    fig.savefig(path, dpi=120)
    return path


def plot_test_metrics(data: ReportData, path: str | Path) -> Path:
    """Grouped bars of the test rates per optimizer, error bars one standard deviation."""
    import numpy as np
    from matplotlib.figure import Figure

    path = Path(path)
    metrics = [m for m in TABLE_METRICS if m != "loss"]
    colors = _colors(data)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(data.optimizers)
    x = np.arange(len(metrics))
    lows, highs = [], []
    for i, label in enumerate(data.optimizers):
        stats = data.stats[label]
        means = np.array([100 * stats[m].mean for m in metrics])
        stds = np.nan_to_num(np.array([100 * stats[m].std for m in metrics]))
        offset = (i - (len(data.optimizers) - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=stds, capsize=3, color=colors[label], label=label)
        finite = np.isfinite(means)
        lows += list((means - stds)[finite])
        highs += list((means + stds)[finite])
    bottom = 0.0
    if lows:
        # Rates near 100% differ by a few points: start the axis below the lowest bar so that
        # the differences show, and say so.
        low, high = min(lows), max(highs)
        span = max(high - low, 1.0)
        bottom = max(0.0, math.floor((low - 0.6 * span) / 5) * 5)
        ax.set_ylim(bottom, high + 0.15 * span)
    ax.set_xticks(x, [METRIC_NAMES[m] for m in metrics])
    ax.set_ylabel("test set (%)" + (f", axis starts at {bottom:g}" if bottom > 0 else ""))
    ax.set_title("Test metrics: mean over seeds, error bars ± 1 std")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the bars
    fig.savefig(path, dpi=120)
    return path
