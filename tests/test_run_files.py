"""Run files that a user can edit or damage, fuzzed: each file of a small finished run and of a
killed one is truncated, emptied, replaced by random bytes, by another JSON type, by another
run file, or has a field dropped or retyped; then ``gcsam resume`` and ``gcsam report`` run on
it. Every outcome is a correct result or one line naming the problem with exit 2: never a
traceback, and nothing of the run is rewritten when it is refused."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gcsam.toolkit import cli
from gcsam.toolkit.config import TrainConfig
from gcsam.toolkit.trainer import Trainer

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # about a hundred resumes and reports of digits runs

FAST = ["--epochs", "2", "--batch-size", "256", "--quiet"]


class _KillError(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run, one killed after its first epoch, and a finished run of another width."""
    root = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", *FAST, "--out", str(root / "finished")]) == 0
    assert cli.main(["train", *FAST, "--width", "2", "--out", str(root / "wide")]) == 0
    trainer = Trainer(TrainConfig(epochs=2, batch_size=256), root / "killed", progress=False)
    epoch = trainer._train_epoch

    def epoch_then_kill() -> dict:
        epoch()
        raise _KillError

    trainer._train_epoch = epoch_then_kill
    with pytest.raises(_KillError):
        trainer.run()
    return {"finished": root / "finished", "killed": root / "killed", "wide": root / "wide"}


def _mutations(run: Path, name: str, wide: Path) -> Iterator[tuple[str, bytes]]:
    data = (run / name).read_bytes()
    yield "truncated", data[: len(data) // 2]
    yield "empty", b""
    yield "random bytes", random.Random(name).randbytes(64)
    if name.endswith(".json"):
        for value in (5, [1, 2], None, "x", {}):
            yield f"the JSON {value!r}", json.dumps(value).encode()
        record = json.loads(data)
        for key in list(record)[:12]:
            yield (
                f"without {key}",
                json.dumps({k: v for k, v in record.items() if k != key}).encode(),
            )
            yield f"{key} a string", json.dumps(record | {key: "zzz"}).encode()
        for key, value in (("optimizer", "adam"), ("width", 2.0), ("model", "convnet")):
            yield f"{key} set to {value}", json.dumps(record | {key: value}).encode()
    if name == "metrics.jsonl":
        first = data.decode().splitlines()[0]
        for line in ("5", "[1, 2]", "{}", '{"epoch": "x"}', '{"epoch": 1, "val_accuracy": "x"}'):
            yield f"a line {line}", f"{first}\n{line}\n".encode()
    if name.endswith(".pt"):
        for other in ("last.pt", "best.pt", "final.pt"):
            if other != name and (run / other).exists():
                yield f"{other} copied over it", (run / other).read_bytes()
        yield "from a run of another width", (wide / name).read_bytes()


def _cases() -> list[tuple[str, str]]:
    files = ("config.json", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "final.pt")
    return [("finished", f) for f in files] + [("killed", f) for f in files[:2] + files[3:5]]


@pytest.mark.parametrize(("kind", "name"), _cases())
def test_a_damaged_run_file_gives_a_result_or_one_line(
    runs: dict[str, Path], tmp_path: Path, kind: str, name: str
) -> None:
    source = runs[kind]
    for what, data in _mutations(source, name, runs["wide"]):
        for command in ("resume", "report"):
            run = tmp_path / "run"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(source, run)
            (run / name).write_bytes(data)
            before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main([command, str(run), *(["--quiet"] if command == "resume" else [])])
            lines = err.getvalue().splitlines()
            where = f"{kind} run, {name} {what}, gcsam {command}"
            assert code in (0, 2), where
            assert all(line.startswith("gcsam: ") for line in lines), (where, lines)
            if code == 2:
                assert lines[-1].startswith("gcsam: error: "), where
                if command == "resume":  # refused: nothing of the run was rewritten
                    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
                    changed = {k for k in before if before[k] != after.get(k)}
                    assert not changed - {"report.md"}, (where, changed)
