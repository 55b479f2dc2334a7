"""A run directory on disk: atomic writes, checkpoints, the metrics history, the config, the lock.

Files of one run: ``config.json`` (the settings), ``metrics.jsonl`` (one line per epoch),
``summary.json``, ``best.pt``/``final.pt`` (weights), ``last.pt`` (everything a resumed run
needs) and ``.gcsam.lock`` (see :func:`run_lock`). Every file is replaced atomically, so a kill at
any moment leaves the old file or the new one, never half of one.

A checkpoint is ``torch.save``'s bytes followed by a 48-byte trailer: the SHA-256 of those bytes
(32 bytes) and the marker :data:`CHECKSUM_MARKER` (16 bytes). :func:`load_checkpoint` checks the
digest before unpickling anything, so a corrupted, truncated or foreign file is refused with a
message instead of loading wrong weights, and it unpickles with ``weights_only=True`` only.

Every failure to read or write a run file raises :class:`RunFileError` (a ``ValueError``)
shaped ``<path>: <what went wrong> (<what to do>)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import platform
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._util.strict_json import strict_json
from .config import CHECKS, ConfigError, TrainConfig

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".gcsam.lock"
CHECKSUM_MARKER = b"\ngcsam-sha256-1\n"
_TRAILER = hashlib.sha256().digest_size + len(CHECKSUM_MARKER)


class RunFileError(ValueError):
    """A file of a run directory could not be read or written; the message names it."""


class CheckpointError(RunFileError):
    """A checkpoint is missing, corrupted, truncated or not one gcsam wrote."""


class NotARunError(RunFileError, FileNotFoundError):
    """A folder without ``config.json`` was given where a run directory is needed."""


class RunBusyError(ValueError):
    """Another process holds the lock of a run directory or comparison folder."""


def _os_error(path: Path, error: OSError, kind: type[RunFileError] = RunFileError) -> RunFileError:
    """The :class:`RunFileError` of an ``OSError``, with the remedy its cause calls for."""
    if error.errno == errno.ENOSPC:
        advice = "free some disk space, then run the same command again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "check the permissions of the folder, or write the run elsewhere"
    else:
        advice = "check the path and the disk"
    return kind(f"{path}: {error.strerror or error} ({advice})")


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
    except OSError as error:
        raise _os_error(path, error) from error
    finally:
        with contextlib.suppress(OSError):  # a read-only folder has no temporary file to remove
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


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise _os_error(path, error) from error
    except UnicodeDecodeError as error:
        raise RunFileError(f"{path}: not a text file (restore it, or retrain the run)") from error


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise RunFileError(
            f"{path}: unreadable JSON at line {error.lineno} column {error.colno}: {error.msg} "
            "(restore the file, or delete the run and train it again)"
        ) from error
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files a kill in the middle of :func:`write_atomic` left behind."""
    for partial in run_dir.glob(".*.tmp"):
        partial.unlink()


def save_checkpoint_atomic(path: Path, value: Any) -> None:
    """``torch.save`` plus the checksum trailer, with the guarantees of :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    write_atomic(path, payload + hashlib.sha256(payload).digest() + CHECKSUM_MARKER)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint, checking its checksum first; never unpickles arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (check the run directory)")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _os_error(path, error, CheckpointError) from error
    redo = checkpoint_remedy(path)
    if not data:
        raise CheckpointError(f"{path}: empty file ({redo})")
    if len(data) < _TRAILER or not data.endswith(CHECKSUM_MARKER):
        raise CheckpointError(
            f"{path}: no checksum: the file is truncated, or was not written by this version "
            f"of gcsam ({redo})"
        )
    payload, digest = data[:-_TRAILER], data[-_TRAILER : -len(CHECKSUM_MARKER)]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted ({redo})")
    try:
        value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises weights_only=False, which would run arbitrary code
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain values "
            "(only checkpoints written by gcsam can be read)"
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: not a torch checkpoint ({redo})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(value).__name__}")
    return value


def checkpoint_remedy(path: Path) -> str:
    """What to do about an unusable checkpoint: ``last.pt`` holds the resume point, the others
    can be rebuilt from it."""
    if path.name == "last.pt":
        return "delete it to restart the run from its first epoch, or retrain"
    # best.pt and final.pt hold the selected epoch's weights, which no other file keeps
    return "restore it, or train the run again with --overwrite"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _edited(path: Path, what: str) -> RunFileError:
    return RunFileError(
        f"{path}: {what} (was it edited? restore the file, or delete the run and train it again)"
    )


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN_DIR/metrics.jsonl``; a line cut short by a kill is
    ignored. Raises :class:`RunFileError` naming the line that is not an epoch's record (a
    JSON object of numbers with an integer ``epoch`` >= 1)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not (
            isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and epoch >= 1
            and all(v is None or _is_number(v) for v in record.values())
        ):
            raise _edited(path, f"line {number} is not an epoch's record of numbers: {line[:60]}")
        records.append(record)
    return records


def append_history(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one epoch's line to ``metrics.jsonl``, on disk before this returns."""
    path = run_dir / METRICS_FILE
    try:
        with open(path, "a") as handle:
            handle.write(to_json_text(record, indent=None) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _os_error(path, error) from error


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


def default_run_dir(cfg: TrainConfig) -> Path:
    """Where ``gcsam train`` writes a run when no ``--out`` is given."""
    cfg = cfg.resolved()
    return Path(f"runs/{cfg.dataset}-{cfg.model}-{cfg.optimizer}-seed{cfg.seed}")


def default_compare_dir(cfg: TrainConfig) -> Path:
    """Where ``gcsam compare`` writes its runs and report when no ``--out`` is given."""
    cfg = cfg.resolved()
    return Path(f"runs/compare-{cfg.dataset}-{cfg.model}")


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a run directory was started with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise NotARunError(
            f"{run_dir} is not a run directory (no config.json); "
            "pass a folder written by gcsam train or compare"
        )
    return TrainConfig.from_json(read_json(path), ignore_unknown=True)


_SCORES = ("val", "test")  # summary.json's metrics of the selected model, per split
_SUMMARY_NUMBERS = (
    "seed", "best_epoch", "epochs_run", "total_time_s", "passes_per_step", "passes",
    "target_val_accuracy", "epochs_to_target", "time_to_target_s", "test_accuracy_last_epoch",
    "top_eigenvalue", "hessian_trace", "sam_sharpness", "flatness_time_s",
)  # fmt: skip


_REGISTRY_NAMES = ("optimizer", "base", "dataset")  # reports read runs of names since removed


def read_config_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` as recorded, every setting in it checked (but the registry names,
    so that a report still reads runs of an optimizer no longer registered). Raises
    :class:`RunFileError` naming the file and the setting."""
    path = Path(run_dir) / "config.json"
    record = read_json(path)
    for key, value in record.items():
        if key in CHECKS and key not in _REGISTRY_NAMES and value is not None:
            try:
                CHECKS[key](key, value)
            except ConfigError as error:
                raise _edited(path, str(error)) from None
    return record


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``summary.json``, or None before it ends. Raises :class:`RunFileError` naming
    the file when it is not JSON, or a field is not what the trainer writes: a known status,
    numbers, and for a finished run the validation and test metrics."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path)
    status = summary.get("status", "finished")  # summaries from before status was written
    if status not in ("finished", "diverged"):
        raise _edited(path, f"status must be finished or diverged, got {status!r}")
    for key, value in summary.items():
        if key in _SCORES:
            if not isinstance(value, dict) or not all(
                v is None or _is_number(v) or k == "confusion_matrix" for k, v in value.items()
            ):
                raise _edited(path, f"{key!r} must map metrics to numbers")
        elif key in _SUMMARY_NUMBERS and not (value is None or _is_number(value)):
            raise _edited(path, f"{key!r} must be a number, got {value!r}")
    if status == "finished" and not _is_number(summary.get("test", {}).get("accuracy")):
        raise _edited(path, "a finished run's summary needs its test metrics")
    return summary


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.gcsam.lock`` exclusively (creating ``folder``), or raise
    :class:`RunBusyError` at once naming the holder. The lock is an ``flock``: the OS drops it
    when the holder dies, so a ``kill -9`` never leaves a stale lock behind.

    The lock covers the whole tree below ``folder``: it is refused while a folder inside is
    locked, and a folder inside a locked one is refused too (a ``compare`` never writes into a
    running study), unless the holder is this process or its parent (a study's own runs and its
    ``--jobs`` helpers). While held, a shared lock on each locked-before ancestor keeps that
    ancestor from being taken in turn."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _os_error(path, error) from error
    with contextlib.ExitStack() as held:
        held.callback(os.close, fd)  # releases the flock
        _refuse_locked_inside(folder)
        for ancestor in _share_ancestors(folder):
            held.callback(os.close, ancestor)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(
                f"{folder} is in use by {_holder(path)}; wait for it to finish or stop it"
            ) from None
        # The file is kept, never unlinked: deleting it would let two processes lock two files.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{shlex.join(sys.argv)}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)


def _try_lock(path: Path, how: int, refusal: Callable[[str], str]) -> int | None:
    """``flock(how | LOCK_NB)`` on the lock file ``path``: its open descriptor when granted, or
    ``None`` when ``path`` cannot be opened or its holder is this process or its parent. Another
    holder raises :class:`RunBusyError` with ``refusal(holder)``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if _holder_pid(path) in (os.getpid(), os.getppid()):
            return None
        raise RunBusyError(refusal(_holder(path))) from None
    return fd


def _refuse_locked_inside(folder: Path) -> None:
    for inner in folder.rglob(LOCK_FILE):
        if inner.parent != folder:
            fd = _try_lock(
                inner,
                fcntl.LOCK_EX,
                lambda holder, inner=inner: (
                    f"{folder} holds {inner.parent}, which is in use by "
                    f"{holder}; wait for it to finish or stop it"
                ),
            )
            if fd is not None:
                os.close(fd)


def _share_ancestors(folder: Path) -> list[int]:
    """Shared locks on the lock files of ``folder``'s ancestors (their open descriptors)."""
    shared: list[int] = []
    try:
        for ancestor in folder.resolve().parents:
            fd = _try_lock(
                ancestor / LOCK_FILE,
                fcntl.LOCK_SH,
                lambda holder, ancestor=ancestor: (
                    f"{folder} is inside {ancestor}, which is in use by {holder}; wait for it "
                    "to finish or stop it, or choose a folder outside it"
                ),
            )
            if fd is not None:
                shared.append(fd)
    except BaseException:
        for fd in shared:
            os.close(fd)
        raise
    return shared


def _holder_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        return int(path.read_text().partition("\n")[0])
    return None


def _holder(path: Path) -> str:
    """``process PID (cmdline)`` from a lock file, as far as it can be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        pid, _, cmdline = path.read_text().partition("\n")
        if pid.strip():
            return f"process {pid.strip()} ({cmdline.strip()})"
    return "another process"
