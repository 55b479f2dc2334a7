"""Aggregation over seeds: groups in table order, means and standard deviations, paired tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..metrics import METRICS
from ..optimizers import OPTIMIZERS
from .runs import Run

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
    diverged: list[Run] = field(default_factory=list)  # listed, left out of groups and tests

    @property
    def optimizers(self) -> list[str]:
        return list(self.groups)


def optimizer_rank(name: str) -> int:
    """``name``'s place in :data:`OPTIMIZERS` (the table order); unregistered names share the
    last place, where they sort alphabetically."""
    order = list(OPTIMIZERS)
    return order.index(name) if name in order else len(order)


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


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Label -> its runs sorted by seed, labels in table order; warns about repeated seeds."""
    by_label: dict[str, list[Run]] = {}
    optimizer_of: dict[str, str] = {}
    for run, label in zip(runs, _labels(runs), strict=True):
        by_label.setdefault(label, []).append(run)
        optimizer_of[label] = run.optimizer

    def table_place(label: str) -> tuple[int, str, str]:
        return optimizer_rank(optimizer_of[label]), optimizer_of[label], label

    groups = {
        label: sorted(by_label[label], key=lambda r: r.seed)
        for label in sorted(by_label, key=table_place)
    }
    for label, group in groups.items():
        seeds = [run.seed for run in group]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            warnings.warn(
                f"{label} has several runs for seed(s) {repeated}: all count in its mean, and the "
                "paired tests use their average per seed",
                stacklevel=3,
            )
    return groups


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
    every other optimizer (see :class:`Stat` and :class:`PairedTest`). Diverged runs count in
    none of these: they are only listed."""
    if not runs:
        raise ValueError("no runs to summarize")
    groups = _group([run for run in runs if not run.diverged])
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
    diverged = sorted((r for r in runs if r.diverged), key=lambda r: (r.optimizer, r.seed))
    return ReportData(groups, stats, ref, reference, tests, meta, diverged)
