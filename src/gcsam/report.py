"""The comparison report: load finished runs, aggregate them over seeds, test, write and plot.

A run directory holds ``config.json``, ``metrics.jsonl`` (one record per epoch) and, once the run
has finished, ``summary.json``. Runs are grouped by optimizer; every statistic is a mean and a
sample standard deviation over seeds, and the reference optimizer (GCSAM by default) is compared
with each other one by a paired t-test over the seeds both ran.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import METRICS

FLATNESS_KEYS: tuple[str, ...] = ("top_eigenvalue", "hessian_trace", "sam_sharpness")
"""Flatness of the final weights (``gcsam compare --sharpness``), in ``summary.json``."""

SUMMARY_KEYS: tuple[str, ...] = (
    "epochs_to_target",
    "time_to_target_s",
    "total_time_s",
    "best_epoch",
    *FLATNESS_KEYS,
)
"""Per-run numbers of ``summary.json`` aggregated next to the test metrics."""

CANONICAL_ORDER: tuple[str, ...] = (
    "sgd",
    "adam",
    "adamw",
    "gc-sgd",
    "gc-adam",
    "sam",
    "asam",
    "gcsam",
)
"""Table order: plain baselines first, the reference-like methods last; others alphabetically."""

# Table order and headers; loss is the only metric not shown in percent.
TABLE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "f1",
    "precision",
    "recall",
    "specificity",
    "roc_auc",
    "loss",
)
METRIC_NAMES: dict[str, str] = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced acc.",
    "f1": "F1",
    "precision": "Precision",
    "recall": "Recall",
    "specificity": "Specificity",
    "roc_auc": "ROC AUC",
    "loss": "Loss",
}
_SKIP_DIRS = {"__pycache__", "checkpoints"}
_MAX_DEPTH = 4  # how far below a given folder run directories are searched for


@dataclass
class Run:
    """One training run as read from its directory."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optimizer") or self.summary.get("optimizer") or "unknown")

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.summary.get("seed", 0)))

    @property
    def base(self) -> str | None:
        return self.config.get("base")

    def value(self, key: str) -> float | None:
        """A test metric (``key`` in :data:`METRICS`) or a summary number; None when missing."""
        source = self.summary.get("test", {}) if key in METRICS else self.summary
        value = source.get(key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the runs that have
    the value; NaN for both when none has it."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """Reference minus other, averaged over paired seeds, and the paired t-test's p-value (NaN
    with fewer than 2 pairs, or when every difference is 0)."""

    diff: float
    p_value: float
    n: int
    seeds: tuple[int, ...]


@dataclass
class ReportData:
    """Everything the report shows; :func:`summarize` builds it."""

    groups: dict[str, list[Run]]  # optimizer label -> its runs sorted by seed, in table order
    stats: dict[str, dict[str, Stat]]  # label -> METRICS + SUMMARY_KEYS -> Stat
    reference: str | None  # the label tested against the others; None when absent
    requested_reference: str
    tests: dict[str, dict[str, PairedTest]]  # other label -> METRICS -> PairedTest
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def optimizers(self) -> list[str]:
        return list(self.groups)


# ---------------------------------------------------------------------------------------------
# loading


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("summary.json", "config.json", "metrics.jsonl"))


def _find_run_dirs(path: Path, depth: int = 0) -> list[Path]:
    """``path`` itself when it is a run directory, else the run directories below it."""
    if _is_run_dir(path):
        return [path]
    if depth >= _MAX_DEPTH or not path.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name not in _SKIP_DIRS:
            found += _find_run_dirs(child, depth + 1)
    return found


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN_DIR/metrics.jsonl``; a line cut short by a kill is
    ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Read finished runs from run directories or from folders that hold them (searched a few
    levels deep, e.g. a ``gcsam compare`` output folder).

    Unfinished runs (no ``summary.json``, or a status other than ``"finished"``) are skipped with
    a warning listing them. Raises ``FileNotFoundError`` for a path that does not exist and
    ``ValueError`` naming the paths when no finished run is found.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("no run directories given")
    candidates: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        candidates += _find_run_dirs(path)

    runs: list[Run] = []
    unfinished: list[str] = []
    seen: set[Path] = set()
    for run_dir in candidates:
        if run_dir.resolve() in seen:  # the same run named twice, directly and via its parent
            continue
        seen.add(run_dir.resolve())
        try:
            summary = _read_json(run_dir / "summary.json")
        except json.JSONDecodeError:
            unfinished.append(f"{run_dir} (unreadable summary.json)")
            continue
        if not summary:
            unfinished.append(f"{run_dir} (no summary.json)")
            continue
        if summary.get("status", "finished") != "finished":
            unfinished.append(f"{run_dir} (status {summary['status']!r})")
            continue
        config = _read_json(run_dir / "config.json")
        runs.append(Run(run_dir, config, read_history(run_dir), summary))

    if unfinished:
        warnings.warn(
            f"skipping {len(unfinished)} unfinished run(s): {', '.join(unfinished)}",
            stacklevel=2,
        )
    if not runs:
        where = ", ".join(map(str, paths))
        raise ValueError(f"no finished runs (run directories with a summary.json) in {where}")
    return runs


# ---------------------------------------------------------------------------------------------
# aggregation


def _labels(runs: Sequence[Run]) -> list[str]:
    """The optimizer name, or ``optimizer-base`` when runs of one optimizer differ in base."""
    bases: dict[str, set[str | None]] = {}
    for run in runs:
        bases.setdefault(run.optimizer, set()).add(run.base)
    return [
        run.optimizer
        if len(bases[run.optimizer]) == 1 or run.base is None
        else f"{run.optimizer}-{run.base}"
        for run in runs
    ]


def _order_key(label: str, optimizer: str) -> tuple[int, str, str]:
    known = optimizer in CANONICAL_ORDER
    return (CANONICAL_ORDER.index(optimizer) if known else len(CANONICAL_ORDER)), optimizer, label


def _stat(values: Sequence[float]) -> Stat:
    import numpy as np

    if not values:
        return Stat(math.nan, math.nan, 0)
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return Stat(float(array.mean()), std, len(array))


def _per_seed(runs: Sequence[Run], key: str) -> dict[int, float]:
    """Seed -> value (the mean when a seed was run more than once)."""
    values: dict[int, list[float]] = {}
    for run in runs:
        value = run.value(key)
        if value is not None:
            values.setdefault(run.seed, []).append(value)
    return {seed: sum(v) / len(v) for seed, v in values.items()}


def _paired_test(reference: Sequence[Run], other: Sequence[Run], key: str) -> PairedTest:
    import numpy as np
    from scipy import stats

    ref, oth = _per_seed(reference, key), _per_seed(other, key)
    seeds = tuple(sorted(set(ref) & set(oth)))
    a = np.array([ref[s] for s in seeds], dtype=np.float64)
    b = np.array([oth[s] for s in seeds], dtype=np.float64)
    diff = float((a - b).mean()) if seeds else math.nan
    p_value = math.nan
    if len(seeds) >= 2:
        # Identical pairs make t = 0/0: scipy warns and returns NaN, which is what we report.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p_value = float(stats.ttest_rel(a, b).pvalue)
    return PairedTest(diff, p_value, len(seeds), seeds)


def _unique(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value is not None and value not in out:
            out.append(value)
    return out


def summarize(runs: list[Run], reference: str = "gcsam") -> ReportData:
    """Group ``runs`` by optimizer label, aggregate over seeds and test ``reference`` against
    every other optimizer (see :class:`Stat` and :class:`PairedTest`)."""
    if not runs:
        raise ValueError("no runs to summarize")
    by_label: dict[str, list[Run]] = {}
    optimizer_of: dict[str, str] = {}
    for run, label in zip(runs, _labels(runs), strict=True):
        by_label.setdefault(label, []).append(run)
        optimizer_of[label] = run.optimizer
    order = sorted(by_label, key=lambda label: _order_key(label, optimizer_of[label]))
    groups = {label: sorted(by_label[label], key=lambda r: r.seed) for label in order}

    for label, group in groups.items():
        seeds = [run.seed for run in group]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            warnings.warn(
                f"{label} has several runs for seed(s) {repeated}: all count in its mean, and the "
                "paired tests use their average per seed",
                stacklevel=2,
            )

    stats = {
        label: {
            key: _stat([v for v in (run.value(key) for run in group) if v is not None])
            for key in (*METRICS, *SUMMARY_KEYS)
        }
        for label, group in groups.items()
    }
    ref = reference if reference in groups else None
    tests = {
        label: {key: _paired_test(groups[ref], group, key) for key in METRICS}
        for label, group in groups.items()
        if ref is not None and label != ref
    }
    meta = {
        "datasets": _unique(run.config.get("dataset") for run in runs),
        "models": _unique(run.config.get("model") for run in runs),
        "epochs": _unique(run.config.get("epochs") for run in runs),
        "seeds": sorted({run.seed for run in runs}),
        "targets": _unique(run.summary.get("target_val_accuracy") for run in runs),
    }
    return ReportData(groups, stats, ref, reference, tests, meta)


# ---------------------------------------------------------------------------------------------
# formatting


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def _mean_std(stat: Stat, scale: float = 1.0, decimals: int = 2) -> str:
    if not _finite(stat.mean):
        return "n/a"
    std = f"{scale * stat.std:.{decimals}f}" if _finite(stat.std) else "n/a"
    return f"{scale * stat.mean:.{decimals}f} ± {std}"


def _metric_cell(stat: Stat, metric: str) -> str:
    return _mean_std(stat, 1.0, 4) if metric == "loss" else _mean_std(stat, 100.0, 2)


def _diff_cell(test: PairedTest, metric: str) -> str:
    if not _finite(test.diff):
        return "n/a"
    return f"{test.diff:+.4f}" if metric == "loss" else f"{100 * test.diff:+.2f}"


def format_p(p_value: float) -> str:
    """Three significant digits, ``n/a`` for NaN."""
    return f"{p_value:#.3g}" if _finite(p_value) else "n/a"


def _target_cell(stat: Stat, runs: int, decimals: int) -> str:
    if stat.n == 0:
        return "not reached"
    cell = _mean_std(stat, 1.0, decimals)
    return cell if stat.n == runs else f"{cell} ({stat.n}/{runs})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A Markdown table padded to column width, so that it also reads well as plain text;
    ``align`` holds ``l`` or ``r`` per column."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)
    ]
    return [line(header), line(rule), *(line(row) for row in rows)]


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "?"


def _title(data: ReportData) -> list[str]:
    meta = data.meta
    seeds = meta["seeds"]
    details = [
        f"{_join(meta['epochs'])} epochs",
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({_join(seeds)})",
    ]
    if meta["targets"]:
        details.append(
            "target validation accuracy " + ", ".join(f"{100 * t:.2f}%" for t in meta["targets"])
        )
    return [
        f"# Optimizer comparison: {_join(meta['datasets'])}, {_join(meta['models'])}",
        "",
        "; ".join(details) + ".",
    ]


def _results_table(data: ReportData) -> list[str]:
    with_target = bool(data.meta["targets"])
    header = ["Optimizer", "Seeds", *(f"{METRIC_NAMES[m]} (%)" for m in TABLE_METRICS[:-1])]
    header += ["Loss"]
    if with_target:
        header += ["Epochs to target", "Time to target (s)"]
    header += ["Time (s)"]
    rows = []
    for label, group in data.groups.items():
        stats = data.stats[label]
        row = [label, str(len(group)), *(_metric_cell(stats[m], m) for m in TABLE_METRICS)]
        if with_target:
            row += [
                _target_cell(stats["epochs_to_target"], len(group), 1),
                _target_cell(stats["time_to_target_s"], len(group), 1),
            ]
        row.append(_mean_std(stats["total_time_s"], 1.0, 1))
        rows.append(row)
    return _table(header, rows, "l" + "r" * (len(header) - 1))


def _tests_table(data: ReportData) -> list[str]:
    ref = data.reference
    if ref is None:
        return [
            f"No paired tests: the reference optimizer {data.requested_reference!r} is not among "
            f"the runs ({', '.join(data.optimizers)})."
        ]
    if not data.tests:
        return [f"No paired tests: {ref} is the only optimizer."]
    header = ["Metric"]
    for other in data.tests:
        header += [f"{ref} vs {other}", "p"]
    rows = []
    for metric in TABLE_METRICS:
        unit = " (raw)" if metric == "loss" else " (points)"
        row = [METRIC_NAMES[metric] + unit]
        for tests in data.tests.values():
            row += [_diff_cell(tests[metric], metric), format_p(tests[metric].p_value)]
        rows.append(row)
    pairs = {other: tests["accuracy"].n for other, tests in data.tests.items()}
    if len(set(pairs.values())) == 1:
        n_text = f"n = {next(iter(pairs.values()))} seed pairs"
    else:
        n_text = "n = " + ", ".join(f"{n} ({other})" for other, n in pairs.items()) + " seed pairs"
    note = (
        f"Paired two-sided t-test (scipy.stats.ttest_rel) of {ref} against each optimizer over "
        f"the seeds both ran, {n_text}. Differences are {ref} minus the other optimizer, in "
        "percentage points (loss: raw). n/a: fewer than 2 pairs, or identical results."
    )
    return [*_table(header, rows, "l" + "r" * (len(header) - 1)), "", note]


def format_report(data: ReportData) -> str:
    """The report as Markdown (what ``report.md`` holds)."""
    lines = _title(data)
    lines += [
        "",
        "## Test results",
        "",
        "Mean ± sample standard deviation over seeds; rates in percent. "
        + (
            "To target: over the runs whose validation accuracy reached the target, "
            "(k/n) when only k of n did. "
            if data.meta["targets"]
            else ""
        )
        + "Time: total training time per run.",
        "",
        *_results_table(data),
        "",
        f"## Paired tests against {data.reference or data.requested_reference}",
        "",
        *_tests_table(data),
        *_flatness_section(data),
    ]
    return "\n".join(lines) + "\n"


_FLATNESS_NAMES = {
    "top_eigenvalue": "Top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness",
}


def _flatness_section(data: ReportData) -> list[str]:
    """Mean ± std of the flatness measures, when the runs have them (smaller is flatter)."""
    if not any(data.stats[label]["top_eigenvalue"].n for label in data.optimizers):
        return []
    header = ["Optimizer", *(_FLATNESS_NAMES[k] for k in FLATNESS_KEYS)]
    rows = [
        [
            label,
            *(
                _mean_std(data.stats[label][k], decimals=4 if k == "sam_sharpness" else 2)
                for k in FLATNESS_KEYS
            ),
        ]
        for label in data.optimizers
    ]
    first = next(iter(data.groups.values()))[0].summary.get("flatness_settings", {})
    settings = ", ".join(f"{k} {v}" for k, v in first.items())
    return [
        "",
        "## Flatness of the final weights",
        "",
        "Smaller is flatter. Mean ± std over seeds" + (f" ({settings})." if settings else "."),
        "",
        *_table(header, rows, "l" + "r" * len(FLATNESS_KEYS)),
    ]


def format_sharpness(records: list[dict[str, Any]]) -> str:
    """A Markdown table of ``gcsam sharpness`` results, one row per run."""
    header = ["Run", "Optimizer", "Seed", "Top eigenvalues", "Trace ± s.e.", "SAM sharpness"]
    with_m = any("m_sharpness" in r for r in records)
    header += ["m-sharpness"] if with_m else []
    rows = []
    for record in records:
        trace = record.get("trace")
        row = [
            Path(record["run"]).name,
            record["optimizer"],
            str(record["seed"]),
            ", ".join(f"{v:.4g}" for v in record["top_eigenvalues"]["values"]),
            f"{trace['trace']:.4g} ± {trace['std_error'] or 0:.2g}" if trace else "",
            f"{record['sam_sharpness']['sharpness']:.4g}",
        ]
        if with_m:
            row.append(
                f"{record['m_sharpness']['sharpness']:.4g}" if "m_sharpness" in record else ""
            )
        rows.append(row)
    first = records[0]
    note = (
        f"On the {first['split']} split ({first['samples']} examples), eval mode; SAM sharpness: "
        f"largest loss increase within rho = {first['sam_sharpness']['rho']} "
        f"({'adaptive' if first['sam_sharpness']['adaptive'] else 'L2'} ball)."
    )
    return "\n".join([*_table(header, rows, "lllrrrr"[: len(header)]), "", note]) + "\n"


def write_sharpness(records: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``sharpness.md`` (the table) and ``sharpness.csv`` (plain numbers) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "sharpness.md"
    markdown.write_text(format_sharpness(records))
    table = out / "sharpness.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["run", "optimizer", "seed", "split", "samples", "top_eigenvalue", "trace",
             "trace_std_error", "sam_sharpness", "rho", "m_sharpness"]
        )  # fmt: skip
        for r in records:
            trace = r.get("trace") or {}
            writer.writerow(
                [
                    r["run"], r["optimizer"], r["seed"], r["split"], r["samples"],
                    _number(r["top_eigenvalues"]["values"][0]), _number(trace.get("trace")),
                    _number(trace.get("std_error")), _number(r["sam_sharpness"]["sharpness"]),
                    r["sam_sharpness"]["rho"],
                    _number(r["m_sharpness"]["sharpness"]) if "m_sharpness" in r else "",
                ]
            )  # fmt: skip
    return {"markdown": markdown, "csv": table}


# ---------------------------------------------------------------------------------------------
# files


def _number(value: float | None) -> str:
    """A CSV cell: the float's shortest exact form, empty when undefined."""
    return repr(float(value)) if value is not None and math.isfinite(value) else ""


def write_csv(data: ReportData, path: str | Path) -> Path:
    """One row per optimizer x statistic, plain numbers (empty cells for undefined values)."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["optimizer", "metric", "mean", "std", "n", "reference", "diff", "p_value", "n_pairs"]
        )
        for label in data.optimizers:
            for key, stat in data.stats[label].items():
                test = data.tests.get(label, {}).get(key)
                writer.writerow(
                    [
                        label,
                        key,
                        _number(stat.mean),
                        _number(stat.std),
                        stat.n,
                        data.reference if test else "",
                        _number(test.diff) if test else "",
                        _number(test.p_value) if test else "",
                        test.n if test else "",
                    ]
                )
    return path


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


def plot_learning_curves(data: ReportData, path: str | Path) -> Path:
    """Validation accuracy and loss per epoch: mean over seeds, band from min to max."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open windows
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    colors = _colors(data)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, key, scale, title in (
        (panels[0], "val_accuracy", 100.0, "Validation accuracy (%)"),
        (panels[1], "val_loss", 1.0, "Validation loss"),
    ):
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


def write_report(data: ReportData, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and (with ``plots``) ``learning_curves.png`` and
    ``test_metrics.png`` into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    markdown.write_text(format_report(data))
    paths = {"markdown": markdown, "csv": write_csv(data, out / "report.csv")}
    if plots:
        paths["learning_curves"] = plot_learning_curves(data, out / "learning_curves.png")
        paths["test_metrics"] = plot_test_metrics(data, out / "test_metrics.png")
    return paths
