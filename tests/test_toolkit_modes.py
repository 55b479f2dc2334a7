"""The cheap sharpness-aware modes through the toolkit: registry entries, counted passes,
rho schedules, kill-and-resume, and bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gcsam import AdaptiveAscent, AscentFraction, LookSAM, MomentumAscent, Periodic
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.optimizers import OPTIMIZERS, build_optimizer
from gcsam.toolkit.rundir import load_checkpoint, read_history
from gcsam.toolkit.trainer import Trainer, lr_factor, train

# 3 digit classes: about 380 training images, 4 steps of 96 per epoch.
SMALL = dict(epochs=3, batch_size=96, classes=["0", "1", "2"])
CHEAP = {
    "periodic-gcsam": Periodic,
    "look-gcsam": LookSAM,
    "m-gcsam": MomentumAscent,
    "ae-gcsam": AdaptiveAscent,
    "f-gcsam": AscentFraction,
}


@pytest.mark.parametrize("name", CHEAP)
def test_each_cheap_optimizer_builds_its_mode_from_the_settings(name: str) -> None:
    cfg = TrainConfig(
        optimizer=name, every=3, look_alpha=0.5, ae_threshold=-0.5, ascent_fraction=0.25
    ).resolved()
    opt = build_optimizer(cfg, torch.nn.Linear(3, 2))
    assert type(opt.mode) is CHEAP[name]
    assert opt.param_groups[0]["rho"] == OPTIMIZERS[name].default_rho
    if name in ("periodic-gcsam", "look-gcsam"):
        assert opt.mode.every == 3
    if name == "look-gcsam":
        assert opt.mode.alpha == 0.5
    if name == "ae-gcsam":
        assert opt.mode.threshold == -0.5
    if name == "f-gcsam":
        assert opt.mode.fraction == 0.25


def _steps_per_epoch(run: Path) -> int:
    return Trainer(TrainConfig.from_json(_config(run), ignore_unknown=True), run).steps_per_epoch


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("adam", lambda steps: 1.0), ("gcsam", lambda steps: 2.0),
     ("m-gcsam", lambda steps: 1.0),
     ("periodic-gcsam", lambda steps: 1 + math.ceil(steps / 3) / steps)],
)  # fmt: skip
def test_passes_per_step_are_counted(tmp_path: Path, name: str, expected) -> None:
    run = tmp_path / name
    summary = train(TrainConfig(optimizer=name, every=3, **SMALL), run, progress=False)
    steps = _steps_per_epoch(run) * SMALL["epochs"]
    assert summary["passes_per_step"] == pytest.approx(expected(steps))
    rows = read_history(run)
    assert all(0.99 < row["passes_per_step"] <= 2.0 for row in rows)


def test_the_ascent_fraction_counts_its_part_of_each_batch(tmp_path: Path) -> None:
    """f-gcsam: 1 + round(f n) / n passes for a batch of n, the short last batch included; the
    training accuracy is logged on the part the first pass ran on."""
    run = tmp_path / "f"
    summary = train(
        TrainConfig(optimizer="f-gcsam", ascent_fraction=0.3, **SMALL), run, progress=False
    )
    train_size = _config(run)["split_sizes"]["train"]
    sizes = [96] * (train_size // 96) + ([train_size % 96] if train_size % 96 else [])
    per_epoch = sum(1 + round(0.3 * n) / n for n in sizes)
    steps = len(sizes) * SMALL["epochs"]
    assert summary["passes_per_step"] == pytest.approx(per_epoch * SMALL["epochs"] / steps)
    assert summary["passes"] == pytest.approx(per_epoch * SMALL["epochs"])
    assert summary["passes_per_step"] < 1.31
    for row in read_history(run):
        assert 0 <= row["train_accuracy"] <= 1


def test_adaptive_ascent_takes_between_one_and_two_passes(tmp_path: Path) -> None:
    summary = train(TrainConfig(optimizer="ae-gcsam", **SMALL), tmp_path / "ae", progress=False)
    assert 1.0 < summary["passes_per_step"] < 2.0


def test_rho_follows_the_learning_rate(tmp_path: Path) -> None:
    cfg = TrainConfig(optimizer="periodic-gcsam", rho=0.1, rho_schedule="lr", **SMALL)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    factor = lr_factor(trainer.cfg, trainer.steps_per_epoch)(trainer.progress.step)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(trainer.cfg.lr * factor)
    assert group["rho"] == pytest.approx(0.1 * factor)
    assert group["initial_rho"] == 0.1


class _KillError(Exception):
    pass


@pytest.mark.parametrize("name", [*CHEAP, "gcsam"])
def test_a_run_killed_mid_cycle_resumes_bit_identically(tmp_path: Path, name: str) -> None:
    # every=3 with 4 steps per epoch: the kill after epoch 1 falls inside a cycle.
    cfg = TrainConfig(optimizer=name, every=3, rho_schedule="lr", **SMALL)
    straight = train(cfg, tmp_path / "straight", progress=False)
    trainer = Trainer(cfg, tmp_path / "killed", progress=False)
    epoch = trainer._train_epoch

    def epoch_then_kill() -> dict:
        epoch()
        raise _KillError

    trainer._train_epoch = epoch_then_kill
    with pytest.raises(_KillError):
        trainer.run()
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed["test"] == straight["test"]
    assert resumed["passes_per_step"] == straight["passes_per_step"]
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    mode_a, mode_b = a["optimizer"]["sharpness_aware"], b["optimizer"]["sharpness_aware"]
    directions = mode_a.pop("look_direction", {}), mode_b.pop("look_direction", {})
    assert mode_a == mode_b
    torch.testing.assert_close(*directions, rtol=0, atol=0)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(optimizer="periodic-gcsam", every=0), "every must be an integer >= 1"),
        (dict(optimizer="look-gcsam", look_alpha=-0.1), "look_alpha must be >= 0"),
        (dict(optimizer="ae-gcsam", ae_threshold="inf"), "ae_threshold must be a finite"),
        (dict(optimizer="gcsam", rho_schedule="cosine"), "rho_schedule must be one of"),
        (dict(optimizer="periodic-sam"), "optimizer must be one of"),
    ],
)
def test_bad_mode_settings_are_refused_before_anything_runs(
    tmp_path: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(**SMALL, **settings), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_momentum_mode_over_sgd_without_momentum_names_the_bases_that_work(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig(optimizer="m-gcsam", base="sgd", momentum=0.0, **SMALL)
    with pytest.raises(ValueError, match="SGD with momentum > 0, Adam, AdamW"):
        train(cfg, tmp_path / "run", progress=False)
