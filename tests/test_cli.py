"""The ``gcsam`` command end to end on digits, through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.fsdp

from gcsam.toolkit.rundir import load_checkpoint, run_lock

# Subprocesses: slow; `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

pytest.importorskip("sklearn")

FAST = ["--epochs", "2", "--batch-size", "128", "--quiet"]
needs_fsdp2 = pytest.mark.skipif(
    not hasattr(torch.distributed.fsdp, "fully_shard"),
    reason="--strategy fsdp needs FSDP2's public fully_shard (torch 2.6 and later)",
)


def gcsam(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "gcsam", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def wait_for_epochs(process: subprocess.Popen, run_dir: Path, epochs: int) -> None:
    """Return once ``run_dir`` has logged ``epochs`` epochs (or the process ended, or 300 s: the
    test machine may be busy)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        history = run_dir / "metrics.jsonl"
        if history.exists() and len(history.read_text().splitlines()) >= epochs:
            return
        time.sleep(0.05)


def weights(run_dir: Path, name: str = "final.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / name)["model"]


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = gcsam("train", *FAST, "--optimizer", "gcsam", "--out", str(run)).stdout
    assert "gcsam seed 0: test accuracy" in out
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == "gcsam" and config["seed"] == 0 and config["rho"] == 0.05
    assert config["versions"]["torch"] == torch.__version__
    assert (
        config["split_sizes"]["train"]
        + config["split_sizes"]["val"]
        + config["split_sizes"]["test"]
        == 1797
    )
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"train_loss", "val_accuracy", "val_roc_auc", "epoch_time_s", "lr"} <= set(history[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 2
    assert 0.5 < summary["test"]["accuracy"] <= 1.0
    assert len(summary["test"]["confusion_matrix"]) == 10
    assert sum(map(sum, summary["test"]["confusion_matrix"])) == config["split_sizes"]["test"]
    assert set(weights(run)) == set(weights(run, "best.pt"))
    assert not list(run.glob(".*.tmp"))


def test_flags_override_the_config_file_and_the_file_overrides_defaults(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("optimizer: sam\nbase: sgd\nlr: 0.02\nbatch-size: 256\n")
    (tmp_path / "run.toml").write_text('optimizer = "asam"\nrho = 0.3\n')
    yaml_run, toml_run = tmp_path / "y", tmp_path / "t"
    gcsam(
        "train",
        *FAST,
        "--config",
        str(tmp_path / "run.yaml"),
        "--lr",
        "0.03",
        "--out",
        str(yaml_run),
    )
    gcsam("train", *FAST, "--config", str(tmp_path / "run.toml"), "--out", str(toml_run))
    y = json.loads((yaml_run / "config.json").read_text())
    t = json.loads((toml_run / "config.json").read_text())
    assert (y["optimizer"], y["base"], y["lr"]) == ("sam", "sgd", 0.03)
    assert y["batch_size"] == 128  # FAST's flag beats the file's 256
    assert (t["optimizer"], t["rho"]) == ("asam", 0.3)


def test_bad_settings_exit_with_a_message(tmp_path: Path) -> None:
    done = gcsam(
        "train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"), check=False
    )
    assert done.returncode == 2 and str(tmp_path / "nope") in done.stderr
    done = gcsam("train", "--lr", "-1", "--out", str(tmp_path / "r"), check=False)
    assert done.returncode == 2 and "lr must be positive" in done.stderr
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    done = gcsam("train", "--config", str(tmp_path / "bad.yaml"), check=False)
    assert done.returncode != 0 and "learning_rate" in done.stderr
    done = gcsam("report", str(tmp_path / "empty"), check=False)
    assert done.returncode == 2


def test_help_teaches_with_examples() -> None:
    out = gcsam("train", "--help").stdout
    assert "examples:" in out and "--rho" in out and "--config" in out and "fashion-mnist" in out
    assert "examples:" in gcsam("compare", "--help").stdout


def test_compare_two_optimizers_end_to_end_and_rerun_skips_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        *FAST,
        "--optimizers",
        "adam",
        "gcsam",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
    ]
    printed = gcsam(*args).stdout
    assert "gcsam" in printed and "adam" in printed
    assert f"wrote {out / 'report.md'}, report.csv" in printed
    for name in (
        "report.md",
        "report.csv",
        "learning_curves.png",
        "test_metrics.png",
        "frontier.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "adam-seed0",
        "adam-seed1",
        "gcsam-seed0",
        "gcsam-seed1",
    ]
    summaries = [json.loads((d / "summary.json").read_text()) for d in out.iterdir() if d.is_dir()]
    target = summaries[0]["target_val_accuracy"]
    assert all(s["target_val_accuracy"] == target for s in summaries)
    assert all(s["epochs_to_target"] is not None for s in summaries)  # every run reaches it
    stamp = (out / "adam-seed0" / "final.pt").stat().st_mtime_ns
    gcsam(*args)
    assert (out / "adam-seed0" / "final.pt").stat().st_mtime_ns == stamp
    rebuilt = gcsam("report", str(out), "--out", str(tmp_path / "again")).stdout
    assert (tmp_path / "again" / "report.md").read_text() == (out / "report.md").read_text()
    assert "gcsam" in rebuilt


def test_compare_refuses_to_mix_in_runs_made_with_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    base = ["compare", *FAST, "--optimizers", "adam", "--seeds", "0", "--out", str(out)]
    gcsam(*base)
    done = gcsam(*base, "--lr", "0.01", check=False)
    assert done.returncode == 2 and "other settings" in done.stderr


def test_a_killed_run_resumes_bit_identically(tmp_path: Path) -> None:
    settings = ["--epochs", "6", "--batch-size", "64", "--optimizer", "gcsam", "--quiet"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    gcsam("train", *settings, "--out", str(straight))
    process = subprocess.Popen(
        [sys.executable, "-m", "gcsam", "train", *settings, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    wait_for_epochs(process, killed, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    gcsam("resume", str(killed), "--quiet")
    for name, tensor in weights(straight).items():
        assert torch.equal(tensor, weights(killed)[name]), name
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    drop = ("epoch_time_s", "wall_time_s")
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]
        for lines in ((d / "metrics.jsonl").read_text().splitlines() for d in (straight, killed))
    ]
    assert rows[0] == rows[1]


def test_a_run_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "gcsam", "train", "--epochs", "200", "--quiet", "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for_epochs(process, run, 1)
        assert (run / "metrics.jsonl").exists(), "the run did not start"
        done = gcsam("resume", str(run), "--quiet", check=False)
        assert process.poll() is None, "the run ended before a second process could try it"
        assert done.returncode == 2
        assert f"{run} is in use by process {process.pid} (" in done.stderr
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with run_lock(run):  # SIGKILL ran no cleanup, yet the lock is free
        pass


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adam and gcsam trained for 2 epochs on digits, with the report's flatness columns."""
    out = tmp_path_factory.mktemp("flat") / "cmp"
    gcsam("compare", *FAST, "--optimizers", "adam", "gcsam", "--seeds", "0", "--out", str(out),
          "--sharpness", "--no-plots")  # fmt: skip
    return out


def test_compare_with_sharpness_reports_flatness(finished_runs: Path) -> None:
    report = (finished_runs / "report.md").read_text()
    assert "## Flatness of the final weights" in report and "Top Hessian eigenvalue" in report
    summary = json.loads((finished_runs / "gcsam-seed0" / "summary.json").read_text())
    assert summary["top_eigenvalue"] > 0 and summary["hessian_trace"] > 0
    assert summary["sam_sharpness"] >= 0


def test_sharpness_command_writes_json_and_tables(finished_runs: Path, tmp_path: Path) -> None:
    runs = [str(finished_runs / "adam-seed0"), str(finished_runs / "gcsam-seed0")]
    args = ["--max-samples", "200", "--trace-samples", "5", "--top-k", "2", "--m", "100"]
    out = gcsam("sharpness", *runs, *args, "--quiet", "--out", str(tmp_path)).stdout
    assert "| adam-seed0" in out and "| gcsam-seed0" in out
    record = json.loads((finished_runs / "gcsam-seed0" / "sharpness.json").read_text())
    assert record["samples"] == 200 and len(record["top_eigenvalues"]["values"]) == 2
    assert record["top_eigenvalues"]["values"][0] >= record["top_eigenvalues"]["values"][1]
    assert len(record["m_sharpness"]["per_chunk"]) == 2 and record["trace"]["samples"] == 5
    assert (tmp_path / "sharpness.csv").read_text().count("\n") == 3


def test_landscape_command_draws_planes_lines_and_interpolations(
    finished_runs: Path, tmp_path: Path
) -> None:
    runs = [str(finished_runs / "gcsam-seed0"), str(finished_runs / "adam-seed0")]
    common = ["--max-samples", "100", "--grid", "5", "--quiet"]
    gcsam("landscape", *runs, *common, "--out", str(tmp_path))
    for name in ("landscape-2d-contour.png", "landscape-2d-surface.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plane = np.load(finished_runs / "adam-seed0" / "landscape-2d.npz")
    assert plane["loss"].shape == (5, 5)
    meta = json.loads((finished_runs / "adam-seed0" / "landscape-2d.json").read_text())
    assert meta["settings"]["grid"] == 5
    gcsam("landscape", *runs, *common, "--dim", "1", "--out", str(tmp_path))
    assert (tmp_path / "landscape-1d.png").exists()
    gcsam("landscape", *runs, *common, "--between", "--out", str(tmp_path))
    assert len(list(tmp_path.glob("interpolation-gcsam-seed0-adam-seed0.*"))) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--span", "-1"], "span"),
        (["--grid", "1"], "grid"),
        (["--between"], "exactly two runs"),
    ],
)
def test_landscape_errors(finished_runs: Path, args: list[str], message: str) -> None:
    done = gcsam("landscape", str(finished_runs / "adam-seed0"), *args, "--quiet", check=False)
    assert done.returncode == 2 and message in done.stderr


def test_measuring_a_run_without_a_checkpoint_says_how_to_finish_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    gcsam("train", *FAST, "--out", str(run))
    (run / "final.pt").unlink()
    for command in ("sharpness", "landscape"):
        done = gcsam(command, str(run), "--quiet", check=False)
        assert done.returncode == 2 and "gcsam resume" in done.stderr, command


def torchrun(*args: str, port: int) -> list[str]:
    """``torchrun --nproc-per-node 2 -m gcsam ...`` on loopback; returns its printed lines."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "gcsam", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_two_workers_agree_and_write_one_run(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    lines = torchrun("train", *FAST, "--optimizer", "gcsam", "--out", str(run), port=free_port())
    results = sorted(line for line in lines if "test accuracy" in line)
    assert [line[:16] for line in results] == ["[rank 0 of 2] gc", "[rank 1 of 2] gc"]
    metrics = [line.split("] ", 1)[1].split(" s -> ")[0].rsplit(", ", 1)[0] for line in results]
    assert metrics[0] == metrics[1]  # the same test metrics (each worker times itself)
    assert sorted(p.name for p in run.iterdir()) == [
        ".gcsam.lock", "best.pt", "config.json", "final.pt", "last.pt", "metrics.jsonl",
        "summary.json",
    ]  # fmt: skip
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    rng = torch.load(run / "last.pt", weights_only=True)["rng"]
    assert len(rng["augment"]) == 2 and not torch.equal(rng["augment"][0], rng["augment"][1])


def _two_nodes(tmp_path: Path, out: str) -> list[subprocess.CompletedProcess[str]]:
    """``torchrun --nnodes 2 --nproc-per-node 1`` on loopback, each node started in its own
    folder (``tmp_path/node0``, ``node1``), as on two machines; returns each node's result."""
    port = free_port()
    nodes = []
    for rank in range(2):
        folder = tmp_path / f"node{rank}"
        folder.mkdir(parents=True)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
            str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
            str(port), "-m", "gcsam", "train", *FAST, "--ddp-timeout-s", "60", "--out", out,
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                command,
                cwd=folder,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=os.environ | {"OMP_NUM_THREADS": "1"},
            )
        )
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_torchrun_nodes_without_a_shared_run_folder_are_refused_at_the_start(
    tmp_path: Path,
) -> None:
    """Each node wrote its own ``run``: both trained every epoch, then rank 1 found no
    ``best.pt`` and rank 0 died in an all-reduce."""
    refusal = (
        "gcsam: error: run: worker(s) of rank 1 do not see the files rank 0 writes there; under "
        "torchrun on several machines the run folder must be on a file system every node "
        "shares, at the same path\n"
    )
    for node in _two_nodes(tmp_path, "run"):
        assert node.returncode != 0
        assert refusal in node.stderr and "Traceback" not in node.stderr.split(refusal)[0]
    for rank in range(2):
        run = tmp_path / f"node{rank}" / "run"
        assert not (run / "metrics.jsonl").exists() and not (run / ".gcsam-shared").exists()
    shared = tmp_path / "shared"
    for node in _two_nodes(tmp_path / "again", str(shared)):
        assert node.returncode == 0, node.stderr[-3000:]
    assert json.loads((shared / "summary.json").read_text())["status"] == "finished"
    assert not (shared / ".gcsam-shared").exists()


@needs_fsdp2
def test_torchrun_fsdp_workers_agree_with_batchnorm_and_early_stopping(tmp_path: Path) -> None:
    """small-cnn has BatchNorm, whose statistics FSDP leaves to each worker: they scored
    differently, picked different best epochs and, with --patience, stopped at different
    epochs and hung until the process-group timeout."""
    run = tmp_path / "fsdp"
    lines = torchrun(
        "train", "--epochs", "8", "--batch-size", "128", "--patience", "1", "--quiet",
        "--strategy", "fsdp", "--ddp-timeout-s", "60", "--out", str(run), port=free_port(),
    )  # fmt: skip
    results = sorted(line for line in lines if "test accuracy" in line)
    assert [line[:14] for line in results] == ["[rank 0 of 2] ", "[rank 1 of 2] "]
    metrics = [line.split("] ", 1)[1].split(" s -> ")[0].rsplit(", ", 1)[0] for line in results]
    assert metrics[0] == metrics[1]  # the same test metrics and best epoch on both workers


@needs_fsdp2
def test_torchrun_fsdp_trains_like_ddp_with_a_global_ascent(tmp_path: Path) -> None:
    """FSDP2 reduce-scatters the gradients, so its ascent is DDP's global one: the same weights
    (to float rounding), and full-tensor checkpoints like any run's."""
    runs = {}
    for strategy, extra in (("fsdp", []), ("ddp", ["--ascent", "global"])):
        runs[strategy] = tmp_path / strategy
        torchrun(
            "train", *FAST, "--optimizer", "gcsam", "--strategy", strategy, *extra,
            "--out", str(runs[strategy]), port=free_port(),
        )  # fmt: skip
    sharded, replicated = weights(runs["fsdp"]), weights(runs["ddp"])
    assert sharded.keys() == replicated.keys()
    for name, tensor in replicated.items():
        assert type(sharded[name]) is torch.Tensor, name  # gathered, not a DTensor
        # Adam magnifies the different summation orders of a reduce-scatter and an all-reduce
        # to ~5e-6 in 2 epochs; DDP's local ascent lands 1.7e-2 away.
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=1e-4, msg=name)
    assert json.loads((runs["fsdp"] / "config.json").read_text())["strategy"] == "fsdp"


@pytest.mark.parametrize(
    ("strategy", "optimizer"),
    [
        ("ddp", "sam"),
        pytest.param("fsdp", "look-gcsam", marks=needs_fsdp2),  # g_v gathered and resharded
    ],
)
def test_torchrun_run_killed_and_resumed_matches_an_uninterrupted_one(
    tmp_path: Path, strategy: str, optimizer: str
) -> None:
    settings = ["--epochs", "4", "--batch-size", "64", "--optimizer", optimizer, "--quiet"]
    settings += ["--strategy", strategy]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun("train", *settings, "--out", str(straight), port=free_port())
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "gcsam",
         "train", *settings, "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    wait_for_epochs(process, killed, 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    # Whatever the workers were writing, the checkpoint on disk is a whole one: epoch 2's, or
    # epoch 1's when the kill came between epoch 2's history line and its checkpoint (the
    # resume then drops that line and trains epoch 2 again).
    assert torch.load(killed / "last.pt", weights_only=True)["progress"]["epoch"] >= 1
    torchrun("resume", str(killed), "--quiet", port=free_port())
    assert not list(killed.glob(".*.tmp"))
    for name, tensor in weights(straight).items():
        assert torch.equal(tensor, weights(killed)[name]), name
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["test"] == b["test"]
