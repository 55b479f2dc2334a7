"""Optimizer-step benchmark: GCSAM vs its base step, SAM, a textbook loop and pytorch-optimizer.

Only optimizer work is timed, on CPU in fp32. Every candidate owns its own copy of the model's
parameters; the gradients are fixed random tensors made once. Before every timed iteration the
weights and ``.grad`` of the candidate are reset with ``torch._foreach_copy_`` *outside* the timed
region (``first_step`` centralizes ``.grad`` in place, so the gradients must be restored), hence
every candidate does identical work on identical data and the reset copies are not counted.
Momentum buffers are created by untimed warm-up steps and are not reset.

Candidates run interleaved in rounds (the order rotates every round); each round times a few
iterations per candidate and keeps their minimum (so one iteration preempted by another process
does not count); the table shows the median over the rounds and its spread. Other processes on
the same cores make the timings meaningless (two-thread kernels stall when one core is taken):
the script prints how many cores other processes used while it timed, and warns.

The SAM-family candidates are built the way users write them, ``GCSAM(params, SGD, rho, lr=...,
momentum=..., foreach=...)``; the table's last column shows the ``foreach`` setting their base
SGD actually received. ``--profile`` adds, for GCSAM, a phase-by-phase timing (a replica of its
fp32 foreach path with the same kernels), what-if timings of alternatives that need fewer passes
over memory, and a ``torch.profiler`` operator table.

Usage::

    python benchmarks/optimizer_step.py                  # all models, about 2-3 minutes on 2 cores
    python benchmarks/optimizer_step.py --quick          # under a minute
    python benchmarks/optimizer_step.py --models resnet18_w64 --profile --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
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
GRAD_SCALE = 1e-2
SEED = 0

# Issue targets on the width-64 ResNet (reported as PASS/MISS, never asserted).
TARGET_MODEL = "resnet18_w64"
TARGET_VS_SGD = 2.5
TARGET_VS_PYOPT = 0.6
TARGET_VS_SAM = 1.05
TARGET_EXTRA_MEMORY = 1.0


# --------------------------------------------------------------------------------------------
# Models (plain torch)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, BasicBlock stages [2, 2, 2, 2] of width w, 2w, 4w, 8w."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        in_planes = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**stage
            for block_stride in (stride, 1):
                layers.append(BasicBlock(in_planes, planes, block_stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with separate q/k/v projections (many small tensors)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def heads(proj: nn.Linear) -> Tensor:
            return proj(h).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            heads(self.q), heads(self.k), heads(self.v), is_causal=True
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallTransformer(nn.Module):
    """GPT-style language model: token and position embeddings, blocks, final LayerNorm, head."""

    def __init__(
        self,
        vocab: int = 1000,
        d_model: int = 192,
        n_layers: int = 12,
        n_heads: int = 3,
        ctx: int = 128,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(ctx, d_model))
        self.blocks = nn.Sequential(*(TransformerBlock(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18_w16": lambda: CifarResNet18(width=16),
    "resnet18_w64": lambda: CifarResNet18(width=64),
    "transformer_d192": lambda: SmallTransformer(),
}


# --------------------------------------------------------------------------------------------
# Textbook per-parameter GCSAM (davda54/sam style, plus gradient centralization)
# --------------------------------------------------------------------------------------------


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
        return torch.norm(
            torch.stack(
                [
                    p.grad.norm(p=2)
                    for g in self.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One optimizer under test, with its own parameters and gradients."""

    key: str
    label: str
    params: list[Tensor]
    optimizer: Optimizer
    two_step: bool
    samples: list[float] = field(default_factory=list)  # per-round minima, seconds

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
    def reset(self, weights: list[Tensor], grads: list[Tensor]) -> None:
        """Put the weights and gradients back (untimed)."""
        torch._foreach_copy_(self.params, weights)
        torch._foreach_copy_(self.grads, grads)


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


CANDIDATES: dict[str, tuple[str, Callable[[list[Tensor]], Optimizer], bool]] = {
    "sgd": (
        "SGD-momentum step (foreach)",
        lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=True),
        False,
    ),
    "sgd_single": (
        "SGD-momentum step (foreach=False)",
        lambda ps: SGD(ps, lr=LR, momentum=MOMENTUM, foreach=False),
        False,
    ),
    "gcsam": (
        "GCSAM first+second (foreach)",
        lambda ps: gcsam.GCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "sam": (
        "SAM first+second (foreach)",
        lambda ps: gcsam.SAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "gcsam_single": (
        "GCSAM first+second (foreach=False)",
        lambda ps: gcsam.GCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=False),
        True,
    ),
    "textbook": (
        "textbook per-param GCSAM loop",
        lambda ps: TextbookGCSAM(ps, SGD, RHO, lr=LR, momentum=MOMENTUM, foreach=True),
        True,
    ),
    "pyopt": (
        "pytorch-optimizer SAM use_gc (foreach=True)",
        lambda ps: PyOptSAM(ps, SGD, **pyopt_kwargs(True)),
        True,
    ),
    "pyopt_default": (
        "pytorch-optimizer SAM use_gc (default)",
        lambda ps: PyOptSAM(ps, SGD, **pyopt_kwargs(None)),
        True,
    ),
}
PYOPT_KEYS = ("pyopt", "pyopt_default")


def make_candidates(keys: list[str], weights: list[Tensor], grads: list[Tensor]) -> list[Candidate]:
    """Build each candidate on a fresh copy of the weights, with gradients set."""
    candidates = []
    for key in keys:
        label, factory, two_step = CANDIDATES[key]
        params = [nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        candidates.append(Candidate(key, label, params, factory(params), two_step))
    return candidates


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def timed_step(candidate: Candidate, weights: list[Tensor], grads: list[Tensor]) -> float:
    """Reset (untimed), then time one step; returns seconds."""
    candidate.reset(weights, grads)
    start = time.perf_counter()
    candidate.step()
    return time.perf_counter() - start


def run_rounds(
    candidates: list[Candidate],
    weights: list[Tensor],
    grads: list[Tensor],
    repeats: int,
    iters: int,
) -> None:
    """Interleave the candidates: each round rotates the order and times ``iters`` steps of each,
    keeping their minimum (an iteration hit by another process is discarded)."""
    for r in range(repeats):
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        for candidate in order:
            times = [timed_step(candidate, weights, grads) for _ in range(iters)]
            candidate.samples.append(min(times))  # robust to a preempted iteration


class BusyMeter:
    """CPU used by *other* processes (and hypervisor steal) while timing, in cores, from
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


def memory_report(
    candidates: list[Candidate], weights: list[Tensor], grads: list[Tensor], param_bytes: int
) -> dict[str, dict[str, float]]:
    """Extra state (beyond SGD's momentum) between the two steps and after them, and the peak
    of temporaries, each as a multiple of the parameter bytes."""
    report = {}
    for c in candidates:
        c.reset(weights, grads)
        if c.two_step:
            with torch.no_grad():
                c.optimizer.first_step()
            held = state_bytes_beyond_base(c.optimizer)
            c.optimizer.second_step()
        else:
            c.optimizer.step()
            held = state_bytes_beyond_base(c.optimizer)
        after = state_bytes_beyond_base(c.optimizer)
        c.reset(weights, grads)
        peak = peak_temporary_bytes(c.step)
        report[c.key] = {
            "held_between_steps": held / param_bytes,
            "held_after_step": after / param_bytes,
            "peak_temporaries": peak / param_bytes,
        }
    return report


@torch.no_grad()
def agreement(
    candidates: list[Candidate], weights: list[Tensor], grads: list[Tensor]
) -> dict[str, dict[str, float | None]]:
    """Max |difference| from GCSAM, from the same start, at the perturbed point ``w + eps``
    (after ``first_step``) and after the whole step (which restores ``w``, so it only sees the
    descent gradient and the base step)."""

    def snapshot(c: Candidate) -> list[Tensor]:
        return [p.detach().clone() for p in c.params]

    perturbed: dict[str, list[Tensor] | None] = {}
    final: dict[str, list[Tensor]] = {}
    for c in candidates:
        c.reset(weights, grads)
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


# --------------------------------------------------------------------------------------------
# Phase breakdown of GCSAM (--profile)
# --------------------------------------------------------------------------------------------

# Ideal traffic of each phase in passes over the parameter bytes (reads + writes), for fp32.
PHASE_PASSES = {
    "GC: row sums (sum/div_)": 1,
    "GC: subtract row means (sub_)": 2,
    "squared norms (per-row vector_norm)": 1,
    "total norm (stack/sum/float)": 0,
    "backup copy w -> b (_foreach_copy_)": 2,
    "perturb w += s*d (_foreach_add_)": 3,
    "restore copy b -> w (_foreach_copy_)": 2,
    "base SGD step": 8,
}
# What-if variants (not in the package) and the phases each would replace.
ALTERNATIVES = {
    "GC + flat dot per tensor (one sweep)": (
        "GC: row sums (sum/div_)",
        "GC: subtract row means (sub_)",
        "squared norms (per-row vector_norm)",
    ),
    "w+eps into spare buffer, swap storages": (
        "backup copy w -> b (_foreach_copy_)",
        "perturb w += s*d (_foreach_add_)",
        "restore copy b -> w (_foreach_copy_)",
    ),
    "no backup, inexact restore w -= s*d": (
        "backup copy w -> b (_foreach_copy_)",
        "restore copy b -> w (_foreach_copy_)",
    ),
}


def _rest(tensor: Tensor) -> tuple[int, ...]:
    return tuple(range(1, tensor.dim()))


@torch.no_grad()
def phase_breakdown(
    candidate: Candidate, weights: list[Tensor], grads: list[Tensor], iters: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median time of each phase of GCSAM's step, from a replica of its fp32 foreach path
    (p = 2, gc_scope 'all', normalize_by 'centralized') written with the same torch kernels
    (the package's helpers are private and may change), and of the what-if alternatives (timed
    in a second loop). The base step is the GCSAM candidate's own."""
    params = candidate.params
    base = candidate.optimizer.base_optimizer
    backups = [torch.empty_like(p) for p in params]
    # Separate tensors for the alternatives, so the candidate's parameters are untouched.
    alt_params = [nn.Parameter(w.clone()) for w in weights]
    alt_grads = [g.clone() for g in grads]
    spares = [torch.empty_like(w) for w in weights]
    samples: dict[str, list[float]] = {name: [] for name in [*PHASE_PASSES, *ALTERNATIVES]}
    for _ in range(iters):
        candidate.reset(weights, grads)
        ds = candidate.grads
        marks = [time.perf_counter()]
        means = [
            d.sum(_rest(d), keepdim=True).div_(d[0].numel()) if d.dim() > 1 else None for d in ds
        ]
        marks.append(time.perf_counter())
        for d, mean in zip(ds, means, strict=True):
            if mean is not None:
                d.sub_(mean)
        marks.append(time.perf_counter())
        terms = [
            torch.linalg.vector_norm(d, dim=_rest(d)).double().square().sum()
            for d in ds
            if d.dim() > 1
        ]
        flat = [d for d in ds if d.dim() <= 1]
        terms += [n.double().square() for n in torch._foreach_norm(flat, 2)] if flat else []
        marks.append(time.perf_counter())
        scale = RHO / float(torch.stack(terms).sum().sqrt())
        marks.append(time.perf_counter())
        torch._foreach_copy_(backups, params)
        marks.append(time.perf_counter())
        torch._foreach_add_(params, ds, alpha=scale)
        marks.append(time.perf_counter())
        torch._foreach_copy_(params, backups)
        marks.append(time.perf_counter())
        base.step()
        marks.append(time.perf_counter())
        for name, t0, t1 in zip(PHASE_PASSES, marks, marks[1:], strict=False):
            samples[name].append(t1 - t0)

    # The alternatives in a loop of their own, so that they do not disturb the caches above.
    for _ in range(iters):
        # What-if 1: centralize and measure each tensor while it is hot (fp32 BLAS dot).
        torch._foreach_copy_(alt_grads, grads)
        start = time.perf_counter()
        terms = []
        for d in alt_grads:
            if d.dim() > 1:
                d.sub_(d.sum(_rest(d), keepdim=True).div_(d[0].numel()))
            flat_d = d.view(-1)
            terms.append(torch.dot(flat_d, flat_d))
        samples["GC + flat dot per tensor (one sweep)"].append(time.perf_counter() - start)

        # What-if 2: write w + eps into a spare buffer and swap storages (exact restore).
        torch._foreach_copy_(alt_params, weights)
        start = time.perf_counter()
        for p, d, spare in zip(alt_params, alt_grads, spares, strict=True):
            torch.add(p, d, alpha=scale, out=spare)
        originals = [p.data for p in alt_params]
        for p, spare in zip(alt_params, spares, strict=True):
            p.data = spare
        # (the second forward/backward runs here)
        for i, (p, original) in enumerate(zip(alt_params, originals, strict=True)):
            spares[i] = p.data
            p.data = original
        samples["w+eps into spare buffer, swap storages"].append(time.perf_counter() - start)

        # What-if 3: the textbook restore, w -= s*d (not bit-exact), no backup.
        start = time.perf_counter()
        torch._foreach_add_(alt_params, alt_grads, alpha=scale)
        torch._foreach_add_(alt_params, alt_grads, alpha=-scale)
        samples["no backup, inexact restore w -= s*d"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return (
        {name: medians[name] for name in PHASE_PASSES},
        {name: medians[name] for name in ALTERNATIVES},
    )


def profiler_table(
    candidate: Candidate, weights: list[Tensor], grads: list[Tensor], iters: int
) -> str:
    """torch.profiler operator table of GCSAM's first_step + second_step. Nothing is reset
    between the profiled steps (GC is idempotent and the kernels are the same), so the table
    holds GCSAM's own operators only."""
    from torch.profiler import ProfilerActivity, profile, record_function

    candidate.reset(weights, grads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            with record_function("first_step"):
                candidate.optimizer.first_step()
            with record_function("second_step"):
                candidate.optimizer.second_step()
    return prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def ratio(results: dict[str, float], a: str, b: str) -> float | None:
    if a in results and b in results:
        return results[a] / results[b]
    return None


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "MISS"


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def bench_model(name: str, keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every candidate on one model and print its tables."""
    torch.manual_seed(SEED)
    model = MODELS[name]()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(w).mul_(GRAD_SCALE) for w in weights]
    numel = sum(w.numel() for w in weights)
    param_bytes = sum(w.numel() * w.element_size() for w in weights)
    del model

    candidates = make_candidates(keys, weights, grads)
    with torch.no_grad():
        for c in candidates:  # warm-up: momentum buffers, backups, allocator
            for _ in range(2):
                c.reset(weights, grads)
                c.step()
    deltas = agreement(candidates, weights, grads)

    # Size the rounds from a rough per-step cost.
    per_round = sum(min(timed_step(c, weights, grads) for _ in range(3)) for c in candidates)
    iters = max(1, min(args.max_iters, int(args.round_seconds / max(per_round, 1e-6))))

    start = time.perf_counter()
    meter = BusyMeter()
    run_rounds(candidates, weights, grads, args.repeats, iters)
    others = meter.other_cores()
    elapsed = time.perf_counter() - start
    medians = {c.key: statistics.median(c.samples) for c in candidates}
    spreads = {
        c.key: (max(c.samples) - min(c.samples)) / statistics.median(c.samples) for c in candidates
    }
    memory = memory_report(candidates, weights, grads, param_bytes)

    print(
        f"\n=== {name}: {numel / 1e6:.2f} M parameters, {len(weights)} tensors, "
        f"{param_bytes / 2**20:.1f} MiB fp32; {args.repeats} rounds x {iters} iters "
        f"({elapsed:.0f} s) ==="
    )
    if others is not None:
        warning = "  WARNING: contended, timings unreliable" if others > 0.15 else ""
        print(f"other processes used {others:.2f} cores on average while timing{warning}")
    print(
        f"{'candidate':<46}{'ms/step':>9}{'spread':>8}{'x SGD':>7}"
        f"{'state held':>12}{'after':>7}{'peak tmp':>10}  base foreach"
    )
    for c in candidates:
        mem = memory[c.key]
        print(
            f"{c.label:<46}{medians[c.key] * 1e3:>9.2f}{spreads[c.key] * 100:>7.0f}%"
            f"{fmt(ratio(medians, c.key, 'sgd')):>7}"
            f"{mem['held_between_steps']:>11.2f}x{mem['held_after_step']:>6.2f}x"
            f"{mem['peak_temporaries']:>9.2f}x  {base_foreach(c.optimizer)}"
        )
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
    targets = {
        "GCSAM / SGD-step": TARGET_VS_SGD,
        "GCSAM / pytorch-optimizer (foreach=True)": TARGET_VS_PYOPT,
        "GCSAM / SAM": TARGET_VS_SAM,
    }
    is_target = name == TARGET_MODEL
    print("ratios:")
    for label, value in ratios.items():
        note = ""
        if is_target and label in targets:
            note = f"   target <= {targets[label]:.2f}: {verdict(value, targets[label])}"
        print(f"  {label:<42}{fmt(value, '.3f'):>7}{note}")
    note = f"   target <= {TARGET_EXTRA_MEMORY:.2f}: {verdict(extra, TARGET_EXTRA_MEMORY)}"
    print(f"  {'GCSAM extra state (x param bytes)':<42}{fmt(extra):>7}{note if is_target else ''}")
    if deltas:
        print("max |w - w_GCSAM| from the same start, at w + eps / after the whole step:")
        print(
            "  "
            + "; ".join(
                f"{key} {fmt(d['perturbed'], '.1e')} / {fmt(d['final'], '.1e')}"
                for key, d in deltas.items()
            )
        )

    result: dict[str, Any] = {
        "parameters": numel,
        "tensors": len(weights),
        "param_bytes": param_bytes,
        "rounds": args.repeats,
        "iters_per_round": iters,
        "other_processes_cores": others,
        "candidates": {
            c.key: {
                "label": c.label,
                "median_ms": medians[c.key] * 1e3,
                "round_minima_ms": [s * 1e3 for s in c.samples],
                "memory": memory[c.key],
            }
            for c in candidates
        },
        "ratios": ratios,
        "max_abs_diff_vs_gcsam": deltas,
    }
    if is_target:
        result["targets"] = {
            label: {
                "value": ratios[label],
                "limit": limit,
                "verdict": verdict(ratios[label], limit),
            }
            for label, limit in targets.items()
        } | {
            "extra memory": {
                "value": extra,
                "limit": TARGET_EXTRA_MEMORY,
                "verdict": verdict(extra, TARGET_EXTRA_MEMORY),
            }
        }

    if args.profile and "gcsam" in medians:
        result["profile"] = print_profile(candidates, medians, weights, grads, param_bytes, args)
    return result


def print_profile(
    candidates: list[Candidate],
    medians: dict[str, float],
    weights: list[Tensor],
    grads: list[Tensor],
    param_bytes: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Print GCSAM's phase breakdown, the what-if alternatives and a profiler table."""
    gc = next(c for c in candidates if c.key == "gcsam")
    meter = BusyMeter()
    phases, alternatives = phase_breakdown(gc, weights, grads, iters=max(10, 2 * args.repeats))
    others = meter.other_cores()
    total = sum(phases.values())
    print(
        f"\nGCSAM phases (replica, median of each): sum {total * 1e3:.2f} ms; measured GCSAM "
        f"step {medians['gcsam'] * 1e3:.2f} ms; base step runs with foreach="
        f"{base_foreach(gc.optimizer)}"
    )
    if others is not None:
        warning = "  WARNING: contended, timings unreliable" if others > 0.15 else ""
        print(f"other processes used {others:.2f} cores on average while timing{warning}")
    print(f"  {'phase':<40}{'ms':>8}{'share':>8}{'passes':>8}{'GB/s':>8}")
    for phase, seconds in phases.items():
        passes = PHASE_PASSES[phase]
        rate = passes * param_bytes / seconds / 1e9 if passes else None
        print(
            f"  {phase:<40}{seconds * 1e3:>8.2f}{seconds / total * 100:>7.0f}%"
            f"{passes:>8}{fmt(rate, '.1f'):>8}"
        )
    print(
        f"  ideal passes over the parameter bytes: GCSAM {sum(PHASE_PASSES.values())}, "
        f"SGD-momentum step {PHASE_PASSES['base SGD step']}"
    )
    sgd = medians.get("sgd")
    print("what-if (not in the package; same conditions, timed after the phases):")
    print(f"  {'alternative':<40}{'ms':>8}{'replaces':>10}{'saves':>8}{'GCSAM/SGD':>11}")
    projected = {}
    for name, seconds in alternatives.items():
        replaced = sum(phases[phase] for phase in ALTERNATIVES[name])
        projected[name] = medians["gcsam"] - replaced + seconds
        print(
            f"  {name:<40}{seconds * 1e3:>8.2f}{replaced * 1e3:>10.2f}"
            f"{(replaced - seconds) * 1e3:>8.2f}"
            f"{fmt(projected[name] / sgd if sgd else None):>11}"
        )
    both = medians["gcsam"] - sum(medians["gcsam"] - v for v in list(projected.values())[:2])
    print(
        f"  first two together: ~{both * 1e3:.2f} ms, GCSAM/SGD ~{fmt(both / sgd if sgd else None)}"
    )
    print("\ntorch.profiler, real GCSAM first_step + second_step (3 steps):")
    print(profiler_table(gc, weights, grads, iters=3))
    return {
        "phases_ms": {k: v * 1e3 for k, v in phases.items()},
        "alternatives_ms": {k: v * 1e3 for k, v in alternatives.items()},
        "projected_gcsam_ms": {k: v * 1e3 for k, v in projected.items()},
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keys = list(args.candidates)
    if PyOptSAM is None:
        keys = [k for k in keys if k not in PYOPT_KEYS]
    pyopt_version = getattr(pytorch_optimizer, "__version__", None) if pytorch_optimizer else None
    if pytorch_optimizer is not None and pyopt_version is None:
        from importlib.metadata import version

        pyopt_version = version("pytorch-optimizer")
    print(
        f"torch {torch.__version__}, gcsam {gcsam.__version__}, "
        f"pytorch-optimizer {pyopt_version or 'not installed (skipped)'}; "
        f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}"
    )
    print(
        "CPU fp32, fixed gradients; weights and .grad reset with _foreach_copy_ outside the "
        "timed region; ms = median over rounds of the per-round minimum; spread = "
        "(max - min) / median of the round medians; memory as multiples of parameter bytes "
        "(state held: beyond SGD's momentum buffers, between the two steps; after: once the step "
        "is done; peak tmp: peak of bytes allocated during one step and still live, at operator "
        "granularity, transient state included)"
    )
    results = {
        "torch": torch.__version__,
        "gcsam": gcsam.__version__,
        "pytorch_optimizer": pyopt_version,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "models": {},
    }
    start = time.perf_counter()
    for name in args.models:
        results["models"][name] = bench_model(name, keys, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
