"""The 2-D single-label MedMNIST data sets (``breastmnist``, ``pneumoniamnist``, ...):
``<data_dir>/<name>.npz`` (or MedMNIST+'s ``<name>_<size>.npz``) with the official splits."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

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
    parts = {}
    try:
        # allow_pickle=False: a .npz can otherwise hold pickled objects that run code.
        with np.load(path, allow_pickle=False) as archive:
            for split in ("train", "val", "test"):
                missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in archive]
                if missing:
                    raise DataError(
                        f"{abs_path(path)} lacks {', '.join(missing)}; expected {spec.expected}. "
                        f"{spec.how_to_get}"
                    )
                images = archive[f"{split}_images"]
                labels = archive[f"{split}_labels"]
                parts[split] = _part(images, labels, len(classes), path, split)
    except DataError:
        raise
    except Exception as e:  # not a zip, truncated member, pickled object array, ...
        raise DataError(f"{abs_path(path)} is not a valid MedMNIST .npz: {e}") from e
    return Raw(parts, classes, abs_path(path))


def _part(
    images: np.ndarray, labels: np.ndarray, classes: int, path: Path, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """One split's arrays as ``(N, C, H, W)`` images and ``(N,)`` labels, checked."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{abs_path(path)}: {split}_images must be uint8 (N, H, W) or (N, H, W, C), got "
            f"{images.dtype} {images.shape}"
        )
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{abs_path(path)}: {split}_labels has shape {labels.shape}: multi-label data sets "
            "are not supported (gcsam trains single-label classifiers)"
        )
    if labels.dtype.kind not in "iu" or labels.ndim not in (1, 2):
        raise DataError(
            f"{abs_path(path)}: {split}_labels must be integer (N, 1), got {labels.shape}"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(
            f"{abs_path(path)}: {len(images)} {split}_images but {len(labels)} {split}_labels"
        )
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
