"""benchmarks/gpu.py runs end to end (``--quick --device cpu``) and refuses a missing GPU in one
line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
MODELS = ("resnet18", "resnet50", "vit")
STEP_KEYS = ("base", "gcsam", "periodic", "looksam", "momentum", "adaptive", "fraction", "control")
CONFIGS = {"fp32": STEP_KEYS, "bf16": STEP_KEYS, "bf16+compile": (*STEP_KEYS[:6], "control")}
OPTIMIZER_KEYS = ("sgd", "gcsam", "sam")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_cpu_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = run("--quick", "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "summary: whole step" in result.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["device"] == "cpu"
    assert results["compile_failures"] == {}
    assert list(results["models"]) == list(MODELS)
    for name, entry in results["models"].items():
        assert list(entry["configs"]) == list(CONFIGS), name
        for cfg, keys in CONFIGS.items():
            rows = entry["configs"][cfg]["rows"]
            assert tuple(rows) == keys, (name, cfg)
            for key, row in rows.items():
                assert positive(row["median_ms"]), (name, cfg, key)
                assert positive(row["ratio_to_base"]), (name, cfg, key)
                assert row["peak_memory_over_base"] is None  # CUDA only
                assert row["syncs_per_step"] is None
            assert rows["base"]["ratio_to_base"] == 1.0
            assert rows["gcsam"]["forwards_per_step"] == 2.0
        optimizer = entry["optimizer"]
        assert set(OPTIMIZER_KEYS) <= set(optimizer["candidates"]), name
        assert positive(optimizer["ratios"]["GCSAM / SGD-step"]), name
        for key, value in optimizer["ratios"].items():
            assert value is None or positive(value), (name, key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_exits_2_with_one_line() -> None:
    result = run("--device", "cuda")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "no CUDA device: run on a GPU machine or pass --device cpu" in result.stderr
