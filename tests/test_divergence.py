"""A diverging run stops with :class:`Diverged` and never saves a non-finite weight; rho = 0
trains exactly like the base optimizer, BatchNorm statistics included."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gcsam.toolkit import compare as compare_module
from gcsam.toolkit.compare import compare
from gcsam.toolkit.config import TrainConfig
from gcsam.toolkit.trainer import Diverged, Trainer, train

pytest.importorskip("sklearn")

SMALL = dict(epochs=2, batch_size=128, classes=["0", "1", "2"])  # a few steps per epoch


def _checkpoints_are_finite(run: Path) -> list[str]:
    """The names of the run's checkpoints, after asserting that every tensor in them is finite."""
    names = sorted(p.name for p in run.glob("*.pt"))
    for name in names:
        saved = torch.load(run / name, weights_only=True)
        for key, value in saved["model"].items():
            assert not value.is_floating_point() or bool(value.isfinite().all()), (name, key)
    return names


def _nan_from_step(trainer: Trainer, step: int) -> None:
    """Make the model's training-mode output NaN from optimizer step ``step`` (1-based) on."""
    calls = []

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        calls.append(1)
        return output * float("nan") if len(calls) >= step else None

    trainer.model.register_forward_hook(hook)


def test_rho_zero_trains_bit_identically_to_the_base_optimizer(tmp_path: Path) -> None:
    # With rho = 0 the descent pass used to update BatchNorm statistics a second time.
    for name in ("adam", "gcsam"):
        train(TrainConfig(optimizer=name, rho=0.0, **SMALL), tmp_path / name, progress=False)
    for checkpoint in ("final.pt", "last.pt"):
        adam = torch.load(tmp_path / "adam" / checkpoint, weights_only=True)["model"]
        gcsam = torch.load(tmp_path / "gcsam" / checkpoint, weights_only=True)["model"]
        assert any("num_batches_tracked" in key for key in adam)
        assert adam.keys() == gcsam.keys()
        different = [key for key in adam if not torch.equal(adam[key], gcsam[key])]
        assert different == [], checkpoint


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(optimizer="adam", **SMALL), run, progress=False)
    steps = trainer.steps_per_epoch
    _nan_from_step(trainer, steps + 2)  # in the second epoch
    expected = (
        rf"diverged at epoch 2, step {2 * steps}: the training loss is nan .*; "
        rf"the last good checkpoint is {re.escape(str(run / 'last.pt'))}$"
    )
    with pytest.raises(Diverged, match=expected):
        trainer.run()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at"] == {"epoch": 2, "step": 2 * steps}
    assert "test" not in summary and summary["epochs_run"] == 1
    assert _checkpoints_are_finite(run) == ["best.pt", "last.pt"]
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1]
    # Resuming it says so again, and changes nothing.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(Diverged, match=expected):
        train(TrainConfig(optimizer="adam", **SMALL), run, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_non_finite_weights_stop_the_run_before_any_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(optimizer="adam", **SMALL), run, progress=False)
    step, calls = trainer._train_step, []
    norm = next(m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))

    def poisoning(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        result = step(x, y)
        calls.append(1)
        if len(calls) == 2 * trainer.steps_per_epoch:  # the loss stays finite: a buffer only
            norm.running_var.fill_(float("inf"))
        return result

    trainer._train_step = poisoning
    with pytest.raises(Diverged, match=r"epoch 2, .*: the weights are not finite"):
        trainer.run()
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert _checkpoints_are_finite(run) == ["best.pt", "last.pt"]


def test_a_huge_learning_rate_diverges_without_saving_non_finite_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(Diverged, match=r"lower --lr, now 1e\+09"):
        train(TrainConfig(optimizer="adam", lr=1e9, **SMALL), run, progress=False)
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    _checkpoints_are_finite(run)


@pytest.mark.filterwarnings("ignore:SAM. the ascent gradient is not finite")
def test_compare_reports_a_diverged_run_and_does_not_retrain_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []

    def train_sam_into_nan(cfg: TrainConfig, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
        trained.append(cfg.optimizer)
        trainer = Trainer(cfg, run_dir, progress=False)
        if cfg.optimizer == "sam":
            _nan_from_step(trainer, 1)
        return trainer.run(resume=kwargs["resume"])

    monkeypatch.setattr(compare_module, "train", train_sam_into_nan)
    out = tmp_path / "cmp"
    settings = dict(SMALL, epochs=1)
    kwargs: dict[str, Any] = dict(optimizers=("adam", "sam"), seeds=(0,), out_dir=out, plots=False)
    with pytest.warns(UserWarning, match="sam-seed0: diverged at epoch 1"):
        markdown = compare(settings, **kwargs)
    assert trained == ["adam", "sam"]
    assert "Diverged, left out of the means and tests: sam seed 0 (epoch 1, step " in markdown
    assert (out / "report.md").read_text() == markdown
    assert not any(line.startswith("| sam") for line in markdown.splitlines())
    assert json.loads((out / "adam-seed0" / "summary.json").read_text())["status"] == "finished"
    assert json.loads((out / "sam-seed0" / "summary.json").read_text())["status"] == "diverged"
    assert compare(settings, **kwargs) == markdown
    assert trained == ["adam", "sam"]  # resumed: nothing trained again
