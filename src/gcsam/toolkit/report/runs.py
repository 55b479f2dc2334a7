"""Finished (and diverged) runs as the report reads them from their directories."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..metrics import METRICS
from ..rundir import RunFileError, read_config_record, read_history, read_summary

_SKIP_DIRS = {"__pycache__", "checkpoints"}
_MAX_DEPTH = 4  # how far below a given folder run directories are searched for
_REPORTED = ("finished", "diverged")  # a diverged run is listed, not averaged


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
    def label(self) -> str:
        """The method's name in the report: a variant's label, else the optimizer."""
        return str(self.config.get("label") or self.optimizer)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.summary.get("seed", 0)))

    @property
    def base(self) -> str | None:
        return self.config.get("base")

    @property
    def base_optimizer(self) -> str | None:
        """The plain optimizer this run builds on (``gcsam`` on adam: ``adam``; ``adam``: itself),
        as :meth:`TrainConfig.base_name` resolves it (the default base when the config has
        none); None for an unregistered optimizer or base."""
        base = self.config.get("base") or TrainConfig.base
        try:
            return TrainConfig(optimizer=self.optimizer, base=base).base_name()
        except (KeyError, TypeError):  # unregistered, or not a name at all
            return None

    @property
    def mean_epoch_time_s(self) -> float | None:
        """Mean ``epoch_time_s`` of the history's epochs; None when none recorded it."""
        times = [_finite_float(record.get("epoch_time_s")) for record in self.history]
        known = [t for t in times if t is not None]
        return sum(known) / len(known) if known else None

    @property
    def diverged(self) -> bool:
        """Stopped on a non-finite loss or weights: it has no test metrics."""
        return self.summary.get("status") == "diverged"

    def value(self, key: str) -> float | None:
        """A test metric (``key`` in :data:`METRICS`), a history key of the last epoch
        (``last_<key>``: ``last_val_accuracy``) or a summary number; None when missing."""
        if key in METRICS:
            value = self.summary.get("test", {}).get(key)
        elif key.startswith("last_"):
            value = self.history[-1].get(key[len("last_") :]) if self.history else None
        else:
            value = self.summary.get(key)
        return None if value is None else float(value)


def _finite_float(value: Any) -> float | None:
    """``value`` as a finite float; None for anything else (missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


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


def _read_finished(run_dir: Path) -> Run | str:
    """The run in ``run_dir``, or why it does not count as finished (or diverged)."""
    try:
        summary = read_summary(run_dir)
    except RunFileError as error:  # not JSON, or not what the trainer writes
        return str(error)
    if not summary:
        return f"{run_dir} (no summary.json)"
    if summary.get("status", "finished") not in _REPORTED:
        return f"{run_dir} (status {summary['status']!r})"
    return Run(run_dir, read_config_record(run_dir), read_history(run_dir), summary)


def load_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Read finished and diverged runs from run directories or from folders that hold them
    (searched a few levels deep, e.g. a ``gcsam compare`` output folder).

    Unfinished runs (no ``summary.json``, or a status other than ``"finished"`` or
    ``"diverged"``) are skipped with a warning listing them. Raises ``FileNotFoundError`` for
    a path that does not exist and ``ValueError`` naming the paths when no run is found.
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
        run = _read_finished(run_dir)
        if isinstance(run, Run):
            runs.append(run)
        else:
            unfinished.append(run)

    if unfinished:
        warnings.warn(
            f"skipping {len(unfinished)} run(s) not finished or not readable: "
            + ", ".join(unfinished),
            stacklevel=2,
        )
    if not runs:
        where = ", ".join(map(str, paths))
        raise ValueError(f"no finished runs (run directories with a summary.json) in {where}")
    return runs
