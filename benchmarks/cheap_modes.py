"""Cheap sharpness-aware modes: step time against the base optimizer, with counted passes.

    python benchmarks/cheap_modes.py                 # about 1-2 minutes on 2 CPU cores
    python benchmarks/cheap_modes.py --quick         # a few seconds: does it run
    python benchmarks/cheap_modes.py --base adam --every 10 --json out.json

What runs: the base optimizer alone (SGD with momentum, or Adam with --base adam), full GCSAM
(the ascent every step), GCSAM with each cheap mode: Periodic(every=k), LookSAM(every=k),
MomentumAscent(), AdaptiveAscent() and AscentFraction(0.5), and a second copy of the base
optimizer (the noise check: it does the same work as the first, so its "x base" shows how far
from 1.000 noise alone moves a ratio in this run). Each trains its own copy of the same model
(same initial weights, BatchNorm in training mode, CPU fp32) on the same fixed synthetic
batches, in the same order, with the loop a user writes:

  base:                   zero_grad(); loss = cross_entropy(model(x), y); backward(); step()
  sharpness-aware (GCSAM): opt.step(closure), the closure doing zero_grad(), the forward of
                          opt.pass_batch((x, y)) under
                          gcsam.frozen_bn_stats(model, enabled=opt.descending), backward()

What is measured: the wall time of whole training steps (forward, backward, optimizer), all
optimizers interleaved in one process (the shared harness of _harness.py). Every round runs each
optimizer for a block of --steps consecutive steps, in an order that rotates from round to round,
so that noise from the machine hits all alike; warm-up blocks run first, untimed (allocator,
momentum buffers, the modes' statistics). Per optimizer:

  ms/step    median over the rounds of the block's mean step time
  spread     (max - min) / median of those block means
  x base     median over the rounds of (block time / the base optimizer's block time that
             round), the two measured side by side
  fwd, bwd   forward and backward passes per timed step in units of a whole batch, COUNTED (a
             forward hook on the model adds the rows it saw / --batch, a gradient hook on its
             output the same for the backward), not assumed; "ideal" is what the mode promises
             (1 + 1/k for Periodic and LookSAM, 1 + f for AscentFraction(f); AdaptiveAscent's
             depends on the gradients)
  x/pass     median over the rounds of (x base / the ratio of the passes counted in the two
             blocks): the cost beyond the passes themselves (the optimizer's own work and
             the closure's; 1.00 = none)
  target     the issue's targets: Periodic and LookSAM at k=5 <= 1.25x the base, MomentumAscent
             <= 1.05x, full GCSAM <= 2.05x; PASS/FAIL is informational (the script exits 0)

--steps must be a multiple of --every, so that every block of Periodic and LookSAM holds the same
number of ascent steps. Other processes on the same cores distort the timings: the line under the
header says how many cores they used while timing. On a machine shared with other work,
--threads 1 is steadier (a two-thread kernel stalls while another process holds one core).
In --json, each optimizer's "round_minima_ms" (the harness's name) holds its block means, one per
round, and "forwards_per_block" the passes counted in each of those blocks.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _harness import (
    BusyMeter,
    Run,
    Timing,
    busy_line,
    interleave,
    machine_info,
    machine_line,
    warm_up,
    write_json,
)
from torch import Tensor, nn
from torch.optim import SGD, Adam, Optimizer

import gcsam
from gcsam.toolkit.models import MODELS, build_model

RHO = 0.05
BASES: dict[str, tuple[str, type[Optimizer], dict[str, Any]]] = {
    "sgd": ("SGD-momentum", SGD, {"lr": 0.05, "momentum": 0.9}),
    "adam": ("Adam", Adam, {"lr": 1e-3}),
}
NUM_CLASSES = 10
DATA_BATCHES = 8  # distinct fixed batches, cycled
TARGET_EVERY = 5  # the Periodic and LookSAM targets are for k = 5
TARGETS = {"gcsam": 2.05, "periodic": 1.25, "looksam": 1.25, "momentum": 1.05}

Batch = tuple[Tensor, Tensor]


@dataclass
class PassCounter:
    """Forward passes of a model (a forward hook) and backward passes through its output (a
    gradient hook registered on each output that requires grad), in whole batches of
    ``batch_size`` rows: a pass over half a batch counts 0.5."""

    batch_size: int
    forwards: float = 0.0
    backwards: float = 0.0

    def attach(self, model: nn.Module) -> None:
        def on_forward(module: nn.Module, inputs: Any, output: Tensor) -> None:
            share = len(output) / self.batch_size
            self.forwards += share

            def on_backward(grad: Tensor) -> None:
                self.backwards += share

            if output.requires_grad:
                output.register_hook(on_backward)

        model.register_forward_hook(on_forward)


@dataclass
class Candidate:
    """One optimizer on its own copy of the model, stepping through the shared batches."""

    key: str
    label: str
    ideal_passes: float | None
    model: nn.Module
    optimizer: Optimizer
    batches: list[Batch]
    steps_done: int = 0
    counter: PassCounter = field(init=False)
    block_forwards: list[float] = field(default_factory=list)  # per run of block(), in order

    def __post_init__(self) -> None:
        self.counter = PassCounter(batch_size=len(self.batches[0][1]))
        self.counter.attach(self.model)
        self.model.train()

    @property
    def sharpness_aware(self) -> bool:
        return isinstance(self.optimizer, gcsam.SharpnessAwareOptimizer)

    def step(self) -> None:
        """One training step on the next batch, written the way a user writes it."""
        x, y = self.batches[self.steps_done % len(self.batches)]
        model, opt = self.model, self.optimizer
        if self.sharpness_aware:

            def closure() -> Tensor:
                opt.zero_grad()
                inputs, targets = opt.pass_batch((x, y))
                with gcsam.frozen_bn_stats(model, enabled=opt.descending):
                    loss = F.cross_entropy(model(inputs), targets)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        self.steps_done += 1

    def block(self, steps: int) -> Run:
        """A harness run: ``steps`` consecutive steps, returning the mean seconds per step."""

        def run() -> float:
            forwards = self.counter.forwards
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            seconds = time.perf_counter() - start
            self.block_forwards.append(self.counter.forwards - forwards)
            return seconds / steps

        return run


def make_candidates(args: argparse.Namespace, batches: list[Batch]) -> list[Candidate]:
    """The base optimizer and GCSAM in every mode, each on a copy of one seeded model."""
    torch.manual_seed(0)
    template = build_model(
        args.model, NUM_CLASSES, args.channels, args.image_size, width=args.width
    )
    base_name, base_cls, base_kwargs = BASES[args.base]
    k = args.every
    specs: list[tuple[str, str, float | None, Any]] = [
        ("base", f"{base_name} (base)", 1.0, "base"),
        ("gcsam", "GCSAM full (every step)", 2.0, None),
        ("periodic", f"GCSAM Periodic(every={k})", 1 + 1 / k, gcsam.Periodic(every=k)),
        ("looksam", f"GCSAM LookSAM(every={k})", 1 + 1 / k, gcsam.LookSAM(every=k)),
        ("momentum", "GCSAM MomentumAscent()", 1.0, gcsam.MomentumAscent()),
        ("adaptive", "GCSAM AdaptiveAscent()", None, gcsam.AdaptiveAscent()),
        ("fraction", "GCSAM AscentFraction(0.5)", 1.5, gcsam.AscentFraction(0.5)),
        ("control", f"{base_name} again (noise check)", 1.0, "base"),
    ]
    candidates = []
    for key, label, ideal, mode in specs:
        model = copy.deepcopy(template)
        if mode == "base":
            optimizer: Optimizer = base_cls(model.parameters(), **base_kwargs)
        else:
            optimizer = gcsam.GCSAM(model.parameters(), base_cls, RHO, mode=mode, **base_kwargs)
        candidates.append(Candidate(key, label, ideal, model, optimizer, batches))
    return candidates


def make_batches(args: argparse.Namespace) -> list[Batch]:
    """Fixed synthetic batches (normal images, uniform labels), the same for every optimizer."""
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    return [
        (
            torch.randn(shape, generator=generator),
            torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator),
        )
        for _ in range(DATA_BATCHES)
    ]


# Report ----------------------------------------------------------------------------------------


def time_blocks(
    candidates: list[Candidate],
    runs: dict[str, Callable[[], float]],
    *,
    warmup: int,
    rounds: int,
) -> tuple[dict[str, Timing], float]:
    """Warm every block up (untimed), zero the pass counters, then time ``rounds`` interleaved
    rounds; returns the timings and how many cores other processes used meanwhile."""
    warm_up(runs.values(), times=warmup)
    for c in candidates:
        c.counter.forwards = c.counter.backwards = 0
        c.block_forwards.clear()
    meter = BusyMeter()
    timings = interleave(runs, rounds)
    return timings, meter.other_cores()


def paired_ratio(timing: Timing, base: Timing, per: list[float] | None = None) -> float:
    """Median over rounds of this round's time / the base's time in the same round, each
    divided by that round's ``per`` (the passes ratio) when given."""
    per = per or [1.0] * len(timing.samples)
    pairs = zip(timing.samples, base.samples, per, strict=True)
    return statistics.median(t / b / q for t, b, q in pairs)


def target_for(key: str, every: int) -> float | None:
    if key in ("periodic", "looksam") and every != TARGET_EVERY:
        return None
    return TARGETS.get(key)


def summarize(
    candidates: list[Candidate], timings: dict[str, Timing], timed_steps: int, every: int
) -> dict[str, dict[str, Any]]:
    base = timings["base"]
    base_forwards = candidates[0].block_forwards
    rows = {}
    for c in candidates:
        ratio = paired_ratio(timings[c.key], base)
        # This round's passes over the base's: AdaptiveAscent's vary from block to block.
        passes = [f / b for f, b in zip(c.block_forwards, base_forwards, strict=True)]
        forwards = c.counter.forwards / timed_steps
        target = target_for(c.key, every)
        rows[c.key] = {
            "label": c.label,
            **timings[c.key].as_json(),
            "spread": timings[c.key].spread,
            "ratio_to_base": ratio,
            "forwards_per_step": forwards,
            "backwards_per_step": c.counter.backwards / timed_steps,
            "ideal_passes_per_step": c.ideal_passes,
            "forwards_per_block": c.block_forwards,
            "ratio_per_pass": paired_ratio(timings[c.key], base, passes),
            "target": target,
            "verdict": None if target is None else ("PASS" if ratio <= target else "FAIL"),
        }
    return rows


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'optimizer':<34}{'ms/step':>9}{'spread':>8}{'x base':>8}{'fwd':>7}{'bwd':>6}"
        f"{'ideal':>7}{'x/pass':>8}  target"
    )
    for key, row in rows.items():
        ideal = row["ideal_passes_per_step"]
        if row["target"] is not None:
            note = f"<= {row['target']:.2f}x {row['verdict']}"
        elif key in ("periodic", "looksam"):
            note = f"(target set for k={TARGET_EVERY})"
        elif key == "control":
            note = "same work as the base: its distance from 1 is noise"
        else:
            note = "-"
        print(
            f"{row['label']:<34}{row['median_ms']:>9.2f}{row['spread'] * 100:>7.0f}%"
            f"{row['ratio_to_base']:>8.3f}{row['forwards_per_step']:>7.2f}"
            f"{row['backwards_per_step']:>6.2f}{'-' if ideal is None else f'{ideal:.2f}':>7}"
            f"{row['ratio_per_pass']:>8.3f}  {note}"
        )


# Driver ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", choices=list(BASES), default="sgd", help="base optimizer (sgd)")
    parser.add_argument(
        "--model", default="small-cnn", help=f"toolkit model: {', '.join(MODELS)} (small-cnn)"
    )
    parser.add_argument("--width", type=float, default=1.0, help="model width multiplier (1)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (64; quick 32)")
    parser.add_argument("--image-size", type=int, default=32, help="square image side (32)")
    parser.add_argument("--channels", type=int, default=3, help="input channels (3)")
    parser.add_argument("--every", type=int, default=5, help="k of Periodic and LookSAM (5)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per block, a multiple of k (k)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (24; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed blocks (2; quick 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 rounds of k steps")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")
    defaults = {"batch": (32, 64), "steps": (args.every, args.every), "rounds": (2, 24)}
    defaults["warmup"] = (1, 2)
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("batch", "steps", "rounds", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {value}")
    if args.steps % args.every:
        parser.error(
            f"--steps ({args.steps}) must be a multiple of --every ({args.every}), so that every "
            "block of Periodic and LookSAM holds the same number of ascent steps"
        )
    if args.model not in MODELS:
        try:
            build_model(args.model, NUM_CLASSES, args.channels, args.image_size, width=args.width)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info))
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    batches = make_batches(args)
    candidates = make_candidates(args, batches)
    params = sum(p.numel() for p in candidates[0].model.parameters())
    print(
        f"{args.model} width {args.width} ({params / 1e3:.1f} k parameters), batch {args.batch} "
        f"x {args.channels}x{args.image_size}x{args.image_size}, CPU fp32, train mode; rho "
        f"{RHO}; {args.rounds} rounds x {args.steps} steps per optimizer, {args.warmup} warm-up "
        "blocks"
    )
    runs: dict[str, Callable[[], float]] = {c.key: c.block(args.steps) for c in candidates}

    start = time.perf_counter()
    timings, others = time_blocks(candidates, runs, warmup=args.warmup, rounds=args.rounds)
    elapsed = time.perf_counter() - start

    rows = summarize(candidates, timings, args.rounds * args.steps, args.every)
    print(busy_line(others))
    print_table(rows)
    print(f"total {elapsed:.0f} s (warm-up and timing)")
    if args.json:
        results = {
            "machine": info,
            "command": sys.argv,
            "args": vars(args),
            "other_processes_cores": others,
            "optimizers": rows,
        }
        write_json(args.json, results)


if __name__ == "__main__":
    main()
