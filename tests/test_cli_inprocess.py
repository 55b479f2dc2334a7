"""The ``gcsam`` command in this process: rules for existing runs, messages and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.fsdp

from gcsam.toolkit import cli, trainer
from gcsam.toolkit.config import ConfigError, TrainConfig
from gcsam.toolkit.rundir import run_lock
from gcsam.toolkit.trainer import Diverged
from gcsam.toolkit.world import World

pytest.importorskip("sklearn")

FAST = ["--epochs", "1", "--batch-size", "256", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 1-epoch run on digits; tests change copies of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", *FAST, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _fail(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("must not train")


def test_train_refuses_a_folder_that_holds_a_run(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "train", _fail)
    assert cli.main(["train", *FAST, "--out", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"gcsam: error: {run} already holds a run; continue it with --resume, start it over "
        "with --overwrite, or pass another --out\n"
    )
    assert cli.main(["train", *FAST, "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "pass --resume or --overwrite, not both" in capsys.readouterr().err


def test_overwrite_trains_the_run_again(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", *FAST[2:], "--epochs", "2", "--out", str(run), "--overwrite"]) == 0
    assert "best epoch" in capsys.readouterr().out
    assert cli.read_run_config(run).epochs == 2


def test_resume_refuses_settings_that_differ_by_name(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "train", _fail)
    args = ["train", "--out", str(run), "--resume", "--epochs", "5", "--lr", "0.1", "--seed", "0"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == (
        f"gcsam: error: {run}: --epochs 5 differs from the run's epochs 1; --lr 0.1 differs "
        "from the run's lr 0.001: a resumed run keeps its settings; start a new run elsewhere, "
        "or pass --overwrite\n"
    )


def test_a_finished_run_is_reported_not_retrained(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "train", _fail)
    accuracy = 100 * json.loads((run / "summary.json").read_text())["test"]["accuracy"]
    expected = f"{run} already finished (test accuracy {accuracy:.2f} %)\n"
    for args in (["resume", str(run)], ["train", *FAST, "--out", str(run), "--resume"]):
        assert cli.main(args) == 0
        assert capsys.readouterr().out == expected


def test_a_diverged_run_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverge(*args: Any, **kwargs: Any) -> None:
        raise Diverged("diverged at epoch 2, step 17: the training loss is nan")

    monkeypatch.setattr(cli, "train", diverge)
    assert cli.main(["train", *FAST, "--out", str(tmp_path / "x")]) == 3
    assert (
        capsys.readouterr().err == "gcsam: diverged at epoch 2, step 17: the training loss is nan\n"
    )


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


def test_an_interrupt_says_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "train", _interrupt)
    monkeypatch.setattr(cli, "compare", _interrupt)
    out = tmp_path / "my run"
    assert cli.main(["train", *FAST, "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith(f"continue with: gcsam resume '{out}'\n")
    assert cli.main(["compare", "--epochs", "1", "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith(
        "rerun the same command to resume the unfinished runs: "
        f"gcsam compare --epochs 1 --out '{out}'\n"
    )


def test_compare_says_where_it_wrote_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folders: list[Path] = []
    monkeypatch.setattr(cli, "compare", lambda *a, out_dir, **k: folders.append(out_dir) or "#")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", "--quiet"]) == 0
    assert cli.main(["compare", "--quiet", "--no-plots", "--out", "x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert folders == [Path("runs/compare-digits-small-cnn"), Path("x")]
    assert lines[2] == (
        "wrote runs/compare-digits-small-cnn/report.md, report.csv, learning_curves.png, "
        "test_metrics.png, frontier.png and the runs in runs/compare-digits-small-cnn"
    )
    assert lines[-1] == "wrote x/report.md, report.csv and the runs in x"


def test_report_of_several_folders_goes_under_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_report import write_run

    for optimizer in ("adam", "gcsam"):
        write_run(tmp_path / optimizer, optimizer, 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "adam", "gcsam", "--no-plots"]) == 0
    assert (tmp_path / "runs" / "report" / "report.md").is_file()
    assert "wrote runs/report/report.md" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["landscape", "sharpness"])
def test_measuring_a_folder_that_is_no_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert cli.main([command, str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"gcsam: error: {tmp_path} is not a run directory (no config.json); pass a folder "
        "written by gcsam train or compare\n"
    )


def test_a_corrupted_checkpoint_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    final = run / "final.pt"
    data = bytearray(final.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    final.write_bytes(bytes(data))
    assert cli.main(["sharpness", str(run), "--quiet", "--trace-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gcsam: error: {final}: checksum mismatch: the file is corrupted")
    assert "weights_only" not in err


def test_a_truncated_last_checkpoint_is_refused_on_resume(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "summary.json").unlink()
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert cli.main(["resume", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(
        f"gcsam: error: {last}: no checksum: the file is truncated"
    )


def test_unreadable_run_config_names_the_file(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "config.json").write_text('{"epochs": ')
    assert cli.main(["resume", str(run)]) == 2
    assert capsys.readouterr().err.startswith(
        f"gcsam: error: {run / 'config.json'}: unreadable JSON at line 1"
    )


def test_a_busy_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_lock(tmp_path / "run"):
        assert cli.main(["train", *FAST, "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run'} is in use by process" in capsys.readouterr().err


def test_fsdp_on_a_torch_without_fsdp2_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard", raising=False)  # torch < 2.6
    monkeypatch.setattr(cli, "world_size", lambda: 2)  # as under torchrun
    out = tmp_path / "out"
    assert cli.main(["train", *FAST, "--strategy", "fsdp", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "gcsam: error: --strategy fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, public "
        f"since torch 2.6), which torch {torch.__version__} lacks; upgrade torch, or use "
        "--strategy ddp\n"
    )
    assert not out.exists()
    # A study's or a resumed run's config reaches the trainer past the command line.
    monkeypatch.setattr(trainer, "join_world", lambda *args: World(rank=0, size=2))
    with pytest.raises(ConfigError, match="--strategy fsdp needs FSDP2"):
        trainer.train(TrainConfig(epochs=1, strategy="fsdp"), out)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["train", "compare"])
def test_cuda_asked_for_without_one_is_one_line_and_writes_nothing(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main([command, *FAST, "--device", "cuda", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "gcsam: error: device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optimizers", "adam", "optimizers must be a list of names"),
        ("seeds", 3, "seeds must be a list of integers"),
        ("seeds", [0, 1.5], "seeds must be an integer"),
    ],
)
def test_compare_lists_from_a_config_file_are_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: object, message: str
) -> None:
    config = tmp_path / "cmp.json"
    config.write_text(json.dumps({key: value}))
    assert cli.main(["compare", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
