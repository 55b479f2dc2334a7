"""``gcsam study``: study files, their checks, the grid's order, a whole study on digits (layout,
report, CSV, progress lines), resuming it, and the command line."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from gcsam.toolkit import cli, main
from gcsam.toolkit import compare as compare_module
from gcsam.toolkit import study as study_module
from gcsam.toolkit.config import ConfigError
from gcsam.toolkit.report import Run, summarize
from gcsam.toolkit.report.study import StudyData, format_study_report
from gcsam.toolkit.rundir import RunBusyError, run_lock
from gcsam.toolkit.study import _Clock, run_study
from gcsam.toolkit.study_spec import (
    STUDIES,
    Study,
    cells,
    check_study,
    describe_studies,
    find_study,
    read_study_file,
    study_from_mapping,
)

# 8 runs of 1 epoch on 200 or 400 digits, and a flatness that takes about a second per run.
TINY = Study(
    name="tiny",
    knob="train_size",
    values=(200, 400),
    settings={"epochs": 1, "batch_size": 64},
    optimizers=("adam", "gcsam"),
    seeds=(0, 1),
    flatness={"max_samples": 64, "trace_samples": 1},
)
RUNS = [
    f"train-size-{value}/{optimizer}-seed{seed}"
    for value in TINY.values
    for optimizer in TINY.optimizers
    for seed in TINY.seeds
]
PROGRESS = re.compile(
    r"study tiny \[(\d+)/8\] train_size=(\d+) (\w+) seed (\d+): (training|done); "
    r"\d+m\d\ds elapsed, (.+)"
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study given no --out would write runs/study-NAME here, not in the repository."""
    monkeypatch.chdir(tmp_path)


def _fail(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("must not train")


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Study files
# --------------------------------------------------------------------------------------------

YAML = """\
description: digits with few images
knob: train_size
values: [500.0, "1000"]
optimizers: [adam, gcsam]
seeds: [0, 1]
settings: {epochs: 2, lr: "1e-3"}
flatness: {max_samples: 64}
"""
TOML = """\
description = "digits with few images"
knob = "train_size"
values = [500.0, "1000"]
optimizers = ["adam", "gcsam"]
seeds = [0, 1]
flatness = {max_samples = 64}

[settings]
epochs = 2
lr = "1e-3"
"""
JSON = json.dumps(
    {
        "description": "digits with few images",
        "knob": "train_size",
        "values": [500.0, "1000"],
        "optimizers": ["adam", "gcsam"],
        "seeds": [0, 1],
        "settings": {"epochs": 2, "lr": "1e-3"},
        "flatness": {"max_samples": 64},
    }
)


def test_the_same_study_from_yaml_toml_and_json(tmp_path: Path) -> None:
    studies = []
    for suffix, text in (("yaml", YAML), ("toml", TOML), ("json", JSON)):
        path = tmp_path / f"few-digits.{suffix}"
        path.write_text(text)
        studies.append(read_study_file(path))
        assert find_study(str(path)) == studies[-1]
    assert studies[0] == studies[1] == studies[2]
    study = studies[0]
    assert study.name == "few-digits"  # the file's stem
    assert study.values == (500, 1000)
    assert all(type(v) is int for v in study.values)
    assert study.optimizers == ("adam", "gcsam") and study.seeds == (0, 1)
    assert study.settings == {"epochs": 2, "lr": "1e-3"}
    assert study.flatness == {"max_samples": 64, "trace_samples": 10}  # the rest: the default
    assert study.description == "digits with few images"


def test_values_and_flatness_are_canonicalized() -> None:
    base = {"knob": "label_noise", "settings": {}}
    study = study_from_mapping({**base, "values": ["0.2", 0, "0.4"]}, "noise")
    assert study.name == "noise"
    assert study.values == (0.2, 0.0, 0.4)
    assert all(type(v) is float for v in study.values)
    named = study_from_mapping({**base, "values": [0.2], "name": "mine"}, "noise")
    assert named.name == "mine"
    assert study_from_mapping({**base, "values": [0.2], "flatness": False}, "x").flatness is None
    on = study_from_mapping({**base, "values": [0.2], "flatness": True}, "x")
    assert on.flatness == {"max_samples": 1000, "trace_samples": 10}
    sizes = study_from_mapping({"knob": "train_size", "values": [0.5, 500.0], "settings": {}}, "x")
    assert sizes.values == (0.5, 500) and type(sizes.values[1]) is int
    assert check_study(sizes) == sizes  # checking a checked study changes nothing


GOOD = {
    "knob": "train_size",
    "values": [200, 400],
    "optimizers": ["adam", "gcsam"],
    "seeds": [0, 1],
    "settings": {"epochs": 1},
}
DROP = object()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bogus": 1}, "unknown study field(s) bogus; known: name, knob, values, settings"),
        ({"knob": DROP}, "a study needs knob (see gcsam study --help)"),
        ({"values": DROP, "settings": DROP}, "a study needs values, settings"),
        ({"knob": "optimizer"}, "knob 'optimizer' cannot be swept: optimizers and seeds are"),
        ({"knob": "seed"}, "knob 'seed' cannot be swept"),
        ({"knob": "colour"}, "knob must be one of dataset, data_dir,"),
        ({"settings": {"epochs": 1, "train_size": 100}}, "settings must not set train_size"),
        ({"settings": {"seed": 3}}, "settings must not set seed"),
        ({"settings": {"epochz": 1}}, "unknown setting(s) epochz in settings; known: dataset,"),
        ({"settings": [1]}, "settings must be a mapping of training settings, got [1]"),
        ({"values": [200, 200.0]}, "values of train_size must not repeat, got [200, 200.0]"),
        ({"values": []}, "values must be a non-empty list, got []"),
        ({"values": 200}, "values must be a non-empty list, got 200"),
        ({"values": [200, 2.5]}, "train_size must be a number of training images (an integer"),
        ({"knob": "label_noise", "values": [0.0, 1.5]}, "label_noise must be a fraction in [0, 1)"),
        ({"optimizers": ["adam", "nope"]}, "unknown optimizer 'nope' in optimizers; choose from"),
        ({"optimizers": "adam"}, "optimizers must be a non-empty list, got 'adam'"),
        ({"seeds": [0, -1]}, "seeds must be an integer >= 0"),
        ({"settings": {"epochs": 0}}, "study grid, train_size=200: epochs must be an integer >= 1"),
        ({"name": "a/b"}, "name must be letters, digits and . _ + - (it names a folder)"),
        ({"flatness": "yes"}, "flatness must be true, false or a mapping of max_samples"),
        ({"flatness": {"max_samples": 0}}, "flatness.max_samples must be an integer >= 1, got 0"),
        ({"flatness": {"trace_samples": -1}}, "flatness.trace_samples must be an integer >= 0"),
        ({"flatness": {"probes": 5}}, "unknown flatness setting(s) probes; known: max_samples"),
    ],
)
def test_a_bad_study_file_is_refused_by_name_and_nothing_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.setattr(compare_module, "train", _fail)
    values = {k: v for k, v in {**GOOD, **changes}.items() if v is not DROP}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=re.escape(f"study file {path}: ")) as error:
        read_study_file(path)
    assert message in str(error.value)
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gcsam: error: study file {path}: ") and message in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("grid.yaml", "knob: [train_size\n", "invalid YAML: "),
        ("grid.toml", "knob = \n", "invalid TOML: "),
        ("grid.json", '{"knob": ', "invalid JSON: "),
        ("grid.yaml", "- knob\n- values\n", "expected a mapping of settings at the top level"),
        ("grid.json", "[1, 2]", "expected a mapping of settings at the top level"),
        ("grid.yaml", "", "a study needs knob, values, settings"),
        ("missing.yaml", None, "no such file"),
    ],
)
def test_a_study_file_that_cannot_be_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str | None, message: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"study file {path}: {message}")):
        find_study(str(path))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"gcsam: error: study file {path}: {message}")
    assert not out.exists()


def test_a_grid_beyond_the_cap_is_refused_before_any_run_is_built(tmp_path: Path) -> None:
    """2,000 values x 2,000 seeds (24 kB of YAML) once built 4 million configs, 7 GB, before
    anything was refused; now the axes are counted first."""
    from gcsam.toolkit.study_spec import MAX_RUNS

    path = tmp_path / "huge.yaml"
    rhos = ", ".join(f"{0.001 * (k + 1):.3f}" for k in range(2000))
    seeds = ", ".join(map(str, range(2000)))
    path.write_text(f"knob: rho\nvalues: [{rhos}]\nseeds: [{seeds}]\nsettings: {{}}\n")
    with pytest.raises(ConfigError, match=f"2000 x 3 x 2000 = 12000000 runs .* than {MAX_RUNS}"):
        read_study_file(path)


def test_repeated_seeds_are_refused_as_compare_refuses_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("seeds must not repeat, got [0, 1, 0]")):
        run_study(dataclasses.replace(TINY, seeds=(0, 1, 0)), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="seeds must be an integer >= 0"):
        check_study(dataclasses.replace(TINY, seeds=(0, -1)))
    assert not (tmp_path / "out").exists()


def test_a_study_built_in_code_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = Study(name="x", knob="label_noise", values=(0.0, 1.5), settings={})
    with pytest.raises(ConfigError, match=re.escape("label_noise must be a fraction in [0, 1)")):
        run_study(bad, out, progress=False)
    repeated = Study(name="x", knob="label_noise", values=(0.2, "0.2"), settings={})
    with pytest.raises(ConfigError, match="must not repeat"):
        run_study(repeated, out, progress=False)
    assert not out.exists()


@pytest.mark.slow  # loads digits (scikit-learn)
def test_a_train_size_beyond_the_data_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_module, "train", _fail)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="train_size 100000 is more than the"):
        run_study(dataclasses.replace(TINY, values=(200, 100000)), out, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The command line, without training
# --------------------------------------------------------------------------------------------


def test_an_unknown_study_lists_the_built_in_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="unknown study 'tiny'; built-in studies: small-data"):
        find_study("tiny")
    assert main(["study", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcsam: error: unknown study 'tiny'; built-in studies: ")
    assert all(name in err for name in STUDIES)
    assert not (tmp_path / "out").exists()


def test_study_without_a_name_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study"]) == 2
    assert capsys.readouterr().err == (
        f"gcsam: error: name a study ({', '.join(STUDIES)}) or a study file, or pass --list\n"
    )
    assert not (tmp_path / "runs").exists()


def test_the_knob_cannot_be_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "run_study", _fail)
    out = tmp_path / "out"
    assert main(["study", "small-data", "--train-size", "100", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "gcsam: error: --train-size is the knob study small-data sweeps; change its values in "
        "a study file instead\n"
    )
    path = tmp_path / "noise.yaml"
    path.write_text("knob: label_noise\nvalues: [0.0, 0.2]\nsettings: {epochs: 1}\n")
    assert main(["study", str(path), "--label-noise", "0.1", "--out", str(out)]) == 2
    assert "--label-noise is the knob study noise sweeps" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_an_interrupted_study_says_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_study", interrupt)
    assert main(["study", "small-data", "--seeds", "0", "--out", "my study"]) == 130
    assert capsys.readouterr().err.endswith(
        "rerun the same command to resume the unfinished runs: "
        "gcsam study small-data --seeds 0 --out 'my study'\n"
    )


@pytest.mark.parametrize("name", STUDIES)
def test_every_built_in_study_is_valid(name: str) -> None:
    study = STUDIES[name]
    assert study.name == name
    assert check_study(study) == study  # already in canonical form
    assert study.description
    assert len(cells(study)) == len(study.values) * len(study.optimizers) * len(study.seeds)


def test_list_describes_every_built_in_study(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    assert out == describe_studies()
    for name, study in STUDIES.items():
        assert f"\n{name}: {study.knob} in " in f"\n{out}"
        assert f"  {study.description}\n" in out


# --------------------------------------------------------------------------------------------
# The grid and the estimate of the time left
# --------------------------------------------------------------------------------------------


def test_cells_go_seeds_then_values_then_optimizers() -> None:
    grid = cells(TINY)
    assert [(cfg.seed, value, cfg.optimizer) for value, cfg in grid] == [
        (seed, value, optimizer)
        for seed in TINY.seeds
        for value in TINY.values
        for optimizer in TINY.optimizers
    ]
    for value, cfg in grid:
        assert cfg.train_size == value
        assert (cfg.epochs, cfg.batch_size, cfg.dataset) == (1, 64, "digits")


def test_the_prediction_falls_back_from_value_and_optimizer_to_all_runs() -> None:
    clock = _Clock(TINY, len(cells(TINY)), show=False)
    assert clock._predict(200, "adam") is None
    assert clock._left(exclude_next=False) == "time left estimated after the first run"
    clock.seconds = {(200, "adam"): [10.0], (200, "gcsam"): [20.0, 40.0], (400, "adam"): [60.0]}
    assert clock._predict(200, "gcsam") == 30.0  # same value and optimizer
    assert clock._predict(400, "gcsam") == 60.0  # same value
    assert clock._predict(800, "adam") == 35.0  # same optimizer
    assert clock._predict(800, "sam") == 32.5  # all runs
    assert clock._predict(200, "sam") == pytest.approx(70 / 3)  # same value, every optimizer


def test_the_time_left_sums_the_predictions_of_the_pending_runs() -> None:
    study = dataclasses.replace(TINY, flatness=None)
    clock = _Clock(study, 8, show=False)
    clock.seconds = {(200, "adam"): [15.0]}
    assert clock._left(exclude_next=False) == "about 2m00s left"  # 8 runs of 15 s
    assert clock._left(exclude_next=True) == "about 1m45s left"
    shared = _Clock(study, 8, show=False, jobs=2)
    shared.seconds = clock.seconds
    assert shared._left(exclude_next=False) == "about 1m00s left"  # two processes share them


# --------------------------------------------------------------------------------------------
# A whole study on digits
# --------------------------------------------------------------------------------------------


@dataclass
class Done:
    out: Path
    markdown: str
    stderr: str


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    """TINY, run once with its progress lines (tests read it, or change a copy)."""
    out = tmp_path_factory.mktemp("study") / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        markdown = run_study(TINY, out, progress=None)
    return Done(out, markdown, stderr.getvalue())


@pytest.fixture
def copy(done: Done, tmp_path: Path) -> Path:
    return Path(shutil.copytree(done.out, tmp_path / "copy"))


@pytest.mark.slow
def test_the_layout_of_a_study(done: Done) -> None:
    out = done.out
    assert json.loads((out / "study.json").read_text()) == check_study(TINY).to_json()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "train-size-200",
        "train-size-400",
    ]
    for run in RUNS:
        summary = _summary(out / run)
        assert summary["status"] == "finished"
        assert "top_eigenvalue" in summary and summary["flatness_settings"]["max_samples"] == 64
        config = json.loads((out / run / "config.json").read_text())
        assert config["train_size"] == int(run.split("/")[0].rsplit("-", 1)[1])
    for value in TINY.values:
        folder = out / f"train-size-{value}"
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
            "adam-seed0", "adam-seed1", "gcsam-seed0", "gcsam-seed1",
        ]  # fmt: skip
        assert (folder / "report.md").stat().st_size > 0
    for name in ("report.md", "study.csv", "study.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _section(markdown: str, title: str) -> list[str]:
    """The lines of a ``## title`` section up to the next ``##`` heading."""
    lines = markdown.splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def _rows(section: list[str]) -> dict[str, list[str]]:
    """A Markdown table's rows by their first cell (the header's included, not the rule's)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section if "|" in line]
    return {row[0]: row[1:] for row in rows if not re.fullmatch(r"-+", row[0])}


def _cells(section: list[str], label: str) -> list[str]:
    """The second cell of every table row of ``label`` in ``section``, in order."""
    rows = [line.split("|") for line in section if line.startswith("|")]
    return [row[2].strip() for row in rows if row[1].strip() == label]


def _study_data(accuracies: dict[str, tuple[float, ...]]) -> StudyData:
    """A one-value study whose runs (one per optimizer and seed) end at these last-epoch test
    accuracies, 0.1 below their selected-epoch ones."""
    runs = [
        Run(
            Path(f"{label}-seed{seed}"),
            {"optimizer": label, "seed": seed},
            [{"epoch": 1, "val_accuracy": 0.5, "train_accuracy": 0.9}],
            {
                "status": "finished",
                "test": {"accuracy": last + 0.1},
                "test_accuracy_last_epoch": last,
            },
        )
        for label, values in accuracies.items()
        for seed, last in enumerate(values)
    ]
    study = {"name": "s", "knob": "label_noise", "settings": {}, "optimizers": list(accuracies)}
    return StudyData({**study, "seeds": [0, 1, 2]}, {0.4: summarize(runs)})


def test_the_report_gives_the_last_epochs_test_accuracy_and_its_paired_differences() -> None:
    markdown = format_study_report(
        _study_data({"gcsam": (0.70, 0.72, 0.71), "adam": (0.60, 0.65, 0.61)})
    )
    last = _section(markdown, "After the last epoch (%)")
    title = last.index(
        "Test accuracy after the last epoch (what a run without early stopping keeps):"
    )
    end = last.index("Validation accuracy after the last epoch:")
    assert _rows(last[title:end])["gcsam"] == ["71.00 ± 1.00"]
    paired = _section(markdown, "Paired differences (points)")
    start = paired.index("Test accuracy after the last epoch:")
    end = paired.index("Validation accuracy after the last epoch:")
    diff = f"{100 * (0.10 + 0.07 + 0.10) / 3:+.2f}"  # the paired differences' mean, by hand
    # sd 0.0173, so the 95 % interval is 9.00 -+ 4.302653 (t, 2 dof) * 1.732 / sqrt(3) = 4.30
    assert _rows(paired[start:end])["adam"][0].startswith(f"{diff} [+4.70, +13.30] (p ")


def test_a_study_of_one_optimizer_says_there_is_nothing_to_pair() -> None:
    markdown = format_study_report(_study_data({"gcsam": (0.70, 0.72, 0.71)}))
    paired = _section(markdown, "Paired differences (points)")
    assert paired.count("No paired tests: gcsam is the only optimizer.") == 3
    assert not any(line.startswith("|") for line in paired)


def test_runs_without_the_last_epochs_test_accuracy_get_no_table_of_it() -> None:
    data = _study_data({"gcsam": (0.70, 0.72, 0.71)})
    for run in data.regimes[0.4].groups["gcsam"]:
        del run.summary["test_accuracy_last_epoch"]
    data = StudyData(data.study, {0.4: summarize(data.regimes[0.4].groups["gcsam"])})
    markdown = format_study_report(data)
    assert "Test accuracy after the last epoch" not in markdown
    assert "Validation accuracy after the last epoch:" in markdown


def test_the_report_pairs_the_epochs_to_target_and_each_flatness_measure() -> None:
    data = _study_data({"gcsam": (0.70, 0.72, 0.71), "adam": (0.60, 0.65, 0.61)})
    measured = {
        "gcsam": {"epochs_to_target": (3, 4, 5), "top_eigenvalue": (10.0, 12.0, 14.0)},
        "adam": {"epochs_to_target": (5, 5, 6), "top_eigenvalue": (20.0, 20.0, 30.0)},
    }
    runs = [run for group in data.regimes[0.4].groups.values() for run in group]
    for run in runs:
        values = measured[run.optimizer]
        run.summary |= {key: values[key][run.seed] for key in values}
        run.summary |= {"target_val_accuracy": 0.5, "sam_sharpness": 0.01, "hessian_trace": None}
    data = StudyData({**data.study, "flatness": {"max_samples": 64}}, {0.4: summarize(runs)})
    markdown = format_study_report(data)

    speed = _section(markdown, "Convergence: epochs to a common validation accuracy")
    assert any("(targets: 40 %: 50.00 %): the settings' target_accuracy" in t for t in speed)
    # gcsam - adam: -2, -1, -1 -> -1.33, sd 0.577; 4.302653 (t, 2 dof) * 0.577 / sqrt(3) = 1.43
    p_epochs = stats.ttest_rel([3, 4, 5], [5, 5, 6]).pvalue
    assert _cells(speed, "gcsam") == ["4.0 ± 1.0"]
    assert _cells(speed, "adam") == ["5.3 ± 0.6", f"-1.3 [-2.8, +0.1] (p {p_epochs:#.3g})"]

    flatness = _section(markdown, "Flatness of the final weights")
    top = flatness.index("Top Hessian eigenvalue:")
    sharpness = flatness.index("SAM sharpness (the largest loss increase in the ascent ball):")
    assert not any(line.startswith("Hessian trace") for line in flatness)  # no run has one
    # -10, -8, -16 -> -11.33, sd 4.163; half-width 4.302653 * 4.163 / sqrt(3) = 10.34
    p_top = stats.ttest_rel([10.0, 12.0, 14.0], [20.0, 20.0, 30.0]).pvalue
    assert _cells(flatness[top:sharpness], "adam") == [
        "23.3 ± 5.8",
        f"-11.33 [-21.68, -0.99] (p {p_top:#.3g})",
    ]
    # every run has the same SAM sharpness: the difference is 0 and t is undefined
    assert any("+0.0000 [+0.0000, +0.0000] (p n/a)" in line for line in flatness[sharpness:])


DIFFERENCE_CELL = r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \(p .+\)|n/a"
"""A paired difference in the study report: mean [95 % interval] (p value)."""


@pytest.mark.slow
def test_the_report_has_every_value_and_optimizer(done: Done) -> None:
    markdown = done.markdown
    assert (done.out / "report.md").read_text() == markdown
    assert markdown.startswith("# Study tiny: train_size in 200, 400\n")
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings.count("## train_size = 200") == 1
    assert headings.count("## train_size = 400") == 1
    accuracy = _rows(_section(markdown, "Test accuracy (%)"))
    assert accuracy["Optimizer"] == ["train_size = 200", "train_size = 400"]
    for optimizer in TINY.optimizers:
        assert len(accuracy[optimizer]) == 2
        assert all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cell) for cell in accuracy[optimizer])
    section = _section(markdown, "Paired differences (points)")
    last_test = section.index("Test accuracy after the last epoch:")
    last_val = section.index("Validation accuracy after the last epoch:")
    # test accuracy at the selected epoch and at the last, validation accuracy at the last
    for part in (section[:last_test], section[last_test:last_val], section[last_val:]):
        differences = _rows(part)
        assert differences["gcsam minus"] == ["train_size = 200", "train_size = 400"]
        assert set(differences) == {"gcsam minus", "adam"}
        assert all(re.fullmatch(DIFFERENCE_CELL, c) for c in differences["adam"])
    last = _section(markdown, "After the last epoch (%)")
    assert sum(1 for line in last if line.startswith("| adam ")) == 3  # test, val, training
    flatness = _section(markdown, "Flatness of the final weights")
    assert any("up to 64 training images" in line for line in flatness)
    assert "Top Hessian eigenvalue:" in flatness
    assert "Hessian trace (Hutchinson, 1 samples):" in flatness
    assert "gcsam" in _rows(flatness)
    for value in TINY.values:  # each value's frontier, linked from the study's folder
        figure = f"train-size-{value}/frontier.png"
        assert f"![Test accuracy against the measured cost]({figure})" in markdown
        assert (done.out / figure).stat().st_size > 0


@pytest.mark.slow
def test_the_csv_matches_the_runs(done: Done) -> None:
    with open(done.out / "study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:6] == ["train_size", "optimizer", "metric", "mean", "std", "n"]
    cells_ = {(row["train_size"], row["optimizer"], row["metric"]) for row in rows}
    assert len(cells_) == len(rows)  # one row per value x optimizer x statistic
    metrics = {row["metric"] for row in rows}
    assert {"accuracy", "top_eigenvalue", "hessian_trace"} <= metrics
    assert len(rows) == len(TINY.values) * len(TINY.optimizers) * len(metrics)
    by_cell = {(row["train_size"], row["optimizer"], row["metric"]): row for row in rows}
    for value in TINY.values:
        folder = done.out / f"train-size-{value}"
        tests = {}
        for optimizer in TINY.optimizers:
            summaries = [_summary(folder / f"{optimizer}-seed{seed}") for seed in TINY.seeds]
            tests[optimizer] = [s["test"]["accuracy"] for s in summaries]
            row = by_cell[(str(value), optimizer, "accuracy")]
            assert float(row["mean"]) == pytest.approx(statistics.mean(tests[optimizer]))
            assert float(row["std"]) == pytest.approx(statistics.stdev(tests[optimizer]))
            assert row["n"] == "2"
            for key in ("val_accuracy", "train_accuracy"):  # from the last epoch's record
                last = [
                    _history(folder / f"{optimizer}-seed{seed}")[-1][key] for seed in TINY.seeds
                ]
                row = by_cell[(str(value), optimizer, f"last_{key}")]
                assert float(row["mean"]) == pytest.approx(statistics.mean(last))
            eigen = by_cell[(str(value), optimizer, "top_eigenvalue")]
            top = [s["top_eigenvalue"] for s in summaries]
            assert float(eigen["mean"]) == pytest.approx(statistics.mean(top))
        adam = by_cell[(str(value), "adam", "accuracy")]
        pairs = [g - a for g, a in zip(tests["gcsam"], tests["adam"], strict=True)]
        assert adam["reference"] == "gcsam" and adam["n_pairs"] == "2"
        assert float(adam["diff"]) == pytest.approx(statistics.mean(pairs), abs=1e-12)
        assert by_cell[(str(value), "gcsam", "accuracy")]["reference"] == ""


@pytest.mark.slow
def test_one_progress_line_per_run_with_an_estimate_after_the_first(done: Done) -> None:
    lines = [line for line in done.stderr.splitlines() if line.startswith("study tiny [")]
    matches = [PROGRESS.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2]), m[3], int(m[4]), m[5]) for m in matches] == [
        (k, value, cfg.optimizer, cfg.seed, "training")
        for k, (value, cfg) in enumerate(cells(TINY), start=1)
    ]
    assert matches[0][6] == "time left estimated after the first run"
    assert all(re.match(r"about \d+m\d\ds left", m[6]) for m in matches[1:]), lines
    flatness = [line for line in done.stderr.splitlines() if line.startswith("study tiny: ")]
    assert len(flatness) == 8 and all(" flatness " in line for line in flatness)


@pytest.mark.slow
def test_a_rerun_trains_and_measures_nothing_new_and_resumes_what_stopped(
    copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []
    measured: list[str] = []
    train, add_flatness = compare_module.train, study_module.add_flatness

    def record_train(cfg: Any, run_dir: Path, **kwargs: Any) -> Any:
        trained.append(str(Path(run_dir).relative_to(copy)))
        return train(cfg, run_dir, **kwargs)

    def record_flatness(run_dir: Path, **kwargs: Any) -> None:
        measured.append(str(Path(run_dir).relative_to(copy)))
        add_flatness(run_dir, **kwargs)

    monkeypatch.setattr(compare_module, "train", record_train)
    monkeypatch.setattr(study_module, "add_flatness", record_flatness)
    summaries = {run: (copy / run / "summary.json").read_text() for run in RUNS}
    stamps = {run: (copy / run / "final.pt").stat().st_mtime_ns for run in RUNS}

    markdown = run_study(TINY, copy, plots=False)
    assert trained == [] and measured == []
    assert {run: (copy / run / "summary.json").read_text() for run in RUNS} == summaries
    assert {run: (copy / run / "final.pt").stat().st_mtime_ns for run in RUNS} == stamps
    states = [PROGRESS.fullmatch(line)[5] for line in capsys.readouterr().err.splitlines()
              if line.startswith("study tiny [")]  # fmt: skip
    assert states == ["done"] * 8
    assert markdown.splitlines()[:20] == (copy / "report.md").read_text().splitlines()[:20]

    # One run deleted; one killed after its last epoch, before its summary.
    gone, cut = "train-size-400/gcsam-seed1", "train-size-200/adam-seed0"
    shutil.rmtree(copy / gone)
    (copy / cut / "summary.json").unlink()
    (copy / cut / "final.pt").unlink()
    for name in ("report.md", "study.csv"):
        (copy / name).unlink()
    run_study(TINY, copy, plots=False)
    assert trained == [cut, gone] and measured == [cut, gone]
    for run in RUNS:
        assert _summary(copy / run)["status"] == "finished"
        assert "top_eigenvalue" in _summary(copy / run)
        if run not in (cut, gone):
            assert (copy / run / "final.pt").stat().st_mtime_ns == stamps[run]
    states = [PROGRESS.fullmatch(line)[5] for line in capsys.readouterr().err.splitlines()
              if line.startswith("study tiny [")]  # fmt: skip
    assert states.count("training") == 2
    assert "## train_size = 400" in (copy / "report.md").read_text()
    assert (copy / "study.csv").stat().st_size > 0


@pytest.mark.slow  # loads digits (scikit-learn) before taking the lock
def test_a_study_in_use_by_another_process_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_module, "train", _fail)
    out = tmp_path / "out"
    with run_lock(out), pytest.raises(RunBusyError, match=f"{re.escape(str(out))} is in use"):
        run_study(TINY, out, progress=False)
    assert not (out / "study.json").exists()


@pytest.mark.slow
def test_command_line_overrides_change_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "knob: train_size\nvalues: [200, 400]\noptimizers: [adam, sam, gcsam]\n"
        "seeds: [0, 1, 2]\nsettings: {epochs: 3, batch_size: 64}\n"
        "flatness: {max_samples: 64, trace_samples: 1}\n"
    )
    out = tmp_path / "out"
    args = ["--seeds", "0", "--optimizers", "adam", "gcsam", "--no-flatness", "--epochs", "1"]
    assert main(["study", str(path), *args, "--quiet", "--no-plots", "--out", str(out)]) == 0
    assert json.loads((out / "study.json").read_text()) == {
        "name": "grid",
        "description": "",
        "knob": "train_size",
        "values": [200, 400],
        "optimizers": ["adam", "gcsam"],
        "seeds": [0],
        "settings": {"epochs": 1, "batch_size": 64},
        "flatness": None,
    }
    runs = sorted(str(p.parent.relative_to(out)) for p in out.glob("*/*/config.json"))
    assert runs == [
        "train-size-200/adam-seed0", "train-size-200/gcsam-seed0",
        "train-size-400/adam-seed0", "train-size-400/gcsam-seed0",
    ]  # fmt: skip
    for run in runs:
        assert json.loads((out / run / "config.json").read_text())["epochs"] == 1
        assert "top_eigenvalue" not in _summary(out / run)
        assert not (out / run / "sharpness.json").exists()
    captured = capsys.readouterr()
    assert not [line for line in captured.err.splitlines() if line.startswith("study ")]
    report = (out / "report.md").read_text()
    assert captured.out.startswith(report)
    assert captured.out.endswith(f"\nwrote {out / 'report.md'}, study.csv and the runs in {out}\n")
    assert "Flatness" not in report and "Hessian" not in report
    assert not (out / "study.png").exists()
    with open(out / "study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["n"] for row in rows if row["metric"] == "top_eigenvalue"} <= {"0"}
    assert {row["n"] for row in rows if row["metric"] == "accuracy"} == {"1"}


@pytest.mark.parametrize("flag", [["--seed", "3"], ["--optimizer", "sam"]])
def test_the_single_run_flags_point_to_the_study_axes(
    flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["study", "small-data", *flag, "--out", str(out)]) == 2
    axis = flag[0][2:]
    assert f"pass --{axis}s instead of --{axis}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_jobs_2_share_the_runs_each_trained_once(tmp_path: Path) -> None:
    """Two processes split the grid through the run folders' locks: every run is trained by
    one of them, each epoch once, and a rerun trains nothing."""
    study = dataclasses.replace(TINY, flatness=None, settings={"epochs": 2, "batch_size": 64})
    out = tmp_path / "out"
    run_study(study, out, jobs=2, progress=False)
    for run in RUNS:
        assert _summary(out / run)["status"] == "finished", run
        epochs = [json.loads(line)["epoch"] for line in (out / run / "metrics.jsonl").open()]
        assert epochs == [1, 2], run
    stamps = {run: (out / run / "last.pt").stat().st_mtime_ns for run in RUNS}
    run_study(study, out, jobs=2, progress=False)
    assert stamps == {run: (out / run / "last.pt").stat().st_mtime_ns for run in RUNS}


_FLATNESS_KEYS = ("top_eigenvalue", "hessian_trace", "sam_sharpness", "flatness_time_s")


@pytest.mark.slow
def test_a_flatness_helper_skips_the_runs_measured_or_held_elsewhere(copy: Path) -> None:
    held, measured = copy / RUNS[0], copy / RUNS[1]
    for run_dir in (held, measured):
        summary = _summary(run_dir)
        if run_dir == held:
            summary = {k: v for k, v in summary.items() if k not in _FLATNESS_KEYS}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    before = (measured / "summary.json").read_text()
    with run_lock(held):  # as a process measuring it would
        study_module.measure_free_runs([held, measured], {"max_samples": 8, "trace_samples": 0})
    assert "top_eigenvalue" not in _summary(held)
    assert (measured / "summary.json").read_text() == before


@pytest.mark.slow
def test_jobs_2_share_the_flatness_and_measure_what_one_process_measures(copy: Path) -> None:
    """The runs of a study whose flatness is not measured yet: two processes measure every run,
    to the values one process found, and train nothing again."""
    stamps = {run: (copy / run / "last.pt").stat().st_mtime_ns for run in RUNS}
    alone = {run: _summary(copy / run) for run in RUNS}
    for run in RUNS:
        summary = {k: v for k, v in alone[run].items() if k not in _FLATNESS_KEYS}
        (copy / run / "summary.json").write_text(json.dumps(summary))
    run_study(TINY, copy, jobs=2, progress=False)
    for run in RUNS:
        summary = _summary(copy / run)
        # one thread per process instead of two: sums in another order
        for key in ("top_eigenvalue", "hessian_trace", "sam_sharpness"):
            assert summary[key] == pytest.approx(alone[run][key], rel=1e-4), (run, key)
    assert stamps == {run: (copy / run / "last.pt").stat().st_mtime_ns for run in RUNS}
