"""How close the landscape and eigenvalue code comes to the cost of its unavoidable work.

    python benchmarks/sharpness.py            # about 2 minutes on 2 CPU cores
    python benchmarks/sharpness.py --quick    # about 20 seconds

Measured side by side in one process, interleaved over rounds, medians reported:

1. A ``grid x grid`` loss landscape (``gcsam.landscape.plane``) against ``grid**2`` plain
   evaluation passes (forward only, no autograd, eval mode) over the same batches.
   Target: <= 1.1x (no waste beyond the forward passes).
2. ``gcsam.sharpness.top_eigenvalues`` against one Hessian-vector product's time multiplied by
   the number of products it used. Target: <= 1.2x (Lanczos bookkeeping is cheap).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

from gcsam import landscape, sharpness
from gcsam.models import build_model


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def plain_passes(model: torch.nn.Module, batches: list, count: int) -> None:
    """``count`` evaluation passes over ``batches``: the work a landscape cannot avoid."""
    model.eval()
    with torch.no_grad():
        for _ in range(count):
            for x, y in batches:
                logits = model(x)
                F.cross_entropy(logits, y)
                (logits.argmax(1) == y).sum()


def main() -> None:
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
    args = parser.parse_args()
    if args.quick:
        args.grid, args.samples, args.rounds = 11, 128, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 10, 3, 32, width=args.width).eval()
    data = torch.randn(args.samples, 3, 32, 32)
    labels = torch.randint(0, 10, (args.samples,))
    batches = list(zip(data.split(128), labels.split(128), strict=True))
    points = args.grid**2
    print(
        f"{args.model} width {args.width}, {args.samples} samples of 3x32x32, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )

    plane_s, plain_s, eig_s, hvp_s, hvp_counts = [], [], [], [], []
    vector = [torch.randn_like(p) for p in model.parameters()]
    for _ in range(args.rounds):
        plane_s.append(
            timed(lambda: landscape.plane(model, F.cross_entropy, batches, grid=args.grid))[0]
        )
        plain_s.append(timed(lambda: plain_passes(model, batches, points))[0])
        seconds, found = timed(
            lambda: sharpness.top_eigenvalues(model, F.cross_entropy, batches, max_iter=20)
        )
        eig_s.append(seconds)
        hvp_counts.append(found.hvp_count)
        hvp_s.append(
            timed(
                lambda: sharpness.hessian_vector_product(model, F.cross_entropy, batches, vector)
            )[0]
        )

    plane, plain = statistics.median(plane_s), statistics.median(plain_s)
    eig, hvp = statistics.median(eig_s), statistics.median(hvp_s)
    hvps = statistics.median(hvp_counts)
    rows = [
        (f"{args.grid}x{args.grid} landscape", plane, f"{points} plain passes", plain, 1.1),
        (f"top eigenvalue ({hvps:.0f} HVPs)", eig, f"{hvps:.0f} x one HVP", hvps * hvp, 1.2),
    ]
    print(f"{'measure':<30} {'s':>8}   {'unavoidable work':<22} {'s':>8}  ratio  target")
    for name, seconds, baseline_name, baseline, target in rows:
        ratio = seconds / baseline
        verdict = "PASS" if ratio <= target else "MISS"
        print(
            f"{name:<30} {seconds:8.2f}   {baseline_name:<22} {baseline:8.2f}  "
            f"{ratio:5.2f}  <= {target} {verdict}"
        )


if __name__ == "__main__":
    main()
