"""The harness every benchmark uses: interleaved rounds, medians, warm-up, the busy-machine
meter, memory meters, machine information and JSON output.

Candidates are timed side by side in one process. Every round runs each candidate in an order
that rotates from round to round, a few iterations each, and keeps the minimum of those
iterations (an iteration preempted by another process is discarded); a candidate's time is the
median over rounds, its spread ``(max - min) / median``. Other processes on the same cores make
timings meaningless (two-thread kernels stall when one core is taken): :class:`BusyMeter` says
how many cores they used meanwhile.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

import gcsam
from gcsam._util.strict_json import strict_json

# Other processes using more cores than this (on average) make the timings unreliable.
BUSY_CORES = 0.15

Run = Callable[[], float]
"""One timed iteration of a candidate: does the work and returns the seconds it counts (so that
untimed set-up, like resetting the weights, can run inside it)."""


@dataclass
class Timing:
    """One candidate's per-round minima, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """``(max - min) / median`` over the rounds."""
        return (max(self.samples) - min(self.samples)) / self.median

    def as_json(self) -> dict[str, Any]:
        return {"median_ms": self.median * 1e3, "round_minima_ms": [s * 1e3 for s in self.samples]}


def stopwatch(work: Callable[[], object]) -> Run:
    """``work`` as a :data:`Run`: one call, timed whole."""

    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


def warm_up(runs: Iterable[Run], times: int = 2) -> None:
    """Call each run ``times`` times, untimed: allocator, caches, lazily built state."""
    for run in runs:
        for _ in range(times):
            run()


def iterations_per_round(runs: dict[str, Run], round_seconds: float, max_iters: int) -> int:
    """Iterations per candidate so that one round of every candidate takes about
    ``round_seconds``, from the best of 3 calls of each; between 1 and ``max_iters``."""
    per_round = sum(min(run() for _ in range(3)) for run in runs.values())
    return max(1, min(max_iters, int(round_seconds / max(per_round, 1e-6))))


def interleave(runs: dict[str, Run], rounds: int, iters: int = 1) -> dict[str, Timing]:
    """Time every candidate in ``rounds`` interleaved rounds of ``iters`` iterations each."""
    timings = {key: Timing() for key in runs}
    keys = list(runs)
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            timings[key].samples.append(min(runs[key]() for _ in range(iters)))
    return timings


class BusyMeter:
    """CPU used by *other* processes (and hypervisor steal) since creation, in cores, from
    ``/proc/stat`` minus this process's own CPU time; ``None`` where unavailable."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(x) for x in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime

    def other_cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / max(wall, 1e-9)


# Memory ----------------------------------------------------------------------------------------


def state_bytes_beyond_base(optimizer: Optimizer) -> int:
    """Bytes of tensors in the optimizer's state (and its base's) that SGD would not hold."""
    optimizers = [optimizer, getattr(optimizer, "base_optimizer", optimizer)]
    seen: set[int] = set()
    total = 0
    for opt in optimizers:
        for entry in opt.state.values():
            for key, value in entry.items():
                if key == "momentum_buffer" or not isinstance(value, Tensor) or value.dim() == 0:
                    continue
                ptr = value.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += value.untyped_storage().nbytes()
    return total


def peak_temporary_bytes(step: Callable[[], None]) -> int:
    """Peak bytes of live allocations during ``step`` beyond those at its start, at operator
    granularity, from the profiler's memory records (an approximation: temporaries freed inside
    one operator are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage != 0
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def busy_line(other_cores: float | None) -> str:
    """One line saying how busy the machine was, with a warning above :data:`BUSY_CORES`."""
    if other_cores is None:
        return "other processes: not measurable here"
    warning = "  WARNING: contended, timings unreliable" if other_cores > BUSY_CORES else ""
    return f"other processes used {other_cores:.2f} cores on average while timing{warning}"


def git_commit() -> str | None:
    """This checkout's short commit, ``+dirty`` when it has changes; None without git."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Versions, threads, CPU and commit of this run, for the JSON and the header line."""
    return {
        "torch": torch.__version__,
        "gcsam": gcsam.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "git": git_commit(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"torch {info['torch']}, gcsam {info['gcsam']}, Python {info['python']}; {info['cpu']}, "
        f"{info['cores']} cores, {info['threads']} threads; load average "
        f"{info['load_average_1min']:.2f}; git {info['git'] or 'unknown'}"
    )


def write_json(path: str | Path, results: dict[str, Any]) -> None:
    """``results`` as strict JSON (NaN and infinities as null)."""
    Path(path).write_text(json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")


def ratio(medians: dict[str, float], a: str, b: str) -> float | None:
    """``medians[a] / medians[b]``; None unless both were measured."""
    if a in medians and b in medians:
        return medians[a] / medians[b]
    return None


def verdict(value: float | None, limit: float) -> str:
    """PASS when ``value`` is at most ``limit`` (a target ratio), MISS above it."""
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "MISS"


def fmt(value: float | None, spec: str = ".2f") -> str:
    """``value`` in ``spec``, or n/a when it was not measured."""
    return "n/a" if value is None else format(value, spec)


# Worker processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_gloo(rank: int, world: int, port: int, threads: int) -> None:
    """Join the loopback gloo process group of ``world`` benchmark workers, with ``threads``
    intra-op threads in this one."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
