"""The settings of one training run: :class:`TrainConfig`, its allowed values, and the paper's
presets. Defaults that depend on the optimizer or the data set come from their registries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .._validate import check_choice
from ..distributed import ASCENT_MODES
from .data import DATASETS
from .optimizers import BASES, OPTIMIZERS


class ConfigError(ValueError):
    """A training setting is invalid; the message names it and what is allowed."""


AUGMENTATIONS = ("auto", "none", "crop", "flip", "crop+flip")

CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("cosine", "step", "none"),
    "augment": AUGMENTATIONS,
    "amp": ("none", "bf16", "fp16"),
    "select_by": ("val_accuracy", "val_loss"),
    "device": ("auto", "cpu", "cuda"),
    "ascent": ASCENT_MODES,
    "normalize_by": ("centralized", "raw"),
    "gc_scope": ("all", "conv", "none"),
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


@dataclass
class TrainConfig:
    """Every setting of one run; ``None`` means "the default for this optimizer / data set"."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    model: str = "small-cnn"
    width: float = 1.0
    depth: int | None = None
    widen_factor: int | None = None
    patch_size: int | None = None
    dropout: float = 0.0
    optimizer: str = "gcsam"
    base: str = "adam"
    rho: float | None = None
    normalize_by: str = "centralized"
    gc_scope: str = "all"
    gc_descent: bool = False
    ascent: str = "local"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    augment: str = "auto"
    patience: int | None = None
    select_by: str = "val_accuracy"
    target_accuracy: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and every setting checked."""
        cfg = dataclasses.replace(self)
        check_choice("optimizer", cfg.optimizer, OPTIMIZERS, ConfigError)
        check_choice("base", cfg.base, BASES, ConfigError)
        check_choice("dataset", cfg.dataset, DATASETS, ConfigError)
        for name, choices in CHOICES.items():
            check_choice(name, getattr(cfg, name), choices, ConfigError)
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
        _check_ranges(cfg)
        return cfg

    def base_name(self) -> str:
        """The underlying first-order optimizer: fixed by the optimizer (``gc-adam``: adam),
        else ``base``."""
        return OPTIMIZERS[self.optimizer].base_spec(self.base).name

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any], *, ignore_unknown: bool = False) -> TrainConfig:
        """A config from its ``to_json()`` form; keys that are not settings raise, or are
        dropped with ``ignore_unknown`` (a run's ``config.json`` also records split sizes)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and not ignore_unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in values.items() if k in known})


def _check_ranges(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a numeric setting outside its range."""
    for name in ("lr", "epochs", "batch_size"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    for name in ("weight_decay", "warmup_epochs", "label_smoothing", "dropout", "momentum"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.rho is not None and not cfg.rho >= 0:
        raise ConfigError(f"rho must be >= 0, got {cfg.rho!r}")
    if cfg.label_smoothing >= 1:
        raise ConfigError(f"label_smoothing must be below 1, got {cfg.label_smoothing!r}")
    if cfg.patience is not None and cfg.patience < 1:
        raise ConfigError(f"patience must be at least 1 epoch, got {cfg.patience!r}")
    if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 1:
        raise ConfigError(f"target_accuracy is a fraction in (0, 1], got {cfg.target_accuracy!r}")
