"""FSDP2 step benchmark: GCSAM(AdamW) against plain AdamW, both under ``fully_shard``, 2 workers.

Each worker (one intra-op thread, loopback gloo) shards the same MLP with ``fully_shard`` (every
layer, then the root) and reports, for each optimizer:

* the step time on rank 0 (median; the candidates timed interleaved, one step each per round,
  ``_harness.py``): AdamW takes one forward/backward (all-gather, reduce-scatter), GCSAM two;
* per-rank memory, in MB: what the step keeps between steps (the local shards of the weights,
  their gradients, the optimizer state and, for GCSAM, its backup of the weights) and the peak of
  the temporaries during a step (the profiler's memory records: FSDP's all-gathered weights,
  activations, the kernels' scratch). GCSAM's extra memory should be one local shard of the
  weights: its backup.

Usage::

    python benchmarks/fsdp_step.py                  # about a minute on 2 cores
    python benchmarks/fsdp_step.py --quick          # a few steps: does it run
    python benchmarks/fsdp_step.py --width 1024 --depth 6 --json out.json
"""

from __future__ import annotations

import argparse
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
    peak_temporary_bytes,
    stopwatch,
    warm_up,
    write_json,
)
from torch import Tensor, nn

from gcsam import GCSAM

WORLD = 2
LR, RHO = 1e-3, 0.05


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def step_fn(name: str, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Callable[[], None], Any]:
    """One optimizer step of ``name`` ("AdamW" or "GCSAM"), and the optimizer."""
    if name == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def plain() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return plain, opt
    gcsam = GCSAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR)

    def closure() -> Tensor:
        gcsam.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return lambda: gcsam.step(closure), gcsam


def local_bytes(tensors: list[Tensor]) -> int:
    return sum(t.to_local().numel() * t.element_size() for t in tensors)


def kept_bytes(model: nn.Module, opt: Any) -> dict[str, int]:
    """Bytes this rank keeps between steps: weights, gradients, optimizer state, backup."""
    params = list(model.parameters())
    base = getattr(opt, "base_optimizer", opt)
    state = [v for p in params for v in base.state[p].values() if v.dim() > 0]
    backup = [opt.state[p]["backup"] for p in params if "backup" in opt.state.get(p, {})]
    return {
        "weights": local_bytes(params),
        "grads": local_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer_state": local_bytes(state),
        "backup": local_bytes(backup),
    }


def run_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    join_gloo(rank, WORLD, port, args.threads)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch // WORLD, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch // WORLD,), generator=gen)
    runs, memory = {}, {}
    for name in ("AdamW", "GCSAM"):
        model = shard(make_model(args.width, args.depth))
        step, opt = step_fn(name, model, x, y)
        step()  # the optimizer state exists from here on
        memory[name] = kept_bytes(model, opt) | {"peak_temporaries": peak_temporary_bytes(step)}
        runs[name] = stopwatch(step)
    warm_up(runs.values(), args.warmup)
    timings = interleave(runs, rounds=args.steps)
    results = {
        name: {"ms": 1e3 * timing.median, "memory": memory[name]}
        for name, timing in timings.items()
    }
    torch.save(results, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024, help="hidden units of each layer")
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over workers)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if not (dist.is_available() and dist.is_gloo_available()):
        raise SystemExit("torch.distributed with gloo is needed")

    info = machine_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(run_worker, args=(free_port(), args, out), nprocs=WORLD, join=True)
        by_rank = [torch.load(Path(out) / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]
    elapsed = time.perf_counter() - started

    params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    print(machine_line(info))
    print(
        f"MLP {args.depth} x {args.width} ({params:,} parameters, {4 * params / 1e6:.1f} MB in "
        f"fp32), fully_shard over {WORLD} gloo workers, {args.threads} thread(s) each; global "
        f"batch {args.batch}; median of {args.steps} steps; ran {elapsed:.0f} s"
    )
    keys = ("weights", "grads", "optimizer_state", "backup", "peak_temporaries")
    header = f"{'optimizer':<9} {'rank':>4} {'ms/step':>8} " + " ".join(
        f"{k.replace('_', ' ') + ' MB':>18}" for k in keys
    )
    print(header)
    print("-" * len(header))
    for name in ("AdamW", "GCSAM"):
        for rank, results in enumerate(by_rank):
            r = results[name]
            cells = " ".join(f"{r['memory'][k] / 1e6:>18.2f}" for k in keys)
            print(f"{name:<9} {rank:>4} {r['ms'] if rank == 0 else float('nan'):>8.1f} {cells}")
    for rank, results in enumerate(by_rank):
        kept = {name: sum(results[name]["memory"][k] for k in keys[:4]) for name in results}
        print(
            f"rank {rank}: GCSAM keeps {(kept['GCSAM'] - kept['AdamW']) / 1e6:.2f} MB more than "
            f"AdamW (its backup: one local shard of the weights, "
            f"{results['GCSAM']['memory']['weights'] / 1e6:.2f} MB)"
        )
    ratio = by_rank[0]["GCSAM"]["ms"] / by_rank[0]["AdamW"]["ms"]
    print(f"step time, rank 0: GCSAM / AdamW = {ratio:.2f}x")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "ranks": by_rank})


if __name__ == "__main__":
    main()
