"""Helpers for the tests that run on every device (the ``device`` fixture in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def on_device(device: str, tensors: Iterable[Tensor]) -> tuple[Tensor, ...]:
    """``tensors`` on ``device`` (the tests draw their data on the CPU, from CPU generators)."""
    return tuple(t.to(device) for t in tensors)


def assert_runs_match(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
    """Two runs that agree bit for bit on the CPU. On CUDA, where kernels need not be
    deterministic (cuDNN's convolution backward, atomic adds), they agree within the default
    tolerance of their dtype. A value put back from a copy stays exact on every device: check
    it with ``torch.equal``."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.device.type == "cpu":
            assert a.dtype == e.dtype and torch.equal(a, e), index
        else:
            torch.testing.assert_close(a, e, msg=lambda m, index=index: f"{index}: {m}")
