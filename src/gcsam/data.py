"""In-memory image data sets for the experiment toolkit.

Every loader reads a data set's standard on-disk format (nothing is ever downloaded) and returns
uint8 images ``(N, C, H, W)`` with int64 labels ``(N,)``, split into train / val / test:

* ``digits``: scikit-learn's bundled 8x8 digits (no files needed).
* ``mnist``, ``fashion-mnist``: the IDX files, plain or ``.gz``.
* ``cifar10``, ``cifar100``: the official "python version" (read by a restricted unpickler that
  never imports or calls anything from the file) or the "binary version".
* MedMNIST (``breastmnist``, ``pneumoniamnist``, ...): ``<data_dir>/<name>.npz``.
* ``image-folder``: ``<data_dir>/<class>/*.png`` (the BUSI and COVID-19 Radiography layouts).

Data sets with an official test split keep it; the others get a stratified, seeded test split.
Validation is the official one (MedMNIST) or carved stratified from the training pool, or, with
``folds``, fold ``fold`` of a stratified k-fold of the train + val pool.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = [
    "DATASETS",
    "MEDMNIST_DATASETS",
    "Augment",
    "DataError",
    "DataSplits",
    "Split",
    "iterate_batches",
    "load_dataset",
]


class DataError(ValueError):
    """A data set's files are missing or malformed; the message says what, where and how to fix."""


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


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
        name: the canonical data set name (one of ``DATASETS``).
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


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

# MedMNIST's own label names (medmnist/info.py); label k is the k-th entry.
_ORGAN = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
_MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),  # ordinal DR grades; MedMNIST names them 0..4
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "tissuemnist": (
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ),
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
MEDMNIST_DATASETS: tuple[str, ...] = tuple(_MEDMNIST_CLASSES)

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "image-folder",
    *MEDMNIST_DATASETS,
)

# Names people will try that gcsam cannot train on, with the reason.
_REFUSED = {
    "chestmnist": "ChestMNIST is multi-label (14 binary findings per image); gcsam trains "
    "single-label classifiers",
    **{
        f"{n}mnist3d": "the 3-D MedMNIST volumes are not images"
        for n in ("organ", "nodule", "adrenal", "fracture", "vessel", "synapse")
    },
}

_DIGIT_NAMES = [str(k) for k in range(10)]
_FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_IMAGE_FOLDER_SIZE = 64  # default side for image-folder: full-size scans are slow on CPU


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


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
        name: one of ``DATASETS`` (case-insensitive).
        data_dir: the folder with the data set's files (or, for CIFAR, MNIST and Fashion-MNIST,
            its parent). ``None``: Debian's Fashion-MNIST folder, ``~/.medmnist`` for MedMNIST;
            ignored by ``digits``.
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
    key = _check_name(name)
    image_size = _check_args(image_size, val_fraction, test_fraction, seed, folds, fold)
    if key == "digits":
        raw = _load_digits()
    elif key == "image-folder":
        raw = _load_image_folder(_root(key, data_dir), image_size or _IMAGE_FOLDER_SIZE)
    elif key in ("mnist", "fashion-mnist"):
        raw = _load_mnist(key, _root(key, data_dir))
    elif key in ("cifar10", "cifar100"):
        raw = _load_cifar(key, _root(key, data_dir))
    else:
        raw = _load_medmnist(key, _root(key, data_dir), image_size)

    parts = {k: _prepare(v, image_size, grayscale_to_rgb) for k, v in raw.parts.items()}
    train, val, test = _make_splits(parts, val_fraction, test_fraction, seed, folds, fold)
    mean, std = _channel_stats(train.images)
    return DataSplits(
        name=key,
        train=train,
        val=val,
        test=test,
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
        source=raw.source,
    )


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"data set name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _REFUSED:
        raise ValueError(f"data set {name!r} is not supported: {_REFUSED[key]}")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _check_args(
    image_size: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> int | None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if image_size is not None and (not is_int(image_size) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"{arg} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if folds is not None:
        if not is_int(folds) or folds < 2:
            raise ValueError(f"folds must be an int >= 2 or None, got {folds!r}")
        if not is_int(fold) or not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1} for folds={folds}, got {fold!r}")
    return None if image_size is None else int(image_size)


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


def _make_splits(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> tuple[Split, Split, Split]:
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


# --------------------------------------------------------------------------------------------
# Shared post-processing
# --------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """A loader's result: ``parts`` maps 'train' (always), 'val', 'test' (when official) to
    (uint8 ``(N, C, H, W)``, int64 ``(N,)``) numpy arrays."""

    parts: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: Sequence[str]
    source: str


def _prepare(
    part: tuple[np.ndarray, np.ndarray], image_size: int | None, grayscale_to_rgb: bool
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = part
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        images = _resize(images, image_size)
    if grayscale_to_rgb and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images, labels.astype(np.int64, copy=False)


def _resize(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bilinear resize of uint8 ``(N, C, H, W)`` to ``(N, C, size, size)``, antialiased when
    shrinking (like Pillow). torch's uint8 kernel is ~10x faster than a float round trip and
    rounds the same to within one level."""
    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        y = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = y.numpy()
    return out


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``(N, C, H, W)`` scaled to [0, 1].

    From exact per-channel histograms of the 256 levels, so the result is exact up to the final
    division and independent of how the work is split.
    """
    channels = images.shape[1]
    levels = torch.arange(256, dtype=torch.int64)
    mean, std = [], []
    for c in range(channels):
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


def _root(key: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """The folder to read, or the default one; a DataError saying how to get the data."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"{_DISPLAY.get(key, key)} not found: {_abs(root)} is not a directory; "
                f"expected {_expected(key)}. {_how_to_get(key)}"
            )
        return root
    default = _default_dir(key)
    if default is not None and default.is_dir():
        return default
    where = f" (looked in the default {_abs(default)})" if default is not None else ""
    raise DataError(
        f"{_DISPLAY.get(key, key)} needs a data directory{where}: expected {_expected(key)}. "
        f"{_how_to_get(key)}"
    )


def _default_dir(key: str) -> Path | None:
    if key == "fashion-mnist":
        return _DEBIAN_FASHION
    if key in _MEDMNIST_CLASSES:
        return Path("~/.medmnist").expanduser()  # where the medmnist package downloads to
    return None


def _abs(path: Path) -> str:
    return os.path.abspath(path)


_DISPLAY = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "image-folder": "image folder",
}


def _expected(key: str) -> str:
    idx = (
        "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
        "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
    )
    return {
        "mnist": idx,
        "fashion-mnist": idx,
        "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (python "
        "version) or cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin, "
        "batches.meta.txt} (binary version), the folder itself or its parent",
        "cifar100": "cifar-100-python/{train, test, meta} (python version) or "
        "cifar-100-binary/{train.bin, test.bin, fine_label_names.txt} (binary version), the "
        "folder itself or its parent",
        "image-folder": "one subfolder per class holding .png/.jpg/.jpeg/.bmp/.tif images "
        "(<data-dir>/<class>/*.png or <data-dir>/<class>/images/*.png)",
    }.get(key, f"{key}.npz with train/val/test _images and _labels arrays")


def _how_to_get(key: str) -> str:
    if key == "fashion-mnist":
        return (
            "Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; "
            f"files in {_DEBIAN_FASHION}) or download the four .gz files from "
            "https://github.com/zalandoresearch/fashion-mnist and pass --data-dir"
        )
    if key == "mnist":
        return (
            "Download the four .gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
            "(the mirror of http://yann.lecun.com/exdb/mnist/) and pass --data-dir"
        )
    if key in ("cifar10", "cifar100"):
        archive = "cifar-10-python.tar.gz" if key == "cifar10" else "cifar-100-python.tar.gz"
        return (
            f"Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
            f"(tar xzf {archive}) and pass --data-dir"
        )
    if key == "image-folder":
        return (
            "Pass --data-dir pointing at the class folders, e.g. BUSI's Dataset_BUSI_with_GT "
            "(benign/, malignant/, normal/) or the COVID-19 Radiography Database's "
            "COVID-19_Radiography_Dataset (COVID/, Normal/, Viral Pneumonia/)"
        )
    return (
        f"Download {key}.npz from https://medmnist.com (Zenodo record "
        f"https://zenodo.org/records/10519652), or `pip install medmnist` and run "
        f"`python -m medmnist download`, and pass --data-dir (default ~/.medmnist)"
    )


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits  # lazy: only this data set needs scikit-learn

    digits = load_digits()
    # 0..16 ink levels to 0..255, rounded so 16 maps to 255 exactly.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _Raw(
        {"train": (images, digits.target.astype(np.int64))},
        _DIGIT_NAMES,
        "sklearn.datasets.load_digits",
    )


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------


def _load_mnist(key: str, root: Path) -> _Raw:
    subdirs = {
        "mnist": ("mnist", "MNIST/raw", "MNIST"),  # the torchvision layout too
        "fashion-mnist": ("fashion-mnist", "fashion", "FashionMNIST/raw", "FashionMNIST"),
    }[key]
    folder = next(
        (d for d in (root, *(root / s for s in subdirs)) if _idx_path(d, "train", "images")),
        None,
    )
    if folder is None:
        raise DataError(
            f"{_DISPLAY[key]} not found: expected {_expected(key)} in {_abs(root)}. "
            f"{_how_to_get(key)}"
        )
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        kinds = ("images", "labels")
        paths = [_idx_path(folder, prefix, kind) for kind in kinds]
        missing = [f"{prefix}-{k}" for k, p in zip(kinds, paths, strict=True) if p is None]
        if missing:
            raise DataError(
                f"{_DISPLAY[key]} incomplete: {', '.join(missing)} not found in "
                f"{_abs(folder)}; expected {_expected(key)}. {_how_to_get(key)}"
            )
        images = _read_idx(paths[0], ndim=3)
        labels = _read_idx(paths[1], ndim=1)
        if len(images) != len(labels):
            raise DataError(
                f"{_abs(paths[0])} holds {len(images)} images but {_abs(paths[1])} holds "
                f"{len(labels)} labels"
            )
        _check_labels(labels, 10, paths[1])
        parts[split] = (images[:, None], labels.astype(np.int64))
    names = _DIGIT_NAMES if key == "mnist" else _FASHION_NAMES
    return _Raw(parts, names, _abs(folder))


def _idx_path(folder: Path, prefix: str, kind: str) -> Path | None:
    """The IDX file for e.g. ('train', 'images'), plain or gzipped; None when absent."""
    suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    # "-" is the official name; some unpackers write "train-images.idx3-ubyte".
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            path = folder / f"{prefix}-{kind}{sep}{suffix}{ext}"
            if path.is_file():
                return path
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file as a uint8 array of ``ndim`` dimensions."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {_abs(path)}: {e}") from e
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{_abs(path)} is not an IDX file (bad magic number {data[:4].hex()})")
    if data[2] != 0x08:
        raise DataError(f"{_abs(path)}: IDX type code 0x{data[2]:02x}, expected 0x08 (uint8)")
    if data[3] != ndim:
        raise DataError(f"{_abs(path)}: {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{_abs(path)} is truncated: {len(data)} bytes, header alone is {header}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DataError(
            f"{_abs(path)} is truncated or corrupt: {len(data)} bytes, the header's dimensions "
            f"{dims} need {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _check_labels(labels: np.ndarray, num_classes: int, path: Path | str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{_abs(Path(path))}: labels span {labels.min()}..{labels.max()}, expected "
            f"0..{num_classes - 1}"
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def _load_cifar(key: str, root: Path) -> _Raw:
    ten = key == "cifar10"
    folders = (
        ("cifar-10-batches-py", "cifar-10-batches-bin")
        if ten
        else (
            "cifar-100-python",
            "cifar-100-binary",
        )
    )
    py_marker, bin_marker = ("data_batch_1", "data_batch_1.bin") if ten else ("train", "train.bin")
    for folder in (root, *(root / f for f in folders)):
        if (folder / py_marker).is_file():
            return _load_cifar_python(key, folder)
        if (folder / bin_marker).is_file():
            return _load_cifar_binary(key, folder)
    hint = ""
    archives = [p.name for p in root.glob("cifar-10*.tar.gz" if ten else "cifar-100*.tar.gz")]
    if archives:
        hint = f" ({archives[0]} is there but not extracted: tar xzf {archives[0]})"
    raise DataError(
        f"{_DISPLAY[key]} not found in {_abs(root)}{hint}: expected {_expected(key)}. "
        f"{_how_to_get(key)}"
    )


def _require(folder: Path, names: Sequence[str], key: str) -> list[Path]:
    paths = [folder / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{_DISPLAY[key]} incomplete: {', '.join(missing)} not found in {_abs(folder)}; "
            f"expected {_expected(key)}. {_how_to_get(key)}"
        )
    return paths


def _load_cifar_python(key: str, folder: Path) -> _Raw:
    ten = key == "cifar10"
    classes = 10 if ten else 100
    label_key = "labels" if ten else "fine_labels"
    if ten:
        *train_paths, test_path, meta_path = _require(
            folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"], key
        )
    else:
        *train_paths, test_path, meta_path = _require(folder, ["train", "test", "meta"], key)

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        record = _pickle_dict(path)
        data = record.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{_abs(path)}: 'data' must be a uint8 (N, 3072) array")
        if data.shape[1] != 3072:
            raise DataError(f"{_abs(path)}: 'data' rows have {data.shape[1]} values, expected 3072")
        labels = _int_array(record.get(label_key), path, label_key)
        if len(labels) != len(data):
            raise DataError(f"{_abs(path)}: {len(data)} images but {len(labels)} {label_key}")
        _check_labels(labels, classes, path)
        # Each row is the red, green, then blue 32x32 plane, row-major.
        return data.reshape(-1, 3, 32, 32), labels

    train = [batch(p) for p in train_paths]
    parts = {
        "train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        "test": batch(test_path),
    }
    meta = _pickle_dict(meta_path)
    names_key = "label_names" if ten else "fine_label_names"
    names = meta.get(names_key)
    if not isinstance(names, (list, tuple)) or len(names) != classes:
        raise DataError(f"{_abs(meta_path)}: '{names_key}' must list {classes} class names")
    return _Raw(parts, [_text(n) for n in names], _abs(folder))


def _load_cifar_binary(key: str, folder: Path) -> _Raw:
    ten = key == "cifar10"
    classes = 10 if ten else 100
    if ten:
        *train_paths, test_path, names_path = _require(
            folder,
            [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"],
            key,
        )
    else:
        *train_paths, test_path, names_path = _require(
            folder, ["train.bin", "test.bin", "fine_label_names.txt"], key
        )
    # A record is <label byte> (CIFAR-100: <coarse byte><fine byte>) then 3072 pixel bytes.
    label_bytes = 1 if ten else 2
    record = label_bytes + 3072

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        data = np.fromfile(path, dtype=np.uint8)
        if data.size == 0 or data.size % record:
            raise DataError(
                f"{_abs(path)} is truncated or corrupt: {data.size} bytes is not a whole number "
                f"of {record}-byte records"
            )
        data = data.reshape(-1, record)
        labels = data[:, label_bytes - 1].astype(np.int64)  # the fine label is the last one
        _check_labels(labels, classes, path)
        return data[:, label_bytes:].reshape(-1, 3, 32, 32), labels

    train = [batch(p) for p in train_paths]
    parts = {
        "train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        "test": batch(test_path),
    }
    try:
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {_abs(names_path)}: {e}") from e
    if len(names) != classes:
        raise DataError(f"{_abs(names_path)} lists {len(names)} class names, expected {classes}")
    return _Raw(parts, names, _abs(folder))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int_array(value: Any, path: Path, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value, dtype=np.int64).reshape(len(value))
    raise DataError(f"{_abs(path)}: '{what}' must be a list of ints")


# -- restricted unpickling --------------------------------------------------------------------
#
# The CIFAR "python version" files are pickled dicts whose numpy arrays pickle as calls to
# numpy.core.multiarray._reconstruct, numpy.dtype and ndarray.__setstate__. Unpickling them with
# pickle.load would run any callable the file names. Here find_class never returns anything
# real from the file's point of view: the few globals a numpy array needs map to inert stubs
# that only record their arguments, and the arrays are rebuilt afterwards with np.frombuffer
# from validated plain data (simple numeric dtypes only, no object arrays).


class _Refused(pickle.UnpicklingError):
    pass


class _NdarrayMarker:
    """Stands in for numpy.ndarray; only _reconstruct accepts it."""


class _DtypeStub:
    """Records a ``numpy.dtype(spec, align, copy)`` call and its ``__setstate__``."""

    def __init__(self, spec: Any = None, *_: Any) -> None:
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise _Refused("only simple numeric dtypes are allowed (no structured dtypes)")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        spec = _text(self.spec)
        if spec not in {f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)} | {"f4", "f8", "b1"}:
            raise _Refused(f"dtype {spec!r} is not a plain numeric dtype")
        order = {"<": "<", ">": ">", "|": "|", "=": "="}.get(_text(self.byteorder))
        if order is None:
            raise _Refused(f"bad dtype byte order {self.byteorder!r}")
        return np.dtype(spec).newbyteorder(order) if order != "|" else np.dtype(spec)


class _ArrayStub:
    """Records ``_reconstruct(ndarray, ...)`` + ``__setstate__`` (or ``_frombuffer``)."""

    def __init__(self) -> None:
        self.shape: Any = None
        self.dtype: Any = None
        self.fortran: Any = False
        self.raw: Any = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw); very old numpy omitted the version.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _Refused("unexpected ndarray state")
        self.shape, self.dtype, self.fortran, self.raw = state

    def to_numpy(self) -> np.ndarray:
        if not isinstance(self.dtype, _DtypeStub):
            raise _Refused("ndarray without a dtype")
        dtype = self.dtype.to_numpy()
        shape = self.shape
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _Refused(f"bad ndarray shape {shape!r}")
        raw = self.raw
        if isinstance(raw, str):  # a Python 2 str read without encoding='bytes'
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused("ndarray data must be raw bytes (object arrays are refused)")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise _Refused(f"ndarray data is {len(raw)} bytes, shape {shape} needs more or less")
        order = "F" if self.fortran else "C"
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


class _ScalarStub:
    def __init__(self, dtype: Any, raw: Any) -> None:
        self.dtype, self.raw = dtype, raw

    def to_python(self) -> Any:
        array = _ArrayStub()
        array.shape, array.dtype, array.raw = (), self.dtype, self.raw
        return array.to_numpy().item()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if subtype is not _NdarrayMarker:
        raise _Refused("_reconstruct of anything but numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    array = _ArrayStub()
    array.raw = bytes(buffer) if isinstance(buffer, (bytes, bytearray)) else buffer
    array.dtype, array.shape, array.fortran = dtype, shape, order == "F"
    return array


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 pickles bytes for protocol < 3 as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is only allowed as the latin1 bytes encoding")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
    **{(f"{m}.multiarray", "_reconstruct"): _reconstruct for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.multiarray", "scalar"): _ScalarStub for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids are not allowed")


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace the stubs in an unpickled tree by numpy arrays and Python numbers."""
    if depth > 32:
        raise _Refused("nested too deeply")
    if isinstance(obj, (_ArrayStub, _DtypeStub, _ScalarStub)):
        if isinstance(obj, _ArrayStub):
            return obj.to_numpy()
        if isinstance(obj, _ScalarStub):
            return obj.to_python()
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        # Long lists of plain ints (labels) are the common case: skip the recursion for them.
        if all(type(v) is int for v in obj):
            return obj
        return [_materialize(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray)):
        return obj
    raise _Refused(f"unexpected object of type {type(obj).__name__}")


def _safe_unpickle(path: Path) -> Any:
    """Unpickle ``path`` without running any code from it (see the note above)."""
    try:
        with open(path, "rb") as f:
            # encoding='bytes': Python 2 str (the original CIFAR files) arrives as bytes.
            return _materialize(_SafeUnpickler(f, encoding="bytes").load())
    except _Refused as e:
        raise DataError(f"{_abs(path)}: unsafe or unexpected pickle content: {e}") from e
    except Exception as e:  # any other malformation: truncated file, bad opcode, ...
        raise DataError(f"{_abs(path)} is not a valid CIFAR pickle: {e}") from e


def _pickle_dict(path: Path) -> dict[str, Any]:
    obj = _safe_unpickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{_abs(path)}: expected a pickled dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------------
# MedMNIST
# --------------------------------------------------------------------------------------------


def _load_medmnist(key: str, root: Path, image_size: int | None) -> _Raw:
    # MedMNIST+ ships larger sizes as <name>_64.npz, _128, _224: prefer the one asked for.
    candidates = [root / f"{key}_{image_size}.npz"] if image_size else []
    candidates.append(root / f"{key}.npz")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(
            f"{key} not found: expected {candidates[-1].name} in {_abs(root)}. {_how_to_get(key)}"
        )
    names = _MEDMNIST_CLASSES[key]
    parts = {}
    try:
        # allow_pickle=False: a .npz can otherwise hold pickled objects that run code.
        with np.load(path, allow_pickle=False) as archive:
            for split in ("train", "val", "test"):
                missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in archive]
                if missing:
                    raise DataError(
                        f"{_abs(path)} lacks {', '.join(missing)}; expected train/val/test "
                        f"_images and _labels arrays. {_how_to_get(key)}"
                    )
                images = archive[f"{split}_images"]
                labels = archive[f"{split}_labels"]
                parts[split] = _medmnist_part(images, labels, len(names), path, split)
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated member, pickled object array, ...
        raise DataError(f"{_abs(path)} is not a valid MedMNIST .npz: {e}") from e
    return _Raw(parts, names, _abs(path))


def _medmnist_part(
    images: np.ndarray, labels: np.ndarray, classes: int, path: Path, split: str
) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{_abs(path)}: {split}_images must be uint8 (N, H, W) or (N, H, W, C), got "
            f"{images.dtype} {images.shape}"
        )
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{_abs(path)}: {split}_labels has shape {labels.shape}: multi-label data sets "
            "are not supported (gcsam trains single-label classifiers)"
        )
    if labels.dtype.kind not in "iu" or labels.ndim not in (1, 2):
        raise DataError(f"{_abs(path)}: {split}_labels must be integer (N, 1), got {labels.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(
            f"{_abs(path)}: {len(images)} {split}_images but {len(labels)} {split}_labels"
        )
    _check_labels(labels, classes, path)
    return images, labels


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _load_image_folder(root: Path, size: int) -> _Raw:
    files, labels, classes = _list_image_folder(root)
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    # Pillow releases the GIL while decoding and resizing, so threads overlap real work.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(lambda p: _read_image(p, size), files)):
            images[i] = image
    return _Raw({"train": (images, np.asarray(labels, dtype=np.int64))}, classes, _abs(root))


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their labels and the sorted class names.

    A class folder's images are its own files or, when it has an ``images/`` subfolder (the
    COVID-19 Radiography layout), that folder's; ``masks/`` subfolders and any file whose name
    contains ``_mask`` (BUSI's ``x_mask.png``, ``x_mask_1.png``) are segmentation masks, skipped.
    """
    classes = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"
    )
    if not classes:
        raise DataError(
            f"image folder {_abs(root)} has no class subfolders; expected "
            f"{_expected('image-folder')}. {_how_to_get('image-folder')}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        source = folder / "images" if (folder / "images").is_dir() else folder
        found = sorted(
            p
            for p in source.iterdir()
            if p.is_file()
            and p.suffix.lower() in _IMAGE_SUFFIXES
            and not p.name.startswith(".")
            and "_mask" not in p.stem.lower()
        )
        if not found:
            raise DataError(
                f"class folder {_abs(source)} holds no images (.png/.jpg/.jpeg/.bmp/.tif, "
                f"masks excluded); expected {_expected('image-folder')}"
            )
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(3, size, size)`` RGB (grayscale repeated), bilinear resize."""
    from PIL import Image  # lazy: only image folders need Pillow

    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, naming the file
            if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                # 16-bit grayscale: convert("RGB") would clip, so scale to 8 bits first.
                a = np.asarray(img).astype(np.float64)
                if img.mode != "I" or a.max() > 255:
                    a = a / 257.0
                img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise DataError(f"cannot read image {_abs(path)}: {e}") from e
    return array.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Batches and augmentation
# --------------------------------------------------------------------------------------------


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(split)
    if indices is not None:
        order = torch.as_tensor(indices)
        if order.ndim != 1 or order.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
            torch.uint8,
        ):
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


class Augment:
    """Random crop with zero padding, then random horizontal flip, per image, batched.

    For each image, in this order of draws from ``generator``: a vertical offset and a horizontal
    offset in ``0..2 * crop_padding`` for all images, then (``flip``) a coin for all images.
    The image is padded with ``crop_padding`` zeros on every side and the ``H x W`` window at
    that offset is kept, mirrored left-right when the coin is 1. The same generator state gives
    the same output. Works on any device; the draws happen on ``generator``'s device (CPU when
    None: the global RNG).
    """

    def __init__(
        self, crop_padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
    ) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.generator = generator

    def __call__(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> augmented ``(N, C, H, W)`` of the same dtype and device."""
        if images.ndim != 4:
            raise ValueError(f"Augment expects (N, C, H, W) images, got {tuple(images.shape)}")
        p = self.crop_padding
        if p == 0 and not self.flip:
            return images
        n, c, h, w = images.shape
        device = images.device
        draw_device = self.generator.device if self.generator is not None else torch.device("cpu")

        def draw(high: int) -> Tensor:
            return torch.randint(high, (n,), generator=self.generator, device=draw_device).to(
                device
            )

        rows = torch.arange(h, device=device).expand(n, h)
        cols = torch.arange(w, device=device).expand(n, w)
        out = images
        if p > 0:
            rows = rows + draw(2 * p + 1)[:, None]
            cols = cols + draw(2 * p + 1)[:, None]
            out = F.pad(images, (p, p, p, p))
            # Gather the window rows, then columns: per-image offsets without a Python loop.
            out = out.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * p))
        if self.flip:
            flipped = draw(2).bool()
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"
