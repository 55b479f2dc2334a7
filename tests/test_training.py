"""Training-run building blocks, in process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from gcsam import GCSAM, SAM
from gcsam.toolkit.config import TrainConfig
from gcsam.toolkit.optimizers import OPTIMIZERS, build_optimizer
from gcsam.toolkit.rundir import read_history, read_run_config, save_checkpoint_atomic
from gcsam.toolkit.trainer import Trainer, lr_factor, train

pytest.importorskip("sklearn")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_name_builds(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(TrainConfig(optimizer=name).resolved(), model)
    family = {"sam": SAM, "asam": SAM}.get(name, GCSAM if name.endswith("gcsam") else None)
    if family is not None:
        assert isinstance(opt, family)
        assert opt.param_groups[0]["adaptive"] == (name == "asam")
        assert isinstance(opt.base_optimizer, torch.optim.Adam)
        assert (opt.mode is None) == (name in ("sam", "asam", "gcsam"))
    else:
        base = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        assert type(opt) is base[name.removeprefix("gc-")]


def test_lr_schedule_warmup_cosine_and_step() -> None:
    cosine = lr_factor(TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine"), 10)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0)
    step = lr_factor(TrainConfig(epochs=4, schedule="step"), 5)
    assert [step(s) for s in (0, 9, 10, 15, 19)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    assert lr_factor(TrainConfig(epochs=4, schedule="none"), 5)(7) == 1.0


def test_atomic_checkpoint_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint_atomic(path, {"x": torch.ones(3)})
    save_checkpoint_atomic(path, {"x": torch.zeros(3)})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_history_ignores_a_line_cut_short_by_a_kill(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_history(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


def test_read_run_config_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_run_config(tmp_path)


@pytest.mark.parametrize(
    "settings",
    [
        dict(optimizer="gc-adam", amp="bf16"),
        dict(optimizer="asam", base="sgd", schedule="step", label_smoothing=0.1),
        dict(optimizer="gcsam", amp="fp16", patience=1, select_by="val_loss"),
        dict(optimizer="sam", model="resnet20", warmup_epochs=0.5, classes=["3", "5", "8"]),
    ],
)
@pytest.mark.slow
def test_short_runs_of_every_kind_finish_with_finite_metrics(tmp_path: Path, settings) -> None:
    cfg = TrainConfig(epochs=2, batch_size=128, **settings)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "finished"
    assert math.isfinite(summary["test"]["loss"])
    assert summary["test"]["accuracy"] > 1 / len(summary["test"]["confusion_matrix"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optimizer"] == settings["optimizer"]
    if "classes" in settings:
        assert saved["class_names"] == ["3", "5", "8"]


def _worker_that_fails(rank: int, port: int, run_dir: str) -> None:
    """One of two torchrun-like workers; rank 1 raises early in its second epoch."""
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(epochs=3, batch_size=128), run_dir, progress=False)
    if rank == 1:
        step, calls = trainer._train_step, []

        def failing(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
            calls.append(1)
            if len(calls) == trainer.steps_per_epoch + 2:
                raise RuntimeError("worker 1 fails")
            return step(x, y)

        trainer._train_step = failing
    trainer.run()


@pytest.mark.slow
def test_a_failing_worker_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "run"
    with pytest.raises(mp.ProcessRaisedException, match="worker 1 fails"):
        mp.spawn(_worker_that_fails, args=(port, str(run)), nprocs=2, join=True)
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 1
    assert not (run / "summary.json").exists()
    assert [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ] == [1]


class _StopError(Exception):
    pass


@pytest.mark.parametrize("select_by", ["val_accuracy", "val_loss"])
def test_after_epoch_sees_the_best_score_so_far_and_may_stop_the_run(
    tmp_path: Path, select_by: str
) -> None:
    """``after_epoch`` gets each epoch and the best validation score so far (the run's
    ``select_by``); what it raises stops the run after that epoch's checkpoint, and the run
    resumes from there to the same end as a run never stopped."""
    cfg = TrainConfig(epochs=3, batch_size=128, select_by=select_by)
    calls: list[tuple[int, float]] = []

    def stop_after_two(epoch: int, best: float) -> None:
        calls.append((epoch, best))
        if epoch == 2:
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, tmp_path / "stopped", progress=False, after_epoch=stop_after_two)
    history = read_history(tmp_path / "stopped")
    scores = [h["val_accuracy"] if select_by == "val_accuracy" else -h["val_loss"] for h in history]
    assert calls == [(1, scores[0]), (2, max(scores))]
    assert not (tmp_path / "stopped" / "summary.json").exists()
    resumed = train(cfg, tmp_path / "stopped", resume=True, progress=False)
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert resumed["test"] == straight["test"]
