"""The report as text: Markdown (``report.md``, ``sharpness.md``) and CSV (``report.csv``,
``sharpness.csv``)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .frontier import format_frontier
from .markdown import difference_text, markdown_table
from .stats import CONFIDENCE, FLATNESS_KEYS, PairedTest, ReportData, Stat

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
_FLATNESS_NAMES = {
    "top_eigenvalue": "Top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness",
}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _number(value: float | None) -> str:
    """A CSV cell: the float's shortest exact form, empty when undefined."""
    return repr(float(value)) if _finite(value) else ""


def mean_std(stat: Stat, scale: float = 1.0, decimals: int = 2) -> str:
    if not _finite(stat.mean):
        return "n/a"
    std = f"{scale * stat.std:.{decimals}f}" if _finite(stat.std) else "n/a"
    return f"{scale * stat.mean:.{decimals}f} ± {std}"


def _metric_cell(stat: Stat, metric: str) -> str:
    return mean_std(stat, 1.0, 4) if metric == "loss" else mean_std(stat, 100.0, 2)


_EPOCHS_TO_TARGET = "Epochs to target"
# The format of the paired differences not shown in percentage points; every other key is a rate.
_RAW_FORMATS: dict[str, str] = {
    "loss": "+.4f",
    "epochs_to_target": "+.1f",
    "top_eigenvalue": "+.2f",
    "hessian_trace": "+.1f",
    "sam_sharpness": "+.4f",
}


def _test_row_name(key: str) -> str:
    """A row of the tests table: the name of ``key`` and its unit."""
    if key == "epochs_to_target":
        return _EPOCHS_TO_TARGET
    name = METRIC_NAMES.get(key) or _FLATNESS_NAMES[key]
    return f"{name} ({'raw' if key in _RAW_FORMATS else 'points'})"


def diff_cell(test: PairedTest, key: str) -> str:
    """The mean difference and its confidence interval (:func:`difference_text`): raw for the
    loss, the epochs to target and the flatness, else in percentage points; ``n/a`` when
    undefined."""
    if not _finite(test.diff):
        return "n/a"
    if key in _RAW_FORMATS:
        return difference_text(test, 1.0, _RAW_FORMATS[key])
    return difference_text(test)


def format_p(p_value: float) -> str:
    """Three significant digits, ``n/a`` for NaN."""
    return f"{p_value:#.3g}" if _finite(p_value) else "n/a"


def _of_runs(cell: str, stat: Stat, runs: int) -> str:
    """``cell``, followed by ``(k/n)`` when only k of the n runs had the value."""
    return cell if stat.n == runs else f"{cell} ({stat.n}/{runs})"


def _target_cell(stat: Stat, runs: int, decimals: int) -> str:
    if stat.n == 0:
        return "not reached"
    return _of_runs(mean_std(stat, 1.0, decimals), stat, runs)


def _passes_cell(stat: Stat, runs: int) -> str:
    """The mean passes per step, 2 decimals; ``n/a`` when no run counted them."""
    return "n/a" if stat.n == 0 else _of_runs(f"{stat.mean:.2f}", stat, runs)


def _ratio_cell(stat: Stat, runs: int) -> str:
    """A time ratio as ``1.98x ± 0.03``; ``n/a`` when no run has one."""
    if stat.n == 0:
        return "n/a"
    std = f"{stat.std:.2f}" if _finite(stat.std) else "n/a"
    return _of_runs(f"{stat.mean:.2f}x ± {std}", stat, runs)


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "?"


def _title(data: ReportData) -> list[str]:
    meta = data.meta
    seeds = meta["seeds"]
    details = [
        f"{_join(meta['epochs'])} epochs",
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({_join(seeds)})",
    ]
    details += meta.get("regimes", [])
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
        header += [_EPOCHS_TO_TARGET, "Time to target (s)"]
    header += ["Time (s)", "Passes/step", "Time/epoch vs base"]
    rows = []
    for label, group in data.groups.items():
        stats, n = data.stats[label], len(group)
        row = [label, str(n), *(_metric_cell(stats[m], m) for m in TABLE_METRICS)]
        if with_target:
            row += [
                _target_cell(stats["epochs_to_target"], n, 1),
                _target_cell(stats["time_to_target_s"], n, 1),
            ]
        row += [
            mean_std(stats["total_time_s"], 1.0, 1),
            _passes_cell(stats["passes_per_step"], n),
            _ratio_cell(stats["epoch_time_vs_base"], n),
        ]
        rows.append(row)
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


def _diverged_line(data: ReportData) -> list[str]:
    """Under the results table: the runs that diverged, which the table leaves out."""
    if not data.diverged:
        return []
    runs = []
    for run in data.diverged:
        at = run.summary.get("diverged_at") or {}
        runs.append(
            f"{run.optimizer} seed {run.seed} (epoch {at.get('epoch', '?')}, "
            f"step {at.get('step', '?')})"
        )
    return ["", f"Diverged, left out of the means and tests: {', '.join(runs)}."]


def _seeds(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {_join(sorted(seeds))}"


def _missing(data: ReportData) -> tuple[list[str], list[str]]:
    """The runs without passes per step, and those without a time relative to their base (with
    why), as ``label seeds ...`` texts."""
    passes = []
    for label, group in data.groups.items():
        seeds = [run.seed for run in group if run.value("passes_per_step") is None]
        passes += [f"{label} {_seeds(seeds)}"] if seeds else []
    no_base = [
        f"{label} {_seeds(seeds)} ({reason})"
        for label, reasons in data.no_base.items()
        for reason, seeds in reasons.items()
    ]
    return passes, no_base


def _cost_notes(data: ReportData) -> list[str]:
    """Under the results table: what its cost columns count, and why some cells are n/a."""
    notes = [
        "Passes/step: forward/backward passes per optimizer step, counted by the trainer as "
        "the run went (1 for a plain optimizer, 2 for SAM and GCSAM, fewer for their cheap "
        "modes); mean over seeds.",
        "Time/epoch vs base: the run's mean epoch time (training and validation) divided by "
        "that of its base optimizer's run with the same seed in the same comparison folder "
        "(gcsam on adam: the adam run), both timed in that comparison; mean ± std over seeds, "
        "1.00x for the base itself.",
    ]
    if data.meta["targets"]:
        notes.append(
            "Epochs / time to target: the first epoch whose validation accuracy reached the "
            "target, and the training time (validation included) until it ended, over the runs "
            "that reached it."
        )
    notes.append("Time (s): total training time per run (validation included).")
    passes, no_base = _missing(data)
    if passes:
        notes.append(
            f"No passes/step (run before the trainer counted passes): {'; '.join(passes)}."
        )
    if no_base:
        notes.append(f"No time/epoch vs base: {'; '.join(no_base)}.")
    return ["", *(f"- {note}" for note in notes)]


def _raw_names(measured: Sequence[str]) -> str:
    """The loss and whichever of the epochs to target and the flatness ``measured`` holds, as
    words: ``loss, epochs to target and flatness``."""
    names = ["loss"]
    names += ["epochs to target"] if "epochs_to_target" in measured else []
    names += ["flatness"] if set(measured) & set(FLATNESS_KEYS) else []
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


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
    # the convergence and flatness rows where some pair has them
    measured = [
        key
        for key in ("epochs_to_target", *FLATNESS_KEYS)
        if any(tests[key].n for tests in data.tests.values())
    ]
    rows = []
    for key in (*TABLE_METRICS, *measured):
        row = [_test_row_name(key)]
        for tests in data.tests.values():
            row += [diff_cell(tests[key], key), format_p(tests[key].p_value)]
        rows.append(row)
    pairs = {other: tests["accuracy"].n for other, tests in data.tests.items()}
    if len(set(pairs.values())) == 1:
        n_text = f"n = {next(iter(pairs.values()))} seed pairs"
    else:
        n_text = "n = " + ", ".join(f"{n} ({other})" for other, n in pairs.items()) + " seed pairs"
    note = (
        f"Paired two-sided t-test (scipy.stats.ttest_rel) of {ref} against each optimizer over "
        f"the seeds both ran, {n_text}. Differences are {ref} minus the other optimizer, in "
        f"percentage points ({_raw_names(measured)}: raw, where below 0 means that {ref} has "
        f"less), with the {CONFIDENCE:.0%} "
        "confidence interval of the mean difference (Student's t over the seed pairs) in "
        "brackets. n/a: fewer than 2 pairs, or identical results."
    )
    return [*markdown_table(header, rows, "l" + "r" * (len(header) - 1)), "", note]


def _flatness_section(data: ReportData) -> list[str]:
    """Mean ± std of the flatness measures, when the runs have them (smaller is flatter)."""
    if not any(data.stats[label]["top_eigenvalue"].n for label in data.optimizers):
        return []
    header = ["Optimizer", *(_FLATNESS_NAMES[k] for k in FLATNESS_KEYS)]
    rows = [
        [
            label,
            *(
                mean_std(data.stats[label][k], decimals=4 if k == "sam_sharpness" else 2)
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
        *markdown_table(header, rows, "l" + "r" * len(FLATNESS_KEYS)),
    ]


def format_report(data: ReportData, figure: str | None = None) -> str:
    """The report as Markdown (what ``report.md`` holds); ``figure`` is the path of its
    frontier figure (None: the cost-benefit tables without it)."""
    lines = _title(data)
    lines += [
        "",
        "## Test results",
        "",
        "Mean ± sample standard deviation over seeds; rates in percent; (k/n): only k of the "
        "n runs have the value.",
        "",
        *_results_table(data),
        *_diverged_line(data),
        *_cost_notes(data),
        "",
        f"## Paired tests against {data.reference or data.requested_reference}",
        "",
        *_tests_table(data),
        *_flatness_section(data),
        *format_frontier(data, figure),
    ]
    return "\n".join(lines) + "\n"


CSV_HEADER: tuple[str, ...] = (
    "optimizer", "metric", "mean", "std", "n", "reference", "diff", "p_value", "n_pairs",
    "ci_low", "ci_high",
)  # fmt: skip
"""The columns of :func:`csv_rows`."""


def csv_rows(data: ReportData) -> Iterator[list[Any]]:
    """One row per optimizer x statistic (:data:`CSV_HEADER`), plain numbers, empty cells for
    undefined values; ``diff``, ``p_value`` and ``ci_low`` to ``ci_high`` are the reference's
    paired test against that optimizer."""
    for label in data.optimizers:
        for key, stat in data.stats[label].items():
            test = data.tests.get(label, {}).get(key)
            yield [
                label,
                key,
                _number(stat.mean),
                _number(stat.std),
                stat.n,
                data.reference if test else "",
                _number(test.diff) if test else "",
                _number(test.p_value) if test else "",
                test.n if test else "",
                _number(test.ci_low) if test else "",
                _number(test.ci_high) if test else "",
            ]


def write_csv(data: ReportData, path: str | Path) -> Path:
    """:func:`csv_rows` with a header line."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerows(csv_rows(data))
    return path


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
    return "\n".join([*markdown_table(header, rows, "lllrrrr"[: len(header)]), "", note]) + "\n"


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
