"""Weight averaging (:mod:`gcsam.toolkit.averaging`): the EMA and SWA against float64 formulas,
BatchNorm statistics for SWA, and through the trainer: what is validated, selected, tested and
saved, resume, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gcsam.toolkit.averaging import WeightAverage, build_average
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.rundir import load_checkpoint, read_history
from gcsam.toolkit.trainer import Trainer, train

# 3 digit classes: about 380 training images, 4 steps of 96 per epoch.
SMALL = dict(epochs=4, batch_size=96, classes=["0", "1", "2"], model="small-cnn")


class _KillError(Exception):
    pass


def _killed_after(trainer: Trainer, epochs: int) -> None:
    """Run ``trainer`` until ``epochs`` epochs are saved, then stop it as a kill would."""
    epoch, done = trainer._train_epoch, []

    def epoch_then_kill() -> dict:
        done.append(epoch())
        if len(done) == epochs:
            raise _KillError
        return done[-1]

    trainer._train_epoch = epoch_then_kill
    with pytest.raises(_KillError):
        trainer.run()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def _jiggle(model: nn.Module, step: int) -> None:
    """A deterministic "optimizer step": every weight moves, BatchNorm statistics too."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view_as(p))
    model.train()
    model(torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step)))


def _floats(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
    ]


def test_the_ema_is_the_recurrence_over_parameters_and_buffers() -> None:
    model, decay = _net(), 0.8
    average = WeightAverage("ema", model, decay=decay, start=0.0, epochs=1)
    assert not average.started and average.module(model) is model
    expected = None
    for step in range(5):
        _jiggle(model, step)
        average.after_step(model)
        now = _floats(model)
        # the first update copies the weights; then ema <- d ema + (1 - d) w
        expected = (
            now
            if expected is None
            else [decay * e + (1 - decay) * w for e, w in zip(expected, now, strict=True)]
        )
    assert average.started and average.module(model) is average.averaged.module
    for got, want in zip(_floats(average.averaged.module), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    average.after_epoch(1, model, lambda: [])  # no effect on an EMA
    for got, want in zip(_floats(average.averaged.module), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_swa_averages_the_epochs_after_its_start_and_refreshes_batch_norm() -> None:
    """epochs 8, swa_start 0.5: the weights at the ends of epochs 5..8, their plain mean; the
    BatchNorm statistics are the cumulative ones of the average's own forward passes."""
    model = _net()
    average = WeightAverage("swa", model, decay=0.5, start=0.5, epochs=8)
    inputs = [
        torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        for k in range(3)
    ]
    ends = []
    for epoch in range(1, 9):
        for step in range(2):
            _jiggle(model, 10 * epoch + step)
            average.after_step(model)  # no effect on SWA
        average.after_epoch(epoch, model, lambda: iter(inputs))
        assert average.started == (epoch >= 5)
        if epoch >= 5:
            ends.append([p.detach().clone() for p in model.parameters()])
    mean = [torch.stack(ws).mean(0) for ws in zip(*ends, strict=True)]
    for got, want in zip(average.averaged.module.parameters(), mean, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the reference statistics: the averaged weights' activations before the BatchNorm, their
    # mean and their per-batch unbiased variance averaged over the batches (momentum None)
    first = nn.Linear(3, 4).double()
    with torch.no_grad():
        first.weight.copy_(mean[0])
        first.bias.copy_(mean[1])
        features = [first(x) for x in inputs]
    bn = average.averaged.module[1]
    means = torch.stack([f.mean(0) for f in features]).mean(0)
    variances = torch.stack([f.var(0) for f in features]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-10, atol=1e-12)
    assert bn.momentum == 0.1  # update_bn restores it


def test_without_an_average_there_is_none() -> None:
    assert build_average(TrainConfig().resolved(), nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="ema or swa"):
        WeightAverage("none", nn.Linear(2, 2), decay=0.5, start=0.5, epochs=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"average": "polyak"}, "average must be one of none, ema, swa"),
        ({"ema_decay": 1.0}, "ema_decay must be a fraction in \\(0, 1\\)"),
        ({"swa_start": 1.0}, "swa_start must be a fraction in \\[0, 1\\)"),
    ],
)
def test_bad_averaging_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings).resolved()


@pytest.mark.slow  # trains on scikit-learn's digits
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_a_run_validates_selects_tests_and_saves_the_average(tmp_path: Path, kind: str) -> None:
    run = tmp_path / kind
    cfg = TrainConfig(optimizer="gcsam", average=kind, ema_decay=0.9, swa_start=0.5, **SMALL)
    summary = train(cfg, run, progress=False)
    last = load_checkpoint(run / "last.pt")
    trainer = Trainer(cfg, tmp_path / "probe", progress=False)
    trainer.average.load_state_dict(last["average"])
    trainer.model.load_state_dict(last["model"])
    averaged = trainer.average.module(trainer.model)
    assert averaged is not trainer.model
    # the last epoch's validation and the last-epoch test score are the average's
    history = read_history(run)
    assert history[-1]["val_accuracy"] == trainer.evaluate(trainer.data.val, averaged)["accuracy"]
    assert (
        summary["test_accuracy_last_epoch"]
        == trainer.evaluate(trainer.data.test, averaged)["accuracy"]
    )
    # the average differs from the live weights it was made of
    live, mean = last["model"], averaged.state_dict()
    assert any(not torch.equal(live[k], mean[k]) for k in live if live[k].is_floating_point())
    # final.pt is the selected average, in the plain model's keys
    final = load_checkpoint(run / "final.pt")["model"]
    assert set(final) == set(live)
    best_epoch = summary["best_epoch"]
    if best_epoch == len(history):
        for key, tensor in final.items():
            assert torch.equal(tensor, mean[key]), key
    assert summary["test"]["accuracy"] == max(0.0, summary["test"]["accuracy"])
    assert json.loads((run / "config.json").read_text())["average"] == kind


@pytest.mark.slow
def test_an_averaged_run_killed_mid_way_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = TrainConfig(optimizer="adam", average="swa", swa_start=0.25, **SMALL)
    straight = train(cfg, tmp_path / "straight", progress=False)
    _killed_after(Trainer(cfg, tmp_path / "killed", progress=False), 2)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed["test"] == straight["test"]
    assert resumed["test_accuracy_last_epoch"] == straight["test_accuracy_last_epoch"]
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["average"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["average"]
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


@pytest.mark.slow
def test_resuming_with_an_average_the_run_did_not_keep_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(optimizer="adam", **SMALL)
    _killed_after(Trainer(cfg, tmp_path / "run", progress=False), 1)
    averaged = TrainConfig(optimizer="adam", average="ema", **SMALL)
    with pytest.raises(ConfigError, match="holds no weight average"):
        train(averaged, tmp_path / "run", resume=True, progress=False)
