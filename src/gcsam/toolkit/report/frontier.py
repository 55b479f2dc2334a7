"""Cost against benefit: the frontier figure and the verdict table of a comparison.

x is what a method costs, measured against its base optimizer's run of the same seed: the
training forward/backward passes in all (counted by the trainer: a two-pass method at 2.00, the
base at twice the epochs too) and the training wall time; y is test accuracy at the selected
(best-validation) epoch and at the last epoch. A method is on the Pareto set when no other is
at most as costly and at least as accurate, and strictly better in one of the two. The verdict
names the most accurate method and those a paired t-test over seeds cannot tell from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .markdown import difference_text, markdown_table
from .stats import CONFIDENCE, PairedTest, ReportData, paired_test

COSTS: dict[str, str] = {
    "passes_vs_base": "training passes / the base optimizer's",
    "time_vs_base": "training time / the base optimizer's",
}
"""The cost axes: summary numbers of every run, by the name the figure gives them."""
BENEFITS: dict[str, str] = {
    "accuracy": "test accuracy (%), best-validation epoch",
    "test_accuracy_last_epoch": "test accuracy (%), last epoch",
}
"""The accuracy axes: at the epoch selection keeps, and at the last epoch (no selection)."""
TIED_P = 0.05
"""A method is tied with the best when the paired test's p is at least this."""


def pareto(data: ReportData, cost: str, benefit: str) -> list[str]:
    """The labels no other label dominates on mean ``cost`` (lower is better) and mean
    ``benefit`` (higher is better); labels missing either are left out."""
    points = {
        label: (stats[cost].mean, stats[benefit].mean)
        for label, stats in data.stats.items()
        if math.isfinite(stats[cost].mean) and math.isfinite(stats[benefit].mean)
    }

    def dominated(x: float, y: float) -> bool:
        return any((ox <= x and oy >= y) and (ox < x or oy > y) for ox, oy in points.values())

    return [label for label, (x, y) in points.items() if not dominated(x, y)]


@dataclass(frozen=True)
class VerdictRow:
    """One method of the verdict: its accuracy, the paired test of the best against it (its
    difference, interval and p; ``diff`` 0 and ``p_value`` NaN for the best itself), whether it
    is tied with the best, and its costs."""

    label: str
    mean: float
    std: float
    test: PairedTest | None  # the best minus this method; None for the best itself
    tied: bool
    passes: float
    passes_ratio: float
    time_ratio: float

    @property
    def diff(self) -> float:
        return 0.0 if self.test is None else self.test.diff

    @property
    def p_value(self) -> float:
        return math.nan if self.test is None else self.test.p_value


def verdict(data: ReportData, benefit: str) -> list[VerdictRow]:
    """Every method by mean ``benefit``, the best first."""
    ranked = sorted(
        (label for label in data.groups if math.isfinite(data.stats[label][benefit].mean)),
        key=lambda label: -data.stats[label][benefit].mean,
    )
    if not ranked:
        return []
    best = ranked[0]
    rows = []
    for label in ranked:
        stats = data.stats[label]
        test = paired_test(data.groups[best], data.groups[label], benefit)
        is_best = label == best
        rows.append(
            VerdictRow(
                label=label,
                mean=stats[benefit].mean,
                std=stats[benefit].std,
                test=None if is_best else test,
                tied=is_best or (math.isfinite(test.p_value) and test.p_value >= TIED_P),
                passes=stats["passes_per_step"].mean,
                passes_ratio=stats["passes_vs_base"].mean,
                time_ratio=stats["time_vs_base"].mean,
            )
        )
    return rows


def _versus_best(test: PairedTest | None) -> str:
    if test is None:
        return "best"
    return difference_text(test) if math.isfinite(test.diff) else "n/a"


def format_frontier(data: ReportData, figure: str | None = None) -> list[str]:
    """The report's cost-benefit section: the figure (``figure``, a path relative to the
    report; None: none drawn) and a verdict table per accuracy."""
    lines = ["", "## Cost and benefit", ""]
    if figure is not None:
        lines += [f"![Test accuracy against the measured cost]({figure})", ""]
    lines += [
        f"Best: the highest mean. Tied: a paired two-sided t-test over seeds against the best "
        f"gives p >= {TIED_P} (with fewer than 2 paired seeds nothing is tied); the best "
        f"minus each method is shown with its {CONFIDENCE:.0%} confidence interval over the seed "
        "pairs. Pareto: no "
        "other method is as cheap in training passes and as accurate. Costs are over the base "
        "optimizer's run of the same seed.",
    ]
    for benefit, name in BENEFITS.items():
        rows = verdict(data, benefit)
        if not rows:
            continue
        front = set(pareto(data, "passes_vs_base", benefit))
        table = [
            [
                row.label,
                f"{100 * row.mean:.2f} ± {100 * (row.std if math.isfinite(row.std) else 0):.2f}",
                _versus_best(row.test),
                "-" if math.isnan(row.p_value) else f"{row.p_value:.3g}",
                "best" if i == 0 else ("tied" if row.tied else "behind"),
                "-" if math.isnan(row.passes) else f"{row.passes:.2f}",
                "-" if math.isnan(row.passes_ratio) else f"{row.passes_ratio:.2f}x",
                "-" if math.isnan(row.time_ratio) else f"{row.time_ratio:.2f}x",
                "yes" if row.label in front else "",
            ]
            for i, row in enumerate(rows)
        ]
        header = ["Optimizer", "Accuracy (%)", f"vs best (points, {CONFIDENCE:.0%} CI)", "p",
                  "verdict", "passes/step", "passes vs base", "time vs base", "Pareto"]  # fmt: skip
        lines += ["", f"{name[0].upper()}{name[1:]}:", ""]
        lines += markdown_table(header, table, "lrrrlrrrl")
    return lines


def plot_frontier(data: ReportData, path: str | Path) -> Path:
    """Accuracy (rows: best-validation epoch, last epoch) against cost (columns: training
    passes and training time over the base's), one point per optimizer with ± 1 std error bars over
    seeds; the Pareto set ringed and joined."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    path = Path(path)
    cmap = colormaps["tab10"]
    colors = {label: cmap(i % 10) for i, label in enumerate(data.optimizers)}
    benefits = [b for b in BENEFITS if any(math.isfinite(s[b].mean) for s in data.stats.values())]
    fig = Figure(figsize=(11, 4.2 * len(benefits)), layout="constrained")
    axes = fig.subplots(len(benefits), len(COSTS), squeeze=False)
    for row, benefit in enumerate(benefits):
        for column, cost in enumerate(COSTS):
            ax = axes[row][column]
            for label in data.optimizers:
                stats = data.stats[label]
                x, y = stats[cost], stats[benefit]
                if not (math.isfinite(x.mean) and math.isfinite(y.mean)):
                    continue
                ax.errorbar(
                    x.mean, 100 * y.mean, xerr=_std(x.std), yerr=100 * _std(y.std), fmt="o",
                    color=colors[label], capsize=3, label=label,
                )  # fmt: skip
                ax.annotate(label, (x.mean, 100 * y.mean), textcoords="offset points",
                            xytext=(5, 5), fontsize="small")  # fmt: skip
            front = sorted(
                (data.stats[label][cost].mean, 100 * data.stats[label][benefit].mean)
                for label in pareto(data, cost, benefit)
            )
            if front:
                xs, ys = zip(*front, strict=True)
                ax.step(xs, ys, where="post", color="0.5", linestyle="--", linewidth=1)
                ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="0.3",
                           label="Pareto set")  # fmt: skip
            ax.set_xlabel(COSTS[cost])
            ax.set_ylabel(BENEFITS[benefit])
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="outside right upper", fontsize="small")
    fig.suptitle("Cost and benefit: mean over seeds, error bars ± 1 std")
    fig.savefig(path, dpi=120)
    return path


def _std(value: float) -> float:
    return value if math.isfinite(value) else 0.0
