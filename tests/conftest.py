"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The test models are tiny: one intra-op thread is several times faster than two on a
    busy 2-core machine, and keeps the run time steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="no CUDA device on this machine"
                ),
            ],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """The device a test runs on: the CPU, and CUDA where there is a GPU (skipped otherwise;
    ``-m cuda`` selects those runs). CUDA runs without TF32, so that float32 results meet the
    float32 tolerances of the tests."""
    if request.param == "cpu":
        yield "cpu"
        return
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield request.param
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
