"""GPU benchmark: GCSAM's whole training step, its optimizer work, memory and syncs, on one GPU.

    python benchmarks/gpu.py                          # one GPU: meant for under 5 minutes
    python benchmarks/gpu.py --no-compile --json gpu.json
    python benchmarks/gpu.py --quick --device cpu     # smoke test, well under a minute

CIFAR-sized synthetic batches (3x32x32, 10 classes, batch 128, fixed and cycled) on the toolkit's
ResNet-18, ResNet-50 and ViT (``gcsam.toolkit.models``), BatchNorm in training mode, in three
configurations: fp32; bf16 autocast of the forward with channels_last weights and inputs
("bf16"); and the bf16 one with the model under ``torch.compile`` ("bf16+compile", skipped by
``--no-compile``; run after every eager measurement, so that a time limit cuts compilation
first). What is measured, per model:

  whole step     forward + backward + optimizer, written as a user writes it (the loop of
                 cheap_modes.py, whose candidates, pass counters, summary and table this reuses):
                 the base optimizer (SGD with momentum, lr 0.05, as cheap_modes.py), GCSAM's full
                 step, and GCSAM with Periodic(every=5), LookSAM(every=5), MomentumAscent(),
                 AdaptiveAscent() and AscentFraction(0.5), and the base again (the noise check).
                 Every round runs each candidate for a block of 5 steps, interleaved and rotated
                 (the harness of _harness.py); the device is synchronized before a block and its
                 queued work waited for after it (torch.cuda.synchronize, at those boundaries
                 only). "x base" is the median over rounds of the block time over the base's
                 block time in that round; "ideal" the passes the mode promises (2.00 for the full
                 step: its floor, as it runs two forward/backward passes).
                 Under torch.compile, AscentFraction is left out: its half-batch pass would
                 compile the model a second time.
  optimizer      first_step + second_step with gradients already in .grad (weights and .grad
                 reset, untimed, before each iteration; optimizer_step.py's candidates), in ms
                 per step, against plain SGD-momentum's step and against pytorch-optimizer's
                 SAM(params, SGD, rho, adaptive=False, use_gc=True), with its foreach path and
                 with its default; fp32 parameters (autocast does not change them).
  memory         peak memory of a step over the base optimizer's, in copies of the parameters:
                 (max_memory_allocated over 5 steps of the candidate - the base's) /
                 parameter bytes, each candidate built and measured alone after 5 warm-up
                 steps (the claim for the full step: 1.00, the backup of w). CUDA only.
  syncs          host-device synchronizations per step, counted as the warnings of
                 torch.cuda.set_sync_debug_mode("warn") over 5 steps after the timing. CUDA only.

On the CPU, memory and syncs print n/a. ``--quick`` shrinks everything (batch 4, width 0.125,
1 round, no warm-up but the compiling one, one CPU thread) and compiles with the "eager"
backend (Dynamo only: it checks the code path; its times are not compiled ones). cuDNN
autotuning is on (fixed shapes); TF32 is left at torch's defaults (printed in the header).
``--json`` is rewritten after every configuration, so a run cut short keeps what it measured;
a model that torch.compile fails on is reported (traceback on stderr, "compile_failures" in the
JSON), the others still run, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import optimizer_step
import torch
from _harness import (
    BusyMeter,
    Run,
    busy_line,
    fmt,
    interleave,
    iterations_per_round,
    machine_info,
    machine_line,
    ratio,
    warm_up,
    write_json,
)
from _models import Problem
from cheap_modes import (
    BASES,
    NUM_CLASSES,
    RHO,
    Candidate,
    make_batches,
    print_table,
    summarize,
    time_blocks,
)
from optimizer_step import PYOPT_KEYS, PyOptSAM
from torch import Tensor, nn
from torch.optim import Optimizer

import gcsam
from gcsam.toolkit.models import MODELS, build_model

EVERY = 5  # k of Periodic and LookSAM; also the steps per timed block
BASE = "sgd"  # cheap_modes.py's SGD-momentum base
DEFAULT_MODELS = ("resnet18", "resnet50", "vit")
OPTIMIZER_KEYS = ("sgd", "gcsam", "sam", "pyopt", "pyopt_default")  # of optimizer_step.py
SYNC_WARNING = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says
COMPILE_SKIPS = {"fraction"}  # its half-batch pass would compile a second graph


@dataclass(frozen=True)
class Spec:
    """One whole-step candidate: its key (cheap_modes.py's), label, promised passes per step and
    mode (``"base"``: the base optimizer alone; ``None``: GCSAM's full step)."""

    key: str
    label: str
    ideal_passes: float | None
    mode: Any


BASE_LABEL = BASES[BASE][0]
SPECS = (
    Spec("base", f"{BASE_LABEL} (base)", 1.0, "base"),
    Spec("gcsam", "GCSAM full (every step)", 2.0, None),
    Spec("periodic", f"GCSAM Periodic(every={EVERY})", 1 + 1 / EVERY, gcsam.Periodic(every=EVERY)),
    Spec("looksam", f"GCSAM LookSAM(every={EVERY})", 1 + 1 / EVERY, gcsam.LookSAM(every=EVERY)),
    Spec("momentum", "GCSAM MomentumAscent()", 1.0, gcsam.MomentumAscent()),
    Spec("adaptive", "GCSAM AdaptiveAscent()", None, gcsam.AdaptiveAscent()),
    Spec("fraction", "GCSAM AscentFraction(0.5)", 1.5, gcsam.AscentFraction(0.5)),
    Spec("control", f"{BASE_LABEL} again (noise check)", 1.0, "base"),
)


@dataclass(frozen=True)
class Config:
    """Numerics of the forward: bf16 autocast with channels_last, and torch.compile."""

    name: str
    bf16: bool
    compiled: bool


CONFIGS = (Config("fp32", False, False), Config("bf16", True, False))
COMPILED = Config("bf16+compile", True, True)


class Autocast(nn.Module):
    """``model`` with its forward under bf16 autocast on ``device_type``; fp32 logits."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


@dataclass
class Bench:
    """What every measurement of one run shares: device, sizes, the compile backend."""

    device: torch.device
    batch: int
    width: float
    rounds: int
    warmup: int  # untimed blocks before the rounds (at least 1 under torch.compile)
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (nothing on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def synced(self, block: Run, steps: int) -> Run:
        """A block of ``steps`` steps (a run returning its mean seconds per step, timed on the
        host) with the device synchronized before it and the wait for its queued work counted."""

        def run() -> float:
            self.sync()
            seconds = block() * steps
            start = time.perf_counter()
            self.sync()
            return (seconds + time.perf_counter() - start) / steps

        return run

    def syncs_per_step(self, step: Callable[[], None], steps: int = EVERY) -> float | None:
        """Host-device synchronizations per call of ``step`` over ``steps`` calls (None on the
        CPU)."""
        if not self.cuda:
            return None
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum(SYNC_WARNING in str(w.message) for w in caught) / steps

    def peak_bytes(self, build: Callable[[], Candidate], steps: int = EVERY) -> int | None:
        """Peak bytes allocated on the device over ``steps`` steps of a freshly built candidate,
        after ``steps`` warm-up steps (None on the CPU)."""
        if not self.cuda:
            return None
        candidate = build()
        for _ in range(steps):
            candidate.step()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        for _ in range(steps):
            candidate.step()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        del candidate
        release_memory()
        return peak


def release_memory() -> None:
    """Free what nothing references any more, and the allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_candidate(
    spec: Spec, template: nn.Module, batches: list[tuple[Tensor, Tensor]], cfg: Config, b: Bench
) -> Candidate:
    """``spec``'s optimizer on its own copy of ``template``, on the device, in ``cfg``."""
    model = copy.deepcopy(template).to(b.device)
    if cfg.bf16:
        model = model.to(memory_format=torch.channels_last)
    _, base_cls, base_kwargs = BASES[BASE]
    if spec.mode == "base":
        optimizer: Optimizer = base_cls(model.parameters(), **base_kwargs)
    else:
        optimizer = gcsam.GCSAM(model.parameters(), base_cls, RHO, mode=spec.mode, **base_kwargs)
    forward: nn.Module = Autocast(model, b.device.type) if cfg.bf16 else model
    if cfg.compiled:
        forward = torch.compile(forward, backend=b.compile_backend)
    return Candidate(spec.key, spec.label, spec.ideal_passes, forward, optimizer, batches)


def device_batches(b: Bench, cfg: Config) -> list[tuple[Tensor, Tensor]]:
    """cheap_modes.py's fixed synthetic batches, on the device (channels_last for bf16)."""
    shape = argparse.Namespace(batch=b.batch, channels=3, image_size=32)
    layout = torch.channels_last if cfg.bf16 else torch.contiguous_format
    return [(x.to(b.device, memory_format=layout), y.to(b.device)) for x, y in make_batches(shape)]


def whole_steps(name: str, template: nn.Module, cfg: Config, b: Bench) -> dict[str, Any]:
    """Time, count and measure every candidate's whole training step in ``cfg``; print the
    tables; return the rows (cheap_modes.py's, plus syncs and memory)."""
    specs = [s for s in SPECS if not (cfg.compiled and s.key in COMPILE_SKIPS)]
    batches = device_batches(b, cfg)
    param_bytes = sum(p.numel() * p.element_size() for p in template.parameters())
    peaks: dict[str, int | None] = {}
    if not cfg.compiled:
        release_memory()
        for spec in specs:
            peaks[spec.key] = b.peak_bytes(partial(make_candidate, spec, template, batches, cfg, b))
    candidates = [make_candidate(s, template, batches, cfg, b) for s in specs]
    runs = {c.key: b.synced(c.block(EVERY), EVERY) for c in candidates}
    start = time.perf_counter()
    warmup = max(b.warmup, 1) if cfg.compiled else b.warmup
    timings, others = time_blocks(candidates, runs, warmup=warmup, rounds=b.rounds)
    rows = summarize(candidates, timings, b.rounds * EVERY, EVERY)
    for c in candidates:
        peak, base_peak = peaks.get(c.key), peaks.get("base")
        overhead = None if peak is None or base_peak is None else (peak - base_peak) / param_bytes
        rows[c.key]["peak_memory_over_base"] = overhead
        rows[c.key]["syncs_per_step"] = b.syncs_per_step(c.step)
    elapsed = time.perf_counter() - start
    compiled = f", torch.compile (backend {b.compile_backend})" if cfg.compiled else ", eager"
    print(
        f"\n-- {name}, {cfg.name}{compiled}: whole steps; rounds {b.rounds} x {EVERY} steps per "
        f"candidate after {warmup} untimed ({elapsed:.0f} s) --"
    )
    print(busy_line(others))
    print_table(rows)
    if not b.cuda:
        print("syncs per step, peak memory over the base: n/a on the CPU")
        return {"other_processes_cores": others, "seconds": elapsed, "rows": rows}
    print(f"  {'':<32}{'syncs/step':>11}{'peak memory over base (param copies)':>38}")
    for row in rows.values():
        memory = row["peak_memory_over_base"]
        print(
            f"  {row['label']:<32}{fmt(row['syncs_per_step']):>11}"
            f"{'n/a' if memory is None else f'{memory:.2f}':>38}"
        )
    return {"other_processes_cores": others, "seconds": elapsed, "rows": rows}


def optimizer_work(name: str, template: nn.Module, b: Bench, quick: bool) -> dict[str, Any]:
    """Time the optimizer's own work with fixed gradients (optimizer_step.py's candidates, on
    the device); print its table; return ms, ratios and syncs per step."""
    torch.manual_seed(0)
    weights = [p.detach().to(b.device) for p in copy.deepcopy(template).parameters()]
    problem = Problem(name, weights, [torch.randn_like(w).mul_(1e-2) for w in weights])
    keys = [k for k in OPTIMIZER_KEYS if PyOptSAM is not None or k not in PYOPT_KEYS]
    candidates = optimizer_step.make_candidates(keys, problem)

    def timed(c: optimizer_step.Candidate) -> Run:
        def run() -> float:
            c.reset(problem)
            b.sync()
            start = time.perf_counter()
            c.step()
            b.sync()
            return time.perf_counter() - start

        return run

    runs = {c.key: timed(c) for c in candidates}
    with torch.no_grad():
        warm_up(runs.values())
        iters = iterations_per_round(runs, 0.1 if quick else 0.5, 3 if quick else 20)
        meter = BusyMeter()
        timings = interleave(runs, b.rounds, iters)
        others = meter.other_cores()
        syncs = {}
        for c in candidates:
            c.reset(problem)
            syncs[c.key] = b.syncs_per_step(c.step)
    medians = {key: t.median for key, t in timings.items()}
    print(
        f"\n-- {name}: optimizer work alone, fp32 parameters, fixed gradients, rounds {b.rounds} "
        f"x {iters} iterations --"
    )
    print(busy_line(others))
    print(f"  {'optimizer':<46}{'ms':>8}{'spread':>8}{'x SGD':>8}{'GCSAM/it':>10}{'syncs':>7}")
    for c in candidates:
        t = timings[c.key]
        print(
            f"  {c.label:<46}{t.median * 1e3:>8.3f}{t.spread * 100:>7.0f}%"
            f"{fmt(ratio(medians, c.key, 'sgd')):>8}{fmt(ratio(medians, 'gcsam', c.key)):>10}"
            f"{fmt(syncs[c.key], '.1f'):>7}"
        )
    return {
        "other_processes_cores": others,
        "iters_per_round": iters,
        "candidates": {
            c.key: {"label": c.label, **timings[c.key].as_json(), "syncs_per_step": syncs[c.key]}
            for c in candidates
        },
        "ratios": {
            "GCSAM / SGD-step": ratio(medians, "gcsam", "sgd"),
            "SAM / SGD-step": ratio(medians, "sam", "sgd"),
            "GCSAM / pytorch-optimizer (foreach=True)": ratio(medians, "gcsam", "pyopt"),
            "GCSAM / pytorch-optimizer (default)": ratio(medians, "gcsam", "pyopt_default"),
        },
    }


def build_template(name: str, width: float) -> nn.Module:
    """The toolkit's model ``name`` for 3x32x32 inputs and 10 classes, seeded, on the CPU."""
    torch.manual_seed(0)
    return build_model(name, NUM_CLASSES, 3, 32, width=width)


def describe(name: str, template: nn.Module) -> str:
    params = list(template.parameters())
    numel = sum(p.numel() for p in params)
    return (
        f"{name}: {numel / 1e6:.2f} M parameters, {len(params)} tensors, "
        f"{numel * 4 / 2**20:.1f} MiB fp32"
    )


def print_summary(results: dict[str, Any]) -> None:
    """Every configuration's whole-step ratios side by side, with GCSAM's memory and syncs and
    the optimizer-alone ratios."""
    keys = [s.key for s in SPECS]
    print(
        "\nsummary: whole step x the base optimizer's (full step floor 2.00); GCSAM full: "
        "peak memory over base in parameter copies, syncs per step; optimizer work alone"
    )
    print(
        f"{'model':<10}{'config':<14}"
        + "".join(f"{k:>9}" for k in keys)
        + f"{'mem':>6}{'syncs':>6}{'opt/SGD':>9}{'opt/pyopt':>10}"
    )
    for name, entry in results["models"].items():
        ratios = entry["optimizer"]["ratios"]
        optimizer_cells = (
            f"{fmt(ratios['GCSAM / SGD-step']):>9}"
            f"{fmt(ratios['GCSAM / pytorch-optimizer (foreach=True)']):>10}"
        )
        for cfg, config in entry["configs"].items():
            rows = config["rows"]
            cells = "".join(
                f"{fmt(rows[k]['ratio_to_base'], '.3f') if k in rows else '-':>9}" for k in keys
            )
            print(
                f"{name:<10}{cfg:<14}{cells}{fmt(rows['gcsam']['peak_memory_over_base']):>6}"
                f"{fmt(rows['gcsam']['syncs_per_step'], '.1f'):>6}{optimizer_cells}"
            )
            optimizer_cells = ""  # once per model


def header(b: Bench) -> dict[str, Any]:
    """Print and return the versions, device, commit and settings of this run."""
    info = machine_info()
    info["device"] = torch.cuda.get_device_name(b.device) if b.cuda else "cpu"
    info["cuda"] = torch.version.cuda
    info["tf32"] = {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
    }
    print(machine_line(info))
    print(
        f"device {info['device']} (CUDA {info['cuda'] or 'n/a'}); "
        f"TF32 matmul {info['tf32']['matmul']}, cuDNN {info['tf32']['cudnn']}"
    )
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(
        f"batch {b.batch} x 3x32x32 synthetic, {NUM_CLASSES} classes, model width {b.width}; base "
        f"{BASE_LABEL} {BASES[BASE][2]}; rho {RHO}; k = {EVERY}"
    )
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(cuda)")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(DEFAULT_MODELS),
        help=f"toolkit models ({' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (128; quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (10; quick 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 4, width 0.125, 1 round, no warm-up, 1 CPU thread",
    )
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    args = parser.parse_args(argv)
    for option, quick, full in (("batch", 4, 128), ("rounds", 1, 10)):
        if getattr(args, option) is None:
            setattr(args, option, quick if args.quick else full)
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be positive, got {getattr(args, option)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device: run on a GPU machine or pass --device cpu", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.quick:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier
    b = Bench(
        device=torch.device(args.device),
        batch=args.batch,
        width=0.125 if args.quick else 1.0,
        rounds=args.rounds,
        warmup=0 if args.quick else 2,
        compile_backend="eager" if args.quick else "inductor",
    )
    results: dict[str, Any] = {"machine": header(b), "command": sys.argv, "args": vars(args)}
    if args.quick:
        print("--quick: a smoke test of the code paths (1 round, no warm-up), not a measurement")
    results["models"] = {}
    start = time.perf_counter()

    def save() -> None:
        if args.json:
            write_json(args.json, results)

    templates = {name: build_template(name, b.width) for name in args.models}
    for name, template in templates.items():
        print(f"\n=== {describe(name, template)} ===")
        entry: dict[str, Any] = {"configs": {}}
        results["models"][name] = entry
        entry["optimizer"] = optimizer_work(name, template, b, args.quick)
        save()
        for cfg in CONFIGS:
            entry["configs"][cfg.name] = whole_steps(name, template, cfg, b)
            save()
    failures: dict[str, str] = {}  # model -> the error torch.compile raised
    results["compile_failures"] = failures
    for name, template in ({} if args.no_compile else templates).items():
        try:
            results["models"][name]["configs"][COMPILED.name] = whole_steps(
                name, template, COMPILED, b
            )
        except Exception as error:  # a compiler failure must not lose the other models' rows
            traceback.print_exc()
            failures[name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            print(f"\n-- {name}, {COMPILED.name}: torch.compile failed: {failures[name]} --")
        save()
    print_summary(results)
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s")
    save()
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
