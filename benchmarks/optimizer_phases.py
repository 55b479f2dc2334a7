"""Phase profile of GCSAM's optimizer step: the package's own helpers, timed one by one.

The phases call the helpers of ``gcsam.optim._functional`` that ``GCSAM.first_step`` and
``second_step`` call, in the same order, on the same tensors (fp32, foreach, p = 2, gc_scope
"all", normalize_by "centralized"); what the real step spends beyond their sum is its
bookkeeping. Then what-if timings of alternatives the package does not use (fewer passes over
memory), and a ``torch.profiler`` operator table of the real step. Weights and gradients are
reset before every iteration, untimed.

Usage::

    python benchmarks/optimizer_phases.py                     # resnet18_w64, about a minute
    python benchmarks/optimizer_phases.py --quick --models resnet18_w16
    python benchmarks/optimizer_step.py --profile             # the same, after each model's table
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _harness import (
    BusyMeter,
    busy_line,
    interleave,
    iterations_per_round,
    machine_info,
    machine_line,
    stopwatch,
    warm_up,
    write_json,
)
from _models import MODELS, Problem, make_problem
from torch import Tensor, nn
from torch.optim import SGD

from gcsam import GCSAM
from gcsam.optim import _functional

LR, MOMENTUM, RHO = 0.1, 0.9, 0.05

# Ideal traffic of each phase in passes over the parameter bytes (reads + writes), for fp32.
PHASE_PASSES = {
    "centralize_: row sums, subtract, ||d||^2": 4,
    "ascent_norm: sum the terms": 0,
    "copy_: backup w -> b": 2,
    "perturb_: w += s*d": 3,
    "copy_: restore b -> w": 2,
    "base SGD step": 8,
}
# What-if variants (not in the package) and the phases each would replace.
ALTERNATIVES = {
    "GC + flat dot per tensor (one sweep)": ("centralize_: row sums, subtract, ||d||^2",),
    "w+eps into spare buffer, swap storages": (
        "copy_: backup w -> b",
        "perturb_: w += s*d",
        "copy_: restore b -> w",
    ),
    "no backup, inexact restore w -= s*d": ("copy_: backup w -> b", "copy_: restore b -> w"),
}


class Subject:
    """A GCSAM over its own copy of the problem's parameters, and a reset to the problem."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.params = [nn.Parameter(w.clone()) for w in problem.weights]
        for param, grad in zip(self.params, problem.grads, strict=True):
            param.grad = grad.clone()
        self.optimizer = GCSAM(self.params, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True)

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.params, self.problem.weights)
        torch._foreach_copy_(self.grads, self.problem.grads)

    def step(self) -> None:
        self.optimizer.first_step()
        self.optimizer.second_step()


@torch.no_grad()
def time_phases(subject: Subject, iters: int) -> dict[str, float]:
    """Median seconds of each phase of :data:`PHASE_PASSES` over ``iters`` reset steps."""
    params, optimizer = subject.params, subject.optimizer
    group = optimizer.param_groups[0]
    subject.reset()
    subject.step()  # the backups exist from here on
    backups = [optimizer.state[p]["backup"] for p in params]
    samples: dict[str, list[float]] = {name: [] for name in PHASE_PASSES}
    for _ in range(iters):
        subject.reset()
        grads = subject.grads
        ascent = _functional.AscentGroup(group, params, grads, foreach=True)
        marks = [time.perf_counter()]
        ascent.centralized = _functional.centralize_(grads, "all", foreach=True, measure=True)
        marks.append(time.perf_counter())
        norm = _functional.ascent_norm([ascent])
        marks.append(time.perf_counter())
        _functional.copy_(backups, params, foreach=True)
        marks.append(time.perf_counter())
        _functional.perturb_(params, grads, scale=RHO / norm.l2, p=2, adaptive=False, foreach=True)
        marks.append(time.perf_counter())
        _functional.copy_(params, backups, foreach=True)
        marks.append(time.perf_counter())
        optimizer.base_optimizer.step()
        marks.append(time.perf_counter())
        for name, t0, t1 in zip(PHASE_PASSES, marks[:-1], marks[1:], strict=True):
            samples[name].append(t1 - t0)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def time_alternatives(problem: Problem, iters: int) -> dict[str, float]:
    """Median seconds of each what-if of :data:`ALTERNATIVES`, on tensors of their own."""
    params = [nn.Parameter(w.clone()) for w in problem.weights]
    grads = [g.clone() for g in problem.grads]
    spares = [torch.empty_like(w) for w in problem.weights]
    scale = 0.1
    samples: dict[str, list[float]] = {name: [] for name in ALTERNATIVES}
    for _ in range(iters):
        # Centralize and measure each tensor while it is hot (fp32 BLAS dot).
        torch._foreach_copy_(grads, problem.grads)
        start = time.perf_counter()
        for d in grads:
            if d.dim() > 1:
                d.sub_(d.sum(tuple(range(1, d.dim())), keepdim=True).div_(d[0].numel()))
            flat = d.view(-1)
            torch.dot(flat, flat)
        samples["GC + flat dot per tensor (one sweep)"].append(time.perf_counter() - start)

        # Write w + eps into a spare buffer and swap storages (exact restore).
        torch._foreach_copy_(params, problem.weights)
        start = time.perf_counter()
        for p, d, spare in zip(params, grads, spares, strict=True):
            torch.add(p, d, alpha=scale, out=spare)
        originals = [p.data for p in params]
        for p, spare in zip(params, spares, strict=True):
            p.data = spare
        # (the second forward/backward runs here)
        for i, (p, original) in enumerate(zip(params, originals, strict=True)):
            spares[i] = p.data
            p.data = original
        samples["w+eps into spare buffer, swap storages"].append(time.perf_counter() - start)

        # The textbook restore, w -= s*d (not bit-exact), no backup.
        start = time.perf_counter()
        torch._foreach_add_(params, grads, alpha=scale)
        torch._foreach_add_(params, grads, alpha=-scale)
        samples["no backup, inexact restore w -= s*d"].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def profiler_table(subject: Subject, steps: int = 3) -> str:
    """torch.profiler operator table of GCSAM's real first_step + second_step. Nothing is reset
    between the profiled steps (GC is idempotent and the kernels are the same), so the table
    holds GCSAM's own operators only."""
    from torch.profiler import ProfilerActivity, profile, record_function

    subject.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("first_step"):
                subject.optimizer.first_step()
            with record_function("second_step"):
                subject.optimizer.second_step()
    return prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40
    )


def profile(problem: Problem, rounds: int, iters: int | None = None) -> dict[str, Any]:
    """Time the real GCSAM step and an SGD step (``rounds`` interleaved rounds of ``iters``
    iterations, sized to about a second per round by default), then the phases and the
    what-ifs; print the breakdown and a profiler table; return the numbers in ms."""
    subject = Subject(problem)
    sgd_params = [nn.Parameter(w.clone()) for w in problem.weights]
    for param, grad in zip(sgd_params, problem.grads, strict=True):
        param.grad = grad.clone()
    sgd = SGD(sgd_params, lr=LR, momentum=MOMENTUM, foreach=True)

    def gcsam_step() -> float:
        subject.reset()
        return stopwatch(subject.step)()

    runs = {"gcsam": gcsam_step, "sgd": stopwatch(sgd.step)}
    warm_up(runs.values())
    if iters is None:
        iters = iterations_per_round(runs, round_seconds=1.0, max_iters=20)
    meter = BusyMeter()
    steps = {key: timing.median for key, timing in interleave(runs, rounds, iters).items()}
    phases = time_phases(subject, iters=max(10, 2 * rounds))
    alternatives = time_alternatives(problem, iters=max(10, 2 * rounds))
    print_breakdown(problem, steps, phases, alternatives)
    print(busy_line(meter.other_cores()))
    print("\ntorch.profiler, real GCSAM first_step + second_step (3 steps):")
    print(profiler_table(subject))
    projected = {
        name: steps["gcsam"] - sum(phases[p] for p in ALTERNATIVES[name]) + seconds
        for name, seconds in alternatives.items()
    }
    return {
        "step_ms": {k: v * 1e3 for k, v in steps.items()},
        "phases_ms": {k: v * 1e3 for k, v in phases.items()},
        "alternatives_ms": {k: v * 1e3 for k, v in alternatives.items()},
        "projected_gcsam_ms": {k: v * 1e3 for k, v in projected.items()},
    }


def print_breakdown(
    problem: Problem,
    steps: dict[str, float],
    phases: dict[str, float],
    alternatives: dict[str, float],
) -> None:
    total = sum(phases.values())
    gcsam_step, sgd_step = steps["gcsam"], steps["sgd"]
    print(
        f"\nGCSAM phases ({problem.name}, package helpers, median of each): sum "
        f"{total * 1e3:.2f} ms; real GCSAM step {gcsam_step * 1e3:.2f} ms (bookkeeping "
        f"{(gcsam_step - total) * 1e3:.2f} ms); SGD step {sgd_step * 1e3:.2f} ms"
    )
    print(f"  {'phase':<42}{'ms':>8}{'share':>8}{'passes':>8}{'GB/s':>8}")
    for phase, seconds in phases.items():
        passes = PHASE_PASSES[phase]
        rate = f"{passes * problem.param_bytes / seconds / 1e9:.1f}" if passes else "n/a"
        share = seconds / total * 100
        print(f"  {phase:<42}{seconds * 1e3:>8.2f}{share:>7.0f}%{passes:>8}{rate:>8}")
    print(
        f"  ideal passes over the parameter bytes: GCSAM {sum(PHASE_PASSES.values())}, "
        f"SGD-momentum step {PHASE_PASSES['base SGD step']}"
    )
    print("what-if (not in the package; same conditions, timed after the phases):")
    print(f"  {'alternative':<42}{'ms':>8}{'replaces':>10}{'saves':>8}{'GCSAM/SGD':>11}")
    for name, seconds in alternatives.items():
        replaced = sum(phases[phase] for phase in ALTERNATIVES[name])
        projected = gcsam_step - replaced + seconds
        print(
            f"  {name:<42}{seconds * 1e3:>8.2f}{replaced * 1e3:>10.2f}"
            f"{(replaced - seconds) * 1e3:>8.2f}{projected / sgd_step:>11.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["resnet18_w64"])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else 15
    info = machine_info()
    print(machine_line(info))
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "models": {}}
    for name in args.models:
        problem = make_problem(name)
        print(f"\n=== {problem.describe()}; {rounds} rounds ===")
        results["models"][name] = profile(problem, rounds)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
