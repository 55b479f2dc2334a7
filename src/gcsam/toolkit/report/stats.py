"""Aggregation over seeds: groups in table order, means and standard deviations, paired tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import METRICS
from ..optimizers import OPTIMIZERS
from .runs import Run

FLATNESS_KEYS: tuple[str, ...] = ("top_eigenvalue", "hessian_trace", "sam_sharpness")
"""Flatness of the final weights (``gcsam compare --sharpness``), in ``summary.json``."""

LAST_EPOCH_KEYS: tuple[str, ...] = (
    "last_val_accuracy", "last_train_accuracy", "test_accuracy_last_epoch",
)  # fmt: skip
"""The last epoch's validation accuracy, training accuracy (on the training labels, noisy ones
included) and test accuracy: what a run keeps without early stopping, and how much of its
training set it memorized."""

SUMMARY_KEYS: tuple[str, ...] = (
    *LAST_EPOCH_KEYS,
    "epochs_to_target",
    "time_to_target_s",
    "total_time_s",
    "passes_per_step",
    "best_epoch",
    *FLATNESS_KEYS,
)
"""Per-run numbers of ``summary.json`` aggregated next to the test metrics (runs from before the
trainer counted ``passes_per_step`` lack it)."""

TESTED_KEYS: tuple[str, ...] = (
    *METRICS, *LAST_EPOCH_KEYS, "epochs_to_target", *FLATNESS_KEYS,
)  # fmt: skip
"""The values the reference is paired-tested on against every other optimizer: the test
metrics, the last epoch's accuracies, the epochs to the common validation target (convergence
speed; a run that never reached it pairs with none) and the flatness of the final weights."""

RELATIVE_KEYS: tuple[str, ...] = ("epoch_time_vs_base", "passes_vs_base", "time_vs_base")
"""Per-run numbers relative to another run, the run of its base optimizer (``gcsam`` on adam:
the ``adam`` run) with the same seed in the same folder: the mean ``epoch_time_s``, the training
forward/backward passes in all (``passes``) and the training wall time (``total_time_s``), each
over the base's."""


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the runs that have
    the value; NaN for both when none has it."""

    mean: float
    std: float
    n: int


CONFIDENCE = 0.95
"""The level of a paired difference's confidence interval."""


@dataclass(frozen=True)
class PairedTest:
    """Reference minus other, averaged over paired seeds; the paired t-test's p-value (NaN with
    fewer than 2 pairs, or when every difference is 0); and the :data:`CONFIDENCE` t-interval
    of that mean difference, ``ci_low`` to ``ci_high`` (NaN with fewer than 2 pairs): the
    differences the seeds do not rule out."""

    diff: float
    p_value: float
    n: int
    seeds: tuple[int, ...]
    ci_low: float
    ci_high: float


@dataclass
class ReportData:
    """Everything the report shows; :func:`summarize` builds it."""

    groups: dict[str, list[Run]]  # optimizer label -> its runs sorted by seed, in table order
    stats: dict[str, dict[str, Stat]]  # label -> METRICS + SUMMARY_KEYS + RELATIVE_KEYS -> Stat
    reference: str | None  # the label tested against the others; None when absent
    requested_reference: str
    # other label -> TESTED_KEYS -> PairedTest
    tests: dict[str, dict[str, PairedTest]]
    meta: dict[str, Any] = field(default_factory=dict)
    diverged: list[Run] = field(default_factory=list)  # listed, left out of groups and tests
    # label -> why some of its runs have no epoch_time_vs_base -> those runs' seeds
    no_base: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def optimizers(self) -> list[str]:
        return list(self.groups)


def optimizer_rank(name: str) -> int:
    """``name``'s place in :data:`OPTIMIZERS` (the table order); unregistered names share the
    last place, where they sort alphabetically."""
    order = list(OPTIMIZERS)
    return order.index(name) if name in order else len(order)


def _labels(runs: Sequence[Run]) -> list[str]:
    """The run's label (a variant's, else the optimizer), or ``label-base`` when runs of one
    label differ in base."""
    bases: dict[str, set[str | None]] = {}
    for run in runs:
        bases.setdefault(run.label, set()).add(run.base)
    return [
        run.label if len(bases[run.label]) == 1 or run.base is None else f"{run.label}-{run.base}"
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


def paired_test(reference: Sequence[Run], other: Sequence[Run], key: str) -> PairedTest:
    import numpy as np
    from scipy import stats

    ref, oth = _per_seed(reference, key), _per_seed(other, key)
    seeds = tuple(sorted(set(ref) & set(oth)))
    a = np.array([ref[s] for s in seeds], dtype=np.float64)
    b = np.array([oth[s] for s in seeds], dtype=np.float64)
    diff = float((a - b).mean()) if seeds else math.nan
    p_value = ci_low = ci_high = math.nan
    if len(seeds) >= 2:
        # Identical pairs make t = 0/0: scipy warns and returns NaN, which is what we report.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p_value = float(stats.ttest_rel(a, b).pvalue)
        std_error = float((a - b).std(ddof=1)) / math.sqrt(len(seeds))
        half = float(stats.t.ppf((1 + CONFIDENCE) / 2, df=len(seeds) - 1)) * std_error
        ci_low, ci_high = diff - half, diff + half
    return PairedTest(diff, p_value, len(seeds), seeds, ci_low, ci_high)


_RunKey = tuple[Path, str, int]  # (folder, label, seed)


def _mean_epoch_time(run: Run) -> float | None:
    return run.mean_epoch_time_s


def _total_passes(run: Run) -> float | None:
    return run.value("passes")


def _total_time(run: Run) -> float | None:
    return run.value("total_time_s")


# key -> (the run's number, what it is called when missing)
_RELATIVE: dict[str, tuple[Callable[[Run], float | None], str]] = {
    "epoch_time_vs_base": (_mean_epoch_time, "epoch times"),
    "passes_vs_base": (_total_passes, "pass count"),
    "time_vs_base": (_total_time, "training time"),
}


def _per_run(
    runs: Iterable[Run], value: Callable[[Run], float | None]
) -> dict[_RunKey, float | None]:
    """(folder, label, seed) -> mean ``value`` of those runs (averaged over repeated runs);
    None when none of them has it."""
    found: dict[_RunKey, list[float]] = {}
    for run in runs:
        known = found.setdefault((run.path.parent, run.label, run.seed), [])
        number = value(run)
        if number is not None:
            known.append(number)
    return {key: sum(v) / len(v) if v else None for key, v in found.items()}


def _vs_base(
    run: Run,
    value: Callable[[Run], float | None],
    what: str,
    table: dict[_RunKey, float | None],
) -> float | str:
    """``run``'s ``value`` over its base optimizer's run's (same seed, same folder), or why
    there is none."""
    base = run.base_optimizer
    if base is None:
        return "base optimizer unknown"
    own = value(run)
    key = (run.path.parent, base, run.seed)
    if own is None:
        return f"no {what} recorded"
    if key not in table:
        return f"no finished {base} run of the same seed in the same folder"
    reference = table[key]
    if reference is None or reference <= 0:
        return f"the {base} run of the same seed has no {what}"
    return own / reference


def _aggregate(
    groups: dict[str, list[Run]],
) -> tuple[dict[str, dict[str, Stat]], dict[str, dict[str, list[int]]]]:
    """Every label's :class:`Stat` per key, and why some runs have no epoch time relative to
    their base (label -> reason -> seeds)."""
    runs = [run for group in groups.values() for run in group]
    tables = {key: _per_run(runs, value) for key, (value, _) in _RELATIVE.items()}
    stats: dict[str, dict[str, Stat]] = {}
    no_base: dict[str, dict[str, list[int]]] = {}
    for label, group in groups.items():
        stats[label] = {
            key: _stat([v for v in (run.value(key) for run in group) if v is not None])
            for key in (*METRICS, *SUMMARY_KEYS)
        }
        for key, (value, what) in _RELATIVE.items():
            relative = [_vs_base(run, value, what, tables[key]) for run in group]
            stats[label][key] = _stat([v for v in relative if isinstance(v, float)])
            if key != "epoch_time_vs_base":  # the report explains the table's column only
                continue
            for run, ratio in zip(group, relative, strict=True):
                if isinstance(ratio, str):
                    no_base.setdefault(label, {}).setdefault(ratio, []).append(run.seed)
    return stats, no_base


def _unique(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value is not None and value not in out:
            out.append(value)
    return out


def regime_text(config: dict[str, Any]) -> str | None:
    """The training regime of a run's ``config.json`` in words (``"500 training images, 20 %
    symmetric label noise"``); None for the data set as loaded."""
    parts = []
    regime = config.get("regime") or {}
    if config.get("train_size") is not None:
        parts.append(f"{regime.get('train_size', config['train_size'])} training images")
    if config.get("imbalance", 1) > 1:
        parts.append(f"imbalance ratio {config['imbalance']:g}")
    if config.get("label_noise", 0) > 0:
        flipped = regime.get("flipped_fraction", config["label_noise"])
        parts.append(f"{100 * flipped:g} % {config.get('noise_kind', 'symmetric')} label noise")
        same = config.get("val_label_noise") == "same"
        parts.append(f"{'noisy' if same else 'clean'} validation labels")
    return ", ".join(parts) or None


def summarize(runs: list[Run], reference: str = "gcsam") -> ReportData:
    """Group ``runs`` by optimizer label, aggregate over seeds and test ``reference`` against
    every other optimizer (see :class:`Stat` and :class:`PairedTest`). Diverged runs count in
    none of these (nor as a base whose epoch time others are divided by): they are only
    listed."""
    if not runs:
        raise ValueError("no runs to summarize")
    groups = _group([run for run in runs if not run.diverged])
    stats, no_base = _aggregate(groups)
    ref = reference if reference in groups else None
    tests = {
        label: {key: paired_test(groups[ref], group, key) for key in TESTED_KEYS}
        for label, group in groups.items()
        if ref is not None and label != ref
    }
    meta = {
        "datasets": _unique(run.config.get("dataset") for run in runs),
        "models": _unique(run.config.get("model") for run in runs),
        "epochs": _unique(run.config.get("epochs") for run in runs),
        "seeds": sorted({run.seed for run in runs}),
        "targets": _unique(run.summary.get("target_val_accuracy") for run in runs),
        "regimes": _unique(regime_text(run.config) for run in runs),
    }
    diverged = sorted((r for r in runs if r.diverged), key=lambda r: (r.optimizer, r.seed))
    return ReportData(groups, stats, ref, reference, tests, meta, diverged, no_base)
