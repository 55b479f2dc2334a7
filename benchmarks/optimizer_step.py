"""Optimizer-step benchmark: GCSAM vs its base step, SAM, a textbook loop and pytorch-optimizer.

Only optimizer work is timed, on CPU in fp32. Every candidate owns its own copy of the model's
parameters; the gradients are fixed random tensors made once. Before every timed iteration the
weights and ``.grad`` of the candidate are reset with ``torch._foreach_copy_`` *outside* the timed
region (``first_step`` centralizes ``.grad`` in place, so the gradients must be restored), hence
every candidate does identical work on identical data and the reset copies are not counted.
Momentum buffers are created by untimed warm-up steps and are not reset.

Timing (interleaved rounds, per-round minima, medians, the busy-machine meter) is the shared
harness of ``_harness.py``. The SAM-family candidates are built the way users write them,
``GCSAM(params, SGD, rho, lr=..., momentum=..., foreach=...)``; the table's last column shows the
``foreach`` setting their base SGD actually received. ``--profile`` adds, per model, the phase
profile of ``optimizer_phases.py`` (GCSAM's real helpers, what-if alternatives, a
``torch.profiler`` table).

Usage::

    python benchmarks/optimizer_step.py                  # all models, about 2-3 minutes on 2 cores
    python benchmarks/optimizer_step.py --quick          # under a minute
    python benchmarks/optimizer_step.py --models resnet18_w64 --profile --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optimizer_phases
import torch
from _harness import (
    BusyMeter,
    Run,
    Timing,
    busy_line,
    fmt,
    interleave,
    iterations_per_round,
    machine_info,
    machine_line,
    peak_temporary_bytes,
    ratio,
    state_bytes_beyond_base,
    verdict,
    warm_up,
    write_json,
)
from _models import MODELS, Problem, make_problem
from torch import Tensor, nn
from torch.optim import SGD, Optimizer

import gcsam

try:
    import pytorch_optimizer
    from pytorch_optimizer import SAM as PyOptSAM  # noqa: N811
except ImportError:  # optional: pip install "gcsam[bench]"
    pytorch_optimizer = None
    PyOptSAM = None

LR = 0.1
MOMENTUM = 0.9
RHO = 0.05

# Issue targets on the width-64 ResNet (reported as PASS/MISS, never asserted).
TARGET_MODEL = "resnet18_w64"
TARGETS = {
    "GCSAM / SGD-step": 2.5,
    "GCSAM / pytorch-optimizer (foreach=True)": 0.6,
    "GCSAM / SAM": 1.05,
}
TARGET_EXTRA_MEMORY = 1.0


# Textbook per-parameter GCSAM (davda54/sam style, plus gradient centralization) ---------------


class TextbookGCSAM(Optimizer):
    """The common per-parameter SAM loop with GC: ``e_w`` kept in state, removed by ``sub_``."""

    def __init__(
        self,
        params: Iterable[Tensor],
        base_optimizer: type[Optimizer],
        rho: float = RHO,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        """Centralize each gradient, then ``w <- w + rho * g / ||g||`` with ``e_w`` stored."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.dim() > 1:
                    p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.dim())), keepdim=True))
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def second_step(self) -> None:
        """``w <- w - e_w``, then the base optimizer's step."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()

    def _grad_norm(self) -> Tensor:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)


# Candidates ------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One optimizer under test, with its own parameters and gradients."""

    key: str
    label: str
    params: list[Tensor]
    optimizer: Optimizer
    two_step: bool

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    def step(self) -> None:
        """The timed work: one optimizer step (first_step + second_step for the SAM family)."""
        if self.two_step:
            self.optimizer.first_step()
            self.optimizer.second_step()
        else:
            self.optimizer.step()

    @torch.no_grad()
    def reset(self, problem: Problem) -> None:
        """Put the weights and gradients back (untimed)."""
        torch._foreach_copy_(self.params, problem.weights)
        torch._foreach_copy_(self.grads, problem.grads)

    def run(self, problem: Problem) -> Run:
        """A harness run: reset (untimed), then one timed step."""

        def timed_step() -> float:
            self.reset(problem)
            start = time.perf_counter()
            self.step()
            return time.perf_counter() - start

        return timed_step


def pyopt_kwargs(foreach: bool | None) -> dict[str, Any]:
    """Arguments for pytorch-optimizer's SAM, checked against its signature."""
    signature = inspect.signature(PyOptSAM.__init__).parameters
    kwargs: dict[str, Any] = {"rho": RHO, "lr": LR, "momentum": MOMENTUM}
    if "use_gc" not in signature:
        raise RuntimeError("this pytorch-optimizer SAM has no use_gc argument")
    kwargs["use_gc"] = True
    if foreach is not None:
        kwargs["foreach"] = foreach  # its own argument (also forwarded to the base) or a base kwarg
    return kwargs


@dataclass(frozen=True)
class Spec:
    """How to build one candidate on its parameters."""

    label: str
    build: Callable[[list[Tensor]], Optimizer]
    two_step: bool  # first_step + second_step (the SAM family) or one step()


CANDIDATES: dict[str, Spec] = {
    "sgd": Spec(
        "SGD-momentum step (foreach)",
        lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=True),
        False,
    ),
    "sgd_single": Spec(
        "SGD-momentum step (foreach=False)",
        lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=False),
        False,
    ),
    "gcsam": Spec(
        "GCSAM first+second (foreach)",
        lambda ps: gcsam.GCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "sam": Spec(
        "SAM first+second (foreach)",
        lambda ps: gcsam.SAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "gcsam_single": Spec(
        "GCSAM first+second (foreach=False)",
        lambda ps: gcsam.GCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=False),
        True,
    ),
    "textbook": Spec(
        "textbook per-param GCSAM loop",
        lambda ps: TextbookGCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "pyopt": Spec(
        "pytorch-optimizer SAM use_gc (foreach=True)",
        lambda ps: PyOptSAM(ps, SGD, **pyopt_kwargs(True)),
        True,
    ),
    "pyopt_default": Spec(
        "pytorch-optimizer SAM use_gc (default)",
        lambda ps: PyOptSAM(ps, SGD, **pyopt_kwargs(None)),
        True,
    ),
}
PYOPT_KEYS = ("pyopt", "pyopt_default")


def make_candidates(keys: list[str], problem: Problem) -> list[Candidate]:
    """Build each candidate on a fresh copy of the weights, with gradients set."""
    candidates = []
    for key in keys:
        spec = CANDIDATES[key]
        params = [nn.Parameter(w.clone()) for w in problem.weights]
        for p, g in zip(params, problem.grads, strict=True):
            p.grad = g.clone()
        candidates.append(Candidate(key, spec.label, params, spec.build(params), spec.two_step))
    return candidates


# Memory and agreement --------------------------------------------------------------------------


def memory_report(candidates: list[Candidate], problem: Problem) -> dict[str, dict[str, float]]:
    """Extra state (beyond SGD's momentum) between the two steps and after them, and the peak
    of temporaries, each as a multiple of the parameter bytes."""
    report = {}
    for c in candidates:
        c.reset(problem)
        if c.two_step:
            with torch.no_grad():
                c.optimizer.first_step()
            held = state_bytes_beyond_base(c.optimizer)
            c.optimizer.second_step()
        else:
            c.optimizer.step()
            held = state_bytes_beyond_base(c.optimizer)
        after = state_bytes_beyond_base(c.optimizer)
        c.reset(problem)
        peak = peak_temporary_bytes(c.step)
        report[c.key] = {
            "held_between_steps": held / problem.param_bytes,
            "held_after_step": after / problem.param_bytes,
            "peak_temporaries": peak / problem.param_bytes,
        }
    return report


@torch.no_grad()
def agreement(candidates: list[Candidate], problem: Problem) -> dict[str, dict[str, float | None]]:
    """Max |difference| from GCSAM, from the same start, at the perturbed point ``w + eps``
    (after ``first_step``) and after the whole step (which restores ``w``, so it only sees the
    descent gradient and the base step)."""

    def snapshot(c: Candidate) -> list[Tensor]:
        return [p.detach().clone() for p in c.params]

    perturbed: dict[str, list[Tensor] | None] = {}
    final: dict[str, list[Tensor]] = {}
    for c in candidates:
        c.reset(problem)
        if c.two_step:
            c.optimizer.first_step()
            perturbed[c.key] = snapshot(c)
            c.optimizer.second_step()
        else:
            c.optimizer.step()
            perturbed[c.key] = None
        final[c.key] = snapshot(c)
    if "gcsam" not in final:
        return {}

    def max_diff(a: list[Tensor] | None, b: list[Tensor] | None) -> float | None:
        if a is None or b is None:
            return None
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    return {
        key: {
            "perturbed": max_diff(perturbed[key], perturbed["gcsam"]),
            "final": max_diff(final[key], final["gcsam"]),
        }
        for key in final
        if key != "gcsam"
    }


# Driver ----------------------------------------------------------------------------------------


def bench_model(name: str, keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every candidate on one model, print its tables, return its JSON entry."""
    problem = make_problem(name)
    candidates = make_candidates(keys, problem)
    runs = {c.key: c.run(problem) for c in candidates}
    with torch.no_grad():
        warm_up(runs.values())  # momentum buffers, backups, allocator
    deltas = agreement(candidates, problem)
    iters = iterations_per_round(runs, args.round_seconds, args.max_iters)

    start = time.perf_counter()
    meter = BusyMeter()
    timings = interleave(runs, args.repeats, iters)
    others = meter.other_cores()
    elapsed = time.perf_counter() - start
    medians = {key: timing.median for key, timing in timings.items()}
    memory = memory_report(candidates, problem)
    print(
        f"\n=== {problem.describe()}; {args.repeats} rounds x {iters} iters ({elapsed:.0f} s) ==="
    )
    print(busy_line(others))
    print_table(candidates, timings, memory)
    ratios = {
        "GCSAM / SGD-step": ratio(medians, "gcsam", "sgd"),
        "GCSAM / SAM": ratio(medians, "gcsam", "sam"),
        "GCSAM / pytorch-optimizer (foreach=True)": ratio(medians, "gcsam", "pyopt"),
        "GCSAM / pytorch-optimizer (default)": ratio(medians, "gcsam", "pyopt_default"),
        "GCSAM / textbook": ratio(medians, "gcsam", "textbook"),
        "GCSAM foreach / single-tensor": ratio(medians, "gcsam", "gcsam_single"),
        "SGD foreach / single-tensor": ratio(medians, "sgd", "sgd_single"),
    }
    extra = memory["gcsam"]["held_between_steps"] if "gcsam" in memory else None
    targets = print_ratios(ratios, extra, deltas, is_target=name == TARGET_MODEL)
    result: dict[str, Any] = {
        "parameters": problem.numel,
        "tensors": len(problem.weights),
        "param_bytes": problem.param_bytes,
        "rounds": args.repeats,
        "iters_per_round": iters,
        "other_processes_cores": others,
        "candidates": {
            c.key: {"label": c.label, **timings[c.key].as_json(), "memory": memory[c.key]}
            for c in candidates
        },
        "ratios": ratios,
        "max_abs_diff_vs_gcsam": deltas,
    }
    if targets:
        result["targets"] = targets
    if args.profile:
        result["profile"] = optimizer_phases.profile(problem, args.repeats, iters)
    return result


def print_table(
    candidates: list[Candidate], timings: dict[str, Timing], memory: dict[str, dict[str, float]]
) -> None:
    print(
        f"{'candidate':<46}{'ms/step':>9}{'spread':>8}{'x SGD':>7}"
        f"{'state held':>12}{'after':>7}{'peak tmp':>10}  base foreach"
    )
    medians = {key: timing.median for key, timing in timings.items()}
    for c in candidates:
        mem = memory[c.key]
        print(
            f"{c.label:<46}{medians[c.key] * 1e3:>9.2f}{timings[c.key].spread * 100:>7.0f}%"
            f"{fmt(ratio(medians, c.key, 'sgd')):>7}"
            f"{mem['held_between_steps']:>11.2f}x{mem['held_after_step']:>6.2f}x"
            f"{mem['peak_temporaries']:>9.2f}x  {base_foreach(c.optimizer)}"
        )


def print_ratios(
    ratios: dict[str, float | None],
    extra_memory: float | None,
    deltas: dict[str, dict[str, float | None]],
    is_target: bool,
) -> dict[str, dict[str, Any]]:
    """Print the ratios (with the issue's targets on the target model) and the agreement with
    GCSAM; return the targets' verdicts (empty on other models)."""
    print("ratios:")
    for label, value in ratios.items():
        note = ""
        if is_target and label in TARGETS:
            note = f"   target <= {TARGETS[label]:.2f}: {verdict(value, TARGETS[label])}"
        print(f"  {label:<42}{fmt(value, '.3f'):>7}{note}")
    memory_verdict = verdict(extra_memory, TARGET_EXTRA_MEMORY)
    note = f"   target <= {TARGET_EXTRA_MEMORY:.2f}: {memory_verdict}" if is_target else ""
    print(f"  {'GCSAM extra state (x param bytes)':<42}{fmt(extra_memory):>7}{note}")
    if deltas:
        print("max |w - w_GCSAM| from the same start, at w + eps / after the whole step:")
        print(
            "  "
            + "; ".join(
                f"{key} {fmt(d['perturbed'], '.1e')} / {fmt(d['final'], '.1e')}"
                for key, d in deltas.items()
            )
        )
    if not is_target:
        return {}
    limits = {**TARGETS, "extra memory": TARGET_EXTRA_MEMORY}
    values = {**ratios, "extra memory": extra_memory}
    return {
        label: {"value": values[label], "limit": limit, "verdict": verdict(values[label], limit)}
        for label, limit in limits.items()
    }


def base_foreach(optimizer: Optimizer) -> str:
    """The ``foreach`` setting the base optimizer's groups actually hold."""
    base = getattr(optimizer, "base_optimizer", optimizer)
    values = {group.get("foreach", "n/a") for group in base.param_groups}
    return "/".join(str(v) for v in sorted(values, key=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES)
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 15, quick 7)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 1 minute)")
    parser.add_argument("--profile", action="store_true", help="GCSAM phase breakdown + profiler")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.quick else 15
    args.round_seconds = 1.2 if args.quick else 4.0  # time per round, all candidates together
    args.max_iters = 5 if args.quick else 20
    return args


def pytorch_optimizer_version() -> str | None:
    if pytorch_optimizer is None:
        return None
    version = getattr(pytorch_optimizer, "__version__", None)
    if version is None:
        from importlib.metadata import version as installed_version

        version = installed_version("pytorch-optimizer")
    return version


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keys = [k for k in args.candidates if PyOptSAM is not None or k not in PYOPT_KEYS]
    info = machine_info() | {"pytorch_optimizer": pytorch_optimizer_version()}
    print(
        f"{machine_line(info)}; pytorch-optimizer "
        f"{info['pytorch_optimizer'] or 'not installed (skipped)'}"
    )
    print(
        "CPU fp32, fixed gradients; weights and .grad reset with _foreach_copy_ outside the "
        "timed region; ms = median over rounds of the per-round minimum; spread = "
        "(max - min) / median of the round minima; memory as multiples of parameter bytes "
        "(state held: beyond SGD's momentum buffers, between the two steps; after: once the step "
        "is done; peak tmp: peak of bytes allocated during one step and still live, at operator "
        "granularity, transient state included)"
    )
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "models": {}}
    start = time.perf_counter()
    for name in args.models:
        results["models"][name] = bench_model(name, keys, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
