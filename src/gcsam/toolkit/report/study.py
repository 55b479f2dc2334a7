"""A study's report: one comparison per value of the knob, side by side.

``report.md`` opens with the accuracy of every optimizer at every value (at the selected epoch,
and test, validation and training accuracy at the last) with GCSAM's paired differences,
then the epochs to a common validation accuracy and the flatness, each with its paired
differences, then each value's comparison; ``study.csv`` has every number, one row
per value x optimizer x statistic; ``study.png`` plots test accuracy, the last epoch's
validation accuracy and (when measured) the top Hessian eigenvalue against the knob.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .markdown import markdown_table
from .stats import CONFIDENCE, ReportData, Stat
from .tables import CSV_HEADER, csv_rows, diff_cell, format_p, format_report, mean_std

_LAST_TEST = "test_accuracy_last_epoch"


@dataclass
class StudyData:
    """A study's definition (``Study.to_json()``) and, per value of its knob in order, the
    :class:`ReportData` of that value's runs; ``tuning`` is what ``tuning.json`` holds for a
    tuned study (the budget, the space and each picked setting); ``frontiers`` the path of each
    value's cost-benefit figure relative to the study's report, where one was drawn."""

    study: dict[str, Any]
    regimes: dict[Any, ReportData]
    tuning: dict[str, Any] | None = None
    frontiers: dict[Any, str] = field(default_factory=dict)

    @property
    def knob(self) -> str:
        return self.study["knob"]

    @property
    def optimizers(self) -> list[str]:
        """Every optimizer label of any value, in table order."""
        labels: list[str] = []
        for data in self.regimes.values():
            labels += [label for label in data.optimizers if label not in labels]
        return labels

    def measured(self, key: str) -> bool:
        """Whether any run of any value has ``key`` (flatness is optional)."""
        return any(self.stat(v, o, key).n for v in self.regimes for o in self.optimizers)

    def stat(self, value: Any, label: str, key: str) -> Stat:
        stats = self.regimes[value].stats.get(label)
        return stats[key] if stats else Stat(math.nan, math.nan, 0)


def _value_text(knob: str, value: Any) -> str:
    if knob in ("label_noise",) and isinstance(value, float):
        return f"{100 * value:g} %"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _grid_table(result: StudyData, key: str, scale: float, decimals: int) -> list[str]:
    knob = result.knob
    header = ["Optimizer", *(f"{knob} = {_value_text(knob, v)}" for v in result.regimes)]
    rows = [
        [label, *(mean_std(result.stat(v, label, key), scale, decimals) for v in result.regimes)]
        for label in result.optimizers
    ]
    return markdown_table(header, rows, "l" + "r" * len(result.regimes))


def _if_measured(result: StudyData, key: str, title: str, table: list[str]) -> list[str]:
    """``title`` over ``table``, a table of ``key``; nothing when no run has it (runs from
    before the trainer recorded the last epoch's test accuracy)."""
    return [title, "", *table, ""] if result.measured(key) else []


def _differences_table(result: StudyData, key: str) -> list[str]:
    """GCSAM (the reference) minus each other optimizer in ``key``, per value, with its
    confidence interval and p."""
    knob = result.knob
    references = {data.reference for data in result.regimes.values()} - {None}
    if not references:
        return ["No paired tests: the reference optimizer is not among the runs."]
    reference = next(iter(references))
    others = [label for label in result.optimizers if label != reference]
    if not others:
        return [f"No paired tests: {reference} is the only optimizer."]
    header = [f"{reference} minus", *(f"{knob} = {_value_text(knob, v)}" for v in result.regimes)]
    rows = []
    for other in others:
        row = [other]
        for data in result.regimes.values():
            test = data.tests.get(other, {}).get(key)
            if test is None or not math.isfinite(test.diff):
                row.append("n/a")
            else:
                row.append(f"{diff_cell(test, key)} (p {format_p(test.p_value)})")
        rows.append(row)
    return markdown_table(header, rows, "l" + "r" * len(result.regimes))


def _with_differences(result: StudyData, key: str, title: str, decimals: int) -> list[str]:
    """``title``, the grid of ``key`` (raw, ``decimals``) and the reference minus each other
    optimizer in it; nothing when no run has ``key``."""
    if not result.measured(key):
        return []
    return [
        "",
        title,
        "",
        *_grid_table(result, key, 1.0, decimals),
        "",
        "The reference minus each optimizer (paired over seeds, as above):",
        "",
        *_differences_table(result, key),
    ]


def _convergence_section(result: StudyData) -> list[str]:
    """Epochs to each value's common validation target, with the paired differences."""
    table = _with_differences(result, "epochs_to_target", "Epochs to the target:", 1)
    if not table:
        return []
    targets = "; ".join(
        f"{_value_text(result.knob, value)}: "
        + ", ".join(f"{100 * t:.2f} %" for t in data.meta["targets"])
        for value, data in result.regimes.items()
    )
    return [
        "",
        "## Convergence: epochs to a common validation accuracy",
        "",
        "The first epoch at which a run's validation accuracy reached the target of its value "
        "of the knob (targets: "
        f"{targets}): the settings' target_accuracy, else the lowest best validation accuracy "
        "of that value's runs, which every run reaches. Smaller is faster; a run that never "
        "reached the target pairs with none.",
        *table,
    ]


def _flatness_section(result: StudyData) -> list[str]:
    """The flatness of the final weights, each measure with its paired differences."""
    if not result.measured("top_eigenvalue"):
        return []
    flatness = result.study.get("flatness") or {}
    return [
        "",
        "## Flatness of the final weights",
        "",
        "Smaller is flatter; measured on up to "
        f"{flatness.get('max_samples', '?')} training images (with their training labels, "
        "noisy ones included).",
        *_with_differences(result, "top_eigenvalue", "Top Hessian eigenvalue:", 1),
        *_with_differences(
            result,
            "hessian_trace",
            f"Hessian trace (Hutchinson, {flatness.get('trace_samples', '?')} samples):",
            0,
        ),
        *_with_differences(
            result,
            "sam_sharpness",
            "SAM sharpness (the largest loss increase in the ascent ball):",
            4,
        ),
    ]


def _sampler_seed(tune: dict[str, Any]) -> str:
    return f" seeded {tune['sampler_seed']}" if tune.get("sampler_seed") else ""


def _tuning_section(result: StudyData) -> list[str]:
    """How each optimizer was tuned: the budget, the sampler, the space and the picked setting
    with its validation score (nothing for an untuned study)."""
    if result.tuning is None:
        return []
    tune = result.tuning["tune"]
    space = tune["space"]
    lines = [
        "## Tuning",
        "",
        f"Every optimizer had the same budget: {tune['trials']} distinct settings per value of "
        f"{result.knob} ({tune['sampler']} sampler{_sampler_seed(tune)}, Optuna), each one run "
        "at seed "
        f"{tune['seed'] if tune['seed'] is not None else result.study['seeds'][0]} and scored "
        f"on {result.tuning['selected_on']}; an optimizer with nothing to tune ran once, at its "
        "defaults. The picked setting then trained every seed; test accuracy played no part in "
        "the choice.",
        "",
        "Search space: "
        + (
            "; ".join(
                f"{'every optimizer' if key == '*' else key}: {_space_text(params)}"
                for key, params in space.items()
            )
            or "none"
        )
        + ".",
        "",
        *_pruning_text(tune.get("prune"), result.tuning["cells"]),
    ]
    rows = [
        [
            _value_text(result.knob, cell["value"]),
            cell["optimizer"],
            _trials_text(cell["trials"]),
            ", ".join(f"{k} {_number(v)}" for k, v in sorted(cell["params"].items())) or "defaults",
            "-" if math.isnan(cell["score"]) else f"{cell['score']:.4f}",
        ]
        for cell in result.tuning["cells"]
    ]
    header = [result.knob, "optimizer", "trials", "picked setting", "validation score"]
    return [*lines, *markdown_table(header, rows, "llrlr"), ""]


def _pruned(trials: list[dict[str, Any]]) -> int:
    return sum(t.get("state") == "pruned" for t in trials)


def _trials_text(trials: list[dict[str, Any]]) -> str:
    pruned = _pruned(trials)
    return f"{len(trials)} ({pruned} pruned)" if pruned else str(len(trials))


def _pruning_text(prune: dict[str, int] | None, cells: list[dict[str, Any]]) -> list[str]:
    """What the median pruner stopped, and the epochs it saved (nothing without pruning)."""
    if prune is None:
        return []
    trials = [t for cell in cells for t in cell["trials"]]
    trained = sum(t.get("epochs") or 0 for t in trials)
    unpruned = sum(
        cell["epochs_per_trial"] if t.get("state") == "pruned" else (t.get("epochs") or 0)
        for cell in cells
        for t in cell["trials"]
    )
    saved = f"{100 * (1 - trained / unpruned):.0f} %" if unpruned else "none"
    return [
        f"Pruning: Optuna's median pruner on each epoch's best validation score "
        f"({prune['startup_trials']} startup trial(s) per optimizer, {prune['warmup_epochs']} "
        f"warmup epoch(s) per trial). It stopped {_pruned(trials)} of the "
        f"{len(trials)} trials; they trained {trained} epochs in all, against {unpruned} had "
        f"the stopped ones run to their end ({saved} saved). A stopped trial counts against "
        "the budget and is never picked.",
        "",
    ]


def _space_text(params: dict[str, Any]) -> str:
    parts = []
    for name, spec in params.items():
        if isinstance(spec, list):
            parts.append(f"{name} in {{{', '.join(_number(v) for v in spec)}}}")
        else:
            scale = " (log)" if spec["log"] else ""
            parts.append(f"{name} in [{_number(spec['low'])}, {_number(spec['high'])}]{scale}")
    return ", ".join(parts)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_study_report(result: StudyData) -> str:
    """The study's report as Markdown (what ``report.md`` holds)."""
    study = result.study
    settings = ", ".join(f"{k} {v}" for k, v in study["settings"].items())
    lines = [
        f"# Study {study['name']}: {result.knob} in "
        + ", ".join(_value_text(result.knob, v) for v in result.regimes),
        "",
    ]
    if study.get("description"):
        lines += [study["description"], ""]
    labels = [o if isinstance(o, str) else o["label"] for o in study["optimizers"]]
    lines += [
        f"Shared settings: {settings or 'the defaults'}. Optimizers: "
        f"{', '.join(labels)}; seeds {', '.join(map(str, study['seeds']))}.",
        "",
        *_tuning_section(result),
        "## Test accuracy (%)",
        "",
        "Mean ± sample standard deviation over seeds, at the epoch of best validation accuracy.",
        "",
        *_grid_table(result, "accuracy", 100.0, 2),
        "",
        "## After the last epoch (%)",
        "",
        *_if_measured(
            result,
            _LAST_TEST,
            "Test accuracy after the last epoch (what a run without early stopping keeps):",
            _grid_table(result, _LAST_TEST, 100.0, 2),
        ),
        "Validation accuracy after the last epoch:",
        "",
        *_grid_table(result, "last_val_accuracy", 100.0, 2),
        "",
        "Training accuracy in the last epoch, on the training labels (noisy ones included: "
        "how much of its training set each optimizer memorized):",
        "",
        *_grid_table(result, "last_train_accuracy", 100.0, 2),
        "",
        "## Paired differences (points)",
        "",
        "The reference minus each optimizer, mean over seeds, with the mean difference's "
        f"{CONFIDENCE:.0%} confidence interval in brackets (Student's t over the seed pairs: "
        "the differences the seeds do not rule out), and the paired two-sided t-test's p "
        "(scipy.stats.ttest_rel). Test accuracy at the best validation epoch:",
        "",
        *_differences_table(result, "accuracy"),
        "",
        *_if_measured(
            result,
            _LAST_TEST,
            "Test accuracy after the last epoch:",
            _differences_table(result, _LAST_TEST),
        ),
        "Validation accuracy after the last epoch:",
        "",
        *_differences_table(result, "last_val_accuracy"),
    ]
    lines += [*_convergence_section(result), *_flatness_section(result)]
    lines += ["", "![Test accuracy against the knob](study.png)"]
    for value, data in result.regimes.items():
        # its own title names the data set again
        body = format_report(data, result.frontiers.get(value)).splitlines()[1:]
        lines += ["", f"## {result.knob} = {_value_text(result.knob, value)}"]
        lines += [("#" + line if line.startswith("## ") else line) for line in body]
    return "\n".join(lines).rstrip() + "\n"


def write_study_csv(result: StudyData, path: str | Path) -> Path:
    """The comparison CSV of every value (:func:`~.tables.csv_rows`), each row led by the
    knob's value: one row per value x optimizer x statistic."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([result.knob, *CSV_HEADER])
        for value, data in result.regimes.items():
            writer.writerows([value, *row] for row in csv_rows(data))
    return path


def plot_study(result: StudyData, path: str | Path) -> Path:
    """Test accuracy, validation accuracy after the last epoch and (when measured) the top
    Hessian eigenvalue on a log scale against the knob: one line per optimizer, the mean with a
    ± std bar at each value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    values = list(result.regimes)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    panels = [
        ("accuracy", "test accuracy (%), best validation epoch", 100.0, False),
        ("last_val_accuracy", "validation accuracy (%), last epoch", 100.0, False),
    ]
    if result.measured("top_eigenvalue"):
        panels.append(("top_eigenvalue", "top Hessian eigenvalue (smaller: flatter)", 1.0, True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.0), squeeze=False)
    cmap = colormaps["tab10"]
    for ax, (key, title, scale, log) in zip(axes[0], panels, strict=True):
        for i, label in enumerate(result.optimizers):
            stats = [result.stat(v, label, key) for v in values]
            points = [(x, s) for x, s in zip(xs, stats, strict=True) if s.n]
            if not points:
                continue
            reference = label == next(iter(result.regimes.values())).reference
            ax.errorbar(
                [x for x, _ in points],
                [scale * s.mean for _, s in points],
                yerr=[scale * s.std for _, s in points],
                label=label,
                color=cmap(i % 10),
                marker="o",
                capsize=3,
                linewidth=2.4 if reference else 1.4,
                zorder=3 if reference else 2,
            )
        positive = numeric and all(v > 0 for v in values)
        if positive and max(values) / min(values) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([_value_text(result.knob, v) for v in values])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(result.knob)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"Study {result.study['name']}: mean ± std over seeds")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_study_report(
    result: StudyData, out_dir: str | Path, *, plots: bool = True
) -> dict[str, Path]:
    """Write ``report.md``, ``study.csv`` and (with ``plots``) ``study.png`` into ``out_dir``;
    returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    markdown.write_text(format_study_report(result))
    paths = {"markdown": markdown, "csv": write_study_csv(result, out / "study.csv")}
    if plots and any(data.groups for data in result.regimes.values()):
        paths["plot"] = plot_study(result, out / "study.png")
    return paths
