"""The data set registry: the one place data set names, and every fact about each, live.

Every loader reads a data set's standard on-disk format (nothing is ever downloaded) and returns
uint8 images ``(N, C, H, W)`` with int64 labels ``(N,)``; :func:`load_dataset` resizes and
splits them (see :mod:`.splits`).

To add a data set:

1. write a loader ``load(spec, data_dir, image_size) -> Raw`` (the official splits as uint8
   ``(N, C, H, W)`` / int64 ``(N,)`` numpy arrays, the class names, the source) in its own module;
2. in that module, ``register_dataset(DatasetSpec(name=..., summary=..., load=load, ...))``;
3. import that module in ``__init__.py``, at the place its name should take in ``--help``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..._util.validate import check_choice, check_int
from ._common import DataError, Raw, abs_path, prepare
from .augment import AUGMENTATIONS
from .splits import DataSplits, channel_stats, make_splits

# (the spec itself, for its messages; data_dir as given, None for the default; image_size)
Loader = Callable[["DatasetSpec", Path | None, int | None], Raw]


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: its name, its loader and what to tell people about it.

    Attributes:
        name: the canonical name, lower case (``load_dataset`` is case-insensitive).
        summary: one line for ``--help``.
        load: reads the files into a :class:`Raw`; raises :class:`DataError` on bad files.
        default_augment: what ``augment="auto"`` trains with: ``"crop+flip"`` for natural or
            medical photographs, where a crop or mirror image is still the class.
        display: the name in messages (``"CIFAR-10"``); the name when empty.
        expected: the files the data folder must hold, for messages; empty when none are read.
        how_to_get: where to get those files, for messages.
        default_dir: the folder read when no ``data_dir`` is given (``~`` allowed).
        default_model: the model trained when none is named: sized so that it can fit (and
            overfit) this data in a few epochs on a CPU.
        default_epochs: the epochs trained when none are given: enough for the default model to
            converge, few enough that ``gcsam compare`` stays quick on this data.
    """

    name: str
    summary: str
    load: Loader
    default_augment: str = "none"
    display: str = ""
    expected: str = ""
    how_to_get: str = ""
    default_dir: Path | None = None
    default_model: str = "small-cnn"
    default_epochs: int = 20

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"a data set name must be stripped lower case, got {self.name!r}")
        check_choice("default_augment", self.default_augment, AUGMENTATIONS)
        if isinstance(self.default_epochs, bool) or not isinstance(self.default_epochs, int):
            raise ValueError(f"default_epochs must be an int, got {self.default_epochs!r}")
        if self.default_epochs < 1:
            raise ValueError(f"default_epochs must be >= 1, got {self.default_epochs}")
        if not self.display:
            object.__setattr__(self, "display", self.name)

    def folder(self, data_dir: Path | None) -> Path:
        """``data_dir`` or the default folder; a DataError saying how to get the data when
        neither is a directory."""
        if data_dir is not None:
            if not data_dir.is_dir():
                raise DataError(
                    f"{self.display} not found: {abs_path(data_dir)} is not a directory; "
                    f"expected {self.expected}. {self.how_to_get}"
                )
            return data_dir
        default = self.default_dir.expanduser() if self.default_dir is not None else None
        if default is not None and default.is_dir():
            return default
        where = f" (looked in the default {abs_path(default)})" if default is not None else ""
        raise DataError(
            f"{self.display} needs a data directory{where}: expected {self.expected}. "
            f"{self.how_to_get}"
        )


DATASETS: dict[str, DatasetSpec] = {}
# Names people will try that gcsam cannot train on, with the reason.
_REFUSED: dict[str, str] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to ``DATASETS`` (last in ``--help``); a ValueError if the name is taken."""
    if spec.name in DATASETS or spec.name in _REFUSED:
        raise ValueError(f"data set name {spec.name!r} is taken")
    DATASETS[spec.name] = spec
    return spec


def refuse_dataset(name: str, reason: str) -> None:
    """Make ``load_dataset(name)`` explain why ``name`` is not supported."""
    if name in DATASETS:
        raise ValueError(f"data set {name!r} is registered; it cannot also be refused")
    _REFUSED[name] = reason


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
    grayscale_to_rgb: bool = False,
) -> DataSplits:
    """Load a data set into memory and split it.

    Args:
        name: a key of ``DATASETS`` (case-insensitive).
        data_dir: the folder with the data set's files (or, for CIFAR, MNIST and Fashion-MNIST,
            its parent). ``None``: the spec's ``default_dir`` (Debian's Fashion-MNIST folder,
            ``~/.medmnist`` for MedMNIST); ignored by ``digits``.
        image_size: resize every image to ``image_size x image_size`` (bilinear). ``None``: the
            native size (``image-folder``: 64).
        val_fraction: the validation share when there is no official validation split: of the
            official train set (MNIST, CIFAR), of all images (digits, image-folder). Ignored
            with ``folds`` and for MedMNIST.
        test_fraction: the test share of all images when there is no official test split
            (digits, image-folder); ignored otherwise.
        seed: seeds every split; the same seed gives the same splits.
        folds, fold: stratified ``folds``-fold cross-validation on the train + val pool; fold
            ``fold`` is the validation split and the test split stays fixed.
        grayscale_to_rgb: repeat a single channel three times.

    Raises:
        ValueError: a bad argument (an unknown name lists the valid ones).
        DataError: missing or malformed files.
    """
    spec = _spec(name)
    _check_args(image_size, val_fraction, test_fraction, seed, folds, fold)
    folder = None if data_dir is None else Path(data_dir).expanduser()
    raw = spec.load(spec, folder, image_size)
    parts = {k: prepare(v, image_size, grayscale_to_rgb) for k, v in raw.parts.items()}
    train, val, test = make_splits(parts, val_fraction, test_fraction, seed, folds, fold)
    mean, std = channel_stats(train.images)
    return DataSplits(
        name=spec.name,
        train=train,
        val=val,
        test=test,
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
        source=raw.source,
    )


def _spec(name: str) -> DatasetSpec:
    if not isinstance(name, str):
        raise TypeError(f"data set name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _REFUSED:
        raise ValueError(f"data set {name!r} is not supported: {_REFUSED[key]}")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[key]


def _check_args(
    image_size: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> None:
    if image_size is not None:
        check_int("image_size", image_size, 1)
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(f"{arg} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    check_int("seed", seed, None)
    if folds is not None:
        check_int("folds", folds, 2)
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1} for folds={folds}, got {fold!r}")
