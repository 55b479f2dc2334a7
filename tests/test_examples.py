"""The examples run end to end and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gcsam.toolkit.study_spec import Study

# Subprocesses: slow; `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_prints_an_accuracy_per_optimizer() -> None:
    pytest.importorskip("sklearn")
    out = run("quickstart.py", "--epochs", "2", "--seeds", "0")
    accuracies = {
        name: float(acc) for name, acc in re.findall(r"^(sgd|sam|gcsam)\s+([\d.]+) \+-", out, re.M)
    }
    assert set(accuracies) == {"sgd", "sam", "gcsam"}
    # Ten balanced classes: chance is 10 %; two epochs of a small CNN already do far better.
    assert all(50.0 < acc <= 100.0 for acc in accuracies.values()), out


def test_lightning_example_prints_a_test_accuracy() -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = run("lightning_digits.py", "--epochs", "2", "--accumulate", "2")
    match = re.search(r"^gcsam \(lightning, 32-true\): test accuracy ([\d.]+) %$", out, re.M)
    assert match, out
    assert 50.0 < float(match.group(1)) <= 100.0, out  # chance is 10 %


def test_transformers_example_prints_a_test_accuracy() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    out = run("hf_trainer.py", "--epochs", "1", "--accumulate", "2", "--mode", "periodic")
    match = re.search(r"^gcsam \(transformers, fp32\): test accuracy ([\d.]+) %$", out, re.M)
    assert match, out
    assert 50.0 < float(match.group(1)) <= 100.0, out  # chance is 10 %


def test_recipes_all_reduce_the_loss() -> None:
    out = run("recipes.py")
    rows = re.findall(r"^(\w+)\s+loss ([\d.]+) -> ([\d.]+)$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "closure_style",
        "two_step_style_with_clipping",
        "gradient_accumulation",
        "bf16_autocast",
        "fp16_grad_scaler",
        "cheap_modes_two_step",
        "rho_follows_lr",
    ]
    for name, first, last in rows:
        assert float(last) < float(first), name


def test_study_file_example_defines_the_study_the_readme_shows(tmp_path: Path) -> None:
    """examples/imbalance-study.yaml is a valid study, and run on digits in a minute form it
    writes the study's report (the Fashion-MNIST settings swapped for tiny digits ones)."""
    from gcsam.toolkit import main
    from gcsam.toolkit.study_spec import read_study_file

    study = read_study_file(EXAMPLES / "imbalance-study.yaml")
    assert (study.name, study.knob, study.values) == ("imbalance", "imbalance", (1.0, 10.0, 50.0))
    assert study.settings["dataset"] == "fashion-mnist" and study.optimizers[-1] == "gcsam"
    quick = ["--dataset", "digits", "--train-size", "300", "--epochs", "1", "--seeds", "0"]
    out = tmp_path / "study"
    flags = [*quick, "--no-flatness", "--quiet", "--out", str(out)]
    code = main(["study", str(EXAMPLES / "imbalance-study.yaml"), *flags])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "imbalance-1", "imbalance-10", "imbalance-50",
    ]  # fmt: skip
    assert "## imbalance = 50" in (out / "report.md").read_text()


def test_the_verdict_study_file_is_the_protocol_docs_results_describes() -> None:
    """examples/verdict.yaml: every method, the compute-matched and averaged Adam among them,
    tuned on one learning-rate grid with one budget, selected on noisy validation labels."""
    from gcsam.toolkit.study_spec import cells, read_study_file

    study = read_study_file(EXAMPLES / "verdict.yaml")
    assert study.labels == (
        "adam", "adam-2x", "adam-swa", "sam", "gcsam", "periodic-gcsam", "look-gcsam",
        "m-gcsam", "ae-gcsam", "f-gcsam",
    )  # fmt: skip
    assert (study.knob, study.values, study.seeds) == ("label_noise", (0.0, 0.4), (0, 1, 2))
    assert study.tune is not None and (study.tune.trials, study.tune.sampler) == (3, "grid")
    for label in study.labels:
        assert study.tune.space_for(label)["lr"].choices == (0.0003, 0.001, 0.003)
    grid = [cfg.resolved() for _, cfg in cells(study)]
    assert {cfg.val_label_noise for cfg in grid} == {"same"}
    epochs = {cfg.row: cfg.epochs for cfg in grid}
    assert epochs["adam-2x"] == 2 * epochs["adam"] == 30
    assert {cfg.row: cfg.rho for cfg in grid}["m-gcsam"] == 3.0  # Becker et al.'s radius


def _a_12_point_sweep_of_the_verdict(name: str, label: str) -> Study:
    """The study in examples/``name``: ``label`` alone on the verdict's data, settings and seeds,
    12 grid trials over a space that includes the verdict's learning-rate grid."""
    from gcsam.toolkit.study_spec import read_study_file

    study = read_study_file(EXAMPLES / name)
    verdict = read_study_file(EXAMPLES / "verdict.yaml")
    assert study.labels == (label,)
    assert (study.knob, study.values, study.seeds) == (verdict.knob, verdict.values, verdict.seeds)
    assert study.settings == verdict.settings
    assert study.tune is not None and (study.tune.trials, study.tune.sampler) == (12, "grid")
    assert study.tune.space_for(label)["lr"].choices == verdict.tune.space_for("adam")["lr"].choices
    return study


def test_the_momentum_radius_study_file_sweeps_the_verdicts_settings() -> None:
    """examples/momentum-radius.yaml: m-gcsam alone, rho and lr on a 4 x 3 grid, on the verdict's
    data, model, epochs, schedule and noisy validation labels."""
    from gcsam.toolkit.study_spec import cells

    sweep = _a_12_point_sweep_of_the_verdict("momentum-radius.yaml", "m-gcsam")
    assert sweep.tune.space_for("m-gcsam")["rho"].choices == (0.1, 0.3, 1.0, 3.0)
    assert {cfg.val_label_noise for _, cfg in cells(sweep)} == {"same"}


def test_the_pruned_momentum_radius_study_is_the_sweep_with_a_pruner() -> None:
    """examples/momentum-radius-pruned.yaml differs from momentum-radius.yaml only by its name,
    description and pruner, so docs/results.md compares like with like."""
    import dataclasses

    from gcsam.toolkit.search_space import Pruning
    from gcsam.toolkit.study_spec import read_study_file

    sweep = read_study_file(EXAMPLES / "momentum-radius.yaml")
    pruned = read_study_file(EXAMPLES / "momentum-radius-pruned.yaml")
    assert pruned.tune is not None and sweep.tune is not None
    assert pruned.tune.prune == Pruning(startup_trials=3, warmup_epochs=3)
    same = {"name": "x", "description": ""}
    assert dataclasses.replace(
        pruned, **same, tune=dataclasses.replace(pruned.tune, prune=None)
    ) == (dataclasses.replace(sweep, **same))


def test_the_explicit_regularization_study_runs_adam_with_penalties_on_the_verdicts_settings() -> (
    None
):
    """examples/explicit-regularization.yaml: Adam with both penalties, the coefficients and the
    verdict's learning-rate grid tuned together, on the verdict's data and settings."""
    from gcsam.toolkit.study_spec import cells

    study = _a_12_point_sweep_of_the_verdict("explicit-regularization.yaml", "adam-penalties")
    assert set(study.tune.space_for("adam-penalties")) == {"lr", "feature_penalty", "head_penalty"}
    assert {cfg.resolved().optimizer for _, cfg in cells(study)} == {"adam"}


def test_the_wide_explicit_regularization_study_starts_at_the_first_ones_corner() -> None:
    """examples/explicit-regularization-wide.yaml: the 40 % noise value of the first sweep, its
    grid continued upwards from the corner it picked, on the same settings."""
    from gcsam.toolkit.study_spec import read_study_file

    wide = read_study_file(EXAMPLES / "explicit-regularization-wide.yaml")
    first = read_study_file(EXAMPLES / "explicit-regularization.yaml")
    assert (wide.labels, wide.knob, wide.seeds) == (first.labels, first.knob, first.seeds)
    assert wide.values == (0.4,) and wide.settings == first.settings
    assert wide.tune is not None and first.tune is not None
    space, corner = wide.tune.space_for("adam-penalties"), first.tune.space_for("adam-penalties")
    assert space["feature_penalty"].choices[0] == max(corner["feature_penalty"].choices)
    assert space["head_penalty"].choices[0] == max(corner["head_penalty"].choices)
    assert space["lr"].choices == corner["lr"].choices[:2]
    assert wide.tune.trials == 3 * 3 * 2


def test_the_budget_matched_explicit_regularization_study_has_the_verdicts_budget() -> None:
    """examples/explicit-regularization-budget.yaml: Adam with both penalties on the verdict's
    data, settings and seeds, with the verdict's 3 trials drawn over ranges that span both
    earlier sweeps' grids."""
    from gcsam.toolkit.study_spec import read_study_file

    study = read_study_file(EXAMPLES / "explicit-regularization-budget.yaml")
    verdict = read_study_file(EXAMPLES / "verdict.yaml")
    assert study.labels == ("adam-penalties",)
    assert (study.knob, study.values, study.seeds) == (verdict.knob, verdict.values, verdict.seeds)
    assert study.settings == verdict.settings
    assert study.tune is not None and verdict.tune is not None
    assert (study.tune.trials, study.tune.sampler) == (verdict.tune.trials, "tpe")
    space = study.tune.space_for("adam-penalties")
    assert all(param.log and param.choices is None for param in space.values())
    swept = [
        read_study_file(EXAMPLES / f"explicit-regularization{suffix}.yaml").tune
        for suffix in ("", "-wide")
    ]
    for name, param in space.items():
        points = [p for tune in swept for p in tune.space_for("adam-penalties")[name].choices]
        assert (param.low, param.high) == (min(points), max(points)), name


def test_the_penalties_with_sam_study_is_the_verdicts_protocol_with_the_wide_sweeps_penalties() -> (
    None
):
    """examples/penalties-with-sam.yaml: Adam, SAM and GCSAM on the verdict's data, settings,
    seeds and learning-rate grid, with the penalties the wide sweep picked under 40 % noise;
    GCSAM last, so the report's paired tests are against it."""
    from gcsam.toolkit.compare import reference_optimizer
    from gcsam.toolkit.study_spec import cells, read_study_file

    study = read_study_file(EXAMPLES / "penalties-with-sam.yaml")
    verdict = read_study_file(EXAMPLES / "verdict.yaml")
    assert study.labels == ("adam-penalties", "sam-penalties", "gcsam-penalties")
    assert reference_optimizer(study.optimizers) == "gcsam-penalties"
    assert (study.knob, study.values, study.seeds) == (verdict.knob, verdict.values, verdict.seeds)
    assert study.settings == {**verdict.settings, "feature_penalty": 0.01, "head_penalty": 0.3}
    assert study.tune is not None and verdict.tune is not None
    assert (study.tune.trials, study.tune.sampler) == (verdict.tune.trials, verdict.tune.sampler)
    for label in study.labels:
        assert study.tune.space_for(label) == verdict.tune.space_for("adam")
    grid = {cfg.row: cfg.resolved() for _, cfg in cells(study)}
    assert {row: cfg.optimizer for row, cfg in grid.items()} == {
        "adam-penalties": "adam", "sam-penalties": "sam", "gcsam-penalties": "gcsam",
    }  # fmt: skip
    wide = read_study_file(EXAMPLES / "explicit-regularization-wide.yaml").tune
    assert wide is not None  # the fixed penalties are one of the wide sweep's points
    assert 0.01 in wide.space_for("adam-penalties")["feature_penalty"].choices
    assert 0.3 in wide.space_for("adam-penalties")["head_penalty"].choices


def test_the_gcsam_against_sam_study_is_the_verdicts_protocol_with_ten_seeds() -> None:
    """examples/gcsam-vs-sam.yaml: Adam, SAM and GCSAM (the paper's formula, and the released
    script's raw-norm variant) on the verdict's data, settings and learning-rate grid, with 10
    seeds (the verdict's 3 among them) and the flatness measured; GCSAM last, so the report's
    paired tests are against it."""
    from gcsam.toolkit.compare import reference_optimizer
    from gcsam.toolkit.study_spec import read_study_file

    study = read_study_file(EXAMPLES / "gcsam-vs-sam.yaml")
    verdict = read_study_file(EXAMPLES / "verdict.yaml")
    assert study.labels == ("adam", "sam", "gcsam-raw", "gcsam")
    assert study.optimizers[2] == {
        "label": "gcsam-raw",
        "optimizer": "gcsam",
        "normalize_by": "raw",
    }
    assert study.flatness == {"max_samples": 1000, "trace_samples": 10}
    assert reference_optimizer(study.optimizers) == "gcsam"
    assert (study.knob, study.values) == (verdict.knob, verdict.values)
    assert study.seeds == tuple(range(10)) and set(verdict.seeds) <= set(study.seeds)
    assert study.settings == verdict.settings
    assert study.tune is not None and verdict.tune is not None
    assert study.tune.to_json() == verdict.tune.to_json()


def test_the_resnet_study_is_the_gcsam_against_sam_protocol_with_resnet20() -> None:
    """examples/gcsam-vs-sam-resnet.yaml: gcsam-vs-sam.yaml's data, settings, seeds and tuning
    for Adam, SAM and GCSAM with the CIFAR ResNet-20 in place of the convnet; GCSAM last."""
    from gcsam.toolkit.compare import reference_optimizer
    from gcsam.toolkit.study_spec import read_study_file

    resnet = read_study_file(EXAMPLES / "gcsam-vs-sam-resnet.yaml")
    study = read_study_file(EXAMPLES / "gcsam-vs-sam.yaml")
    assert resnet.labels == ("adam", "sam", "gcsam")
    assert reference_optimizer(resnet.optimizers) == "gcsam"
    assert (resnet.knob, resnet.values, resnet.seeds) == (study.knob, study.values, study.seeds)
    assert resnet.settings == {**study.settings, "model": "resnet20"}
    assert resnet.tune is not None and study.tune is not None
    assert resnet.tune.to_json() == study.tune.to_json()


def test_the_learning_rate_control_pairs_sam_and_gcsam_at_one_rate_on_the_same_runs() -> None:
    """examples/gcsam-vs-sam-by-lr.yaml: SAM and GCSAM on gcsam-vs-sam.yaml's clean-label data
    and settings, its seeds and flatness, at two learning rates of its grid."""
    from gcsam.toolkit.study_spec import read_study_file

    control = read_study_file(EXAMPLES / "gcsam-vs-sam-by-lr.yaml")
    study = read_study_file(EXAMPLES / "gcsam-vs-sam.yaml")
    assert study.tune is not None and control.tune is None
    assert control.knob == "lr" and control.labels == ("sam", "gcsam")
    assert set(control.values) <= set(study.tune.space_for("gcsam")["lr"].choices)
    assert 0.0 in study.values and "label_noise" not in control.settings  # clean labels
    assert (control.settings, control.seeds) == (study.settings, study.seeds)
    assert control.flatness == study.flatness
