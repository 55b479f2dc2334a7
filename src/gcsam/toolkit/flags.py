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
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._util.validate import check_choice
from .config import (
    CHOICES,
    MAX_DEPTH,
    PRESETS,
    RUN_RECORDS,
    ConfigError,
    TrainConfig,
    check_plain,
)
from .data import DATASETS
from .models import MODELS
from .optimizers import BASES, OPTIMIZER_SETTINGS, OPTIMIZERS

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
    return _data_and_model_flags() + _sharpness_flags() + _training_flags()


def _data_and_model_flags() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("dataset", _registry(DATASETS, "data set", _DEFAULTS.dataset)),
        ("data_dir", dict(metavar="DIR", help="where the data set's files are")),
        ("image_size", dict(type=int, metavar="PX", help="resize images to PX x PX")),
        ("classes", dict(nargs="+", metavar="CLASS", help="keep only these classes")),
        ("val_fraction", dict(type=float, help="validation share without an official split")),
        ("test_fraction", dict(type=float, help="test share without an official split")),
        ("folds", dict(type=int, help="k-fold cross-validation: number of folds")),
        ("fold", dict(type=int, help="which fold is the validation split (0-based)")),
        (
            "train_size",
            dict(
                type=float,
                metavar="N",
                help="train on a stratified, seeded subset: N images, or a fraction if < 1",
            ),
        ),
        (
            "label_noise",
            dict(type=float, metavar="P", help="make a fraction P of training labels wrong (0)"),
        ),
        ("noise_kind", _choice("noise_kind", "wrong labels: any other class, or the next one")),
        (
            "val_label_noise",
            _choice(
                "val_label_noise",
                "validation labels: clean, or noisy like the training split's (test: clean)",
            ),
        ),
        (
            "imbalance",
            dict(
                type=float,
                metavar="RATIO",
                help="long-tailed training split: largest class / smallest class (1)",
            ),
        ),
        ("model", _registry(MODELS, "model", "the data set's (listed below)")),
        ("width", dict(type=float, help="channel width multiplier (1.0)")),
        ("depth", dict(type=int, help="depth of the models that take one (listed below)")),
        ("widen_factor", dict(type=int, metavar="K", help="WideResNet widening factor (8)")),
        ("patch_size", dict(type=int, metavar="PX", help="ViT patch size")),
        ("dropout", dict(type=float, help="dropout before the classifier (0)")),
    ]


def _sharpness_flags() -> list[tuple[str, dict[str, Any]]]:
    """The optimizer and the SAM family's settings, cheap modes included."""
    rho_defaults = ", ".join(
        f"{s.name} {s.default_rho:g}" for s in OPTIMIZERS.values() if s.default_rho is not None
    )
    return [
        ("optimizer", _registry(OPTIMIZERS, "optimizer", _DEFAULTS.optimizer)),
        (
            "label",
            dict(
                metavar="NAME",
                help="what reports call this run's method (the optimizer's name); a study's "
                "variant sets it",
            ),
        ),
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
        (
            "every",
            dict(type=int, metavar="K", help="periodic-/look-: the full step every K steps (5)"),
        ),
        ("look_alpha", dict(type=float, help="look-: weight of the stored g_v (0.7)")),
        (
            "ascent_fraction",
            dict(
                type=float,
                metavar="F",
                help="f-gcsam: the ascent from this fraction of each batch, in (0, 1] (0.5)",
            ),
        ),
        (
            "ae_threshold",
            dict(type=float, metavar="C", help="ae-: ascend when ||g||^2 >= mean + C*std (0)"),
        ),
        ("rho_schedule", _choice("rho_schedule", "SAM family: constant rho, or rho ~ lr (GSAM)")),
    ]


def _training_flags() -> list[tuple[str, dict[str, Any]]]:
    base_defaults = ", ".join(f"{b.name} {b.lr:g}" for b in BASES.values())
    decay_defaults = ", ".join(f"{b.name} {b.weight_decay:g}" for b in BASES.values())
    return [
        ("lr", dict(type=float, help=f"learning rate ({base_defaults})")),
        ("momentum", dict(type=float, help="SGD momentum (0.9)")),
        ("weight_decay", dict(type=float, help=f"weight decay ({decay_defaults})")),
        ("schedule", _choice("schedule", "LR schedule after warmup")),
        ("warmup_epochs", dict(type=float, help="linear LR warmup, in epochs (0)")),
        ("label_smoothing", dict(type=float, help="label smoothing (0)")),
        (
            "feature_penalty",
            dict(
                type=float,
                metavar="C",
                help="add C x the mean squared norm of the features the last linear layer reads "
                "(Baek et al. 2024, SAM's explicit counterpart under label noise; 0)",
            ),
        ),
        (
            "head_penalty",
            dict(
                type=float,
                metavar="C",
                help="add C x the squared norm of the last linear layer's weight (Baek et al.; 0)",
            ),
        ),
        (
            "average",
            _choice("average", "evaluate and keep an average of the weights: EMA or SWA"),
        ),
        ("ema_decay", dict(type=float, metavar="D", help="--average ema: decay per step (0.999)")),
        (
            "swa_start",
            dict(
                type=float,
                metavar="S",
                help="--average swa: average the epochs after this fraction of them (0.75)",
            ),
        ),
        ("epochs", dict(type=int, help="epochs (the data set's default, listed below)")),
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
        (
            "strategy",
            _choice(
                "strategy",
                "torchrun: ddp (a copy of the model per worker) or fsdp (FSDP2's fully_shard: "
                "weights, gradients and optimizer state sharded; the ascent is global)",
            ),
        ),
        (
            "ddp_timeout_s",
            dict(
                type=float,
                metavar="SECONDS",
                help="torchrun: how long a worker waits for the others before the run stops "
                f"({_DEFAULTS.ddp_timeout_s:g})",
            ),
        ),
    ]


def registry_help() -> str:
    """The optimizers, models and data sets the flags accept, one line each, for the epilog."""
    width = 2 + max(len(name) for names in (OPTIMIZERS, MODELS, DATASETS) for name in names)
    lines = ["optimizers (--optimizer):"]
    for spec in OPTIMIZERS.values():
        lines.append(f"  {spec.name:<{width}}{spec.summary}")
        if spec.defaults:
            lines.append(f"  {'':<{width}}defaults: {spec.defaults}")
    lines.append("models (--model):")
    for spec in MODELS.values():
        options = f" [{', '.join('--' + o.replace('_', '-') for o in spec.options)}]"
        lines.append(f"  {spec.name:<{width}}{spec.summary}{options if spec.options else ''}")
    lines.append("data sets (--dataset; the default model, epochs and augment auto shown):")
    lines += [
        f"  {s.name:<{width}}{s.summary} "
        f"[model {s.default_model}, {s.default_epochs} epochs, augment {s.default_augment}]"
        for s in DATASETS.values()
    ]
    return "\n".join(lines)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training settings (a --config file may set any of them)")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="YAML, TOML or JSON file whose keys mirror these flags (data-dir or data_dir); "
        "a run's config.json too",
    )
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the paper's setups (need the data, and a GPU at full size); flags override them",
    )
    for name, options in _flag_specs():
        group.add_argument("--" + name.replace("_", "-"), dest=name, **options)


MAX_CONFIG_BYTES = 1 << 20
"""The largest config file read (1 MiB); settings take a few hundred bytes."""


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML, TOML or JSON file's settings, keys with ``-`` or ``_`` alike. From a ``.json``
    file, a run's own ``config.json`` included, the keys of :data:`RUN_RECORDS` are dropped.

    Raises :class:`ConfigError` with one line, starting ``--config PATH:``, for a missing, too
    large, malformed or too deeply nested file and for a key given twice."""
    try:
        values = read_mapping_file(Path(path))
        settings: dict[str, Any] = {}
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(f"keys must be setting names, got {key!r}")
            name = key.replace("-", "_")
            if name in settings:
                raise ConfigError(f"{name} is given twice")
            check_plain(name, value)
            settings[name] = value
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    if Path(path).suffix == ".json":
        settings = {k: v for k, v in settings.items() if k not in RUN_RECORDS}
    return settings


def read_mapping_file(file: Path) -> dict[Any, Any]:
    """The top-level mapping of a YAML, TOML or JSON ``file``, parsed by its suffix, at most
    :data:`MAX_CONFIG_BYTES` and :data:`MAX_DEPTH` deep, YAML without anchors or aliases.
    Raises :class:`ConfigError` (without the path: callers say which file)."""
    parsers = {
        ".yaml": _parse_yaml,
        ".yml": _parse_yaml,
        ".toml": _parse_toml,
        ".json": _parse_json,
    }
    if file.suffix not in parsers:
        raise ConfigError("use a .yaml, .yml, .toml or .json file")
    if not file.is_file():
        raise ConfigError("no such file")
    with open(file, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB; is it a config file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text (byte {error.start})") from None
    try:
        values = parsers[file.suffix](text)
    except RecursionError:
        raise ConfigError(f"nested more than {MAX_DEPTH} levels deep") from None
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ConfigError("expected a mapping of settings at the top level")
    return values


def _parse_yaml(text: str) -> Any:
    import yaml

    # libyaml when present: the pure-Python scanner is quadratic in flow nesting ([[[[...)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_yaml_events(yaml.parse(text, Loader=loader))
        return yaml.load(text, Loader=loader)  # a safe loader: no python tags
    except yaml.MarkedYAMLError as error:
        what = error.problem or error.context
        raise ConfigError(f"invalid YAML: {what}{_where(error.problem_mark)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {' '.join(str(error).split())}") from None


def _check_yaml_events(events: Iterable[Any]) -> None:
    """Refuse anchors, aliases, deep nesting and repeated keys while parsing, before anything is
    built: an alias repeats a subtree, nested aliases repeat it exponentially (billion laughs),
    and settings never need one; of a repeated key YAML keeps the last value silently."""
    import yaml

    # One frame per open collection: (the keys seen, a key comes next) for a mapping, None for
    # a sequence.
    frames: list[tuple[set[str], list[bool]] | None] = []

    def fill_slot() -> bool:
        """A node takes the innermost mapping's next slot: whether that slot is a key."""
        frame = frames[-1] if frames else None
        if frame is None:
            return False
        is_key = frame[1][0]
        frame[1][0] = not is_key
        return is_key

    for event in events:
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            refused = "anchors and aliases (&name, *name) are not allowed"
            raise ConfigError(f"{refused}{_where(event.start_mark)}")
        if isinstance(event, yaml.ScalarEvent):
            if fill_slot():
                seen = frames[-1][0]  # type: ignore[index]
                if event.value in seen:
                    raise ConfigError(
                        f"key {event.value!r} is given twice{_where(event.start_mark)}; keep one"
                    )
                seen.add(event.value)
        elif isinstance(event, yaml.CollectionStartEvent):
            fill_slot()
            frames.append((set(), [True]) if isinstance(event, yaml.MappingStartEvent) else None)
            if len(frames) > MAX_DEPTH + 1:  # + 1: the top-level mapping of settings
                raise ConfigError(
                    f"nested more than {MAX_DEPTH} levels deep{_where(event.start_mark)}"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            frames.pop()


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def _parse_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML: {error}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"key(s) {', '.join(map(repr, repeated))} given twice; keep one")
    return dict(pairs)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        where = f" (line {error.lineno}, column {error.colno})"
        raise ConfigError(f"invalid JSON: {error.msg}{where}") from None


def settings(
    args: argparse.Namespace, command_keys: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig values, command-level values): defaults < preset < config file < flags.

    Raises :class:`ConfigError` for a bad config file, an unknown preset or an unknown key."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = vars(args)
    merged: dict[str, Any] = {}
    file_values = read_config_file(given["config"]) if "config" in given else {}
    preset = given.get("preset", file_values.pop("preset", None))
    if preset is not None:
        merged.update(PRESETS[check_choice("preset", preset, PRESETS, ConfigError)])
    unknown = sorted(set(file_values) - fields - command_keys)
    if unknown:
        raise ConfigError(
            f"--config {given['config']}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields | command_keys))}"
        )
    merged.update(file_values)
    merged.update({k: v for k, v in given.items() if k in fields | command_keys})
    train_values = {k: v for k, v in merged.items() if k in fields}
    command_values = {k: v for k, v in merged.items() if k in command_keys}
    return train_values, command_values


_TORCHRUN_ONLY = ("strategy", "ascent", "ddp_timeout_s")
_AVERAGING = {"ema_decay": "ema", "swa_start": "swa"}


def refuse_no_effect(flags: Iterable[str], cfg: TrainConfig, workers: int) -> None:
    """Refuse a flag given to ``gcsam train`` that would change nothing: a setting ``cfg``'s
    optimizer does not read (naming those that do), ``--momentum`` without SGD, a torchrun flag
    in a world of one ``workers``, ``--ema-decay``/``--swa-start`` without their ``--average``.
    Raises :class:`ConfigError`. ``flags`` are TrainConfig field names."""

    def refuse(name: str, why: str) -> None:
        raise ConfigError(f"--{name.replace('_', '-')} has no effect {why}; leave it out")

    spec = OPTIMIZERS[cfg.optimizer]
    for name in flags:
        if name in OPTIMIZER_SETTINGS and name not in spec.settings:
            users = ", ".join(n for n, s in OPTIMIZERS.items() if name in s.settings)
            refuse(name, f"with --optimizer {cfg.optimizer} (used by {users})")
        elif name == "momentum" and not spec.base_spec(cfg.base).takes_momentum:
            base = spec.base_spec(cfg.base).title
            refuse(name, f"with {base} (used by SGD: --optimizer sgd, or --base sgd)")
        elif name in _TORCHRUN_ONLY and workers == 1:
            refuse(name, "in one process (it sets how torchrun's workers train)")
        elif name in _AVERAGING and cfg.average != _AVERAGING[name]:
            refuse(name, f"without --average {_AVERAGING[name]}")
