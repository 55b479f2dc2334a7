"""The training settings as command-line flags and config files.

Every flag is a :class:`~gcsam.toolkit.config.TrainConfig` field; choices and the lists in the
help come from the registries (:data:`~gcsam.toolkit.optimizers.OPTIMIZERS`,
:data:`~gcsam.toolkit.models.MODELS`, :data:`~gcsam.toolkit.data.DATASETS`) and
:data:`~gcsam.toolkit.config.CHOICES`, so a new entry shows up here by itself. Precedence:
defaults < ``--preset`` < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .config import CHOICES, PRESETS, TrainConfig
from .data import DATASETS
from .models import MODELS
from .optimizers import BASES, OPTIMIZERS

_DEFAULTS = TrainConfig()


def _choice(name: str, help: str) -> dict[str, Any]:
    """A fixed-choice flag whose help ends with its choices and default."""
    choices = CHOICES[name]
    default = getattr(_DEFAULTS, name)
    return dict(choices=choices, help=f"{help} ({', '.join(choices)}; default {default})")


def _registry(names: Any, help: str, default: str) -> dict[str, Any]:
    return dict(
        choices=list(names), metavar="NAME", help=f"{help}; default {default} (listed below)"
    )


def _flag_specs() -> list[tuple[str, dict[str, Any]]]:
    """(TrainConfig field, argparse options) for every training flag."""
    base_defaults = ", ".join(f"{b.name} {b.lr:g}" for b in BASES.values())
    decay_defaults = ", ".join(f"{b.name} {b.weight_decay:g}" for b in BASES.values())
    rho_defaults = ", ".join(
        f"{s.name} {s.default_rho:g}" for s in OPTIMIZERS.values() if s.default_rho is not None
    )
    return [
        ("dataset", _registry(DATASETS, "data set", _DEFAULTS.dataset)),
        ("data_dir", dict(metavar="DIR", help="where the data set's files are")),
        ("image_size", dict(type=int, metavar="PX", help="resize images to PX x PX")),
        ("classes", dict(nargs="+", metavar="CLASS", help="keep only these classes")),
        ("val_fraction", dict(type=float, help="validation share without an official split")),
        ("test_fraction", dict(type=float, help="test share without an official split")),
        ("folds", dict(type=int, help="k-fold cross-validation: number of folds")),
        ("fold", dict(type=int, help="which fold is the validation split (0-based)")),
        ("model", _registry(MODELS, "model", _DEFAULTS.model)),
        ("width", dict(type=float, help="channel width multiplier (1.0)")),
        ("depth", dict(type=int, help="depth of the models that take one (listed below)")),
        ("widen_factor", dict(type=int, metavar="K", help="WideResNet widening factor (8)")),
        ("patch_size", dict(type=int, metavar="PX", help="ViT patch size")),
        ("dropout", dict(type=float, help="dropout before the classifier (0)")),
        ("optimizer", _registry(OPTIMIZERS, "optimizer", _DEFAULTS.optimizer)),
        ("base", dict(choices=list(BASES), help=f"base of the SAM family ({_DEFAULTS.base})")),
        ("rho", dict(type=float, help=f"SAM radius ({rho_defaults})")),
        ("normalize_by", _choice("normalize_by", "GCSAM: paper's formula or released script")),
        ("gc_scope", _choice("gc_scope", "GCSAM: which tensors are centralized")),
        (
            "gc_descent",
            dict(
                action=argparse.BooleanOptionalAction,
                help="GCSAM: centralize the descent gradient too",
            ),
        ),
        ("ascent", _choice("ascent", "torchrun: each worker's own or the all-reduced gradient")),
        ("lr", dict(type=float, help=f"learning rate ({base_defaults})")),
        ("momentum", dict(type=float, help="SGD momentum (0.9)")),
        ("weight_decay", dict(type=float, help=f"weight decay ({decay_defaults})")),
        ("schedule", _choice("schedule", "LR schedule after warmup")),
        ("warmup_epochs", dict(type=float, help="linear LR warmup, in epochs (0)")),
        ("label_smoothing", dict(type=float, help="label smoothing (0)")),
        ("epochs", dict(type=int, help=f"epochs ({_DEFAULTS.epochs})")),
        ("batch_size", dict(type=int, help=f"batch size ({_DEFAULTS.batch_size})")),
        ("augment", _choice("augment", "auto: the data set's default (listed below)")),
        (
            "patience",
            dict(type=int, metavar="EPOCHS", help="early stopping after EPOCHS without progress"),
        ),
        ("select_by", _choice("select_by", "validation metric that picks the best epoch")),
        (
            "target_accuracy",
            dict(
                type=float,
                metavar="FRACTION",
                help="validation accuracy whose first epoch and time measure convergence speed",
            ),
        ),
        ("seed", dict(type=int, help="seed of split, initialization, order, augmentation (0)")),
        ("device", _choice("device", "auto picks CUDA when present")),
        ("amp", _choice("amp", "mixed precision: bf16 autocast, or fp16 with a GradScaler")),
    ]


def registry_help() -> str:
    """The optimizers, models and data sets the flags accept, one line each, for the epilog."""
    lines = ["optimizers (--optimizer):"]
    lines += [f"  {s.name:<14}{s.summary}" for s in OPTIMIZERS.values()]
    lines.append("models (--model):")
    for spec in MODELS.values():
        options = f" [{', '.join('--' + o.replace('_', '-') for o in spec.options)}]"
        lines.append(f"  {spec.name:<14}{spec.summary}{options if spec.options else ''}")
    lines.append("data sets (--dataset; augment auto = the default shown):")
    lines += [f"  {s.name:<14}{s.summary} [augment {s.default_augment}]" for s in DATASETS.values()]
    return "\n".join(lines)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
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


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or TOML file's settings, keys with ``-`` or ``_`` alike."""
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


def settings(
    args: argparse.Namespace, command_keys: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig values, command-level values): defaults < preset < config file < flags."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = vars(args)
    merged: dict[str, Any] = {}
    file_values = read_config_file(given["config"]) if "config" in given else {}
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
