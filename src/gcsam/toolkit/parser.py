"""The ``gcsam`` command's parser: its subcommands, their flags, help and examples (the training
flags themselves come from :mod:`~gcsam.toolkit.flags`, generated from the registries)."""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from .compare import DEFAULT_OPTIMIZERS, DEFAULT_SEEDS
from .flags import add_training_flags, registry_help
from .study_spec import STUDIES

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
  gcsam train --out runs/x --overwrite                # delete the run in runs/x, train anew

A folder that already holds a run (config.json) is refused unless --resume or --overwrite.
--resume keeps the run's saved settings: a training flag (or --config/--preset setting) that
differs from them is refused by name; a finished run is reported, not retrained. Checkpoints
carry a SHA-256 checksum, checked before loading; one process at a time may use a run directory
(RUN_DIR/.gcsam.lock). Ctrl-C prints the command that continues the run.
"""

_EPILOG_COMPARE = """\
examples:
  gcsam compare                                       # adam, sam, gcsam x 3 seeds on digits
  gcsam compare --optimizers sgd sam gcsam --base sgd --lr 0.05
  gcsam compare --dataset fashion-mnist --epochs 10 --seeds 0 1 2 --out runs/fmnist
  gcsam compare --preset paper-bus --data-dir ~/data/BUSI --device cuda

Runs land in OUT/<optimizer>-seed<k>/; running the same command again resumes unfinished runs
and skips finished ones, and so does rerunning it after Ctrl-C or a crash. One process at a
time may use OUT (OUT/.gcsam.lock). The report (report.md, report.csv, learning_curves.png,
test_metrics.png, frontier.png) is written to OUT.
"""

_EPILOG_STUDY = """\
examples:
  gcsam study --list                                  # the built-in studies
  gcsam study small-data                              # Fashion-MNIST, 500-2,000 images
  gcsam study noisy-labels --seeds 0 1 2 3 4 --out runs/noisy
  gcsam study my-study.yaml                           # a grid of your own
  gcsam study small-data --epochs 2 --seeds 0         # a quick try (other settings, other runs)
  gcsam study examples/verdict.yaml --jobs 2          # tuned; 2 processes share the work
  gcsam study tuned.yaml --storage postgresql://me@db/gcsam            # on every machine;
  gcsam study tuned.yaml --storage postgresql://me@db/gcsam --tune-only  # helpers stop there
  gcsam study tuned.yaml --sampler-seed 1 --out runs/draws-1   # the same budget, other draws

A study file (YAML, TOML or JSON) holds: knob (the setting swept, e.g. train_size,
label_noise, imbalance, rho), values, settings (every other training setting, keys as in
--config), and optionally name, description, optimizers, seeds and flatness (false, or
max_samples and trace_samples). For example:

  knob: label_noise
  values: [0.0, 0.2, 0.4]
  optimizers: [adam, sam, gcsam]
  seeds: [0, 1, 2]
  settings: {dataset: fashion-mnist, train_size: 2000, epochs: 20}

An optimizer may also be a variant, an optimizer with settings and a label of its own, e.g.
Adam given the passes of a two-pass method, or with weight averaging:

  optimizers: [adam, {label: adam-2x, optimizer: adam, epochs: 40},
               {label: adam-swa, optimizer: adam, average: swa}, gcsam]

A tune section gives every optimizer the same trial budget over its search space (Optuna;
samplers tpe or grid), picked on the validation split, then trains the picked setting for every
seed and reports it on test:

  tune:
    trials: 8
    sampler: tpe
    space:
      "*": {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
      sam: {rho: [0.02, 0.05, 0.1, 0.2]}

A space is keyed by an optimizer's name or a variant's label. Trials are resumable runs in
OUT/<knob>-<value>/trials/<optimizer>/, recorded in the storage
(sqlite:///OUT/optuna.db unless --storage): a rerun continues, a finished trial never trains
again, and a killed worker's trial resumes from its last epoch. "prune: true" (or
{startup_trials: 5, warmup_epochs: 0}) stops trials whose best validation score after an epoch
is below the median of the finished trials' at that epoch (Optuna's median pruner); a stopped
trial counts against the budget, and the report says how many epochs it saved.

Training flags override the study's settings (not its knob). Runs land in
OUT/<knob>-<value>/<optimizer>-seed<k>/ and OUT holds the study's report (report.md,
study.csv, study.png); each OUT/<knob>-<value>/ holds that value's comparison report. Running
the same command again continues the study: finished runs and flatness measurements are kept,
a stopped run resumes. One process at a time may use OUT.
"""

_EPILOG_MAIN = """\
Run 'gcsam COMMAND --help' for the settings and examples of each command.

exit codes: 0 done; 2 bad input, or a run file that cannot be read or written (the message
names it); 3 the training diverged (non-finite loss or weights); 130 interrupted (Ctrl-C).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line (the usage block hid the line that matters) and every
    number a value: ``-inf``, ``-nan`` and ``-1e-3`` after a flag are its value, not a flag
    (argparse knows only ``-1`` and ``-.5``), so their own checks can name them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gcsam",
        description="Train and compare Adam, SAM and GCSAM (gradient-centralized SAM).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_MAIN,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    _add_compare_parser(commands)
    _add_study_parser(commands)
    _add_report_parser(commands)
    _add_resume_parser(commands)
    _add_sharpness_parser(commands)
    _add_landscape_parser(commands)
    return parser


def _add_train_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train one run",
        epilog=_EPILOG_TRAIN + "\n" + registry_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --out and train it again from scratch",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_compare_parser(commands: Any) -> None:
    compare = commands.add_parser(
        "compare",
        help="train several optimizers over several seeds and report (the main job)",
        epilog=_EPILOG_COMPARE + "\n" + registry_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def _add_study_parser(commands: Any) -> None:
    study = commands.add_parser(
        "study",
        help="a grid of regimes x optimizers x seeds, e.g. small data or noisy labels",
        epilog=_EPILOG_STUDY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    study.add_argument(
        "study",
        nargs="?",
        metavar="NAME_OR_FILE",
        help=f"a built-in study ({', '.join(STUDIES)}) or a .yaml/.toml/.json study file",
    )
    study.add_argument("--list", action="store_true", help="describe the built-in studies")
    study.add_argument(
        "--optimizers", nargs="+", metavar="NAME", help="instead of the study's optimizers"
    )
    study.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="instead of its seeds")
    add_training_flags(study)
    study.add_argument("--out", metavar="DIR", help="output folder (runs/study-<name>)")
    study.add_argument(
        "--no-flatness", action="store_true", help="skip the flatness of the final models"
    )
    study.add_argument("--no-plots", action="store_true", help="write the tables only")
    study.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    study.add_argument(
        "--storage",
        metavar="URL",
        help="a tuned study's Optuna storage, shared by every process that tunes it (default: "
        "sqlite:///OUT/optuna.db; e.g. postgresql://user@host/db for several machines)",
    )
    study.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="processes on this machine that share the trials, the runs and the flatness "
        "measurements, each with cores/N threads (1)",
    )
    study.add_argument(
        "--sampler-seed",
        type=int,
        metavar="N",
        help="instead of the tune section's sampler_seed: another set of the sampler's draws "
        "(tpe) or another order of its grid",
    )
    study.add_argument(
        "--tune-only",
        action="store_true",
        help="run trials, then stop: a helper on another machine (the study's own command "
        "trains the picked settings and writes the report)",
    )


def _add_report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="rebuild the comparison report from finished runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  gcsam report runs/compare-digits-small-cnn\n"
        "  gcsam report runs/a runs/b --out reports/ab",
    )
    report.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding them"
    )
    report.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: the single folder given, else runs/report)",
    )
    report.add_argument(
        "--reference", default="gcsam", help="optimizer the paired tests compare against (gcsam)"
    )
    report.add_argument("--no-plots", action="store_true", help="write the tables only")


def _add_resume_parser(commands: Any) -> None:
    resume = commands.add_parser(
        "resume",
        help="continue a stopped run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  gcsam resume runs/digits-small-cnn-gcsam-seed0\n\n"
        "Continues from RUN_DIR/last.pt with the run's saved settings; a finished run is\n"
        "reported, not retrained.",
    )
    resume.add_argument("run_dir", metavar="RUN_DIR")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")


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
