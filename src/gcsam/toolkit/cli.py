"""The ``gcsam`` command: train and compare Adam, SAM and GCSAM on real data, measure flatness.

Dispatch only: the parser is :mod:`~gcsam.toolkit.parser`; the work is in
:mod:`~gcsam.toolkit.trainer`, :mod:`~gcsam.toolkit.compare`, :mod:`~gcsam.toolkit.measure` and
:mod:`~gcsam.toolkit.report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util.validate import check_int
from .compare import DEFAULT_OPTIMIZERS, DEFAULT_SEEDS, compare
from .config import ConfigError, TrainConfig
from .flags import refuse_no_effect, settings
from .measure import run_landscapes, run_sharpness
from .parser import build_parser
from .report import (
    format_report,
    format_sharpness,
    load_runs,
    summarize,
    write_report,
    write_sharpness,
)
from .rundir import default_compare_dir, default_run_dir, read_run_config, read_summary
from .study import run_study
from .study_spec import STUDIES, describe_studies, find_study
from .trainer import Diverged, train
from .world import (
    WorkerTimeoutError,
    check_strategy,
    pick_device,
    worker_prefix,
    world_size,
)


def _run_train(args: argparse.Namespace) -> int:
    values, _ = settings(args, set())
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    if resume and overwrite:
        raise ConfigError("pass --resume or --overwrite, not both")
    cfg = TrainConfig(**values)
    out = Path(getattr(args, "out", None) or default_run_dir(cfg))
    args.out = out  # the interrupt message names it
    if not resume:  # a resumed run's flags must match it, whether they act or not
        refuse_no_effect(set(vars(args)) & set(values), cfg, world_size())
    if resume:
        cfg = read_run_config(out)
        _check_resumed_settings(out, cfg, values)
        return _train_or_report_finished(cfg, out, args)
    if (out / "config.json").exists() and not overwrite:
        raise ConfigError(
            f"{out} already holds a run; continue it with --resume, start it over with "
            "--overwrite, or pass another --out"
        )
    summary = train(cfg, out, overwrite=overwrite, progress=_progress(args))
    _print_summary(out, summary)
    return 0


def _run_resume(args: argparse.Namespace) -> int:
    out = Path(args.run_dir)
    return _train_or_report_finished(read_run_config(out), out, args)


def _train_or_report_finished(cfg: TrainConfig, out: Path, args: argparse.Namespace) -> int:
    """Resume the run in ``out``, or say that it has already finished."""
    done = read_summary(out) or {}
    if done.get("status") == "finished":
        print(f"{out} already finished (test accuracy {100 * done['test']['accuracy']:.2f} %)")
        return 0
    summary = train(cfg, out, resume=True, progress=_progress(args))
    _print_summary(out, summary)
    return 0


def _check_resumed_settings(out: Path, saved: TrainConfig, given: dict[str, Any]) -> None:
    """Refuse the settings given with --resume that differ from the run's, by name."""
    asked = dataclasses.replace(saved, **given).resolved()
    kept = saved.resolved()
    differ = [
        f"--{key.replace('_', '-')} {_shown(given[key])} differs from the run's {key} "
        f"{_shown(getattr(kept, key))}"
        for key in given
        if getattr(asked, key) != getattr(kept, key)
    ]
    if differ:
        raise ConfigError(
            f"{out}: {'; '.join(differ)}: a resumed run keeps its settings; start a new run "
            "elsewhere, or pass --overwrite"
        )


def _shown(value: Any) -> str:
    """A setting as it would be typed on the command line."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _run_compare(args: argparse.Namespace) -> int:
    values, command = settings(args, {"optimizers", "seeds"})
    out = Path(getattr(args, "out", None) or default_compare_dir(TrainConfig(**values)))
    plots = not getattr(args, "no_plots", False)
    data = compare(
        values,
        optimizers=command.get("optimizers", DEFAULT_OPTIMIZERS),
        seeds=command.get("seeds", DEFAULT_SEEDS),
        out_dir=out,
        plots=plots,
        sharpness=getattr(args, "sharpness", False),
        progress=_progress(args),
    )
    if data:  # empty on the workers of torchrun other than rank 0
        print(data)
        figures = ", learning_curves.png, test_metrics.png, frontier.png" if plots else ""
        print(f"\nwrote {out / 'report.md'}, report.csv{figures} and the runs in {out}")
    return 0


def _run_study(args: argparse.Namespace) -> int:
    if getattr(args, "list", False):
        print(describe_studies(), end="")
        return 0
    if getattr(args, "study", None) is None:
        raise ConfigError(f"name a study ({', '.join(STUDIES)}) or a study file, or pass --list")
    study = find_study(args.study)
    values, command = settings(args, {"optimizers", "seeds"})
    for axis in ("seed", "optimizer"):
        if axis in values:
            raise ConfigError(f"a study runs several: pass --{axis}s instead of --{axis}")
    if study.knob in values:
        raise ConfigError(
            f"--{study.knob.replace('_', '-')} is the knob study {study.name} sweeps; "
            "change its values in a study file instead"
        )
    changes: dict[str, Any] = {"settings": {**study.settings, **values}}
    changes |= {key: tuple(command[key]) for key in ("optimizers", "seeds") if key in command}
    if getattr(args, "no_flatness", False):
        changes["flatness"] = None
    if getattr(args, "sampler_seed", None) is not None:
        if study.tune is None:
            raise ConfigError(
                "--sampler-seed seeds a tuned study's sampler: give it a tune section (see "
                "gcsam study --help)"
            )
        seed = check_int("--sampler-seed", args.sampler_seed, 0, ConfigError)
        changes["tune"] = dataclasses.replace(study.tune, sampler_seed=seed)
    study = dataclasses.replace(study, **changes)
    out = Path(getattr(args, "out", None) or f"runs/study-{study.name}")
    plots = not getattr(args, "no_plots", False)
    report = run_study(
        study,
        out,
        plots=plots,
        progress=_progress(args),
        storage=getattr(args, "storage", None),
        jobs=getattr(args, "jobs", 1),
        tune_only=getattr(args, "tune_only", False),
    )
    if getattr(args, "tune_only", False):
        print(f"trials done; the study's own command trains the picked settings into {out}")
    elif report:
        print(report)
        figure = ", study.png" if plots else ""
        print(f"\nwrote {out / 'report.md'}, study.csv{figure} and the runs in {out}")
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
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.runs[0]) if len(args.runs) == 1 else Path("runs/report")
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


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    """A warning as the command's other messages read: one line, without the source line."""
    return f"gcsam: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    code = 1
    try:
        code = _dispatch(args, argv)
        return code
    finally:
        warnings.formatwarning = formatwarning
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if code == 0:
                # Under load, a gloo worker that tore its group down while another was still
                # finishing died with SIGABRT after a complete run. So: free what still holds
                # the group's work (FSDP's state) while the group lives, wait for every worker,
                # then let go.
                gc.collect()
                dist.barrier()
            dist.destroy_process_group()


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command; bad input and unusable files exit 2, a diverged run 3, a torchrun
    worker that stopped answering 1, Ctrl-C 130."""
    try:
        runner = {
            "train": _run_train,
            "compare": _run_compare,
            "study": _run_study,
            "report": _run_report,
            "resume": _run_resume,
            "sharpness": _run_sharpness,
            "landscape": _run_landscape,
        }[args.command]
        if getattr(args, "device", None) is not None:  # before any folder is made
            pick_device(args.device)
        if getattr(args, "strategy", None) is not None:
            check_strategy(args.strategy, world_size())
        return runner(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"gcsam: error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"gcsam: {error}", file=sys.stderr)
        return 3
    except WorkerTimeoutError as error:
        print(f"gcsam: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gcsam: interrupted{_how_to_continue(args, argv)}", file=sys.stderr)
        return 130


def _how_to_continue(args: argparse.Namespace, argv: list[str]) -> str:
    """What to run after Ctrl-C: resuming is safe, every file was written atomically."""
    if args.command == "resume":
        return f"; continue with: gcsam resume {shlex.quote(args.run_dir)}"
    if args.command == "train" and getattr(args, "out", None) is not None:
        return f"; continue with: gcsam resume {shlex.quote(str(args.out))}"
    if args.command in ("compare", "study"):
        return "; rerun the same command to resume the unfinished runs: " + shlex.join(
            ["gcsam", *argv]
        )
    return ""


if __name__ == "__main__":
    sys.exit(main())
