"""The examples run end to end and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Subprocesses: slow; `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_prints_an_accuracy_per_optimizer() -> None:
    pytest.importorskip("sklearn")
    out = run("quickstart.py", "--epochs", "2", "--seeds", "0")
    accuracies = {
        name: float(acc) for name, acc in re.findall(r"^(sgd|sam|gcsam)\s+([\d.]+) \+-", out, re.M)
    }
    assert set(accuracies) == {"sgd", "sam", "gcsam"}
    # Ten balanced classes: chance is 10 %; two epochs of a small CNN already do far better.
    assert all(50.0 < acc <= 100.0 for acc in accuracies.values()), out


def test_recipes_all_reduce_the_loss() -> None:
    out = run("recipes.py")
    rows = re.findall(r"^(\w+)\s+loss ([\d.]+) -> ([\d.]+)$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "closure_style",
        "two_step_style_with_clipping",
        "gradient_accumulation",
        "bf16_autocast",
        "fp16_grad_scaler",
        "cheap_modes_two_step",
        "rho_follows_lr",
    ]
    for name, first, last in rows:
        assert float(last) < float(first), name
