"""A stopped torchrun worker ends the run after ``ddp_timeout_s`` with a message naming it,
instead of hanging every other worker forever."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import torch

from gcsam.toolkit.config import TrainConfig
from gcsam.toolkit.trainer import Trainer

pytest.importorskip("sklearn")


def _worker_that_stops(rank: int, port: int, run_dir: str, error_file: str) -> None:
    """One of two torchrun-like workers; rank 1 stops itself (SIGSTOP) in its second epoch.
    What rank 0 raises goes to ``error_file``."""
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainConfig(
        optimizer="adam", epochs=3, batch_size=64, classes=["0", "1", "2"], ddp_timeout_s=5
    )
    trainer = Trainer(cfg, run_dir, progress=False)
    if rank == 1:
        step, calls = trainer._train_step, []

        def stopping(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
            calls.append(1)
            if len(calls) == trainer.steps_per_epoch + 1:
                os.kill(os.getpid(), signal.SIGSTOP)
            return step(x, y)

        trainer._train_step = stopping
    try:
        trainer.run()
    except Exception as error:
        Path(error_file).write_text(f"{type(error).__name__}: {error}")
        raise


@pytest.mark.slow
def test_a_stopped_worker_ends_the_run_with_a_message_naming_the_timeout(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spawn = mp.get_context("spawn")
    errors = [tmp_path / f"error-{rank}.txt" for rank in range(2)]
    workers = [
        spawn.Process(
            target=_worker_that_stops, args=(rank, port, str(tmp_path / "run"), str(errors[rank]))
        )
        for rank in range(2)
    ]
    try:
        for worker in workers:
            worker.start()
        workers[0].join(timeout=300)  # generous: only a hang (the bug) comes near it
        assert workers[0].exitcode not in (None, 0)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()  # SIGKILL ends a stopped process too
            worker.join()
    assert (
        errors[0]
        .read_text()
        .startswith(
            "WorkerTimeoutError: a worker did not answer within ddp_timeout_s=5 s: it stopped, "
        )
    )
    assert not errors[1].exists()  # rank 1 never got further than its stop
