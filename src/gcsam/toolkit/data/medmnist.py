"""The 2-D single-label MedMNIST data sets (``breastmnist``, ``pneumoniamnist``, ...):
``<data_dir>/<name>.npz`` (or MedMNIST+'s ``<name>_<size>.npz``) with the official splits."""

from __future__ import annotations

import math
import zipfile
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
from numpy.lib import format as npy_format

from ._common import DataError, Raw, abs_path, check_labels
from .registry import DatasetSpec, refuse_dataset, register_dataset

_DEFAULT_DIR = Path("~/.medmnist")  # where the medmnist package downloads to

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
_CLASSES: dict[str, tuple[str, ...]] = {
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
MEDMNIST_DATASETS: tuple[str, ...] = tuple(_CLASSES)
_SPLITS = ("train", "val", "test")

# The largest MedMNIST+ array, pathmnist_224's train images, is 13.5 GB; real images compress
# a few times at most, a crafted member of zeros ~1000x (4 MB of file, 4 GB of memory).
MAX_ARRAY_BYTES = 16 * 2**30
MAX_RATIO = 50
_RATIO_FLOOR = 16 * 2**20  # smaller arrays (labels) may compress as well as they like


_HEADER_READERS = MappingProxyType(
    {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
)


class _Header(NamedTuple):
    """What a ``.npy`` member's header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _load_medmnist(
    spec: DatasetSpec, data_dir: Path | None, image_size: int | None, *, classes: tuple[str, ...]
) -> Raw:
    root = spec.folder(data_dir)
    # MedMNIST+ ships larger sizes as <name>_64.npz, _128, _224: prefer the one asked for.
    candidates = [root / f"{spec.name}_{image_size}.npz"] if image_size else []
    candidates.append(root / f"{spec.name}.npz")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(
            f"{spec.display} not found: expected {candidates[-1].name} in {abs_path(root)}. "
            f"{spec.how_to_get}"
        )
    keys = [f"{split}_{kind}" for split in _SPLITS for kind in ("images", "labels")]
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [k for k in keys if f"{k}.npy" not in names]
            if missing:
                raise DataError(
                    f"{abs_path(path)} lacks {', '.join(missing)}; expected {spec.expected}. "
                    f"{spec.how_to_get}"
                )
            # Every header is checked before any array is read, so nothing is allocated for a
            # file that is refused.
            infos = {k: archive.getinfo(f"{k}.npy") for k in keys}
            headers = {k: _header(archive, infos[k], path) for k in keys}
            for split in _SPLITS:
                _check_split(headers, split, path)
            arrays = {k: _read(archive, infos[k]) for k in keys}
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated member, bad CRC, ...
        raise DataError(f"{abs_path(path)} is not a valid MedMNIST .npz: {e}") from e
    parts = {
        split: _part(arrays[f"{split}_images"], arrays[f"{split}_labels"], len(classes), path)
        for split in _SPLITS
    }
    return Raw(parts, classes, abs_path(path))


def _header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> _Header:
    """A member's declared shape and dtype, refused unless they match the zip entry's declared
    size, are plain numbers and stay within the limits; nothing is decompressed past the header.
    """
    where = f"{abs_path(path)}, member {info.filename}"
    with archive.open(info) as f:
        version = npy_format.read_magic(f)
        read = _HEADER_READERS.get(version)
        if read is None:
            raise DataError(f"{where}: unsupported .npy format version {version}")
        shape, _, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{where}: dtype {dtype} refused (plain numbers only, never objects)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(
            f"{where}: the header declares {shape} {dtype}, {nbytes:,} bytes, more than the "
            f"{MAX_ARRAY_BYTES:,}-byte limit for one array"
        )
    if offset + nbytes != info.file_size:
        raise DataError(
            f"{where}: the header declares {shape} {dtype} ({nbytes:,} bytes) but the zip entry "
            f"holds {info.file_size - offset:,} bytes of data"
        )
    if nbytes > _RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise DataError(
            f"{where}: {info.compress_size:,} compressed bytes declare {nbytes:,} (more than "
            f"{MAX_RATIO}x, a decompression bomb rather than images)"
        )
    return _Header(shape, dtype)


def _check_split(headers: dict[str, _Header], split: str, path: Path) -> None:
    """The images and labels of ``split`` as ``_part`` needs them, from their headers alone."""
    images, labels = headers[f"{split}_images"], headers[f"{split}_labels"]
    if images.dtype != np.uint8 or len(images.shape) not in (3, 4):
        raise DataError(
            f"{abs_path(path)}: {split}_images must be uint8 (N, H, W) or (N, H, W, C), got "
            f"{images.dtype} {images.shape}"
        )
    if len(labels.shape) == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{abs_path(path)}: {split}_labels has shape {labels.shape}: multi-label data sets "
            "are not supported (gcsam trains single-label classifiers)"
        )
    if labels.dtype.kind not in "iu" or len(labels.shape) not in (1, 2):
        raise DataError(
            f"{abs_path(path)}: {split}_labels must be integer (N, 1), got {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{abs_path(path)}: {images.shape[0]} {split}_images but {labels.shape[0]} "
            f"{split}_labels"
        )


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    # The zip entry stops at its declared size, which _header matched to the array's.
    with archive.open(info) as f:
        return npy_format.read_array(f, allow_pickle=False)


def _part(
    images: np.ndarray, labels: np.ndarray, classes: int, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """One split's checked arrays as ``(N, C, H, W)`` images and ``(N,)`` labels."""
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = labels.reshape(-1).astype(np.int64)
    check_labels(labels, classes, path)
    return images, labels


def _spec(name: str, classes: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        summary=f"MedMNIST {name}.npz, {len(classes)} classes, official splits (default folder "
        f"{_DEFAULT_DIR})",
        load=partial(_load_medmnist, classes=classes),
        expected=f"{name}.npz with train/val/test _images and _labels arrays",
        how_to_get=f"Download {name}.npz from https://medmnist.com (Zenodo record "
        "https://zenodo.org/records/10519652), or `pip install medmnist` and run "
        "`python -m medmnist download`, and pass --data-dir (default ~/.medmnist)",
        default_dir=_DEFAULT_DIR,
        default_model="convnet",
    )


for _name, _classes in _CLASSES.items():
    register_dataset(_spec(_name, _classes))

refuse_dataset(
    "chestmnist",
    "ChestMNIST is multi-label (14 binary findings per image); gcsam trains single-label "
    "classifiers",
)
for _organ in ("organ", "nodule", "adrenal", "fracture", "vessel", "synapse"):
    refuse_dataset(f"{_organ}mnist3d", "the 3-D MedMNIST volumes are not images")
