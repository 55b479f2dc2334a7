"""Tuned studies on Optuna: the checks of a tune section, one budget for every optimizer, the
choice on validation, resume after kill -9, --jobs and two processes sharing one storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from gcsam.toolkit import cli, tuning, tuning_storage
from gcsam.toolkit.cli import main
from gcsam.toolkit.config import ConfigError
from gcsam.toolkit.report.study import StudyData, _tuning_section
from gcsam.toolkit.study import run_study
from gcsam.toolkit.study_spec import Study, study_from_mapping
from gcsam.toolkit.tuning import check_storage, counted, setting_key, tuning_cells
from gcsam.toolkit.tuning_storage import open_storage

SETTINGS = {"dataset": "digits", "epochs": 2, "train_size": 300}
SPACE = {"*": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "sam": {"rho": [0.02, 0.1]}}


def definition(**tune: Any) -> dict[str, Any]:
    return {
        "knob": "label_noise",
        "values": [0.2],
        "optimizers": ["adam", "sam"],
        "seeds": [0],
        "flatness": False,
        "settings": dict(SETTINGS),
        "tune": {"trials": 2, "space": SPACE, **tune},
    }


# Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tune", "match"),
    [
        ({"space": {"sgdx": {"lr": [0.1]}}}, "unknown optimizer 'sgdx'"),
        ({"space": {"gcsam": {"lr": [0.1]}}}, "'gcsam', which the study does not run"),
        ({"space": {"*": {"lr": {"low": 0.1, "high": 0.01}}}}, "empty or inverted"),
        ({"space": {"*": {"lr": {"low": 0.1, "high": 0.1}}}}, "empty or inverted"),
        ({"space": {"*": {"lr": []}}}, "at least one value"),
        ({"space": {"*": {"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}}}, "log range"),
        ({"space": {"*": {"label_noise": [0.1]}}}, "knob"),
        ({"space": {"*": {"seed": [1]}}}, "setting"),
        ({"space": {"*": {"lr": [-1.0]}}}, "lr"),
        ({"trials": 0}, "tune.trials"),
        ({"trials": 3, "space": {"*": {"lr": [0.1, 0.01]}}}, "more than the 2 distinct"),
        ({"sampler": "grid"}, "grid needs a list"),
        ({"sampler": "random"}, "tune.sampler"),
        ({"sampler_seed": -1}, "tune.sampler_seed must be an integer >= 0"),
        ({"sampler_seed": 0.5}, "tune.sampler_seed must be an integer"),
        ({"budget": 3}, "unknown tune field"),
        ({"prune": "median"}, "tune.prune must be true, false or"),
        ({"prune": {"patience": 2}}, "unknown tune.prune key.*known: startup_trials"),
        ({"prune": {"warmup_epochs": -1}}, "tune.prune.warmup_epochs must be an integer >= 0"),
        ({"prune": {"startup_trials": True}}, "tune.prune.startup_trials must be an integer"),
    ],
)
def test_a_bad_tune_section_is_refused_naming_it(tune: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        study_from_mapping(definition(**tune), "bad")


def test_tuning_flags_need_a_tune_section(tmp_path: Path) -> None:
    plain = definition()
    del plain["tune"]
    with pytest.raises(ConfigError, match="tune section"):
        run_study(study_from_mapping(plain, "plain"), tmp_path / "out", storage="sqlite://")
    with pytest.raises(ConfigError, match="tune section"):
        run_study(study_from_mapping(plain, "plain"), tmp_path / "out", tune_only=True)
    assert not (tmp_path / "out").exists()


def test_jobs_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jobs"):
        run_study(study_from_mapping(definition(), "t"), tmp_path / "out", jobs=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", ["notaurl", "nosuchdb://host/x", "sqlite:////proc/no/such/x.db"])
def test_a_bad_storage_gets_one_line(url: str) -> None:
    with pytest.raises(ConfigError, match="--storage") as error:
        open_storage(url)
    assert "\n" not in str(error.value)


def test_another_definition_on_the_same_storage_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=storage, study_name="t/label-noise-0.2/adam").set_user_attr(
        "definition", json.dumps({"settings": {"epochs": 99}})
    )
    with pytest.raises(ConfigError, match=r"another definition.*differs in"):
        run_study(study_from_mapping(definition(), "t"), tmp_path / "out", storage=storage)
    assert not list((tmp_path / "out").glob("label-noise-*"))


def test_a_study_another_worker_is_creating_is_waited_for_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that finds the study between another's creation and its label accepts it: here
    the label arrives while the checking worker waits."""
    storage = open_storage(f"sqlite:///{tmp_path / 'shared.db'}")
    cell = tuning_cells(study_from_mapping(definition(), "t"), tmp_path / "out")[0]
    created = optuna.create_study(storage=storage, study_name=cell.name)
    waits: list[float] = []

    def the_creator_labels_it_meanwhile(seconds: float) -> None:
        waits.append(seconds)
        created.set_user_attr("definition", cell.definition)

    monkeypatch.setattr(tuning_storage.time, "sleep", the_creator_labels_it_meanwhile)
    check_storage(storage, [cell])
    assert len(waits) == 1


def test_an_unlabelled_study_with_trials_is_refused_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'shared.db'}")
    cell = tuning_cells(study_from_mapping(definition(), "t"), tmp_path / "out")[0]
    optuna.create_study(storage=storage, study_name=cell.name).enqueue_trial({"lr": 0.1})
    waits: list[float] = []
    monkeypatch.setattr(tuning_storage.time, "sleep", waits.append)
    with pytest.raises(ConfigError, match="none recorded"):
        check_storage(storage, [cell])
    assert waits == []


# Running ---------------------------------------------------------------------------------------


def test_the_choice_waits_for_a_trial_still_running_in_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial that another process runs when this one is done may finish ahead of a counted
    trial (its finishing time is taken before its commit): the choice reads the cell only once
    nothing in it runs, so it sees that trial."""
    study = study_from_mapping(definition(), "t")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    rho = optuna.distributions.CategoricalDistribution([0.02, 0.1])
    running: list[tuple[optuna.Study, optuna.Trial]] = []
    for cell in tuning_cells(study, tmp_path / "out"):
        cell_study = optuna.create_study(storage=url, study_name=cell.name, direction="maximize")
        cell_study.set_user_attr("definition", cell.definition)
        distributions = {"lr": lr, **({"rho": rho} if "rho" in cell.space else {})}
        params = {"lr": 1e-3, **({"rho": 0.1} if "rho" in cell.space else {})}
        cell_study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=0.5, user_attrs={"epochs": 2}
            )
        )
        running.append((cell_study, cell_study.ask(distributions)))
    waits: list[float] = []
    lines: list[str] = []

    def the_other_process_finishes(seconds: float) -> None:
        waits.append(seconds)
        cell_study, trial = running[len(waits) - 1]
        cell_study.tell(trial, 0.9)

    monkeypatch.setattr(tuning.time, "sleep", the_other_process_finishes)
    result = tuning.picked(study, tuning_cells(study, tmp_path / "out"), url, lines.append)
    assert len(waits) == len(lines) == 2  # once per cell
    assert all(line.endswith(": waiting for 1 trial(s) running elsewhere") for line in lines)
    for (_, trial), pick in zip(running, result.values(), strict=True):
        assert pick.score == 0.9 and pick.params == trial.params
        assert [t["score"] for t in pick.trials] == [0.5, 0.9]


def trained_epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


@pytest.mark.slow
def test_a_tuned_study_picks_on_validation_and_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    study = study_from_mapping(definition(), "t")
    report = run_study(study, out, plots=False, progress=False)
    record = json.loads((out / "tuning.json").read_text())
    storage = open_storage(f"sqlite:///{out / 'optuna.db'}")
    for cell in record["cells"]:
        trials = cell["trials"]
        assert len(trials) == 2  # the same budget for both
        assert cell["epochs_per_trial"] == 2
        assert [(t["state"], t["epochs"]) for t in trials] == [("complete", 2)] * 2
        best = max(trials, key=lambda t: t["score"])
        assert cell["params"] == best["params"] and cell["score"] == best["score"]
        for trial in trials:  # the score is the run's validation accuracy at its best epoch
            summary = json.loads((Path(trial["run"]) / "summary.json").read_text())
            assert trial["score"] == summary["val"]["accuracy"]
        final = json.loads(
            (out / "label-noise-0.2" / f"{cell['optimizer']}-seed0" / "config.json").read_text()
        )
        assert {k: final[k] for k in cell["params"]} == cell["params"]
        optuna_study = optuna.load_study(
            study_name=f"t/label-noise-0.2/{cell['optimizer']}", storage=storage
        )
        assert len(counted(optuna_study)) == 2
    assert "## Tuning" in report and "picked setting" in report
    assert "sam: rho in {0.02, 0.1}" in report

    # A rerun trains nothing: every trial and run is kept (the report rewrites summaries).
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    run_study(study, out, plots=False, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps
    assert len(optuna_study.trials) == 2


@pytest.mark.slow
def test_a_diverging_trial_is_failed_counted_and_the_study_goes_on(tmp_path: Path) -> None:
    tune = {"sampler": "grid", "space": {"*": {"lr": [1e-3, 1e9]}}}
    study = study_from_mapping({**definition(**tune), "optimizers": ["sgd"]}, "div")
    run_study(study, tmp_path / "out", plots=False, progress=False)
    storage = open_storage(f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    trials = optuna.load_study(study_name="div/label-noise-0.2/sgd", storage=storage).trials
    states = {t.params["lr"]: t.state for t in trials}
    assert states == {1e-3: optuna.trial.TrialState.COMPLETE, 1e9: optuna.trial.TrialState.FAIL}
    picked = json.loads((tmp_path / "out" / "tuning.json").read_text())["cells"][0]
    assert picked["params"] == {"lr": 1e-3} and len(picked["trials"]) == 2


def test_pruning_is_off_unless_asked_for_and_part_of_the_definition(tmp_path: Path) -> None:
    plain = study_from_mapping(definition(), "t")
    assert plain.tune.prune is None and "prune" not in plain.tune.to_json()
    assert study_from_mapping(definition(prune=False), "t").tune.prune is None
    defaults = study_from_mapping(definition(prune=True), "t").tune.prune
    assert defaults.to_json() == {"startup_trials": 5, "warmup_epochs": 0}
    pruned = study_from_mapping(definition(prune={"warmup_epochs": 2}), "t")
    assert pruned.tune.prune.to_json() == {"startup_trials": 5, "warmup_epochs": 2}
    # Pruning changes what a trial scores: a storage tuned without it is not this study.
    (before,), (after,) = (
        [json.loads(c.definition) for c in tuning_cells(s, tmp_path)][:1] for s in (plain, pruned)
    )
    assert "prune" not in before and after["prune"] == {"startup_trials": 5, "warmup_epochs": 2}
    assert {k: v for k, v in after.items() if k != "prune"} == before


def _first_draws(study: Study, storage_dir: Path) -> list[dict[str, Any]]:
    """The settings the sampler draws first in each of ``study``'s cells (each cell's study
    opened afresh in its own storage)."""
    draws = []
    for index, cell in enumerate(tuning_cells(study, storage_dir)):
        storage = open_storage(f"sqlite:///{storage_dir / f'{index}.db'}")
        trial = tuning._open(storage, cell, study.tune).ask()
        draws.append({name: p.suggest(trial) for name, p in cell.space.items()})
    return draws


# Asking a trial outside Study.optimize, as the test does, is what Optuna warns of.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_the_sampler_seed_picks_the_draws_and_is_part_of_the_definition(tmp_path: Path) -> None:
    """``tune.sampler_seed`` (default 0, which the definition leaves out so that storages tuned
    before it existed still open) seeds TPE's draws: the same seed draws the same settings,
    another draws others."""
    space = {"*": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "momentum": [0.8, 0.9]}}
    first, again, other = (
        study_from_mapping(definition(space=space, **seed), "t")
        for seed in ({}, {"sampler_seed": 0}, {"sampler_seed": 7})
    )
    assert first.tune.sampler_seed == 0 and "sampler_seed" not in first.tune.to_json()
    assert other.tune.to_json()["sampler_seed"] == 7
    draws = [
        _first_draws(s, tmp_path / name) for s, name in ((first, "a"), (again, "b"), (other, "c"))
    ]
    assert draws[0] == draws[1]
    assert all(a["lr"] != c["lr"] for a, c in zip(draws[0], draws[2], strict=True))
    (before,), (after,) = (
        [json.loads(c.definition) for c in tuning_cells(s, tmp_path)][:1] for s in (first, other)
    )
    assert "sampler_seed" not in before and after["sampler_seed"] == 7
    assert {k: v for k, v in after.items() if k != "sampler_seed"} == before


def test_sampler_seed_on_the_command_line_replaces_the_files_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[Study] = []
    monkeypatch.setattr(cli, "run_study", lambda study, out, **kwargs: given.append(study))
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(definition(sampler_seed=3)))
    assert main(["study", str(path), "--sampler-seed", "5", "--quiet"]) == 0
    (study,) = given
    assert study.tune.sampler_seed == 5 and study.tune.trials == 2
    record = {"tune": study.tune.to_json(), "cells": [], "selected_on": "validation accuracy"}
    text = "\n".join(_tuning_section(StudyData(study.to_json(), {}, record)))
    assert "(tpe sampler seeded 5, Optuna)" in text
    record["tune"] = study_from_mapping(definition(), "t").tune.to_json()
    assert "(tpe sampler, Optuna)" in "\n".join(
        _tuning_section(StudyData(study.to_json(), {}, record))
    )


@pytest.mark.parametrize(
    ("mapping", "seed", "message"),
    [
        ({k: v for k, v in definition().items() if k != "tune"}, "1", "give it a tune section"),
        (definition(), "-1", "--sampler-seed must be an integer >= 0"),
    ],
)
def test_a_bad_sampler_seed_on_the_command_line_is_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    mapping: dict[str, Any],
    seed: str,
    message: str,
) -> None:
    monkeypatch.setattr(cli, "run_study", _never)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(mapping))
    assert main(["study", str(path), "--sampler-seed", seed, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _never(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("run_study was called")


def _lr_grid_study(name: str, warmup_epochs: int) -> Study:
    """Adam for 3 epochs over the lr grid {3e-3, 1e-9, 1e-3}, pruned after 1 startup trial."""
    tune = {
        "trials": 3,
        "sampler": "grid",
        "space": {"*": {"lr": [3e-3, 1e-9, 1e-3]}},
        "prune": {"startup_trials": 1, "warmup_epochs": warmup_epochs},
    }
    mapping = {**definition(**tune), "optimizers": ["adam"]}
    mapping["settings"] = {**SETTINGS, "epochs": 3}
    return study_from_mapping(mapping, name)


@pytest.mark.slow
def test_pruning_stops_a_losing_trial_counts_it_and_reports_the_saving(tmp_path: Path) -> None:
    """The grid sampler (seed 0) tries lr 1e-3 first: it finishes (the one startup trial), and
    lr 1e-9, which does not learn, is stopped before its last epoch."""
    out = tmp_path / "out"
    report = run_study(_lr_grid_study("p", warmup_epochs=0), out, plots=False, progress=False)
    cell = json.loads((out / "tuning.json").read_text())["cells"][0]
    trials = {t["params"]["lr"]: t for t in cell["trials"]}
    assert [t["params"]["lr"] for t in cell["trials"]][:2] == [1e-3, 1e-9]
    assert trials[1e-3]["state"] == "complete" and trials[1e-3]["epochs"] == 3
    stopped_after = trials[1e-9]["epochs"]
    assert trials[1e-9]["state"] == "pruned" and 1 <= stopped_after < 3
    assert trials[1e-9]["score"] is None
    stopped = Path(trials[1e-9]["run"])
    assert trained_epochs(stopped) == list(range(1, stopped_after + 1))
    assert (stopped / "last.pt").exists()
    assert not (stopped / "summary.json").exists()  # resumable, not finished
    complete = [t for t in cell["trials"] if t["state"] == "complete"]
    assert cell["params"] == max(complete, key=lambda t: t["score"])["params"]
    assert cell["epochs_per_trial"] == 3
    storage = open_storage(f"sqlite:///{out / 'optuna.db'}")
    optuna_study = optuna.load_study(study_name="p/label-noise-0.2/adam", storage=storage)
    assert len(counted(optuna_study)) == 3  # a pruned trial counts against the budget
    pruned = [t for t in cell["trials"] if t["state"] == "pruned"]
    trained = sum(t["epochs"] for t in cell["trials"])
    unpruned = trained + sum(3 - t["epochs"] for t in pruned)
    assert f"It stopped {len(pruned)} of the 3 trials" in report
    assert f"trained {trained} epochs in all, against {unpruned}" in report
    assert f"({100 * (1 - trained / unpruned):.0f} % saved)" in report
    assert f"| 3 ({len(pruned)} pruned) |" in report


@pytest.mark.slow
def test_warmup_epochs_are_never_stopped(tmp_path: Path) -> None:
    """As above, but with 2 warmup epochs of 3: only the last epoch could stop a trial, and
    stopping there would save nothing, so every trial trains to its end."""
    study = _lr_grid_study("w", warmup_epochs=2)
    run_study(study, tmp_path / "out", plots=False, progress=False)
    cell = json.loads((tmp_path / "out" / "tuning.json").read_text())["cells"][0]
    assert [(t["state"], t["epochs"]) for t in cell["trials"]] == [("complete", 3)] * 3


def test_a_pruned_setting_asked_for_again_is_pruned_without_training(tmp_path: Path) -> None:
    cell = tuning_cells(study_from_mapping(definition(prune=True), "t"), tmp_path / "out")[0]
    assert cell.optimizer == "adam"
    optuna_study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    optuna_study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 1e-3}, distributions={"lr": lr}, state=optuna.trial.TrialState.PRUNED
        )
    )
    optuna_study.enqueue_trial({"lr": 1e-3})
    optuna_study.optimize(tuning._objective(cell, 0, False, prune=True), n_trials=1)
    assert optuna_study.trials[-1].state == optuna.trial.TrialState.PRUNED
    assert not cell.folder.exists()  # nothing trained
    assert len(counted(optuna_study)) == 1


STUDY_FILE = """\
knob: label_noise
values: [0.2]
optimizers: [adam, sam]
seeds: [0]
flatness: false
settings: {dataset: digits, epochs: EPOCHS, train_size: 400}
tune:
  trials: 3
  space:
    "*": {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def write_study(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / "tuned.yaml"
    path.write_text(STUDY_FILE.replace("EPOCHS", str(epochs)))
    return path


def gcsam_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gcsam", "study", *args, "--no-plots", "--quiet"]


def check_counted_once(
    storage_url: str, budget: int, workers: int = 1
) -> list[list[dict[str, Any]]]:
    """Every cell has ``budget`` counted trials (up to ``workers - 1`` more, each a new setting,
    when workers race past the budget: the choice ignores those), each a distinct setting whose
    run folder trained every epoch exactly once. Returns each cell's first ``budget`` counted
    settings, the ones the choice is made from."""
    storage = open_storage(storage_url)
    firsts = []
    for optimizer in ("adam", "sam"):
        study = optuna.load_study(study_name=f"tuned/label-noise-0.2/{optimizer}", storage=storage)
        trials = counted(study)
        assert budget <= len(trials) <= budget + workers - 1
        firsts.append([t.params for t in trials[:budget]])
        for trial in trials:
            run_dir = Path(trial.user_attrs["run"])
            epochs = trained_epochs(run_dir)
            assert epochs == sorted(set(epochs)) and epochs[-1] == len(epochs)
    return firsts


@pytest.mark.slow
def test_kill_9_mid_trial_resumes_its_run(tmp_path: Path) -> None:
    study_file, out = write_study(tmp_path, epochs=6), tmp_path / "out"
    process = subprocess.Popen(gcsam_command(str(study_file), "--out", str(out)))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once a trial has a checkpoint mid-run
        partial = [
            p for p in out.glob("label-noise-0.2/trials/*/*/metrics.jsonl")
            if not (p.parent / "summary.json").exists() and len(p.read_text().splitlines()) >= 2
        ]  # fmt: skip
        if partial:
            break
        time.sleep(0.05)
    assert partial, "no trial reached its second epoch"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    result = subprocess.run(gcsam_command(str(study_file), "--out", str(out)), timeout=600)
    assert result.returncode == 0
    check_counted_once(f"sqlite:///{out / 'optuna.db'}", budget=3)
    storage = open_storage(f"sqlite:///{out / 'optuna.db'}")
    studies = {
        name: optuna.load_study(study_name=f"tuned/label-noise-0.2/{name}", storage=storage)
        for name in ("adam", "sam")
    }
    killed = [
        (name, t) for name, study in studies.items() for t in study.trials
        if t.state == optuna.trial.TrialState.FAIL
    ]  # fmt: skip
    assert len(killed) == 1  # the dead worker's trial: failed, not counted
    name, trial = killed[0]
    # ... and its setting queued again: the counted trial of that setting resumed its folder.
    again = [
        t for t in counted(studies[name]) if setting_key(t.params) == setting_key(trial.params)
    ]
    assert len(again) == 1 and again[0].user_attrs["run"] == trial.user_attrs["run"]


@pytest.mark.slow
def test_jobs_2_and_two_processes_on_one_storage(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, epochs=2)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first = subprocess.Popen(
        gcsam_command(str(study_file), "--out", str(tmp_path / "a"), "--storage", shared)
    )
    second = subprocess.Popen(
        gcsam_command(
            str(study_file), "--out", str(tmp_path / "b"), "--storage", shared, "--jobs", "2"
        )
    )
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0
    firsts = check_counted_once(shared, budget=3, workers=3)
    picked = [json.loads((tmp_path / o / "tuning.json").read_text()) for o in ("a", "b")]
    assert picked[0]["cells"] == picked[1]["cells"]  # both picked from the same first 3 trials
    assert [[t["params"] for t in cell["trials"]] for cell in picked[0]["cells"]] == firsts


def test_every_tunable_setting_is_a_training_setting() -> None:
    from gcsam.toolkit.config import CHECKS
    from gcsam.toolkit.search_space import TUNABLE

    assert set(TUNABLE) <= set(CHECKS)


def _open_and_report(url: str, out: str) -> None:
    try:
        open_storage(url)
        Path(out).write_text("ok")
    except ConfigError as error:
        Path(out).write_text(str(error))


@pytest.mark.slow  # four fresh interpreters
def test_workers_that_create_one_new_storage_together_all_open_it(tmp_path: Path) -> None:
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'new.db'}"
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_open_and_report, args=(url, str(tmp_path / f"{k}.txt")))
        for k in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [(tmp_path / f"{k}.txt").read_text() for k in range(4)] == ["ok"] * 4
