"""A run's resume state (:mod:`gcsam.toolkit.run_state`): ``restore`` inverts ``checkpoint``
exactly, and a checkpoint that does not fit is refused with one line naming it, before anything
of the run is changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.rundir import CheckpointError
from gcsam.toolkit.trainer import Trainer

pytest.importorskip("sklearn")

# 3 digit classes, small CNN: one step takes milliseconds.
SMALL = dict(batch_size=32, classes=["0", "1", "2"], model="small-cnn")


def _stepped(cfg: TrainConfig, run: Path, steps: int) -> Trainer:
    """A trainer after ``steps`` optimizer steps, its progress and every stream moved on."""
    trainer = Trainer(cfg, run, progress=False)
    trainer.model.train()
    for (images, labels), _ in zip(trainer._epoch_batches(), range(steps), strict=False):
        trainer._train_step(trainer._inputs(images, train=True), labels)
        trainer.progress.step += 1
    trainer.progress.epoch, trainer.progress.best_score = 1, 0.5
    torch.rand(3)  # the global stream moves on too
    return trainer


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoints (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "settings",
    [{"optimizer": "gcsam"}, {"optimizer": "adam", "average": "ema"}, {"optimizer": "m-gcsam"}],
    ids=["gcsam", "adam-ema", "m-gcsam"],
)
def test_restore_inverts_checkpoint(tmp_path: Path, settings: dict[str, Any]) -> None:
    cfg = TrainConfig(**SMALL, **settings)
    saved = _stepped(cfg, tmp_path / "a", steps=3).resumable.checkpoint()
    fresh = Trainer(cfg, tmp_path / "b", progress=False)
    assert not _equal(fresh.resumable.checkpoint(), saved)
    fresh.resumable.restore(saved, tmp_path / "a" / "last.pt")
    assert _equal(fresh.resumable.checkpoint(), saved)
    assert fresh.progress is fresh.resumable.progress  # the loop sees the restored progress
    assert (fresh.progress.step, fresh.progress.epoch) == (3, 1)


def test_a_checkpoint_without_resume_keys_is_refused(tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(**SMALL), tmp_path, progress=False)
    path = tmp_path / "best.pt"
    with pytest.raises(CheckpointError, match=r"best\.pt: not a resume checkpoint \(no optimizer"):
        trainer.resumable.restore({"model": trainer.model.state_dict()}, path)


def test_a_checkpoint_of_another_model_names_the_file(tmp_path: Path) -> None:
    wide = _stepped(TrainConfig(**SMALL, width=2), tmp_path / "wide", steps=1)
    trainer = Trainer(TrainConfig(**SMALL), tmp_path / "run", progress=False)
    path = tmp_path / "wide" / "last.pt"
    with pytest.raises(CheckpointError, match=r"last\.pt: does not fit this run \(.*copied from"):
        trainer.resumable.restore(wide.resumable.checkpoint(), path)


@pytest.mark.parametrize("problem", ["workers", "average"])
def test_a_refused_checkpoint_changes_nothing(tmp_path: Path, problem: str) -> None:
    """Another worker count, or no weight average for a run that keeps one: refused before the
    model, optimizer or progress is touched."""
    cfg = TrainConfig(**SMALL, optimizer="adam")
    saved = _stepped(cfg, tmp_path / "a", steps=2).resumable.checkpoint()
    if problem == "workers":
        saved["rng"]["augment"] = saved["rng"]["augment"] * 2
        expected = "written by 2 worker.*--nproc-per-node.*not 1"
    else:
        cfg = TrainConfig(**SMALL, optimizer="adam", average="ema")
        expected = "holds no weight average: it was written without --average ema"
    trainer = Trainer(cfg, tmp_path / "b", progress=False)
    before, state = _weights(trainer), trainer.optimizer.state_dict()
    with pytest.raises(ConfigError, match=expected):
        trainer.resumable.restore(saved, tmp_path / "a" / "last.pt")
    assert _equal(_weights(trainer), before)
    assert _equal(trainer.optimizer.state_dict(), state)
    assert trainer.progress.step == 0
