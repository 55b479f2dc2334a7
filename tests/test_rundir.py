"""The run directory: checksummed checkpoints, run-file errors that name the file, the lock."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gcsam.toolkit import rundir
from gcsam.toolkit.report import load_runs
from gcsam.toolkit.rundir import (
    LOCK_FILE,
    CheckpointError,
    RunBusyError,
    RunFileError,
    append_history,
    load_checkpoint,
    read_json,
    read_run_config,
    run_lock,
    save_checkpoint_atomic,
    truncate_history,
    write_atomic,
)

# -- the lock -----------------------------------------------------------------------------------


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"  # created by the lock
    with run_lock(folder):
        assert f"{os.getpid()}\n" in (folder / LOCK_FILE).read_text()
        with pytest.raises(RunBusyError) as caught, run_lock(folder):
            pass
    message = str(caught.value)
    assert message.startswith(f"{folder} is in use by process {os.getpid()} (")
    assert message.endswith("); wait for it to finish or stop it")
    with run_lock(folder):  # released on exit
        pass


def test_the_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), run_lock(tmp_path):
        raise KeyboardInterrupt
    with run_lock(tmp_path):
        pass


def test_the_lock_file_is_not_taken_for_a_run(tmp_path: Path) -> None:
    with run_lock(tmp_path / "compare" / "adam-seed0"):
        with pytest.raises(ValueError, match="no finished runs"):
            load_runs([tmp_path / "compare"])
        with pytest.raises(RunFileError, match="not a run directory"):
            read_run_config(tmp_path / "compare" / "adam-seed0")


_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gcsam.toolkit.rundir import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
    """
)


@pytest.mark.slow
def test_another_process_holds_the_lock_until_it_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path), "--marker"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        busy = rf"in use by process {holder.pid} \(.*--marker"
        with pytest.raises(RunBusyError, match=busy), run_lock(tmp_path):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the OS drops the flock
        holder.wait()
    with run_lock(tmp_path):
        pass


def _hold(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder``'s lock (kill it when done)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_folder_inside_a_locked_one_is_refused_and_the_reverse(tmp_path: Path) -> None:
    study, inner = tmp_path / "study", tmp_path / "study" / "rho=0.05" / "adam-seed0"
    holder = _hold(study)
    try:
        with pytest.raises(RunBusyError) as caught, run_lock(inner):
            pass
        assert str(caught.value).startswith(
            f"{inner} is inside {study.resolve()}, which is in use by process {holder.pid} ("
        )
        assert str(caught.value).endswith("or choose a folder outside it")
        assert not (inner / LOCK_FILE).exists() or not (inner / LOCK_FILE).read_text()
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(inner)
    try:
        with pytest.raises(RunBusyError) as caught, run_lock(study):
            pass
        assert str(caught.value).startswith(
            f"{study} holds {inner}, which is in use by process {holder.pid} ("
        )
    finally:
        holder.kill()
        holder.wait()
    with run_lock(study), run_lock(inner):  # free again, and one process may nest its own
        pass


def test_a_locked_inner_folder_keeps_its_ancestor_from_being_taken(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).touch()  # the ancestor was locked before, say by a finished study
    with run_lock(tmp_path / "run"):
        ancestor = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(ancestor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(ancestor)
    with run_lock(tmp_path):
        pass


def test_a_child_process_may_lock_inside_its_parents_folder(tmp_path: Path) -> None:
    """As a study's ``--jobs`` helpers do with its runs."""
    with run_lock(tmp_path):
        child = subprocess.run(
            [sys.executable, "-c", _HOLD.replace("time.sleep(600)", "pass"), str(tmp_path / "r")],
            capture_output=True,
            text=True,
            check=False,
        )
    assert child.returncode == 0 and child.stdout == "locked\n", child.stderr


# -- checkpoints ---------------------------------------------------------------------------------


def _saved(tmp_path: Path, name: str = "best.pt") -> Path:
    path = tmp_path / name
    save_checkpoint_atomic(path, {"model": {"w": torch.arange(1000.0)}})
    return path


def test_a_checkpoint_round_trips(tmp_path: Path) -> None:
    loaded = load_checkpoint(_saved(tmp_path))
    assert torch.equal(loaded["model"]["w"], torch.arange(1000.0))


def test_corrupted_bytes_are_caught_before_loading(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside the tensor data: torch.load alone accepts it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == (
        f"{path}: checksum mismatch: the file is corrupted "
        "(restore it, or train the run again with --overwrite)"
    )


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda data: b"", "empty file"),
        (lambda data: data[: len(data) // 2], "no checksum: the file is truncated"),
        (lambda data: data[:-60], "no checksum: the file is truncated"),
    ],
)
def test_empty_and_truncated_checkpoints_name_the_file(tmp_path: Path, cut, message) -> None:
    path = _saved(tmp_path, "last.pt")
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}.*\(delete it to restart"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "final.pt"
    torch.save({"model": {}}, path)  # the format of older versions
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)


def test_a_checksummed_pickle_of_arbitrary_objects_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint_atomic(path, {"model": Path("x")})  # a valid checksum over a forbidden type
    with pytest.raises(CheckpointError, match="objects other than tensors") as caught:
        load_checkpoint(path)
    assert "weights_only" not in str(caught.value)


def test_a_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'best.pt'}: no such checkpoint"):
        load_checkpoint(tmp_path / "best.pt")


# -- every run file: the error names it ---------------------------------------------------------


def test_unreadable_json_names_the_file_and_the_place(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"epochs": 3,')
    path = tmp_path / "config.json"
    with pytest.raises(RunFileError, match=rf"^{path}: unreadable JSON at line 1 column 14"):
        read_json(tmp_path / "config.json")
    with pytest.raises(RunFileError, match="unreadable JSON"):
        read_run_config(tmp_path)


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "write",
    [
        lambda run: write_atomic(run / "summary.json", b"{}"),
        lambda run: save_checkpoint_atomic(run / "last.pt", {}),
        lambda run: append_history(run, {"epoch": 1}),
        lambda run: truncate_history(run, 0),
    ],
)
def test_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write) -> None:
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(RunFileError, match=rf"^{tmp_path}/\S+: No space left on device \(free"):
        write(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def _denied(*args: object, **kwargs: object) -> None:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_a_read_only_folder_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: the tests may run as root, who can write into a read-only folder.
    monkeypatch.setattr(rundir, "open", _denied, raising=False)
    with pytest.raises(RunFileError, match=r"summary.json: Permission denied \(check the"):
        write_atomic(tmp_path / "summary.json", b"{}")
    with pytest.raises(RunFileError, match=r"metrics.jsonl: Permission denied \(check the"):
        append_history(tmp_path, {"epoch": 1})


def test_an_unreadable_checkpoint_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path)
    monkeypatch.setattr(Path, "read_bytes", _denied)
    with pytest.raises(CheckpointError, match=rf"^{path}: Permission denied"):
        load_checkpoint(path)
