"""A run directory on disk: atomic writes, checkpoints, the metrics history and the config.

Files of one run: ``config.json`` (the settings), ``metrics.jsonl`` (one line per epoch),
``summary.json``, ``best.pt``/``final.pt`` (weights) and ``last.pt`` (everything a resumed run
needs). Every file is replaced atomically, so a kill at any moment leaves the old file or the new
one, never half of one; checkpoints are read without unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._json import strict_json
from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"


def to_json_text(value: Any, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities (an undefined ROC AUC, say) become null."""
    return json.dumps(strict_json(value), indent=indent, allow_nan=False)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, to_json_text(value).encode())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, ``{}`` when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else {}


def remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files a kill in the middle of :func:`write_atomic` left behind."""
    for partial in run_dir.glob(".*.tmp"):
        partial.unlink()


def save_checkpoint_atomic(path: Path, value: Any) -> None:
    """``torch.save`` with the guarantees of :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN_DIR/metrics.jsonl``; a line cut short by a kill is
    ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one epoch's line to ``metrics.jsonl``, on disk before this returns."""
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(to_json_text(record, indent=None) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def truncate_history(run_dir: Path, epochs: int) -> None:
    """Drop the epochs logged after the checkpoint a resumed run starts from."""
    kept = [r for r in read_history(run_dir) if r["epoch"] <= epochs]
    text = "".join(to_json_text(r, indent=None) + "\n" for r in kept)
    write_atomic(run_dir / METRICS_FILE, text.encode())


def versions() -> dict[str, str]:
    """The versions a run records in its ``config.json``."""
    return {
        "gcsam": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a run directory was started with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} does not exist")
    return TrainConfig.from_json(json.loads(path.read_text()), ignore_unknown=True)
