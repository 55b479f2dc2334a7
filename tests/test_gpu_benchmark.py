"""benchmarks/gpu.py runs end to end (``--quick --device cpu``), through the device check
(benchmarks/device_check.sh) as a GPU machine is handed it, and refuses a missing GPU in one
line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu.py"
DEVICE_CHECK = BENCHMARKS / "device_check.sh"
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


def device_check(
    *args: str, cwd: Path, script: Path = DEVICE_CHECK, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    """The device check with this interpreter first on PATH (no .venv of the checkout's)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env | env_vars,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run of the device check")
def test_the_device_checks_benchmark_part_writes_every_row(tmp_path: Path) -> None:
    result = device_check("--summary", "check/summary.txt", "bench", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / "check" / "summary.txt").read_text()
    assert "parts: bench" in summary.splitlines()[0]
    assert "== bench: rc 0," in summary
    assert "--quick --device cpu" in summary
    assert "== tests" not in summary and "== fsdp" not in summary
    assert summary.rstrip().endswith("every part passed ==")
    assert "summary: whole step" in (tmp_path / "check" / "summary.bench.log").read_text()
    results = json.loads((tmp_path / "check" / "summary.gpu.json").read_text())
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bogus",), "unknown argument 'bogus': name parts among tests, bench and fsdp"),
        (("--summary",), "--summary needs a file name"),
    ],
)
def test_the_device_check_refuses_a_bad_argument_in_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = device_check(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_exits_2_with_one_line() -> None:
    result = run("--device", "cuda")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "no CUDA device: run on a GPU machine or pass --device cpu" in result.stderr


def _checkout_with_wheel(root: Path, wheel_bytes: bytes | None) -> Path:
    """A checkout holding only the device check, a test_fsdp.py that imports the module
    ``probe_wheel``, and in .whl/ that module's wheel (or, with ``wheel_bytes``, a file of those
    bytes named as a wheel); returns its copy of the script."""
    script = root / "benchmarks" / "device_check.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(DEVICE_CHECK, script)
    (root / "tests").mkdir()
    (root / "tests" / "test_fsdp.py").write_text(
        "import probe_wheel\n\n\ndef test_probe():\n    assert probe_wheel.VALUE == 1\n"
    )
    (root / ".whl").mkdir()
    wheel = root / ".whl" / "probe_wheel-1.0-py3-none-any.whl"
    if wheel_bytes is not None:
        wheel.write_bytes(wheel_bytes)
        return script
    info = "probe_wheel-1.0.dist-info"
    files = {
        "probe_wheel.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: probe-wheel\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return script


def test_the_device_check_installs_the_wheels_in_whl_for_its_parts(tmp_path: Path) -> None:
    script = _checkout_with_wheel(tmp_path / "checkout", wheel_bytes=None)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = device_check(
        "--summary", "summary.txt", "fsdp", cwd=tmp_path, script=script, TMPDIR=str(temporary)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "installed from .whl/: probe_wheel-1.0-py3-none-any.whl" in summary
    assert "== fsdp: rc 0," in summary and "1 passed" in summary  # the part imported it
    assert list(temporary.iterdir()) == []  # the folder it was installed into is gone


def test_a_wheel_that_does_not_install_stops_the_device_check_in_one_line(
    tmp_path: Path,
) -> None:
    script = _checkout_with_wheel(tmp_path / "checkout", wheel_bytes=b"not a zip archive")
    result = device_check("--summary", "summary.txt", cwd=tmp_path, script=script)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == "device_check: could not install .whl/probe_wheel-1.0-py3-none-any.whl"
    assert not (tmp_path / "summary.txt").exists()  # no part ran
