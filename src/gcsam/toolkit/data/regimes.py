"""Training regimes that stand in for small, noisy and imbalanced data: a seeded change of the
training split only (validation and test are never touched).

In the order applied, each seeded by the run's seed alone, so every optimizer of a seed trains
on the same images with the same labels:

1. ``imbalance`` (ratio r >= 1): long-tailed subsampling as in CIFAR-LT. Class k of K keeps
   ``round(n * r ** (-k / (K - 1)))`` images, n being the smallest class's count, so class 0
   keeps n and class K - 1 keeps n / r (at least one).
2. ``train_size`` (a count, or a fraction of the split): a stratified subset. Each class keeps
   its share of the images (largest remainders round), and at least one image.
3. ``label_noise`` (p in [0, 1)): exactly ``round(p * N)`` labels, picked uniformly, are made
   wrong. ``"symmetric"`` gives each a uniformly drawn *other* class; ``"pair"`` (class-dependent
   pair flip, as in Han et al. 2018's Co-teaching) gives class k the label ``(k + 1) mod K``. So p
   is the fraction of wrong labels in both kinds.
4. ``val_label_noise``: ``"clean"`` (the default) leaves the validation labels as loaded;
   ``"same"`` makes ``round(p * N_val)`` of them wrong in the same way (its own stream), as a
   user whose labels are noisy also validates on noisy labels. Test labels are always clean.

The normalization statistics are recomputed on the images kept: a user with 500 images has
only their statistics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._common import DataError
from .splits import DataSplits, Split, _rng, channel_stats

NOISE_KINDS: tuple[str, ...] = ("symmetric", "pair")
"""How noisy labels are drawn: any other class uniformly, or the next class (pair flip)."""
VAL_LABEL_NOISE: tuple[str, ...] = ("clean", "same")
"""Whether the validation labels stay clean or get the training split's noise."""

# Streams of their own, apart from the splits' salts (1-3).
_SALT_IMBALANCE, _SALT_SUBSET, _SALT_NOISE, _SALT_VAL_NOISE = 4, 5, 6, 7


@dataclass(frozen=True)
class Regime:
    """How to change a training split; the defaults change nothing.

    Attributes:
        train_size: images to keep, an int >= 1, or a fraction in (0, 1); None keeps all.
        label_noise: the fraction of training labels made wrong, in [0, 1).
        noise_kind: one of :data:`NOISE_KINDS`.
        imbalance: the largest class's count over the smallest's, >= 1 (1: as loaded).
        val_label_noise: one of :data:`VAL_LABEL_NOISE`.
    """

    train_size: float | None = None
    label_noise: float = 0.0
    noise_kind: str = "symmetric"
    imbalance: float = 1.0
    val_label_noise: str = "clean"

    def __post_init__(self) -> None:
        size = self.train_size
        if size is not None and (
            isinstance(size, bool)
            or not isinstance(size, int | float)
            or not (0 < size < 1 or (size >= 1 and float(size).is_integer()))
        ):
            raise ValueError(
                f"train_size must be an integer >= 1 or a fraction in (0, 1), got {size!r}"
            )
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise!r}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(
                f"noise_kind must be one of {', '.join(NOISE_KINDS)}, got {self.noise_kind!r}"
            )
        if self.val_label_noise not in VAL_LABEL_NOISE:
            raise ValueError(
                f"val_label_noise must be one of {', '.join(VAL_LABEL_NOISE)}, "
                f"got {self.val_label_noise!r}"
            )
        if not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1, got {self.imbalance!r}")

    @property
    def changes_data(self) -> bool:
        return self.train_size is not None or self.label_noise > 0 or self.imbalance > 1


def apply_regime(splits: DataSplits, regime: Regime, seed: int) -> tuple[DataSplits, dict]:
    """``splits`` with its training split (and with ``val_label_noise="same"`` its validation
    labels) changed by ``regime`` (see the module docstring), and a record of what was done: the
    train size, per-class counts and the labels flipped.

    Raises:
        DataError: ``train_size`` is more than the training split holds or fewer than its
            classes, naming the setting and the sizes.
    """
    images, labels = splits.train.images, splits.train.labels.numpy()
    num_classes = splits.num_classes
    keep = np.arange(len(labels))
    if regime.imbalance > 1:
        keep = keep[
            _long_tailed(labels, num_classes, regime.imbalance, _rng(seed, _SALT_IMBALANCE))
        ]
    if regime.train_size is not None:
        name = splits.name + (" after the imbalance" if regime.imbalance > 1 else "")
        size = _subset_size(regime.train_size, len(keep), num_classes, name)
        keep = keep[_stratified(labels[keep], size, _rng(seed, _SALT_SUBSET))]
    if regime.label_noise > 0 and num_classes < 2:
        raise DataError(f"label_noise needs at least 2 classes; {splits.name} has {num_classes}")
    observed = labels[keep]
    noisy, flipped = _noisy(observed, num_classes, regime, _rng(seed, _SALT_NOISE))
    train = Split(images[torch.from_numpy(keep)], torch.from_numpy(noisy))
    mean, std = (
        channel_stats(train.images) if len(keep) < len(labels) else (splits.mean, splits.std)
    )
    record = {
        "train_size": len(keep),
        "class_counts": np.bincount(observed, minlength=num_classes).tolist(),
        "flipped_labels": flipped,
        "flipped_fraction": flipped / len(keep),
        "val_label_noise": regime.val_label_noise,
    }
    val = splits.val
    if regime.val_label_noise == "same" and regime.label_noise > 0 and len(val):
        val_noisy, val_flipped = _noisy(
            val.labels.numpy(), num_classes, regime, _rng(seed, _SALT_VAL_NOISE)
        )
        val = Split(val.images, torch.from_numpy(val_noisy))
        record |= {
            "val_flipped_labels": val_flipped,
            "val_flipped_fraction": val_flipped / len(val),
        }
    changed = dataclasses.replace(splits, train=train, val=val, mean=mean, std=std)
    return changed, record


def _subset_size(train_size: float, available: int, num_classes: int, name: str) -> int:
    size = math.floor(train_size * available + 0.5) if train_size < 1 else int(train_size)
    if size > available:
        raise DataError(
            f"train_size {train_size:g} is more than the {available} training images of "
            f"{name}; pass at most {available}, or a fraction"
        )
    if size < num_classes:
        raise DataError(
            f"train_size {train_size:g} gives {size} training images, fewer than the "
            f"{num_classes} classes of {name}; keep at least one image per class"
        )
    return size


def _long_tailed(
    labels: np.ndarray, num_classes: int, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Sorted indices keeping class k's ``round(n * ratio ** (-k / (K - 1)))`` images."""
    counts = np.bincount(labels, minlength=num_classes)
    n = int(counts[counts > 0].min())
    kept = []
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        share = ratio ** (-k / max(num_classes - 1, 1))
        count = min(len(members), max(1, math.floor(n * share + 0.5)))
        kept.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(kept))


def _stratified(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``size`` items, each class in proportion (largest remainders, at
    least one of every class present)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.maximum(np.floor(quota).astype(np.int64), 1)
    # Largest remainders over what is taken: a class raised to its one image has used its share.
    for i in np.argsort(-(quota - take), kind="stable"):
        if take.sum() >= size:
            break
        take[i] += 1
    while take.sum() > size:  # only when the minimum of one per class overshot
        take[np.argmax(take)] -= 1
    kept = [
        rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(kept))


def _noisy(
    labels: np.ndarray, num_classes: int, regime: Regime, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """(labels with ``round(p * N)`` of them made wrong, that count)."""
    count = math.floor(regime.label_noise * len(labels) + 0.5)
    noisy = labels.astype(np.int64, copy=True)
    if count == 0:
        return noisy, 0
    chosen = rng.choice(len(labels), size=count, replace=False)
    if regime.noise_kind == "pair":
        noisy[chosen] = (labels[chosen] + 1) % num_classes
    else:  # an offset in 1..K-1 is a uniformly drawn other class
        noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=count)) % num_classes
    return noisy, count


def regime_of(settings: Any) -> Regime:
    """The :class:`Regime` of anything with its fields (a ``TrainConfig``)."""
    return Regime(
        train_size=settings.train_size,
        label_noise=settings.label_noise,
        noise_kind=settings.noise_kind,
        imbalance=settings.imbalance,
        val_label_noise=settings.val_label_noise,
    )
