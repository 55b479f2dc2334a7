"""A comparison's methods beyond the registry's names: variants (an optimizer with settings and
a label of their own, as compute-matched Adam is), and the verdict's other inputs: noisy
validation labels and the last epoch's test accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcsam.toolkit.compare import compare, entry_settings, run_configs
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.report import load_runs, summarize
from gcsam.toolkit.rundir import load_checkpoint
from gcsam.toolkit.study_spec import Study, cells, check_study, study_from_mapping
from gcsam.toolkit.trainer import Trainer, train

SMALL = dict(epochs=2, batch_size=96, classes=["0", "1", "2"], model="small-cnn")
MATCHED = {"label": "adam-2x", "optimizer": "adam", "epochs": 4}


def test_a_variant_is_its_optimizer_with_its_settings_and_label() -> None:
    assert entry_settings("sam") == ("sam", {"optimizer": "sam"})
    configs = run_configs({"epochs": 2, "lr": 0.01}, ["adam", MATCHED], [0])
    plain, matched = configs
    assert (plain.optimizer, plain.label, plain.row, plain.epochs) == ("adam", None, "adam", 2)
    assert (matched.optimizer, matched.label, matched.row, matched.epochs) == (
        "adam", "adam-2x", "adam-2x", 4,
    )  # fmt: skip
    assert matched.lr == 0.01  # the shared settings it does not change


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"optimizer": "adam"}, "needs label"),
        ({"label": "x"}, "needs optimizer"),
        ({"label": "adam", "optimizer": "adam", "epochs": 4}, "is an optimizer's name"),
        ({"label": "a b", "optimizer": "adam"}, "label must be letters"),
        ({"label": "x", "optimizer": "adam", "epoch": 4}, "unknown setting\\(s\\) epoch"),
        ({"label": "x", "optimizer": "adam", "seed": 4}, "must not set seed"),
        ({"label": "x", "optimizer": "nope"}, "optimizer must be one of"),
        (3, "optimizer names or variants"),
        ("nope", "unknown optimizer 'nope'"),
    ],
)
def test_a_bad_variant_is_refused_naming_the_problem(entry, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        [cfg.resolved() for cfg in run_configs({}, [entry], [0])]


def test_two_rows_with_one_label_are_refused() -> None:
    with pytest.raises(ConfigError, match="must not repeat"):
        run_configs({}, [MATCHED, {**MATCHED, "epochs": 6}], [0])


def test_a_study_lists_variants_and_tunes_them_by_label() -> None:
    study = study_from_mapping(
        {
            "knob": "label_noise",
            "values": [0.0],
            "settings": {"epochs": 2},
            "optimizers": ["adam", MATCHED, {"label": "adam-ema", "optimizer": "adam",
                                            "average": "ema"}],
            "seeds": [0],
            "tune": {"trials": 2, "space": {"adam-2x": {"lr": [0.01, 0.001]}}},
        },
        "variants",
    )  # fmt: skip
    assert study.labels == ("adam", "adam-2x", "adam-ema")
    grid = cells(study)
    assert [(cfg.row, cfg.epochs, cfg.average) for _, cfg in grid] == [
        ("adam", 2, "none"), ("adam-2x", 4, "none"), ("adam-ema", 2, "ema"),
    ]  # fmt: skip
    assert study.tune.space_for("adam-2x")["lr"].choices == (0.01, 0.001)
    assert json.loads(json.dumps(study.to_json()))["optimizers"][1] == MATCHED


def test_a_variant_may_not_set_the_knob() -> None:
    study = Study(name="x", knob="epochs", values=(1, 2), optimizers=("adam", MATCHED), seeds=(0,))
    with pytest.raises(ConfigError, match="variant adam-2x must not set epochs"):
        check_study(study)


@pytest.mark.slow  # trains on scikit-learn's digits
def test_a_comparison_with_a_variant_reports_it_with_its_cost(tmp_path: Path) -> None:
    markdown = compare(
        SMALL | {"epochs": 1},
        optimizers=["adam", {"label": "adam-2x", "optimizer": "adam", "epochs": 2}, "gcsam"],
        seeds=[0],
        out_dir=tmp_path,
        plots=False,
        progress=False,
    )
    assert (tmp_path / "adam-2x-seed0" / "summary.json").exists()
    data = summarize(load_runs([tmp_path]))
    assert list(data.groups) == ["adam", "adam-2x", "gcsam"]
    # twice the epochs: twice the passes of Adam's run, as many as GCSAM's two passes a step
    assert data.stats["adam-2x"]["passes_vs_base"].mean == pytest.approx(2.0)
    assert data.stats["gcsam"]["passes_vs_base"].mean == pytest.approx(2.0)
    assert data.stats["adam-2x"]["passes_per_step"].mean == 1.0
    assert "| adam-2x " in markdown


@pytest.mark.slow
def test_the_last_epoch_test_accuracy_is_that_of_the_last_weights(tmp_path: Path) -> None:
    cfg = TrainConfig(optimizer="adam", **SMALL)
    summary = train(cfg, tmp_path / "run", progress=False)
    trainer = Trainer(cfg, tmp_path / "probe", progress=False)
    trainer.model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    last = trainer.evaluate(trainer.data.test)["accuracy"]
    assert summary["test_accuracy_last_epoch"] == last
    assert summary["passes"] == summary["passes_per_step"] * trainer.steps_per_epoch * 2


@pytest.mark.slow
def test_noisy_validation_labels_reach_the_run_and_its_report(tmp_path: Path) -> None:
    noisy = TrainConfig(label_noise=0.4, val_label_noise="same", **SMALL)
    clean = TrainConfig(label_noise=0.4, **SMALL)
    a, b = Trainer(noisy, tmp_path / "a"), Trainer(clean, tmp_path / "b")
    assert torch.equal(a.data.train.labels, b.data.train.labels)
    assert torch.equal(a.data.test.labels, b.data.test.labels)
    wrong = int((a.data.val.labels != b.data.val.labels).sum())
    assert wrong == round(0.4 * len(b.data.val)) == a.regime_record["val_flipped_labels"]
    train(noisy, tmp_path / "run", progress=False)
    data = summarize(load_runs([tmp_path / "run"]))
    assert data.meta["regimes"][0].endswith("% symmetric label noise, noisy validation labels")
