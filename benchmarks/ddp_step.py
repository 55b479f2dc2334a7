"""DDP step benchmark: 1 vs 2 worker processes at the same global batch, on CPU (gloo).

For plain SGD, SAM and GCSAM (``ascent="local"`` and ``"global"``), each world size runs in
fresh worker processes (one intra-op thread each, loopback gloo) and reports:

* the step time on rank 0 (median over the timed steps; every step ends in an all-reduce, so
  the ranks move together), and the speed-up of 2 processes over 1. The candidates are timed
  interleaved, one step each per round (``_harness.py``), in the same order on every rank;
* the gradient all-reduces per step, counted by a DDP comm hook wrapping the default
  all-reduce hook (one per bucket of each all-reducing backward), and their bytes;
* any other all-reduce per step (``torch.distributed.all_reduce`` calls outside the hook): the
  4-byte non-finite-ascent flag of local mode on more than one worker.

The counts come from a short separate run with the hooks in place; the timed run has none (a
Python comm hook is slower than DDP's built-in all-reduce). With 2 cores, 2 processes only speed
up if nothing else runs: the script prints the load average, read the timings with it in mind.

Usage::

    python benchmarks/ddp_step.py                    # about a minute on 2 cores
    python benchmarks/ddp_step.py --quick            # a few steps: does it run
    python benchmarks/ddp_step.py --steps 40 --batch 128 --width 32 --json out.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F  # noqa: N812
from _harness import (
    free_port,
    interleave,
    join_gloo,
    machine_info,
    machine_line,
    stopwatch,
    warm_up,
    write_json,
)
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.optim import SGD, Optimizer

from gcsam import GCSAM, SAM, SharpnessAwareOptimizer

LR, MOMENTUM, RHO = 0.05, 0.9, 0.05
# (name, ascent); ascent None: a plain SGD step (one pass, one all-reduce)
CANDIDATES: list[tuple[str, str | None]] = [
    ("SGD", None),
    ("SAM", "local"),
    ("SAM", "global"),
    ("GCSAM", "local"),
    ("GCSAM", "global"),
]


def make_model(width: int) -> nn.Module:
    """A small CIFAR-style CNN (about 137k parameters at width 16)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_optimizer(name: str, ascent: str | None, ddp: DistributedDataParallel) -> Optimizer:
    if ascent is None:
        return SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    family = GCSAM if name == "GCSAM" else SAM
    return family(
        ddp.parameters(), SGD, rho=RHO, lr=LR, momentum=MOMENTUM, model=ddp, ascent=ascent
    )


def step_fn(
    opt: Optimizer, ddp: DistributedDataParallel, x: Tensor, y: Tensor
) -> Callable[[], None]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        return loss

    if isinstance(opt, SharpnessAwareOptimizer):
        return lambda: opt.step(closure)
    return lambda: (closure(), opt.step())


class Counter:
    """Gradient all-reduces (comm hook) and every ``torch.distributed.all_reduce`` call."""

    def __init__(self) -> None:
        self.hook_calls = self.hook_bytes = self.calls = self.bytes = 0

    def hook(self, state, bucket):  # no annotations: DDP compares them with the real classes
        buffer = bucket.buffer()
        self.hook_calls += 1
        self.hook_bytes += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(state, bucket)

    def wrap(self, all_reduce: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kwargs)

        return counted


def count_allreduces(
    name: str, ascent: str | None, x: Tensor, y: Tensor, args: argparse.Namespace
) -> dict[str, float]:
    """All-reduces and bytes per step of one candidate, from a short run with the hooks on."""
    ddp = DistributedDataParallel(make_model(args.width))
    counter = Counter()
    ddp.register_comm_hook(None, counter.hook)
    original = dist.all_reduce
    dist.all_reduce = counter.wrap(original)
    try:
        step = step_fn(make_optimizer(name, ascent, ddp), ddp, x, y)
        for _ in range(args.count_steps):
            step()
    finally:
        dist.all_reduce = original
    n = args.count_steps
    return {
        "grad_allreduces": counter.hook_calls / n,
        "grad_bytes": counter.hook_bytes / n,
        "other_allreduces": (counter.calls - counter.hook_calls) / n,
        "other_bytes": (counter.bytes - counter.hook_bytes) / n,
    }


def run_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    join_gloo(rank, world, port, args.threads)
    per_worker = args.batch // world
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(per_worker, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (per_worker,), generator=gen)
    counts = {
        f"{name}/{ascent or '-'}": count_allreduces(name, ascent, x, y, args)
        for name, ascent in CANDIDATES
    }
    # Timed runs: no hooks; every candidate's model and optimizer alive at once, interleaved.
    runs = {}
    for name, ascent in CANDIDATES:
        ddp = DistributedDataParallel(make_model(args.width))
        runs[f"{name}/{ascent or '-'}"] = stopwatch(
            step_fn(make_optimizer(name, ascent, ddp), ddp, x, y)
        )
    warm_up(runs.values(), args.warmup)
    timings = interleave(runs, rounds=args.steps)
    params = sum(p.numel() for p in make_model(args.width).parameters())
    results = {
        key: {
            **counts[key],
            "ms": 1e3 * timing.median,
            "ms_min": 1e3 * min(timing.samples),
            "params": params,
        }
        for key, timing in timings.items()
    }
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(run_worker, args=(world, free_port(), args, out), nprocs=world, join=True)
        return torch.load(Path(out) / "results.pt", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over workers)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--count-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="5 steps, 1 warm-up, 1 counted")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.count_steps = 5, 1, 1
    if not (dist.is_available() and dist.is_gloo_available()):
        raise SystemExit("torch.distributed with gloo is needed")

    info = machine_info()
    started = time.perf_counter()
    by_world = {world: measure(world, args) for world in args.worlds}
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    params = next(iter(by_world[args.worlds[0]].values()))["params"]
    print(machine_line(info))
    print(
        f"CNN width {args.width} ({params:,} parameters, "
        f"{4 * params / 1e6:.2f} MB of fp32 gradients); global batch {args.batch}; "
        f"{args.threads} thread(s) per worker; median of {args.steps} steps"
    )
    print(f"load average {load_after[0]:.2f} after the run; ran {elapsed:.0f} s")
    header = (
        f"{'optimizer':<9} {'ascent':<7} {'workers':>7} {'batch/wkr':>9} {'ms/step':>8} "
        f"{'speed-up':>8} {'grad AR/step':>12} {'grad MB/step':>12} {'other AR/step':>14}"
    )
    print(header)
    print("-" * len(header))
    first = args.worlds[0]
    for name, ascent in CANDIDATES:
        key = f"{name}/{ascent or '-'}"
        for world in args.worlds:
            r = by_world[world][key]
            speedup = by_world[first][key]["ms"] / r["ms"]
            other = (
                f"{r['other_allreduces']:.0f} ({r['other_bytes']:.0f} B)"
                if r["other_allreduces"]
                else "0"
            )
            print(
                f"{name:<9} {ascent or '-':<7} {world:>7} {args.batch // world:>9} "
                f"{r['ms']:>8.1f} {speedup:>7.2f}x {r['grad_allreduces']:>12.0f} "
                f"{r['grad_bytes'] / 1e6:>12.2f} {other:>14}"
            )
    if args.json:
        write_json(
            args.json,
            {
                "machine": info,
                "args": {k: str(v) for k, v in vars(args).items()},
                "load_average_1min_after": load_after[0],
                "results": {str(w): r for w, r in by_world.items()},
            },
        )


if __name__ == "__main__":
    main()
