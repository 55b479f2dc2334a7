"""The settings of one training run: :class:`TrainConfig`, its allowed values, and the paper's
presets. Defaults that depend on the optimizer or the data set come from their registries."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .._util.validate import check_choice, check_int
from ..optim.centralization import GC_SCOPES
from ..optim.distributed import ASCENT_MODES
from ..optim.sam import NORMALIZERS
from .averaging import AVERAGES
from .data import AUGMENTATIONS, DATASETS, NOISE_KINDS, VAL_LABEL_NOISE
from .optimizers import BASES, OPTIMIZERS


class ConfigError(ValueError):
    """A training setting is invalid; the message names it and what is allowed."""


MAX_DEPTH = 16
"""How deeply a setting's value (``extra``, a config file's) may nest lists and mappings."""
MAX_ITEMS = 10_000
"""How many values one setting may hold in all, counting every nested one."""
RUN_RECORDS: tuple[str, ...] = (
    "num_classes", "class_names", "image_shape", "split_sizes", "model_size", "regime",
    "versions",
)  # fmt: skip
"""Keys a run's ``config.json`` records besides its settings."""


CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("cosine", "step", "none"),
    "augment": ("auto", *AUGMENTATIONS),  # auto: the data set's default
    "amp": ("none", "bf16", "fp16"),
    "select_by": ("val_accuracy", "val_loss"),
    "device": ("auto", "cpu", "cuda"),
    "ascent": ASCENT_MODES,
    "strategy": ("ddp", "fsdp"),
    "normalize_by": NORMALIZERS,
    "gc_scope": GC_SCOPES,
    "rho_schedule": ("constant", "lr"),
    "noise_kind": NOISE_KINDS,
    "val_label_noise": VAL_LABEL_NOISE,
    "average": AVERAGES,
}
"""The allowed values of every fixed-choice setting (registries give the rest)."""

# The paper's setups (Hassan et al., 2025, and the authors' released CIFAR-10 script). They need
# the data (never downloaded) and, at full size, a GPU: ResNet-50 at 224-256 px trains at a few
# images per second on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar10": dict(
        dataset="cifar10", model="resnet50", image_size=224, base="adam", lr=1e-4, rho=0.05,
        weight_decay=0.0, batch_size=128, epochs=120, schedule="none", augment="crop+flip",
        patience=10, select_by="val_loss",
    ),
    "paper-bus": dict(
        dataset="image-folder", classes=["benign", "malignant"], image_size=256,
        model="resnet50", base="adam", lr=1e-4, rho=0.05, weight_decay=0.0, batch_size=32,
        epochs=100, schedule="none", augment="crop+flip", patience=10, select_by="val_loss",
    ),
    "paper-covid": dict(
        dataset="image-folder", image_size=256, model="resnet50", base="adam", lr=1e-4,
        rho=0.05, weight_decay=0.0, batch_size=32, epochs=100, schedule="none",
        augment="crop+flip", patience=10, select_by="val_loss",
    ),
}  # fmt: skip


Check = Callable[[str, Any], Any]
"""Takes a setting's name and value; returns the value in its canonical type or raises."""


def _as_float(value: Any) -> float | None:
    """``value`` as a float, or None; numeric strings count because YAML 1.1 reads ``1e-3``
    (no dot) as a string. Bools never do."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _number(expected: str, inside: Callable[[float], bool]) -> Check:
    def check(name: str, value: Any) -> float:
        number = _as_float(value)
        if number is None or not math.isfinite(number) or not inside(number):
            raise ConfigError(f"{name} must be {expected}, got {value!r}")
        return number

    return check


def _integer(minimum: int, maximum: int | None = None) -> Check:
    def check(name: str, value: Any) -> int:
        value = check_int(name, value, minimum, ConfigError)
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be an integer <= {maximum}, got {value!r}")
        return value

    return check


def _one_of(choices: Callable[[], Iterable[str]]) -> Check:
    """A choice among names read when checked, so that later registrations count."""
    return lambda name, value: check_choice(name, value, choices(), ConfigError)


def _text(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _texts(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{name} must be a non-empty list of strings, got {value!r}")
    return [_text(f"{name}[{i}]", item) for i, item in enumerate(value)]


def _label(name: str, value: Any) -> str:
    value = _text(name, value)
    if not re.fullmatch(r"[\w.+-]+", value):
        raise ConfigError(
            f"{name} must be letters, digits and . _ + - (it names a folder), got {value!r}"
        )
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_plain(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is plain JSON (mappings with string keys,
    lists, strings, bools, None, finite numbers), at most :data:`MAX_DEPTH` deep and
    :data:`MAX_ITEMS` values in all. Iterative and bounded, so shared or cyclic references
    cannot make it run long."""
    stack = [(name, value, 0)]
    for _ in range(MAX_ITEMS + 1):
        if not stack:
            return
        path, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{path} must have string keys, got {key!r}")
                stack.append((f"{path}.{key}", child, depth + 1))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child, depth + 1) for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{path} must be a finite number, got {item!r}")
        elif item is not None and not isinstance(item, str | int | float):
            raise ConfigError(f"{path} must be a plain JSON value, got a {type(item).__name__}")
    raise ConfigError(f"{name} holds more than {MAX_ITEMS} values")


def _plain_mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    check_plain(name, value)
    return value


_POSITIVE = _number("positive (a finite number > 0)", lambda x: x > 0)
_NON_NEGATIVE = _number(">= 0 (a finite number)", lambda x: x >= 0)
_BELOW_ONE = _number("a fraction in [0, 1)", lambda x: 0 <= x < 1)
_SHARE = _number("a fraction in (0, 1)", lambda x: 0 < x < 1)
_FINITE = _number("a finite number", lambda x: True)
_TARGET = _number("a fraction in (0, 1]", lambda x: 0 < x <= 1)
_COUNT = _integer(1)


def _train_size(name: str, value: Any) -> float:
    """A count of training images (an integer >= 1) or a fraction of the split in (0, 1)."""
    number = _as_float(value)
    if number is not None and 0 < number < 1:
        return number
    if number is not None and number >= 1 and number.is_integer() and math.isfinite(number):
        return int(number)
    raise ConfigError(
        f"{name} must be a number of training images (an integer >= 1) or a fraction in "
        f"(0, 1), got {value!r}"
    )


def _fixed(name: str) -> Check:
    return _one_of(lambda: CHOICES[name])


@dataclass
class TrainConfig:
    """Every setting of one run; ``None`` means "the default for this optimizer / data set".

    :data:`CHECKS` holds each field's check; :meth:`resolved` runs them all."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    train_size: float | None = None
    label_noise: float = 0.0
    noise_kind: str = "symmetric"
    val_label_noise: str = "clean"
    imbalance: float = 1.0
    model: str | None = None
    width: float = 1.0
    depth: int | None = None
    widen_factor: int | None = None
    patch_size: int | None = None
    dropout: float = 0.0
    optimizer: str = "gcsam"
    label: str | None = None
    base: str = "adam"
    rho: float | None = None
    normalize_by: str = "centralized"
    gc_scope: str = "all"
    gc_descent: bool = False
    ascent: str = "local"
    every: int = 5
    look_alpha: float = 0.7
    ascent_fraction: float = 0.5
    ae_threshold: float = 0.0
    rho_schedule: str = "constant"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    feature_penalty: float = 0.0
    head_penalty: float = 0.0
    average: str = "none"
    ema_decay: float = 0.999
    swa_start: float = 0.75
    epochs: int | None = None
    batch_size: int = 64
    augment: str = "auto"
    patience: int | None = None
    select_by: str = "val_accuracy"
    target_accuracy: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    ddp_timeout_s: float = 300.0
    strategy: str = "ddp"
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every setting checked and in its type (``"1e-3"`` -> ``0.001``), and every
        ``None`` default filled in from the registries."""
        values = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None or item.default is not None:
                value = CHECKS[item.name](item.name, value)
            values[item.name] = value
        cfg = TrainConfig(**values)
        spec = OPTIMIZERS[cfg.optimizer]
        base = spec.base_spec(cfg.base)
        if cfg.lr is None:
            cfg.lr = base.lr
        if cfg.weight_decay is None:
            cfg.weight_decay = base.weight_decay
        if cfg.rho is None:
            cfg.rho = spec.default_rho
        if cfg.augment == "auto":
            cfg.augment = DATASETS[cfg.dataset].default_augment
        if cfg.model is None:
            cfg.model = DATASETS[cfg.dataset].default_model
        if cfg.epochs is None:
            cfg.epochs = DATASETS[cfg.dataset].default_epochs
        return cfg

    @property
    def row(self) -> str:
        """What reports and run folders call this run's method: ``label``, else the optimizer."""
        return self.label or self.optimizer

    def base_name(self) -> str:
        """The underlying first-order optimizer: fixed by the optimizer (``gc-adam``: adam),
        else ``base``."""
        return OPTIMIZERS[self.optimizer].base_spec(self.base).name

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any], *, ignore_unknown: bool = False) -> TrainConfig:
        """A config from its ``to_json()`` form; keys that are not settings raise, or are
        dropped with ``ignore_unknown`` (a run's ``config.json`` also records
        :data:`RUN_RECORDS`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and not ignore_unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in values.items() if k in known})


CHECKS: dict[str, Check] = {
    "dataset": _one_of(lambda: DATASETS),
    "data_dir": _text,
    "image_size": _COUNT,
    "classes": _texts,
    "val_fraction": _SHARE,
    "test_fraction": _SHARE,
    "folds": _integer(2),
    "fold": _integer(0),
    "train_size": _train_size,
    "label_noise": _BELOW_ONE,
    "noise_kind": _fixed("noise_kind"),
    "val_label_noise": _fixed("val_label_noise"),
    "imbalance": _number("a ratio >= 1 (largest class / smallest class)", lambda x: x >= 1),
    "model": _text,  # the model registry resolves aliases
    "width": _POSITIVE,
    "depth": _COUNT,
    "widen_factor": _COUNT,
    "patch_size": _COUNT,
    "dropout": _BELOW_ONE,
    "optimizer": _one_of(lambda: OPTIMIZERS),
    "label": _label,
    "base": _one_of(lambda: BASES),
    "rho": _NON_NEGATIVE,
    "normalize_by": _fixed("normalize_by"),
    "gc_scope": _fixed("gc_scope"),
    "gc_descent": _flag,
    "ascent": _fixed("ascent"),
    "every": _COUNT,
    "look_alpha": _NON_NEGATIVE,
    "ascent_fraction": _TARGET,
    "ae_threshold": _FINITE,
    "rho_schedule": _fixed("rho_schedule"),
    "lr": _POSITIVE,
    "momentum": _BELOW_ONE,
    "weight_decay": _NON_NEGATIVE,
    "schedule": _fixed("schedule"),
    "warmup_epochs": _NON_NEGATIVE,
    "label_smoothing": _BELOW_ONE,
    "feature_penalty": _NON_NEGATIVE,
    "head_penalty": _NON_NEGATIVE,
    "average": _fixed("average"),
    "ema_decay": _SHARE,
    "swa_start": _BELOW_ONE,
    "epochs": _COUNT,
    "batch_size": _COUNT,
    "augment": _fixed("augment"),
    "patience": _COUNT,
    "select_by": _fixed("select_by"),
    "target_accuracy": _TARGET,
    "seed": _integer(0, 2**63 - 1),  # what torch.manual_seed takes, with room for the ranks
    "device": _fixed("device"),
    "amp": _fixed("amp"),
    "ddp_timeout_s": _POSITIVE,  # torchrun's process-group timeout
    "strategy": _fixed("strategy"),
    "extra": _plain_mapping,
}
"""Every :class:`TrainConfig` field's type and range: the one place settings are checked."""
