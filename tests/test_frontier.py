"""The cost-benefit frontier: the Pareto set, the verdict's best and ties, the report's section
and the figure, on runs written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from gcsam.toolkit.report import format_report, load_runs, summarize, write_report
from gcsam.toolkit.report.frontier import pareto, verdict

SEEDS = (0, 1, 2)
STEPS_PER_EPOCH = 10
# label -> (test accuracy per seed, last-epoch test accuracy per seed, passes/step, epoch time,
# epochs); adam-2x is Adam given twice the epochs: the passes of a two-pass method.
RUNS = {
    "adam": ((0.80, 0.82, 0.81), (0.78, 0.80, 0.79), 1.0, 1.0, 2),
    "adam-2x": ((0.83, 0.82, 0.835), (0.82, 0.81, 0.83), 1.0, 1.0, 4),
    "sam": ((0.86, 0.85, 0.87), (0.85, 0.84, 0.86), 2.0, 2.0, 2),
    "gcsam": ((0.855, 0.86, 0.862), (0.85, 0.85, 0.85), 2.0, 2.1, 2),  # tied with sam, costlier
    "m-gcsam": ((0.83, 0.835, 0.84), (0.82, 0.83, 0.84), 1.0, 1.05, 2),  # cheap, behind sam
}


def write_run(run_dir: Path, label: str, seed: int) -> None:
    accuracy, last, passes, epoch_time, epochs = RUNS[label]
    optimizer = label.removesuffix("-2x")
    run_dir.mkdir(parents=True)
    config = {"dataset": "digits", "model": "small-cnn", "optimizer": optimizer, "base": "adam",
              "epochs": epochs, "seed": seed}  # fmt: skip
    if label != optimizer:
        config["label"] = label
    (run_dir / "config.json").write_text(json.dumps(config))
    history = [
        {"epoch": e, "val_accuracy": 0.5, "train_accuracy": 0.5, "epoch_time_s": epoch_time}
        for e in range(1, epochs + 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    summary = {
        "optimizer": optimizer, "seed": seed, "status": "finished", "best_epoch": 2,
        "epochs_run": epochs, "total_time_s": epochs * epoch_time, "passes_per_step": passes,
        "passes": passes * epochs * STEPS_PER_EPOCH,
        "test_accuracy_last_epoch": last[seed], "val": {"accuracy": 0.5, "loss": 1.0},
        "test": {"accuracy": accuracy[seed], "loss": 1 - accuracy[seed]},
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("frontier")
    for label in RUNS:
        for seed in SEEDS:
            write_run(root / f"{label}-seed{seed}", label, seed)
    return summarize(load_runs([root]), reference="gcsam")


def test_costs_are_over_the_base_run_of_the_same_seed(data) -> None:
    """Adam at twice the epochs costs what a two-pass method costs, though it takes one pass
    per step; its epoch time is Adam's."""
    for label, passes, time in (
        ("adam", 1, 1),
        ("adam-2x", 2, 2),
        ("sam", 2, 2),
        ("gcsam", 2, 2.1),
    ):
        stats = data.stats[label]
        assert stats["passes_vs_base"].mean == pytest.approx(passes), label
        assert stats["time_vs_base"].mean == pytest.approx(time), label
    assert data.stats["adam-2x"]["passes_per_step"].mean == 1.0
    assert data.stats["adam-2x"]["epoch_time_vs_base"].mean == pytest.approx(1.0)
    assert list(data.groups)[:2] == ["adam", "adam-2x"]  # a variant follows its optimizer


def test_the_pareto_set_is_what_nothing_dominates(data) -> None:
    # adam is cheapest; m-gcsam as cheap in passes and more accurate: adam is dominated, and
    # sam is as costly as adam-2x and more accurate.
    assert set(pareto(data, "passes_vs_base", "accuracy")) == {"m-gcsam", "sam"}
    # per epoch, Adam at twice the epochs looks as cheap as Adam and joins the set: why the
    # frontier counts a run's passes and time in all
    assert set(pareto(data, "passes_per_step", "accuracy")) == {"m-gcsam", "sam"}
    assert set(pareto(data, "epoch_time_vs_base", "accuracy")) == {"adam-2x", "m-gcsam", "sam"}


def test_the_verdict_names_the_best_and_the_ties(data) -> None:
    rows = verdict(data, "accuracy")
    assert [r.label for r in rows] == ["sam", "gcsam", "m-gcsam", "adam-2x", "adam"]
    best = RUNS["sam"][0]
    for row in rows[1:]:
        other = RUNS[row.label][0]
        expected = scipy_stats.ttest_rel(best, other).pvalue
        assert row.p_value == pytest.approx(expected, rel=1e-12)
        assert row.diff == pytest.approx(sum(best) / 3 - sum(other) / 3, abs=1e-12)
        assert row.tied == (expected >= 0.05)
    assert rows[0].tied and math.isnan(rows[0].p_value) and rows[0].test is None
    assert rows[0].diff == 0.0
    assert rows[1].tied and not any(r.tied for r in rows[2:])
    assert [r.passes for r in rows] == [2.0, 2.0, 1.0, 1.0, 1.0]
    assert [r.passes_ratio for r in rows] == [2.0, 2.0, 1.0, 2.0, 1.0]
    assert rows[1].time_ratio == pytest.approx(2.1) and rows[2].time_ratio == pytest.approx(1.05)


def test_the_last_epoch_has_its_own_verdict(data) -> None:
    rows = verdict(data, "test_accuracy_last_epoch")
    assert rows[0].label == "sam"
    assert rows[0].mean == pytest.approx(0.85)


def test_the_report_has_the_section_and_the_figure(data, tmp_path: Path) -> None:
    markdown = format_report(data)
    assert "## Cost and benefit" in markdown and "frontier.png" not in markdown
    section = markdown.split("## Cost and benefit")[1]
    sam = next(line for line in section.splitlines() if line.startswith("| sam "))
    assert "best" in sam and "2.00" in sam and "yes" in sam
    # sam minus m-gcsam: 0.03, 0.015, 0.03 -> 2.50 points -+ 4.302653 (t, 2 dof) * 0.5 = 2.15
    m_gcsam = next(line for line in section.splitlines() if line.startswith("| m-gcsam "))
    assert " +2.50 [+0.35, +4.65] |" in m_gcsam
    assert "vs best (points, 95% CI)" in section
    paths = write_report(data, tmp_path)
    assert paths["frontier"].stat().st_size > 0
    assert (
        "![Test accuracy against the measured cost](frontier.png)"
        in (tmp_path / "report.md").read_text()
    )


def test_one_seed_ties_nothing(tmp_path: Path) -> None:
    for optimizer in ("adam", "sam"):
        write_run(tmp_path / f"{optimizer}-seed0", optimizer, 0)
    rows = verdict(summarize(load_runs([tmp_path])), "accuracy")
    assert [r.tied for r in rows] == [True, False]  # the best itself; no test with one pair
