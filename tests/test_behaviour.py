"""The optimizer computes, bit for bit, what the recording in ``tests/fixtures`` says: every mode
x GCSAM/SAM x SGD/Adam x closure/two-step, with BatchNorm, GradScaler, non-finite steps, group
settings, schedules, mode changes, bf16 weights, DDP and FSDP2 (``tests/behaviour.py`` lists the
scenarios and how to record them again). The recorded state dicts also load and resume."""

from __future__ import annotations

import math
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


def assert_same(actual: Any, expected: Any, where: str, close: dict | None = None) -> None:
    """Equal structure and values, tensors bit for bit (or as ``torch.testing.assert_close``
    with the tolerances ``close``). A mode entry of the state dict may leave out keys the
    recording has (each mode now saves only its own state), never add any."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        if close is None:
            assert torch.equal(bits(actual), bits(expected)), f"{where}: values differ"
        else:
            torch.testing.assert_close(actual, expected, **close, msg=lambda m: f"{where}: {m}")
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        if where.endswith(f"/{MODE_ENTRY}"):
            assert set(actual) <= set(expected), f"{where}: {set(actual) - set(expected)}"
            expected = {key: expected[key] for key in actual}
        assert list(actual) == list(expected), where
        for key, value in expected.items():
            assert_same(actual[key], value, f"{where}/{key}", close)
        return
    if isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]", close)
        return
    assert type(actual) is type(expected), f"{where}: {actual!r}"
    if close is not None and isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=close["rtol"], abs_tol=close["atol"]), where
    else:
        assert actual == expected, f"{where}: {actual!r}"


# Runs whose numbers changed on purpose since the recording, each with why, compared to within
# a few units in the last place of their dtype instead of bit for bit.
CHANGED_ON_PURPOSE = {
    "bf16-weights-looksam": (
        "LookSAM's scales stay on the device (58a204c): ||g|| from torch's sqrt, the factors in "
        "fp32, where the foreach path with a Python scalar had rounded them to bf16",
        dict(rtol=2e-2, atol=2e-2),
    ),
}


def recordings(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """The recordings of ``kind`` made with this torch on this architecture: one per kind of
    CPU they were made on, since torch's CPU kernels round some functions (sqrt) differently
    from one CPU to another, even pinned (``behaviour-<kind>.pt``, ``behaviour-<kind>.2.pt``)."""
    found = []
    for path in sorted(behaviour.FIXTURES.glob(f"behaviour-{kind}.*pt")):
        fixture = torch.load(path, weights_only=True)
        if fixture["platform"] == behaviour.platform_key():
            found.append((path, fixture))
    if not found:
        pytest.skip(
            f"recorded on other platforms, this is {behaviour.platform_key()}: other torch "
            "versions and CPUs round differently"
        )
    return found


def assert_reproduces(computed: dict[str, Any], fixture: dict[str, Any], single: bool) -> None:
    assert set(computed["runs"]) == set(fixture["runs"])
    for name, expected in fixture["runs"].items():
        close = CHANGED_ON_PURPOSE.get(name.rsplit("-", 1)[0], (None, None))[1]
        assert_same(computed["runs"][name], expected, name, close)
        if single:  # the recorded (older) state dicts load, and the runs go on as before
            assert_same(computed["resumed"][name], expected["final"], f"{name} resumed", close)


@pytest.mark.slow  # a pinned subprocess (and its workers)
@pytest.mark.parametrize("kind", behaviour.KINDS)
def test_the_recorded_runs_are_reproduced_bit_for_bit(kind: str, tmp_path: Path) -> None:
    """The runs match one of the recordings of this CPU's kind (each made with the library
    before the restructuring), bit for bit."""
    failures = []
    for path, fixture in recordings(kind):
        single = kind == "single"  # resumes from the recording's own states
        produced = behaviour.in_pinned_process(kind, tmp_path / path.stem, path if single else None)
        try:
            assert_reproduces(torch.load(produced, weights_only=True), fixture, single)
            return
        except AssertionError as error:
            failures.append(f"{path.name}: {str(error).splitlines()[0]}")
    pytest.fail("matches no recording: " + "; ".join(failures))
