"""``gcsam.toolkit.report`` on fake run directories with hand-chosen numbers."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from gcsam.toolkit.metrics import METRICS
from gcsam.toolkit.optimizers import OPTIMIZERS
from gcsam.toolkit.report import (
    FLATNESS_KEYS,
    LAST_EPOCH_KEYS,
    RELATIVE_KEYS,
    SUMMARY_KEYS,
    TESTED_KEYS,
    Run,
    format_p,
    format_report,
    format_sharpness,
    load_runs,
    optimizer_rank,
    summarize,
    write_report,
    write_sharpness,
)

SEEDS = (0, 1, 2)
# Test accuracy per optimizer and seed; every other metric is derived from it below.
ACCURACY = {
    "adam": (0.85, 0.88, 0.86),
    "sam": (0.89, 0.90, 0.90),
    "gcsam": (0.90, 0.91, 0.92),
}
EPOCHS_TO_TARGET = {"adam": (4, None, 5), "sam": (3, 4, 3), "gcsam": (2, 3, 4)}
TOTAL_TIME = {"adam": (10.0, 11.0, 12.0), "sam": (20.0, 20.0, 23.0), "gcsam": (21.0, 22.0, 23.0)}
TARGET = 0.8
EPOCH_TIME_SHAPE = (0.6, 1.4, 1.0, 1.2, 0.8)  # epoch times over their mean, which is 1


def fake_metrics(accuracy: float) -> dict[str, float]:
    return {
        "loss": round(1.0 - accuracy, 4),
        "accuracy": accuracy,
        "balanced_accuracy": round(accuracy - 0.01, 4),
        "precision": round(accuracy - 0.02, 4),
        "recall": round(accuracy - 0.01, 4),
        "specificity": round(0.5 + accuracy / 2, 4),
        "f1": round(accuracy - 0.015, 4),
        "roc_auc": round(0.05 + accuracy, 4),
    }


def write_run(
    run_dir: Path,
    optimizer: str,
    seed: int,
    *,
    finished: bool = True,
    base: str | None = "adam",
    name: str | None = None,
    epoch_time: float = 2.0,
    passes: float | None = None,
) -> None:
    """A run with the numbers of ``optimizer`` at ``seed``, written as optimizer ``name``; its
    epochs take ``epoch_time`` seconds on average, and ``passes`` (None: a run from before the
    trainer counted them) forward/backward passes per step."""
    i = SEEDS.index(seed)
    accuracy = ACCURACY[optimizer][i]
    run_dir.mkdir(parents=True)
    config = {
        "dataset": "digits",
        "model": "small-cnn",
        "optimizer": name or optimizer,
        "base": base,
        "rho": 0.05,
        "lr": 1e-3,
        "epochs": 5,
        "batch_size": 64,
        "seed": seed,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    history = []
    for epoch in range(1, 6):
        val_accuracy = accuracy * (0.6 + 0.08 * epoch) + 0.001 * seed
        history.append(
            {
                "epoch": epoch,
                "lr": 1e-3,
                "train_loss": 1.5 / epoch,
                "train_accuracy": val_accuracy,
                "val_loss": (1.9 - accuracy) / epoch + 0.01 * seed,
                "val_accuracy": val_accuracy,
                "epoch_time_s": epoch_time * EPOCH_TIME_SHAPE[epoch - 1],
                "wall_time_s": 2.0 * epoch,
            }
        )
        if passes is not None:
            history[-1]["passes_per_step"] = passes
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if not finished:
        return
    epochs = EPOCHS_TO_TARGET[optimizer][i]
    summary = {
        "optimizer": name or optimizer,
        "seed": seed,
        "status": "finished",
        "best_epoch": 5,
        "epochs_run": 5,
        "total_time_s": TOTAL_TIME[optimizer][i],
        "target_val_accuracy": TARGET,
        "epochs_to_target": epochs,
        "time_to_target_s": None if epochs is None else 2.0 * epochs,
        "val": fake_metrics(accuracy),
        "test": {**fake_metrics(accuracy), "confusion_matrix": [[9, 1], [1, 9]]},
    }
    if passes is not None:
        summary["passes_per_step"] = passes
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    for seed in SEEDS:
        for optimizer in ("gcsam", "adam", "sam"):  # not the table order, on purpose
            write_run(root / f"{optimizer}-seed{seed}", optimizer, seed)
    return root


@pytest.fixture(scope="module")
def report(compare_dir, tmp_path_factory):
    data = summarize(load_runs([compare_dir]))
    out = tmp_path_factory.mktemp("report")
    return data, write_report(data, out, plots=False)  # the plots have a test of their own


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{markdown}")


def header(markdown: str, first_cell: str) -> list[str]:
    return table_row(markdown, first_cell)


def test_results_table_values(report):
    data, paths = report
    markdown = paths["markdown"].read_text()
    assert markdown == format_report(data)
    assert markdown.startswith("# Optimizer comparison: digits, small-cnn\n")
    assert "5 epochs; 3 seeds (0, 1, 2); target validation accuracy 80.00%." in markdown
    columns = header(markdown, "Optimizer")
    assert columns == [
        "Optimizer",
        "Seeds",
        "Accuracy (%)",
        "Balanced acc. (%)",
        "F1 (%)",
        "Precision (%)",
        "Recall (%)",
        "Specificity (%)",
        "ROC AUC (%)",
        "Loss",
        "Epochs to target",
        "Time to target (s)",
        "Time (s)",
        "Passes/step",
        "Time/epoch vs base",
    ]
    gcsam = dict(zip(columns, table_row(markdown, "gcsam"), strict=True))
    assert gcsam["Seeds"] == "3"
    assert gcsam["Accuracy (%)"] == "91.00 ± 1.00"
    assert gcsam["Balanced acc. (%)"] == "90.00 ± 1.00"
    assert gcsam["F1 (%)"] == "89.50 ± 1.00"
    assert gcsam["Specificity (%)"] == "95.50 ± 0.50"
    assert gcsam["ROC AUC (%)"] == "96.00 ± 1.00"
    assert gcsam["Loss"] == "0.0900 ± 0.0100"
    assert gcsam["Epochs to target"] == "3.0 ± 1.0"
    assert gcsam["Time to target (s)"] == "6.0 ± 2.0"
    assert gcsam["Time (s)"] == "22.0 ± 1.0"
    # Runs from before the trainer counted passes; every epoch took as long as adam's.
    assert gcsam["Passes/step"] == "n/a"
    assert gcsam["Time/epoch vs base"] == "1.00x ± 0.00"
    adam = dict(zip(columns, table_row(markdown, "adam"), strict=True))
    # mean 0.86333, sample std sqrt(((-0.01333)^2 + 0.01667^2 + (-0.00333)^2) / 2) = 0.015275
    assert adam["Accuracy (%)"] == "86.33 ± 1.53"
    assert adam["Epochs to target"] == "4.5 ± 0.7 (2/3)"
    sam = dict(zip(columns, table_row(markdown, "sam"), strict=True))
    assert sam["Accuracy (%)"] == "89.67 ± 0.58"
    assert sam["Time (s)"] == "21.0 ± 1.7"


def results_column(markdown: str) -> list[str]:
    """The first cell of every row of the results table, top to bottom."""
    lines = markdown.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| Optimizer ")))
    rows = []
    for line in lines[start + 2 :]:  # past the header and the rule
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_table_order_is_registry_order(report):
    data, paths = report
    assert data.optimizers == ["adam", "sam", "gcsam"]
    assert results_column(paths["markdown"].read_text()) == ["adam", "sam", "gcsam"]


UNREGISTERED = ("aaa-unregistered", "zzz-unregistered")


@pytest.fixture(scope="module")
def every_optimizer(tmp_path_factory) -> list[str]:
    """The results table's rows for one run of every registered optimizer and of two unknown
    ones, written in reverse registry order so that no other order can pass by accident."""
    root = tmp_path_factory.mktemp("registry")
    names = [*reversed(OPTIMIZERS), *UNREGISTERED]
    for i, name in enumerate(names):
        write_run(root / f"{i:02d}-{name}", "adam", 0, name=name)
    return results_column(format_report(summarize(load_runs([root]))))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_sits_at_its_registry_place(every_optimizer, name):
    registered = list(OPTIMIZERS)
    assert optimizer_rank(name) == registered.index(name)
    position = every_optimizer.index(name)
    assert every_optimizer[:position] == registered[: registered.index(name)]


def test_unregistered_optimizers_go_last_alphabetically(every_optimizer):
    assert every_optimizer == [*OPTIMIZERS, *UNREGISTERED]
    assert optimizer_rank("aaa-unregistered") == optimizer_rank("zzz-unregistered")
    assert optimizer_rank("aaa-unregistered") == len(OPTIMIZERS)


def test_paired_tests(report):
    data, paths = report
    gcsam, adam = ACCURACY["gcsam"], ACCURACY["adam"]
    test = data.tests["adam"]["accuracy"]
    # By hand: differences 0.05, 0.03, 0.06 -> mean 0.046667.
    assert test.diff == pytest.approx(0.14 / 3, abs=1e-12)
    assert test.n == 3 and test.seeds == SEEDS
    assert test.p_value == stats.ttest_rel(gcsam, adam).pvalue
    # t = mean / (sd / sqrt(n)) = 0.046667 / (0.015275 / sqrt(3)) = 5.2915, two-sided, 2 dof.
    t = (0.14 / 3) / (np.std(np.subtract(gcsam, adam), ddof=1) / math.sqrt(3))
    assert test.p_value == pytest.approx(2 * stats.t.sf(t, df=2), rel=1e-9)
    # 95 % interval: mean +- t(0.975, 2 dof) * sd / sqrt(n), t = 4.302653 from the tables.
    half = 4.302653 * 0.015275252 / math.sqrt(3)
    assert (test.ci_low, test.ci_high) == pytest.approx((0.14 / 3 - half, 0.14 / 3 + half), 1e-6)
    assert set(data.tests) == {"adam", "sam"}
    assert set(data.tests["sam"]) == set(TESTED_KEYS)
    assert set(TESTED_KEYS) == {*METRICS, *LAST_EPOCH_KEYS, "epochs_to_target", *FLATNESS_KEYS}
    # Epochs to target: adam never reached it at seed 1, so only seeds 0 and 2 pair:
    # gcsam 2, 4 against adam 4, 5 -> differences -2, -1.
    epochs = data.tests["adam"]["epochs_to_target"]
    assert (epochs.diff, epochs.n, epochs.seeds) == (-1.5, 2, (0, 2))
    assert epochs.p_value == stats.ttest_rel([2, 4], [4, 5]).pvalue
    # 95 % interval: -1.5 -+ t(0.975, 1 dof) * sd / sqrt(2), t = 12.706205, sd 0.707107.
    half = 12.706205 * 0.70710678 / math.sqrt(2)
    assert (epochs.ci_low, epochs.ci_high) == pytest.approx((-1.5 - half, -1.5 + half), 1e-6)
    assert data.tests["sam"]["epochs_to_target"].diff == pytest.approx(-1 / 3, abs=1e-12)
    # no run has flatness: nothing pairs
    flat = data.tests["sam"]["top_eigenvalue"]
    assert flat.n == 0 and math.isnan(flat.diff) and math.isnan(flat.p_value)

    markdown = paths["markdown"].read_text()
    columns = header(markdown, "Metric")
    assert columns == ["Metric", "gcsam vs adam", "p", "gcsam vs sam", "p"]
    row = table_row(markdown, "Accuracy (points)")
    assert row[1] == "+4.67 [+0.87, +8.46]"  # 4.667 -+ 3.795
    assert row[2] == f"{stats.ttest_rel(gcsam, adam).pvalue:#.3g}" == "0.0339"
    # differences 0.01, 0.01, 0.02: sd 0.00577, half-width 4.302653 * 0.00577 / sqrt(3) = 0.0143
    assert row[3] == "+1.33 [-0.10, +2.77]"
    assert row[4] == f"{stats.ttest_rel(gcsam, ACCURACY['sam']).pvalue:#.3g}"
    loss = table_row(markdown, "Loss (raw)")
    assert loss[1] == "-0.0467 [-0.0846, -0.0087]"
    # -1.5 -+ 12.706205 * 0.5 = -7.85, +4.85
    assert table_row(markdown, "Epochs to target")[1:3] == ["-1.5 [-7.9, +4.9]", "0.205"]
    assert "Top Hessian eigenvalue" not in markdown  # no run has it: no row
    assert "(loss and epochs to target: raw, where below 0 means that gcsam has less)" in markdown
    assert "n = 3 seed pairs" in markdown
    assert "95% confidence interval of the mean difference" in markdown


def test_csv_values(report):
    data, paths = report
    with open(paths["csv"], newline="") as handle:
        rows = {(r["optimizer"], r["metric"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 3 * (len(METRICS) + len(SUMMARY_KEYS) + len(RELATIVE_KEYS))
    gcsam = rows["gcsam", "accuracy"]
    assert float(gcsam["mean"]) == np.mean(ACCURACY["gcsam"])
    assert float(gcsam["mean"]) == pytest.approx(0.91, abs=1e-15)
    assert float(gcsam["std"]) == np.std(ACCURACY["gcsam"], ddof=1)
    assert float(gcsam["std"]) == pytest.approx(0.01, abs=1e-15)
    assert gcsam["n"] == "3"
    assert gcsam["reference"] == gcsam["diff"] == gcsam["p_value"] == ""  # no test against itself
    adam = rows["adam", "accuracy"]
    assert adam["reference"] == "gcsam"
    assert float(adam["diff"]) == data.tests["adam"]["accuracy"].diff
    assert float(adam["p_value"]) == stats.ttest_rel(ACCURACY["gcsam"], ACCURACY["adam"]).pvalue
    assert adam["n_pairs"] == "3"
    test = data.tests["adam"]["accuracy"]
    assert (float(adam["ci_low"]), float(adam["ci_high"])) == (test.ci_low, test.ci_high)
    assert gcsam["ci_low"] == gcsam["ci_high"] == ""
    target = rows["adam", "epochs_to_target"]
    assert (float(target["mean"]), target["n"]) == (4.5, "2")
    assert rows["adam", "total_time_s"]["diff"] == ""  # only TESTED_KEYS are tested
    assert float(target["diff"]) == -1.5 and target["n_pairs"] == "2"
    assert rows["adam", "top_eigenvalue"]["diff"] == ""  # tested, but no pair has it
    assert float(rows["sam", "loss"]["mean"]) == np.mean(
        [fake_metrics(a)["loss"] for a in ACCURACY["sam"]]
    )


@pytest.mark.slow  # matplotlib's import and two figures: 2 to 4 s
def test_pngs_are_written(report, tmp_path):
    data, without_plots = report
    paths = write_report(data, tmp_path)
    assert set(paths) == {"markdown", "csv", "learning_curves", "test_metrics", "frontier"}
    assert paths["csv"].read_text() == without_plots["csv"].read_text()
    figure = "![Test accuracy against the measured cost](frontier.png)\n\n"
    with_plots = paths["markdown"].read_text()
    assert figure in with_plots
    assert with_plots.replace(figure, "") == without_plots["markdown"].read_text()
    for key in ("learning_curves", "test_metrics", "frontier"):
        path = paths[key]
        assert path.name == f"{key}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1024


def test_no_plots(report):
    _, paths = report
    assert set(paths) == {"markdown", "csv"}
    assert not list(paths["markdown"].parent.glob("*.png"))


def test_run_dirs_and_parent_give_the_same_runs(compare_dir):
    direct = load_runs(sorted(compare_dir.iterdir()))
    via_parent = load_runs([compare_dir])
    assert sorted(r.path for r in direct) == sorted(r.path for r in via_parent)
    assert len(via_parent) == 9
    # Naming a run twice (directly and through its parent) loads it once.
    assert len(load_runs([compare_dir, compare_dir / "adam-seed0"])) == 9
    run = next(r for r in via_parent if r.path.name == "gcsam-seed1")
    assert (run.optimizer, run.seed, len(run.history)) == ("gcsam", 1, 5)
    assert run.config["dataset"] == "digits" and run.summary["status"] == "finished"


def test_unfinished_runs_are_skipped_with_a_warning(tmp_path):
    write_run(tmp_path / "gcsam-seed0", "gcsam", 0)
    write_run(tmp_path / "gcsam-seed1", "gcsam", 1, finished=False)
    write_run(tmp_path / "sam-seed0", "sam", 0)
    crashed = tmp_path / "sam-seed1"
    write_run(crashed, "sam", 1)
    summary = json.loads((crashed / "summary.json").read_text())
    (crashed / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    cut = tmp_path / "sam-seed2"
    write_run(cut, "sam", 2)
    (cut / "summary.json").write_text('{"status": "fini')  # killed mid-write
    with pytest.warns(UserWarning, match="3 run\\(s\\) not finished or not readable") as record:
        runs = load_runs([tmp_path])
    message = str(record[0].message)
    assert "gcsam-seed1 (no summary.json)" in message
    assert "sam-seed1/summary.json: status must be finished or diverged, got 'failed'" in message
    assert "sam-seed2/summary.json: unreadable JSON at line 1" in message
    assert sorted(r.path.name for r in runs) == ["gcsam-seed0", "sam-seed0"]


def test_no_finished_runs_raise_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_runs([empty])
    write_run(tmp_path / "only" / "adam-seed0", "adam", 0, finished=False)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="only"):
        load_runs([tmp_path / "only"])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_runs([tmp_path / "missing"])
    with pytest.raises(ValueError):
        load_runs([])


def test_single_seed_has_zero_std_and_no_p_value(tmp_path):
    for optimizer in ("gcsam", "adam"):
        write_run(tmp_path / optimizer, optimizer, 0)
    data = summarize(load_runs([tmp_path]))
    assert data.stats["gcsam"]["accuracy"].std == 0.0
    assert math.isnan(data.tests["adam"]["accuracy"].p_value)
    assert data.tests["adam"]["accuracy"].diff == pytest.approx(0.05)
    markdown = format_report(data)
    assert table_row(markdown, "gcsam")[2] == "90.00 ± 0.00"
    assert table_row(markdown, "Accuracy (points)")[1:] == ["+5.00", "n/a"]
    assert "n = 1 seed pairs" in markdown
    paths = write_report(data, tmp_path / "out", plots=False)
    with open(paths["csv"], newline="") as handle:
        adam = next(r for r in csv.DictReader(handle) if r["optimizer"] == "adam")
    assert (adam["std"], adam["p_value"], adam["n_pairs"]) == ("0.0", "", "1")


def test_pairs_only_shared_seeds_and_missing_reference(tmp_path):
    for seed in SEEDS:
        write_run(tmp_path / f"gcsam-{seed}", "gcsam", seed)
    for seed in (1, 2):
        write_run(tmp_path / f"sam-{seed}", "sam", seed)
    data = summarize(load_runs([tmp_path]))
    test = data.tests["sam"]["accuracy"]
    assert test.seeds == (1, 2)
    assert test.p_value == stats.ttest_rel([0.91, 0.92], [0.90, 0.90]).pvalue
    # differences 0.01, 0.02 (1 dof, t = 12.706205): 0.015 -+ 12.706205 * 0.0070711 / sqrt(2)
    assert (test.ci_low, test.ci_high) == pytest.approx((0.015 - 0.0635310, 0.015 + 0.0635310))
    assert data.stats["sam"]["accuracy"].n == 2

    other = summarize(load_runs([tmp_path]), reference="asam")
    assert other.reference is None and other.tests == {}
    assert "No paired tests: the reference optimizer 'asam'" in format_report(other)


def test_labels_split_by_base_and_ordering(tmp_path):
    write_run(tmp_path / "a", "gcsam", 0, base="adam")
    write_run(tmp_path / "b", "gcsam", 0, base="sgd")
    write_run(tmp_path / "c", "sam", 0, base="adam")
    write_run(tmp_path / "d", "adam", 0, base="adam")
    write_run(tmp_path / "e", "adam", 0, name="zeta")
    write_run(tmp_path / "f", "adam", 0, name="lion")
    data = summarize(load_runs([tmp_path]), reference="gcsam-adam")
    assert data.optimizers == ["adam", "sam", "gcsam-adam", "gcsam-sgd", "lion", "zeta"]
    assert data.reference == "gcsam-adam"
    assert set(data.tests) == {"adam", "sam", "gcsam-sgd", "lion", "zeta"}


def test_truncated_history_line_and_repeated_seeds(tmp_path):
    write_run(tmp_path / "gcsam-a", "gcsam", 0)
    write_run(tmp_path / "gcsam-b", "gcsam", 1, name="gcsam")
    write_run(tmp_path / "adam-a", "adam", 0)
    write_run(tmp_path / "adam-b", "adam", 1)
    # A second adam run of seed 0 (say, another learning rate): both count in adam's mean and
    # the pairing uses their average for seed 0.
    write_run(tmp_path / "adam-c", "adam", 1)
    config = json.loads((tmp_path / "adam-c" / "config.json").read_text())
    (tmp_path / "adam-c" / "config.json").write_text(json.dumps({**config, "seed": 0}))
    with open(tmp_path / "gcsam-a" / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 6, "val_acc')  # killed mid-write
    runs = load_runs([tmp_path])
    assert len(next(r for r in runs if r.path.name == "gcsam-a").history) == 5
    with pytest.warns(UserWarning, match=r"adam has several runs for seed\(s\) \[0\]"):
        data = summarize(runs)
    assert data.stats["adam"]["accuracy"].n == 3
    test = data.tests["adam"]["accuracy"]
    assert test.seeds == (0, 1)
    adam_seed0 = (0.85 + 0.88) / 2
    assert test.diff == pytest.approx(((0.90 - adam_seed0) + (0.91 - 0.88)) / 2)


def test_format_p():
    assert format_p(0.033912) == "0.0339"
    assert format_p(0.5) == "0.500"  # trailing zeros kept: always three significant digits
    assert format_p(1.234e-7) == "1.23e-07"
    assert format_p(math.nan) == "n/a"


def test_flatness_section(tmp_path):
    flatness = {"gcsam": (10.0, 100.0, 0.012), "adam": (30.0, 400.0, 0.05)}
    for optimizer in ("gcsam", "adam"):
        for seed in (0, 1):
            run_dir = tmp_path / f"{optimizer}-{seed}"
            write_run(run_dir, optimizer, seed)
            summary = json.loads((run_dir / "summary.json").read_text())
            top, trace, sharpness = (v * (1 + seed) for v in flatness[optimizer])
            summary.update(
                top_eigenvalue=top,
                hessian_trace=trace,
                sam_sharpness=sharpness,
                flatness_settings={"rho": 0.05, "samples": 256},
            )
            (run_dir / "summary.json").write_text(json.dumps(summary))
    markdown = format_report(summarize(load_runs([tmp_path])))
    assert "## Flatness of the final weights" in markdown
    assert "Smaller is flatter. Mean ± std over seeds (rho 0.05, samples 256)." in markdown
    columns = header(markdown, "Optimizer")  # the first table with that header: the results
    assert columns[0] == "Optimizer" and "Accuracy (%)" in columns
    flat = markdown[markdown.index("## Flatness") :]
    assert header(flat, "Optimizer")[1:] == [
        "Top Hessian eigenvalue",
        "Hessian trace",
        "SAM sharpness",
    ]
    # mean and sample std of (v, 2v): 1.5 v and v / sqrt(2)
    assert table_row(flat, "gcsam")[1:] == ["15.00 ± 7.07", "150.00 ± 70.71", "0.0180 ± 0.0085"]
    assert table_row(flat, "adam")[1] == "45.00 ± 21.21"
    # Paired: gcsam (10, 20) against adam (30, 60) -> differences -20, -40, mean -30, sd 14.142;
    # half-width 12.706205 * 14.142 / sqrt(2) = 127.06; t = -3 with 1 dof.
    p_value = f"{stats.ttest_rel([10.0, 20.0], [30.0, 60.0]).pvalue:#.3g}"
    assert table_row(markdown, "Top Hessian eigenvalue (raw)")[1:] == [
        "-30.00 [-157.06, +97.06]",
        p_value,
    ]
    # trace: -300, -600 -> -450 -+ 12.706205 * 212.13 / sqrt(2) = 1905.93
    assert table_row(markdown, "Hessian trace (raw)")[1] == "-450.0 [-2355.9, +1455.9]"
    # SAM sharpness: -0.038, -0.076 -> -0.057 -+ 12.706205 * 0.026870 / sqrt(2) = 0.24142
    assert table_row(markdown, "SAM sharpness (raw)")[1] == "-0.0570 [-0.2984, +0.1844]"
    assert "(loss, epochs to target and flatness: raw, where below 0 means" in markdown


def test_no_flatness_section_without_flatness_numbers(report):
    data, _ = report
    assert "Flatness" not in format_report(data)


def sharpness_record(run: str, optimizer: str, seed: int, **extra) -> dict:
    return {
        "run": f"/somewhere/{run}",
        "optimizer": optimizer,
        "seed": seed,
        "split": "train",
        "samples": 256,
        "top_eigenvalues": {"values": [12.5, 3.0]},
        "trace": None,
        "sam_sharpness": {"sharpness": 0.0123, "rho": 0.05, "adaptive": False},
        **extra,
    }


def test_sharpness_table_and_csv(tmp_path):
    records = [
        sharpness_record(
            "gcsam-seed0",
            "gcsam",
            0,
            trace={"trace": 100.25, "std_error": 1.5},
            m_sharpness={"sharpness": 0.02},
        ),
        sharpness_record("sam-seed1", "sam", 1),
    ]
    markdown = format_sharpness(records)
    assert header(markdown, "Run") == [
        "Run",
        "Optimizer",
        "Seed",
        "Top eigenvalues",
        "Trace ± s.e.",
        "SAM sharpness",
        "m-sharpness",
    ]
    assert table_row(markdown, "gcsam-seed0")[1:] == [
        "gcsam", "0", "12.5, 3", "100.2 ± 1.5", "0.0123", "0.02"
    ]  # fmt: skip
    assert table_row(markdown, "sam-seed1")[4:] == ["", "0.0123", ""]
    assert markdown.endswith(
        "On the train split (256 examples), eval mode; SAM sharpness: largest loss increase "
        "within rho = 0.05 (L2 ball).\n"
    )
    assert "m-sharpness" not in format_sharpness(records[1:])

    paths = write_sharpness(records, tmp_path / "out")
    assert paths["markdown"].read_text() == markdown
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {
        "run": "/somewhere/gcsam-seed0",
        "optimizer": "gcsam",
        "seed": "0",
        "split": "train",
        "samples": "256",
        "top_eigenvalue": "12.5",
        "trace": "100.25",
        "trace_std_error": "1.5",
        "sam_sharpness": "0.0123",
        "rho": "0.05",
        "m_sharpness": "0.02",
    }
    assert (rows[1]["trace"], rows[1]["trace_std_error"], rows[1]["m_sharpness"]) == ("", "", "")


def write_diverged(run_dir: Path, optimizer: str, seed: int, name: str | None = None) -> None:
    """A run that stopped on a non-finite loss in its third epoch: no test metrics."""
    write_run(run_dir, optimizer, seed, finished=False, name=name)
    summary = {
        "optimizer": name or optimizer,
        "seed": seed,
        "status": "diverged",
        "diverged_at": {"epoch": 3, "step": 60},
        "error": "diverged at epoch 3, step 60: the training loss is nan",
        "best_epoch": 2,
        "epochs_run": 2,
        "total_time_s": 4.0,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_a_diverged_run_is_listed_under_the_table_and_left_out(tmp_path):
    for seed in SEEDS:
        write_run(tmp_path / f"gcsam-seed{seed}", "gcsam", seed)
    write_run(tmp_path / "sam-seed0", "sam", 0)
    write_run(tmp_path / "sam-seed1", "sam", 1)
    write_diverged(tmp_path / "sam-seed2", "sam", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a diverged run is reported, not skipped as unfinished
        data = summarize(load_runs([tmp_path]))
    assert [run.path.name for run in data.diverged] == ["sam-seed2"]
    assert [run.seed for run in data.groups["sam"]] == [0, 1]
    assert data.stats["sam"]["total_time_s"].n == 2
    assert data.tests["sam"]["accuracy"].seeds == (0, 1)
    markdown = write_report(data, tmp_path / "out", plots=False)["markdown"].read_text()
    table_end = markdown.index("## Paired tests")
    line = "Diverged, left out of the means and tests: sam seed 2 (epoch 3, step 60)."
    assert markdown.index(table_row(markdown, "sam")[0]) < markdown.index(line) < table_end
    assert table_row(markdown, "sam")[1] == "2"


def test_a_report_of_diverged_runs_only_is_still_written(tmp_path):
    write_diverged(tmp_path / "gcsam-seed0", "gcsam", 0)
    data = summarize(load_runs([tmp_path]))
    assert data.groups == {} and len(data.diverged) == 1
    paths = write_report(data, tmp_path / "out")  # no figures: nothing to draw
    assert set(paths) == {"markdown", "csv"}
    assert "gcsam seed 0 (epoch 3, step 60)" in paths["markdown"].read_text()


# The cost columns. Mean epoch time per (optimizer, seed) and passes per step, chosen so that
# pairing a run with its base run of another seed, or with the wrong base, gives other numbers.
COST_RUNS = {  # name: (numbers of, config base, epoch time per seed, passes per step per seed)
    "adam": ("adam", "sgd", (1.0, 2.0, 4.0), (1.0, 1.0, 1.0)),  # its base is fixed: adam
    "sgd": ("adam", "adam", (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),  # its base is fixed: sgd
    "gc-adam": ("adam", "sgd", (1.05, 2.1, 4.2), (1.0, 1.0, 1.0)),  # fixed: adam, not sgd
    "sam": ("sam", "sgd", (1.0, 1.1, 0.9), (2.0, 2.0, 2.0)),  # on sgd: 2.0, 2.2, 1.8
    "gcsam": ("gcsam", "adam", (2.0, 3.8, 8.4), (2.0, 2.0, 2.0)),  # on adam: 2.0, 1.9, 2.1
    "periodic-gcsam": ("gcsam", "adam", (1.2, 2.4, 4.8), (1.2, 1.2, 1.2)),
    "ae-gcsam": ("gcsam", "adam", (1.5, 2.5, 4.4), (1.5, 1.25, 1.0)),  # 1.5, 1.25, 1.1
}


@pytest.fixture(scope="module")
def cost_report(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("costs") / "compare"
    for name, (numbers, base, times, passes) in COST_RUNS.items():
        for seed in SEEDS:
            write_run(
                root / f"{name}-seed{seed}",
                numbers,
                seed,
                base=base,
                name=name,
                epoch_time=times[seed],
                passes=passes[seed],
            )
    data = summarize(load_runs([root]))
    paths = write_report(data, tmp_path_factory.mktemp("cost-report"), plots=False)
    return data, paths["markdown"].read_text(), paths["csv"]


def cost_cells(markdown: str, label: str) -> tuple[str, str]:
    """The Passes/step and Time/epoch vs base cells of ``label``'s row."""
    columns = header(markdown, "Optimizer")
    row = dict(zip(columns, table_row(markdown, label), strict=True))
    return row["Passes/step"], row["Time/epoch vs base"]


@pytest.mark.parametrize(
    ("label", "passes", "vs_base"),
    [
        ("adam", "1.00", "1.00x ± 0.00"),
        ("sgd", "1.00", "1.00x ± 0.00"),
        ("gc-adam", "1.00", "1.05x ± 0.00"),
        ("sam", "2.00", "2.00x ± 0.20"),
        ("gcsam", "2.00", "2.00x ± 0.10"),
        ("periodic-gcsam", "1.20", "1.20x ± 0.00"),
        ("ae-gcsam", "1.25", "1.28x ± 0.20"),  # ratios 1.5, 1.25, 1.1: std 0.2021
    ],
)
def test_cost_columns(cost_report, label, passes, vs_base):
    _, markdown, _ = cost_report
    assert cost_cells(markdown, label) == (passes, vs_base)


def test_time_vs_base_pairs_each_run_with_its_base_run_of_the_same_seed(cost_report):
    data, _, _ = cost_report
    stat = data.stats["gcsam"]["epoch_time_vs_base"]
    assert (stat.mean, stat.n) == (pytest.approx(2.0), 3)
    assert stat.std == pytest.approx(np.std([2.0, 1.9, 2.1], ddof=1))
    ae = data.stats["ae-gcsam"]["epoch_time_vs_base"]
    assert ae.mean == pytest.approx((1.5 + 1.25 + 1.1) / 3)
    assert ae.std == pytest.approx(np.std([1.5, 1.25, 1.1], ddof=1))
    assert data.stats["adam"]["epoch_time_vs_base"].mean == 1.0  # itself: exactly 1
    assert data.stats["ae-gcsam"]["passes_per_step"].mean == 1.25
    assert data.no_base == {}
    runs = {run.path.name: run for group in data.groups.values() for run in group}
    assert runs["sam-seed1"].base_optimizer == "sgd"  # from config.json's base
    assert runs["gc-adam-seed1"].base_optimizer == "adam"  # fixed by the optimizer
    assert runs["sgd-seed0"].base_optimizer == "sgd"
    assert runs["gcsam-seed2"].mean_epoch_time_s == pytest.approx(8.4)


def test_cost_columns_in_the_csv(cost_report):
    _, _, csv_path = cost_report
    with open(csv_path, newline="") as handle:
        rows = {(r["optimizer"], r["metric"]): r for r in csv.DictReader(handle)}
    passes = rows["periodic-gcsam", "passes_per_step"]
    assert (float(passes["mean"]), float(passes["std"]), passes["n"]) == (1.2, 0.0, "3")
    ratio = rows["gcsam", "epoch_time_vs_base"]
    assert float(ratio["mean"]) == pytest.approx(2.0) and ratio["n"] == "3"
    assert float(ratio["std"]) == pytest.approx(0.1)
    assert ratio["reference"] == ratio["diff"] == ratio["p_value"] == ""


def test_cost_notes_under_the_table(cost_report):
    _, markdown, _ = cost_report
    notes = markdown[markdown.index("| ae-gcsam ") : markdown.index("## Paired tests")]
    assert "- Passes/step: forward/backward passes per optimizer step, counted by" in notes
    assert "- Time/epoch vs base: the run's mean epoch time" in notes
    assert "same seed in the same comparison folder" in notes
    assert "- Epochs / time to target: the first epoch whose validation accuracy" in notes
    assert "No passes/step" not in notes and "No time/epoch vs base" not in notes


def test_missing_base_run_gives_n_a_and_says_why(tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    for seed in (0, 1):
        write_run(first / f"gcsam-seed{seed}", "gcsam", seed, epoch_time=4.0, passes=2.0)
        write_run(first / f"sam-seed{seed}", "sam", seed, base="sgd", epoch_time=3.0)
    write_run(first / "adam-seed0", "adam", 0, epoch_time=2.0, passes=1.0)
    write_diverged(first / "sgd-seed0", "adam", 0, name="sgd")  # a diverged base run is not a base
    # adam's seed-1 run lies in another comparison folder: it is no base for gcsam's seed 1.
    write_run(other / "adam-seed1", "adam", 1, epoch_time=8.0, passes=1.0)
    data = summarize(load_runs([first, other]))
    markdown = format_report(data)
    assert cost_cells(markdown, "gcsam") == ("2.00", "2.00x ± 0.00 (1/2)")
    assert cost_cells(markdown, "sam") == ("n/a", "n/a")
    assert cost_cells(markdown, "adam") == ("1.00", "1.00x ± 0.00")
    assert data.no_base == {
        "gcsam": {"no finished adam run of the same seed in the same folder": [1]},
        "sam": {"no finished sgd run of the same seed in the same folder": [0, 1]},
    }
    assert (  # in table order
        "- No time/epoch vs base: sam seeds 0, 1 (no finished sgd run of the same seed in the "
        "same folder); gcsam seed 1 (no finished adam run of the same seed in the same folder)."
    ) in markdown
    assert "- No passes/step (run before the trainer counted passes): sam seeds 0, 1." in markdown


def test_old_runs_without_passes_and_runs_without_epoch_times(tmp_path):
    write_run(tmp_path / "adam-seed0", "adam", 0, epoch_time=2.0)  # before passes were counted
    write_run(tmp_path / "adam-seed1", "adam", 1, epoch_time=2.0, passes=1.0)
    write_run(tmp_path / "gcsam-seed0", "gcsam", 0, epoch_time=3.0)
    write_run(tmp_path / "gcsam-seed1", "gcsam", 1, epoch_time=5.0)
    write_run(tmp_path / "zeta-seed0", "adam", 0, name="zeta", passes=1.0)  # unregistered
    no_times = tmp_path / "sam-seed0"
    write_run(no_times, "sam", 0, passes=2.0)
    history = [json.loads(line) for line in (no_times / "metrics.jsonl").read_text().splitlines()]
    for record in history:
        del record["epoch_time_s"]
    (no_times / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    data = summarize(load_runs([tmp_path]))
    markdown = format_report(data)
    assert cost_cells(markdown, "adam") == ("1.00 (1/2)", "1.00x ± 0.00")
    assert cost_cells(markdown, "gcsam") == ("n/a", "2.00x ± 0.71")  # 1.5 and 2.5
    assert cost_cells(markdown, "sam") == ("2.00", "n/a")
    assert cost_cells(markdown, "zeta") == ("1.00", "n/a")
    assert data.stats["adam"]["passes_per_step"].n == 1
    assert (
        "- No passes/step (run before the trainer counted passes): adam seed 0; gcsam seeds 0, 1."
    ) in markdown
    assert (
        "- No time/epoch vs base: sam seed 0 (no epoch times recorded); zeta seed 0 (base "
        "optimizer unknown)."
    ) in markdown
    paths = write_report(data, tmp_path / "out", plots=False)
    with open(paths["csv"], newline="") as handle:
        rows = {(r["optimizer"], r["metric"]): r for r in csv.DictReader(handle)}
    assert (rows["gcsam", "passes_per_step"]["mean"], rows["gcsam", "passes_per_step"]["n"]) == (
        "",
        "0",
    )
    assert rows["sam", "epoch_time_vs_base"]["mean"] == ""


def test_last_epoch_keys_come_from_the_history(tmp_path):
    """``last_<key>`` reads the last epoch's record: what a run keeps without early stopping."""
    history = [
        {"epoch": 1, "val_accuracy": 0.5, "train_accuracy": 0.6},
        {"epoch": 2, "val_accuracy": 0.4, "train_accuracy": 0.9},
    ]
    run = Run(tmp_path, {"optimizer": "adam"}, history, {"test": {"accuracy": 0.55}})
    assert run.value("last_val_accuracy") == 0.4
    assert run.value("last_train_accuracy") == 0.9
    assert run.value("accuracy") == 0.55
    assert Run(tmp_path, {}, [], {}).value("last_val_accuracy") is None


def test_the_confidence_interval_excludes_zero_exactly_when_the_paired_test_rejects():
    """The t-interval and the two-sided t-test are one computation: 0 lies outside the 95 %
    interval exactly when p < 0.05, whatever the number of seeds."""
    from gcsam.toolkit.report.runs import Run
    from gcsam.toolkit.report.stats import paired_test

    def runs(accuracies: np.ndarray) -> list[Run]:
        return [
            Run(Path(f"run{seed}"), {"seed": seed}, [], {"test": {"accuracy": float(value)}})
            for seed, value in enumerate(accuracies)
        ]

    rng = np.random.default_rng(0)
    outcomes = set()
    for n in (2, 3, 5, 10) * 25:
        reference = rng.normal(0.8, 0.01, n)
        other = reference - rng.normal(0.005, 0.01, n)
        test = paired_test(runs(reference), runs(other), "accuracy")
        assert test.ci_low < test.diff < test.ci_high
        excludes_zero = test.ci_low > 0 or test.ci_high < 0
        assert excludes_zero == (test.p_value < 0.05), (n, test)
        outcomes.add(excludes_zero)
    assert outcomes == {True, False}  # both cases were exercised
