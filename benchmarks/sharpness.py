"""How close the landscape and eigenvalue code comes to the cost of its unavoidable work.

    python benchmarks/sharpness.py            # about 2 minutes on 2 CPU cores
    python benchmarks/sharpness.py --quick    # about 20 seconds

Measured side by side in one process, interleaved over rounds, medians reported (the shared
harness of ``_harness.py``):

1. A ``grid x grid`` loss landscape (``gcsam.landscape.plane``) against ``grid**2`` plain
   evaluation passes (forward only, no autograd, eval mode) over the same batches.
   Target: <= 1.1x (no waste beyond the forward passes).
2. ``gcsam.sharpness.top_eigenvalues`` against one Hessian-vector product's time multiplied by
   the number of products it used. Target: <= 1.2x (Lanczos bookkeeping is cheap).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _harness import (
    BusyMeter,
    busy_line,
    interleave,
    machine_info,
    machine_line,
    stopwatch,
    write_json,
)

from gcsam import landscape, sharpness
from gcsam.toolkit.models import build_model

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def plain_passes(model: torch.nn.Module, batches: Batches, count: int) -> None:
    """``count`` evaluation passes over ``batches``: the work a landscape cannot avoid."""
    model.eval()
    with torch.no_grad():
        for _ in range(count):
            for x, y in batches:
                logits = model(x)
                F.cross_entropy(logits, y)
                (logits.argmax(1) == y).sum()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", help="gcsam model name (resnet18)")
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier (0.25)")
    parser.add_argument("--samples", type=int, default=256, help="examples evaluated (256)")
    parser.add_argument("--grid", type=int, default=21, help="landscape grid (21)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--quick", action="store_true", help="grid 11, 128 samples, 2 rounds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.grid, args.samples, args.rounds = 11, 128, 2
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 10, 3, 32, width=args.width).eval()
    data = torch.randn(args.samples, 3, 32, 32)
    labels = torch.randint(0, 10, (args.samples,))
    batches = list(zip(data.split(128), labels.split(128), strict=True))
    points = args.grid**2
    info = machine_info()
    print(machine_line(info))
    print(f"{args.model} width {args.width}, {args.samples} 3x32x32 samples, {args.rounds} rounds")

    vector = [torch.randn_like(p) for p in model.parameters()]
    hvp_counts: list[int] = []

    def eigenvalue() -> None:
        found = sharpness.top_eigenvalues(model, F.cross_entropy, batches, max_iter=20)
        hvp_counts.append(found.hvp_count)

    runs = {
        "landscape": stopwatch(
            lambda: landscape.plane(model, F.cross_entropy, batches, grid=args.grid)
        ),
        "plain passes": stopwatch(lambda: plain_passes(model, batches, points)),
        "top eigenvalue": stopwatch(eigenvalue),
        "one HVP": stopwatch(
            lambda: sharpness.hessian_vector_product(model, F.cross_entropy, batches, vector)
        ),
    }
    meter = BusyMeter()
    timings = interleave(runs, args.rounds)
    print(busy_line(meter.other_cores()))
    seconds = {key: timing.median for key, timing in timings.items()}
    hvps = statistics.median(hvp_counts)
    rows = [
        (f"{args.grid}x{args.grid} landscape", "landscape", f"{points} plain passes",
         seconds["plain passes"], 1.1),
        (f"top eigenvalue ({hvps:.0f} HVPs)", "top eigenvalue", f"{hvps:.0f} x one HVP",
         hvps * seconds["one HVP"], 1.2),
    ]  # fmt: skip
    print(f"{'measure':<30} {'s':>8}   {'unavoidable work':<22} {'s':>8}  ratio  target")
    results: dict[str, Any] = {"machine": info, "args": vars(args), "ratios": {}}
    for name, key, baseline_name, baseline, target in rows:
        ratio = seconds[key] / baseline
        verdict = "PASS" if ratio <= target else "MISS"
        results["ratios"][key] = {"ratio": ratio, "target": target, "verdict": verdict}
        print(
            f"{name:<30} {seconds[key]:8.2f}   {baseline_name:<22} {baseline:8.2f}  "
            f"{ratio:5.2f}  <= {target} {verdict}"
        )
    if args.json:
        results["seconds"] = {key: timing.as_json() for key, timing in timings.items()}
        write_json(args.json, results)


if __name__ == "__main__":
    main()
