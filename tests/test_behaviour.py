"""The optimizer computes, bit for bit, what the recording in ``tests/fixtures`` says: every mode
x GCSAM/SAM x SGD/Adam x closure/two-step, with BatchNorm, GradScaler, non-finite steps, group
settings, schedules, mode changes, bf16 weights, DDP and FSDP2 (``tests/behaviour.py`` lists the
scenarios and how to record them again). The recorded state dicts also load and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import behaviour
import pytest
import torch
from torch import Tensor

MODE_ENTRY = "sharpness_aware"


def bits(tensor: Tensor) -> Tensor:
    """The tensor's bytes: NaNs compare equal to themselves, -0.0 differs from 0.0."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same(actual: Any, expected: Any, where: str) -> None:
    """Equal structure and values, tensors bit for bit. A mode entry of the state dict may
    leave out keys the recording has (each mode now saves only its own state), never add any."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(bits(actual), bits(expected)), f"{where}: values differ"
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        if where.endswith(f"/{MODE_ENTRY}"):
            assert set(actual) <= set(expected), f"{where}: {set(actual) - set(expected)}"
            expected = {key: expected[key] for key in actual}
        assert list(actual) == list(expected), where
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}/{key}")
        return
    if isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]")
        return
    assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r}"


def recorded(kind: str) -> tuple[Path, dict[str, Any]]:
    path = behaviour.FIXTURES / f"behaviour-{kind}.pt"
    fixture = torch.load(path, weights_only=True)
    if fixture["platform"] != behaviour.platform_key():
        pytest.skip(
            f"recorded on {fixture['platform']}, this is {behaviour.platform_key()}: other torch "
            "versions and CPUs round differently"
        )
    return path, fixture


@pytest.mark.slow  # a pinned subprocess (and its workers)
@pytest.mark.parametrize("kind", behaviour.KINDS)
def test_the_recorded_runs_are_reproduced_bit_for_bit(kind: str, tmp_path: Path) -> None:
    path, fixture = recorded(kind)
    produced = behaviour.in_pinned_process(kind, tmp_path, path if kind == "single" else None)
    computed = torch.load(produced, weights_only=True)
    assert set(computed["runs"]) == set(fixture["runs"])
    for name, expected in fixture["runs"].items():
        assert_same(computed["runs"][name], expected, name)
    if kind == "single":  # the recorded (older) state dicts load, and the runs go on as before
        for name, expected in fixture["runs"].items():
            assert_same(computed["resumed"][name], expected["final"], f"{name} resumed")
