"""The comparison report: load finished runs, aggregate them over seeds, test, write and plot.

A run directory holds ``config.json``, ``metrics.jsonl`` (one record per epoch) and, once the run
has finished, ``summary.json``. Runs are grouped by optimizer, in the order of the registry
(:data:`gcsam.toolkit.optimizers.OPTIMIZERS`); every statistic is a mean and a sample standard
deviation over seeds, and the reference optimizer (GCSAM by default) is compared with each other
one by a paired t-test over the seeds both ran.

Modules: :mod:`.runs` (reading), :mod:`.stats` (aggregation and tests), :mod:`.tables`
(Markdown and CSV), :mod:`.frontier` (cost against benefit: the Pareto set and the verdict),
:mod:`.plots` (matplotlib figures).
"""

from __future__ import annotations

from pathlib import Path

from .frontier import plot_frontier
from .plots import plot_learning_curves, plot_test_metrics
from .runs import Run, load_runs
from .stats import (
    FLATNESS_KEYS,
    LAST_EPOCH_KEYS,
    RELATIVE_KEYS,
    SUMMARY_KEYS,
    TESTED_KEYS,
    PairedTest,
    ReportData,
    Stat,
    optimizer_rank,
    summarize,
)
from .tables import (
    METRIC_NAMES,
    TABLE_METRICS,
    format_p,
    format_report,
    format_sharpness,
    write_csv,
    write_sharpness,
)

__all__ = [
    "FLATNESS_KEYS",
    "LAST_EPOCH_KEYS",
    "METRIC_NAMES",
    "RELATIVE_KEYS",
    "SUMMARY_KEYS",
    "TABLE_METRICS",
    "TESTED_KEYS",
    "PairedTest",
    "ReportData",
    "Run",
    "Stat",
    "format_p",
    "format_report",
    "format_sharpness",
    "load_runs",
    "optimizer_rank",
    "plot_learning_curves",
    "plot_test_metrics",
    "summarize",
    "write_csv",
    "write_report",
    "write_sharpness",
]


def write_report(data: ReportData, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and (with ``plots``) ``learning_curves.png``,
    ``test_metrics.png`` and ``frontier.png`` (cost against accuracy) into ``out_dir``; returns
    their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    drawn = plots and bool(data.groups)  # nothing to draw when every run diverged
    markdown.write_text(format_report(data, "frontier.png" if drawn else None))
    paths = {"markdown": markdown, "csv": write_csv(data, out / "report.csv")}
    if drawn:
        paths["learning_curves"] = plot_learning_curves(data, out / "learning_curves.png")
        paths["test_metrics"] = plot_test_metrics(data, out / "test_metrics.png")
        paths["frontier"] = plot_frontier(data, out / "frontier.png")
    return paths
