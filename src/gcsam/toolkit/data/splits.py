"""Train / val / test splits in memory: the containers, seeded stratified splitting, class
selection and batching.

Data sets with an official test split keep it; the others get a stratified, seeded test split.
Validation is the official one (MedMNIST) or carved stratified from the training pool, or, with
``folds``, fold ``fold`` of a stratified k-fold of the train + val pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..._util.validate import check_int
from ._common import DataError


@dataclass(eq=False)
class Split:
    """One split held in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, pixel values 0..255.
        labels: int64 ``(N,)``, class indices ``0..K-1``.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                "Split.images must be a uint8 (N, C, H, W) tensor, got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                "Split.labels must be an int64 (N,) tensor, got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"Split(images={tuple(self.images.shape)}, labels={tuple(self.labels.shape)})"


@dataclass(eq=False)
class DataSplits:
    """A data set's train / val / test splits and the statistics to normalize them.

    Attributes:
        name: the canonical data set name (a key of ``DATASETS``).
        train, val, test: the splits.
        class_names: ``K`` names; label ``k`` is ``class_names[k]``.
        mean, std: per-channel mean and (population) standard deviation of the train images
            scaled to [0, 1]. A constant channel gets std 1 so normalizing never divides by 0.
        source: where the data was read from (a path, or the scikit-learn function).
    """

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    # (mean, std) as (C, 1, 1) float32 tensors per device, so normalize() copies them once.
    _stats: dict[torch.device, tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    def normalize(self, images_uint8: Tensor) -> Tensor:
        """float32 ``(x / 255 - mean) / std`` per channel; any shape ``(..., C, H, W)``."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(
                f"normalize() expects uint8 images (0..255), got {images_uint8.dtype}; "
                "normalize before augmenting, once"
            )
        channels = len(self.mean)
        if images_uint8.ndim < 3 or images_uint8.shape[-3] != channels:
            raise ValueError(
                f"normalize() expects (..., {channels}, H, W) images, got "
                f"{tuple(images_uint8.shape)}"
            )
        device = images_uint8.device
        if device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1)
            self._stats[device] = (mean, std)
        mean, std = self._stats[device]
        return (images_uint8.to(torch.float32) / 255.0 - mean) / std

    def __repr__(self) -> str:
        return (
            f"DataSplits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


def select_classes(splits: DataSplits, names: list[str]) -> DataSplits:
    """Keep only the named classes (e.g. BUSI's benign and malignant), relabelled ``0..K-1`` in
    the order of ``names``; the statistics stay those of the full training set."""
    missing = [n for n in names if n not in splits.class_names]
    if missing:
        raise DataError(
            f"classes {missing} are not in data set {splits.name!r}; its classes are "
            f"{splits.class_names}"
        )
    old = torch.tensor([splits.class_names.index(n) for n in names])

    def keep(split: Split) -> Split:
        mask = (split.labels.unsqueeze(1) == old).any(1)
        relabel = (split.labels[mask].unsqueeze(1) == old).int().argmax(1)
        return Split(split.images[mask], relabel)

    return dataclasses.replace(
        splits,
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        class_names=list(names),
    )


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------

# Salts so each splitting stage draws from its own stream: the test split does not move when
# folds are switched on, and the val carve does not depend on how the test split was drawn.
_SALT_TEST, _SALT_VAL, _SALT_FOLDS = 1, 2, 3


def _rng(seed: int, salt: int) -> np.random.Generator:
    # SeedSequence + PCG64 is numpy's stable, documented stream; no sklearn, no torch version drift.
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, salt]))


def _holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``arange(len(labels))`` into (kept, held out) sorted index arrays.

    Each class of ``n`` items gives ``round(n * fraction)`` to the holdout, but at least one
    when ``n >= 2`` (so every class appears in every split) and never all of them.
    """
    kept, held = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = len(members)
        count = math.floor(n * fraction + 0.5)
        count = min(max(count, 1), n - 1) if n >= 2 else 0
        members = rng.permutation(members)
        held.append(members[:count])
        kept.append(members[count:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _kfold(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified fold id ``(N,)`` of every item.

    Each class is shuffled, the classes are laid end to end, and items are dealt to folds in
    turn: every class is spread evenly and the fold sizes differ by at most one.
    """
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    )
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[order] = np.arange(len(order)) % folds
    return fold_of


def make_splits(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> tuple[Split, Split, Split]:
    """(train, val, test) from a loader's parts (see ``Raw``), as ``load_dataset`` documents."""
    images, labels = parts["train"]
    if "test" in parts:
        test = parts["test"]
    else:  # no official test split: hold out test_fraction of everything
        keep, held = _holdout(labels, test_fraction, _rng(seed, _SALT_TEST))
        test = (images[held], labels[held])
        images, labels = images[keep], labels[keep]

    if folds is not None:
        if "val" in parts:  # official val joins the pool that is cross-validated
            images = np.concatenate([images, parts["val"][0]])
            labels = np.concatenate([labels, parts["val"][1]])
        if len(labels) < folds:
            raise ValueError(f"folds={folds} is more than the {len(labels)} pooled images")
        fold_of = _kfold(labels, folds, _rng(seed, _SALT_FOLDS))
        keep, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        val = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    elif "val" in parts:
        val = parts["val"]
    else:
        # val_fraction is of all images when the test split was carved here too, so that the
        # defaults give 70 / 10 / 20; of the official train set otherwise.
        share = val_fraction if "test" in parts else val_fraction / (1.0 - test_fraction)
        keep, held = _holdout(labels, share, _rng(seed, _SALT_VAL))
        val = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    return _split(images, labels), _split(*val), _split(*test)


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``(N, C, H, W)`` scaled to [0, 1].

    From exact per-channel histograms of the 256 levels, so the result is exact up to the final
    division and independent of how the work is split.
    """
    levels = torch.arange(256, dtype=torch.int64)
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256)
        count = int(counts.sum())
        if count == 0:
            mean.append(0.0)
            std.append(1.0)
            continue
        total, squares = int((counts * levels).sum()), int((counts * levels * levels).sum())
        m = total / (count * 255.0)
        var = max(squares / (count * 255.0**2) - m * m, 0.0)
        mean.append(m)
        std.append(math.sqrt(var) if var > 1e-24 else 1.0)
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    indices: Tensor | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``(uint8 (B, C, H, W), int64 (B,))`` of ``split``, each index once per pass.

    Args:
        shuffle: a random order from ``torch.randperm(len(split), generator=generator)``
            (the global RNG when ``generator`` is None). The permutation is drawn when this
            function is called, not lazily, so restoring ``generator``'s state before the call
            reproduces the order.
        indices: the exact item order to use (a subset or a DDP shard); overrides ``shuffle``.
        drop_last: skip a final batch smaller than ``batch_size``.
    """
    check_int("batch_size", batch_size, 1)
    n = len(split)
    if indices is not None:
        order = torch.as_tensor(indices)
        if order.ndim != 1 or order.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"indices must be a 1-D integer tensor, got {order.dtype} {tuple(order.shape)}"
            )
        order = order.to(torch.int64)
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
            raise ValueError(f"indices must be in 0..{n - 1}")
    elif shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n)
    # A generator, not a loop here, so the permutation above is drawn at the call.
    return _batches(split, order.to(split.images.device), batch_size, drop_last)


def _batches(
    split: Split, order: Tensor, batch_size: int, drop_last: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and idx.numel() < batch_size:
            return
        yield (
            split.images.index_select(0, idx),
            split.labels.index_select(0, idx.to(split.labels.device)),
        )
