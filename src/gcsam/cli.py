"""The ``gcsam`` command: train and compare Adam, SAM and GCSAM on real data."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

_DATA_HELP = (
    "digits (scikit-learn's bundled 8x8 digits, the default), mnist, fashion-mnist (IDX files; "
    "default folder /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist), "
    "cifar10, cifar100 (the official python or binary archives, extracted), a MedMNIST name "
    "such as breastmnist or pneumoniamnist (<data-dir>/<name>.npz), or image-folder "
    "(<data-dir>/<class>/*.png, the BUSI and COVID-19 radiography layouts)"
)


def _flag_specs() -> list[tuple[str, dict[str, Any]]]:
    """(TrainConfig field, argparse options) for every training flag."""
    from .data import DATASETS
    from .models import MODELS
    from .training import (
        AMP_MODES,
        AUGMENTATIONS,
        BASES,
        OPTIMIZERS,
        SCHEDULES,
        SELECT_BY,
    )

    return [
        ("dataset", dict(choices=DATASETS, metavar="NAME", help=_DATA_HELP)),
        ("data_dir", dict(metavar="DIR", help="where the data set's files are")),
        ("image_size", dict(type=int, metavar="PX", help="resize images to PX x PX")),
        (
            "classes",
            dict(nargs="+", metavar="CLASS", help="keep only these classes (image folders)"),
        ),
        (
            "val_fraction",
            dict(type=float, help="validation share when there is no official split (0.1)"),
        ),
        (
            "test_fraction",
            dict(type=float, help="test share when there is no official split (0.2)"),
        ),
        ("folds", dict(type=int, help="k-fold cross-validation: number of folds")),
        ("fold", dict(type=int, help="which fold is the validation split (0-based)")),
        (
            "model",
            dict(
                choices=MODELS,
                help="small-cnn (default), resnet18, resnet20, resnet50, vgg16, wrn, vit",
            ),
        ),
        (
            "width",
            dict(type=float, help="channel width multiplier (1.0; resnet18 at 0.25 = width 16)"),
        ),
        ("depth", dict(type=int, help="depth of resnet20 (6n+2), wrn (6n+4) or vit (blocks)")),
        ("widen_factor", dict(type=int, metavar="K", help="WideResNet widening factor (8)")),
        ("patch_size", dict(type=int, metavar="PX", help="ViT patch size")),
        ("dropout", dict(type=float, help="dropout before the classifier (0)")),
        (
            "optimizer",
            dict(
                choices=OPTIMIZERS,
                help="sgd, adam, adamw, gc-sgd, gc-adam, gc-adamw (GC alone), sam, asam, "
                "gcsam (default)",
            ),
        ),
        ("base", dict(choices=BASES, help="base optimizer of sam/asam/gcsam (adam)")),
        ("rho", dict(type=float, help="SAM radius (0.05; asam 0.5)")),
        (
            "normalize_by",
            dict(
                choices=("centralized", "raw"),
                help="GCSAM: 'centralized' is the paper's formula (default), 'raw' the "
                "authors' released script",
            ),
        ),
        (
            "gc_scope",
            dict(
                choices=("all", "conv", "none"), help="GCSAM: which tensors are centralized (all)"
            ),
        ),
        (
            "gc_descent",
            dict(
                action=argparse.BooleanOptionalAction,
                help="GCSAM: centralize the descent gradient too",
            ),
        ),
        (
            "ascent",
            dict(
                choices=("local", "global"),
                help="under torchrun: each worker perturbs with its own gradient (local, "
                "default) or with the all-reduced one (global)",
            ),
        ),
        ("lr", dict(type=float, help="learning rate (sgd 0.05, adam/adamw 1e-3)")),
        ("momentum", dict(type=float, help="SGD momentum (0.9)")),
        ("weight_decay", dict(type=float, help="weight decay (sgd 5e-4, adam 0, adamw 1e-2)")),
        ("schedule", dict(choices=SCHEDULES, help="LR schedule after warmup (cosine)")),
        ("warmup_epochs", dict(type=float, help="linear LR warmup, in epochs (0)")),
        ("label_smoothing", dict(type=float, help="label smoothing (0)")),
        ("epochs", dict(type=int, help="epochs (20)")),
        ("batch_size", dict(type=int, help="batch size (64)")),
        (
            "augment",
            dict(
                choices=AUGMENTATIONS,
                help="auto: crop (padding 4) + flip for CIFAR and image folders, none otherwise",
            ),
        ),
        (
            "patience",
            dict(
                type=int,
                metavar="EPOCHS",
                help="early stopping: stop when the selection metric has not improved for EPOCHS",
            ),
        ),
        (
            "select_by",
            dict(
                choices=SELECT_BY, help="validation metric that picks the best epoch (val_accuracy)"
            ),
        ),
        (
            "target_accuracy",
            dict(
                type=float,
                metavar="FRACTION",
                help="validation accuracy whose first epoch and time measure convergence speed",
            ),
        ),
        (
            "seed",
            dict(type=int, help="seed for the split, initialization, order and augmentation (0)"),
        ),
        ("device", dict(choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present")),
        (
            "amp",
            dict(
                choices=AMP_MODES,
                help="mixed precision: bf16 autocast, or fp16 with a GradScaler (none)",
            ),
        ),
    ]


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    from .training import PRESETS

    group = parser.add_argument_group("training settings (a --config file may set any of them)")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML file whose keys mirror these flags (seed or seed, data-dir or data_dir)",
    )
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the paper's setups (need the data, and a GPU at full size); flags override them",
    )
    for name, options in _flag_specs():
        group.add_argument("--" + name.replace("_", "-"), dest=name, **options)


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
        epilog=_EPILOG_TRAIN,
        formatter_class=formatter,
        argument_default=argparse.SUPPRESS,
    )
    _add_training_flags(train)
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
        epilog=_EPILOG_COMPARE,
        formatter_class=formatter,
        argument_default=argparse.SUPPRESS,
    )
    compare.add_argument("--optimizers", nargs="+", metavar="NAME", help="default: adam sam gcsam")
    compare.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="default: 0 1 2")
    _add_training_flags(compare)
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


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"gcsam: --config {path}: no such file")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    elif file.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        values = tomllib.loads(text)
    else:
        raise SystemExit(f"gcsam: --config {path}: use a .yaml, .yml or .toml file")
    if not isinstance(values, dict):
        raise SystemExit(f"gcsam: --config {path}: expected a mapping of settings at the top level")
    return {key.replace("-", "_"): value for key, value in values.items()}


def _settings(
    args: argparse.Namespace, command_keys: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig values, command-level values): defaults < preset < config file < flags."""
    from .training import PRESETS, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = vars(args)
    merged: dict[str, Any] = {}
    file_values = _read_config_file(given["config"]) if "config" in given else {}
    preset = given.get("preset", file_values.pop("preset", None))
    if preset is not None:
        if preset not in PRESETS:
            raise SystemExit(f"gcsam: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
    unknown = sorted(set(file_values) - fields - command_keys)
    if unknown:
        raise SystemExit(
            f"gcsam: --config {given['config']}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields | command_keys))}"
        )
    merged.update(file_values)
    merged.update({k: v for k, v in given.items() if k in fields | command_keys})
    train_values = {k: v for k, v in merged.items() if k in fields}
    command_values = {k: v for k, v in merged.items() if k in command_keys}
    return train_values, command_values


def _run_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    values, _ = _settings(args, set())
    cfg = TrainConfig(**values)
    resolved = cfg.resolved()
    out = Path(
        getattr(args, "out", None)
        or f"runs/{resolved.dataset}-{resolved.model}-{resolved.optimizer}-seed{resolved.seed}"
    )
    resume = getattr(args, "resume", False)
    if resume:
        from .training import read_run_config

        cfg = read_run_config(out)
    summary = train(cfg, out, resume=resume, progress=_progress(args))
    _print_summary(out, summary)
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    from .training import read_run_config, train

    cfg = read_run_config(args.run_dir)
    summary = train(cfg, args.run_dir, resume=True, progress=_progress(args))
    _print_summary(Path(args.run_dir), summary)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from .experiment import compare

    values, command = _settings(args, {"optimizers", "seeds"})
    out = getattr(args, "out", None)
    data = compare(
        values,
        optimizers=command.get("optimizers", ["adam", "sam", "gcsam"]),
        seeds=command.get("seeds", [0, 1, 2]),
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
    from .experiment import run_sharpness
    from .report import format_sharpness, write_sharpness

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
    from .experiment import run_landscapes

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
    from .report import format_report, load_runs, summarize, write_report

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
    import torch.distributed as dist

    test = summary["test"]
    worker = (
        f"[rank {dist.get_rank()} of {dist.get_world_size()}] "
        if dist.is_available() and dist.is_initialized()
        else ""
    )
    line = (
        f"{worker}{summary['optimizer']} seed {summary['seed']}: "
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
    except ModuleNotFoundError as error:
        if error.name in ("numpy", "sklearn", "scipy", "PIL", "matplotlib", "tqdm", "yaml"):
            print(
                f"gcsam: the experiment toolkit needs {error.name}: pip install 'gcsam[toolkit]'",
                file=sys.stderr,
            )
            return 2
        raise
    except (ValueError, FileNotFoundError) as error:
        print(f"gcsam: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gcsam: interrupted; continue with 'gcsam resume RUN_DIR'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
