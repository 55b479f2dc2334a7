"""What a run is built from: its data (splits, classes, regime), its seeded model, the order of
each epoch's examples, the LR schedule and the augmentation, from its :class:`TrainConfig`. The
trainer builds its run from these; comparisons and studies check the regimes before they write
anything, and the flatness measurements rebuild a finished run's model."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import TrainConfig
from .data import Augment, DataSplits, apply_regime, load_dataset, regime_of, select_classes
from .models import build_model

if TYPE_CHECKING:
    from .world import World


def prepare_data(cfg: TrainConfig) -> tuple[DataSplits, dict[str, Any]]:
    """The run's splits, its classes selected and its regime applied (:mod:`.data.regimes`),
    and the regime's record (train size, class counts, flipped labels)."""
    splits = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        image_size=cfg.image_size,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        folds=cfg.folds,
        fold=cfg.fold,
    )
    if cfg.classes:
        splits = select_classes(splits, cfg.classes)
    return apply_regime(splits, regime_of(cfg), cfg.seed)


def check_regimes(configs: Sequence[TrainConfig]) -> None:
    """Raise the :class:`DataError` a run would (``train_size`` beyond the data), before a
    comparison writes anything: each data set is loaded once, and each distinct regime applied
    to it."""
    loaded: dict[str, DataSplits] = {}
    for cfg in (c.resolved() for c in configs):
        regime = regime_of(cfg)
        if not regime.changes_data:
            continue
        plain = dataclasses.replace(cfg, train_size=None, label_noise=0.0, imbalance=1.0)
        key = json.dumps(dataclasses.asdict(dataclasses.replace(plain, optimizer="", seed=0)))
        if key not in loaded:
            loaded[key] = prepare_data(plain)[0]
        apply_regime(loaded[key], regime, cfg.seed)


def build_run_model(cfg: TrainConfig, data: DataSplits) -> nn.Module:
    """The run's model, initialized from its seed, for the data set's shape and classes."""
    torch.manual_seed(cfg.seed)
    channels, height, _ = data.image_shape
    return build_model(
        cfg.model,
        data.num_classes,
        channels,
        height,
        width=cfg.width,
        depth=cfg.depth,
        widen_factor=cfg.widen_factor,
        patch_size=cfg.patch_size,
        dropout=cfg.dropout,
    )


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``step`` (linear warmup, then the schedule)."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return factor


def epoch_order(count: int, world: World, generator: torch.Generator) -> torch.Tensor:
    """This worker's training indices for one epoch: a permutation of ``count`` from
    ``generator``; under torchrun DistributedSampler's rule: one order for all (the same
    generator state on every worker), padded with its own head to a multiple of the worker
    count, then strided shards."""
    order = torch.randperm(count, generator=generator)
    if world.size == 1:
        return order
    order = torch.cat([order, order[: math.ceil(count / world.size) * world.size - count]])
    return order[world.rank :: world.size]


def build_augment(mode: str, generator: torch.Generator) -> Augment | None:
    """The training augmentation of ``--augment mode`` (resolved: not ``auto``), drawing from
    ``generator``; None for ``none``."""
    if mode == "none":
        return None
    return Augment(
        crop_padding=4 if "crop" in mode else 0, flip="flip" in mode, generator=generator
    )
