"""Who may write a run directory: one process at a time (the lock), and a new run never on top
of an old one unless asked (``overwrite``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcsam.toolkit.compare import compare
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.rundir import LOCK_FILE, RunBusyError, run_lock
from gcsam.toolkit.trainer import train

pytest.importorskip("sklearn")

SMALL = TrainConfig(optimizer="adam", epochs=1, batch_size=128, classes=["0", "1", "2"])


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` but the lock's own (kept for good once created)."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _old_run(run: Path) -> None:
    """What an earlier run (and the user) left in ``run``."""
    (run / "notes").mkdir(parents=True)
    (run / "notes" / "todo.txt").write_text("mine")
    (run / "README.txt").write_text("mine too")
    for name in ("config.json", "summary.json", "sharpness.json"):
        (run / name).write_text(json.dumps({"old": True}))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    for name in ("best.pt", "last.pt", "final.pt", "landscape-1d.png", "landscape-1d.json"):
        (run / name).write_bytes(b"old")


def test_a_busy_run_directory_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _old_run(run)
    with run_lock(run):
        before = _contents(run)
        for resume in (False, True):
            with pytest.raises(RunBusyError, match=str(run)):
                train(SMALL, run, resume=resume, overwrite=True, progress=False)
        assert _contents(run) == before


def test_a_busy_comparison_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    _old_run(out / "adam-seed0")
    with run_lock(out):
        before = _contents(out)
        with pytest.raises(RunBusyError, match=str(out)):
            compare(SMALL.to_json(), optimizers=("adam",), seeds=(0,), out_dir=out, plots=False)
        assert _contents(out) == before


def test_a_new_run_is_refused_where_a_run_is(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _old_run(run)
    before = _contents(run)
    expected = (
        f"{run} already holds a run; resume it with 'gcsam resume {run}' or pass --overwrite "
        "to start over"
    )
    with pytest.raises(ConfigError) as refused:
        train(SMALL, run, progress=False)
    assert str(refused.value) == expected
    assert _contents(run) == before


def test_overwrite_replaces_the_old_run_files_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _old_run(run)
    summary = train(SMALL, run, overwrite=True, progress=False)
    assert summary["status"] == "finished"
    left = _contents(run)
    assert left["notes/todo.txt"] == b"mine" and left["README.txt"] == b"mine too"
    assert not {"sharpness.json", "landscape-1d.png", "landscape-1d.json"} & left.keys()
    assert [json.loads(line)["epoch"] for line in left["metrics.jsonl"].splitlines()] == [1]
    assert json.loads(left["config.json"])["optimizer"] == "adam"
    assert all(left[name] != b"old" for name in ("best.pt", "last.pt", "final.pt"))
