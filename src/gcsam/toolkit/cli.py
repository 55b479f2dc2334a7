"""The ``gcsam`` command: train and compare Adam, SAM and GCSAM on real data, measure flatness.

Parsing and dispatch only: the work is in :mod:`~gcsam.toolkit.trainer`,
:mod:`~gcsam.toolkit.compare`, :mod:`~gcsam.toolkit.measure` and :mod:`~gcsam.toolkit.report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compare import DEFAULT_OPTIMIZERS, DEFAULT_SEEDS, compare
from .config import TrainConfig
from .flags import add_training_flags, registry_help, settings
from .measure import run_landscapes, run_sharpness
from .report import (
    format_report,
    format_sharpness,
    load_runs,
    summarize,
    write_report,
    write_sharpness,
)
from .rundir import read_run_config
from .trainer import train
from .world import worker_prefix

_EPILOG_TRAIN = """\
examples:
  gcsam train                                         # GCSAM(Adam) on digits, small CNN
  gcsam train --optimizer sam --base sgd --lr 0.05 --epochs 30 --out runs/sam-sgd
  gcsam train --dataset fashion-mnist --model resnet18 --width 0.25 --epochs 10
  gcsam train --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet18
  gcsam train --dataset image-folder --data-dir ~/data/Dataset_BUSI_with_GT \\
              --classes benign malignant --image-size 128
  gcsam train --config my-run.yaml --seed 3           # flags override the file
  gcsam train --out runs/x --resume                   # continue a stopped run
"""

_EPILOG_COMPARE = """\
examples:
  gcsam compare                                       # adam, sam, gcsam x 3 seeds on digits
  gcsam compare --optimizers sgd sam gcsam --base sgd --lr 0.05
  gcsam compare --dataset fashion-mnist --epochs 10 --seeds 0 1 2 --out runs/fmnist
  gcsam compare --preset paper-bus --data-dir ~/data/BUSI --device cuda

Runs land in OUT/<optimizer>-seed<k>/; running the same command again resumes unfinished runs
and skips finished ones. The report (report.md, report.csv, learning_curves.png,
test_metrics.png) is written to OUT.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcsam",
        description="Train and compare Adam, SAM and GCSAM (gradient-centralized SAM).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'gcsam COMMAND --help' for the settings and examples of each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    train = commands.add_parser(
        "train",
        help="train one run",
        epilog=_EPILOG_TRAIN + "\n" + registry_help(),
        formatter_class=formatter,
        argument_default=argparse.SUPPRESS,
    )
    add_training_flags(train)
    train.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run directory (runs/<dataset>-<model>-<optimizer>-seed<k>)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    compare = commands.add_parser(
        "compare",
        help="train several optimizers over several seeds and report (the main job)",
        epilog=_EPILOG_COMPARE + "\n" + registry_help(),
        formatter_class=formatter,
        argument_default=argparse.SUPPRESS,
    )
    compare.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help=f"registered optimizers (listed below); default: {' '.join(DEFAULT_OPTIMIZERS)}",
    )
    compare.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help=f"default: {' '.join(map(str, DEFAULT_SEEDS))}",
    )
    add_training_flags(compare)
    compare.add_argument(
        "--out", metavar="DIR", help="output folder (runs/compare-<dataset>-<model>)"
    )
    compare.add_argument("--no-plots", action="store_true", help="write the tables only")
    compare.add_argument(
        "--sharpness",
        action="store_true",
        help="add each final model's top Hessian eigenvalue, trace and SAM sharpness",
    )
    compare.add_argument("--quiet", action="store_true", help="no progress bars")

    report = commands.add_parser(
        "report",
        help="rebuild the comparison report from finished runs",
        formatter_class=formatter,
        epilog="examples:\n  gcsam report runs/compare-digits-small-cnn\n"
        "  gcsam report runs/a runs/b --out reports/ab",
    )
    report.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding them"
    )
    report.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: the single folder given, else ./gcsam-report)",
    )
    report.add_argument(
        "--reference", default="gcsam", help="optimizer the paired tests compare against (gcsam)"
    )
    report.add_argument("--no-plots", action="store_true", help="write the tables only")

    resume = commands.add_parser(
        "resume",
        help="continue a stopped run",
        formatter_class=formatter,
        epilog="example:\n  gcsam resume runs/digits-small-cnn-gcsam-seed0",
    )
    resume.add_argument("run_dir", metavar="RUN_DIR")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_sharpness_parser(commands)
    _add_landscape_parser(commands)
    return parser


def _add_measure_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="data the loss is measured on (train)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=1000,
        metavar="N",
        help="first N examples of the split (1000; 0 = all)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random probes (0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sharpness_parser(commands: Any) -> None:
    sharp = commands.add_parser(
        "sharpness", help="measure the flatness of finished runs (Hessian, SAM sharpness)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gcsam sharpness runs/compare-digits-small-cnn/*-seed0\n"
        "  gcsam sharpness runs/x --top-k 3 --trace-samples 200 --m 128 --density\n\n"
        "Writes RUN_DIR/sharpness.json for each run and prints a table. Sharpness is measured\n"
        "on the final (best-on-validation) weights, in eval mode, on --split.",
    )  # fmt: skip
    _add_measure_data_flags(sharp)
    sharp.add_argument("--top-k", type=int, default=1, help="Hessian eigenvalues to find (1)")
    sharp.add_argument("--max-iter", type=int, default=50, help="Lanczos iterations at most (50)")
    sharp.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative tolerance")
    sharp.add_argument(
        "--trace-samples",
        type=int,
        default=50,
        help="Hutchinson probes for the trace (50; 0 = skip)",
    )
    sharp.add_argument("--rho", type=float, default=0.05, help="SAM sharpness radius (0.05)")
    sharp.add_argument("--adaptive", action="store_true", help="ASAM-style (scale-invariant) ball")
    sharp.add_argument("--ascent-steps", type=int, default=5, help="ascent steps in the ball (5)")
    sharp.add_argument("--m", type=int, help="also m-sharpness over chunks of M examples")
    sharp.add_argument("--density", action="store_true", help="also the spectral density (SLQ)")
    sharp.add_argument("--out", metavar="DIR", help="also write sharpness.md and .csv here")


def _add_landscape_parser(commands: Any) -> None:
    scape = commands.add_parser(
        "landscape", help="draw loss landscapes of finished runs (Li et al. 2018)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gcsam landscape runs/compare-digits-small-cnn/*-seed0\n"
        "  gcsam landscape runs/a runs/b --dim 1 --span 0.5 --grid 41\n"
        "  gcsam landscape runs/cmp/adam-seed0 runs/cmp/gcsam-seed0 --between\n\n"
        "Per run: RUN_DIR/landscape-2d.npz (+ .json, contour and surface PNGs); for several\n"
        "runs, side-by-side figures on one colour scale in --out, like the paper's Figure 3.\n"
        "Directions are random, filter-normalized and seeded, the same for every run.",
    )  # fmt: skip
    _add_measure_data_flags(scape)
    scape.add_argument("--dim", type=int, choices=(1, 2), default=2, help="a line or a plane (2)")
    scape.add_argument("--grid", type=int, default=21, help="points per axis (21)")
    scape.add_argument("--span", type=float, default=1.0, help="coordinates in [-span, span] (1)")
    scape.add_argument(
        "--normalization", choices=("filter", "layer", "none"), default="filter",
        help="direction scaling (filter, Li et al.)",
    )  # fmt: skip
    scape.add_argument(
        "--ignore-1d", choices=("zero", "keep"), default="zero",
        help="biases and norm scales: no move (zero) or filter-normalized (keep)",
    )  # fmt: skip
    scape.add_argument(
        "--between", action="store_true", help="interpolate linearly between exactly two runs"
    )
    scape.add_argument("--out", metavar="DIR", help="where the comparison figures go")


def _run_train(args: argparse.Namespace) -> int:

    values, _ = settings(args, set())
    cfg = TrainConfig(**values)
    resolved = cfg.resolved()
    out = Path(
        getattr(args, "out", None)
        or f"runs/{resolved.dataset}-{resolved.model}-{resolved.optimizer}-seed{resolved.seed}"
    )
    resume = getattr(args, "resume", False)
    if resume:
        cfg = read_run_config(out)
    summary = train(cfg, out, resume=resume, progress=_progress(args))
    _print_summary(out, summary)
    return 0


def _run_resume(args: argparse.Namespace) -> int:

    cfg = read_run_config(args.run_dir)
    summary = train(cfg, args.run_dir, resume=True, progress=_progress(args))
    _print_summary(Path(args.run_dir), summary)
    return 0


def _run_compare(args: argparse.Namespace) -> int:

    values, command = settings(args, {"optimizers", "seeds"})
    out = getattr(args, "out", None)
    data = compare(
        values,
        optimizers=command.get("optimizers", DEFAULT_OPTIMIZERS),
        seeds=command.get("seeds", DEFAULT_SEEDS),
        out_dir=out,
        plots=not getattr(args, "no_plots", False),
        sharpness=getattr(args, "sharpness", False),
        progress=_progress(args),
    )
    if data:
        print(data)
    return 0


def _max_samples(args: argparse.Namespace) -> int | None:
    if args.max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0, got {args.max_samples}")
    return args.max_samples or None


def _run_sharpness(args: argparse.Namespace) -> int:

    records = [
        run_sharpness(
            run,
            split=args.split,
            max_samples=_max_samples(args),
            batch_size=args.batch_size,
            top_k=args.top_k,
            max_iter=args.max_iter,
            tol=args.tol,
            trace_samples=args.trace_samples,
            rho=args.rho,
            adaptive=args.adaptive,
            ascent_steps=args.ascent_steps,
            m=args.m,
            density=args.density,
            seed=args.seed,
            progress=_progress(args),
        )
        for run in args.runs
    ]
    print(format_sharpness(records))
    if args.out:
        paths = write_sharpness(records, args.out)
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_landscape(args: argparse.Namespace) -> int:

    written = run_landscapes(
        args.runs,
        dim=args.dim,
        grid=args.grid,
        span=args.span,
        split=args.split,
        max_samples=_max_samples(args),
        batch_size=args.batch_size,
        seed=args.seed,
        normalization=args.normalization,
        ignore_1d=args.ignore_1d,
        between=args.between,
        out_dir=args.out,
        progress=_progress(args),
    )
    print("wrote\n  " + "\n  ".join(str(p) for p in written.values()))
    return 0


def _run_report(args: argparse.Namespace) -> int:

    out = (
        Path(args.out)
        if args.out
        else Path(args.runs[0])
        if len(args.runs) == 1
        else Path("gcsam-report")
    )
    data = summarize(load_runs(args.runs), reference=args.reference)
    paths = write_report(data, out, plots=not args.no_plots)
    print(format_report(data))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _progress(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "quiet", False) else None


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    test = summary["test"]
    line = (
        f"{worker_prefix()}{summary['optimizer']} seed {summary['seed']}: "
        f"test accuracy {100 * test['accuracy']:.2f}% "
        f"(balanced {100 * test['balanced_accuracy']:.2f}%, F1 {100 * test['f1']:.2f}%), "
        f"best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
        f"{summary['total_time_s']:.1f} s -> {run_dir}\n"
    )
    # One write per line: torchrun's workers share stdout, and print() writes the text and the
    # newline separately, so lines of two workers could run together.
    sys.stdout.write(line)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        runner = {
            "train": _run_train,
            "compare": _run_compare,
            "report": _run_report,
            "resume": _run_resume,
            "sharpness": _run_sharpness,
            "landscape": _run_landscape,
        }[args.command]
        return runner(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"gcsam: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gcsam: interrupted; continue with 'gcsam resume RUN_DIR'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
