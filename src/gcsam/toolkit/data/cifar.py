"""``cifar10`` and ``cifar100``: the official "python version" (read by :mod:`.safe_unpickle`,
never by ``pickle.load``) or "binary version", extracted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ._common import DataError, Raw, abs_path, check_labels, text
from .registry import DatasetSpec, register_dataset
from .safe_unpickle import load_pickle

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps what, in both versions.

    ``python_files`` / ``binary_files`` are the train batches, then the test batch, then the
    class names file; ``label_bytes`` is 1 (CIFAR-10) or 2 (CIFAR-100's coarse, then fine).
    """

    classes: int
    python_folder: str
    binary_folder: str
    python_files: tuple[str, ...]
    binary_files: tuple[str, ...]
    label_key: str
    names_key: str
    label_bytes: int
    stem: str  # of the archives' names: <stem>-python.tar.gz, <stem>-binary.tar.gz

    @property
    def archive(self) -> str:
        return f"{self.stem}-python.tar.gz"


_CIFAR10 = _Layout(
    classes=10,
    python_folder="cifar-10-batches-py",
    binary_folder="cifar-10-batches-bin",
    python_files=(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    binary_files=(
        *(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
        "batches.meta.txt",
    ),
    label_key="labels",
    names_key="label_names",
    label_bytes=1,
    stem="cifar-10",
)
_CIFAR100 = _Layout(
    classes=100,
    python_folder="cifar-100-python",
    binary_folder="cifar-100-binary",
    python_files=("train", "test", "meta"),
    binary_files=("train.bin", "test.bin", "fine_label_names.txt"),
    label_key="fine_labels",
    names_key="fine_label_names",
    label_bytes=2,
    stem="cifar-100",
)


def _load_cifar(
    spec: DatasetSpec, data_dir: Path | None, image_size: int | None, *, layout: _Layout
) -> Raw:
    """The official train and test splits from ``data_dir`` or its extracted archive folder."""
    root = spec.folder(data_dir)
    for folder in (root, root / layout.python_folder, root / layout.binary_folder):
        if (folder / layout.python_files[0]).is_file():
            return _load_python(spec, layout, folder)
        if (folder / layout.binary_files[0]).is_file():
            return _load_binary(spec, layout, folder)
    hint = ""
    archives = sorted(p.name for p in root.glob(f"{layout.stem}-*.tar.gz"))
    if archives:
        hint = f" ({archives[0]} is there but not extracted: tar xzf {archives[0]})"
    raise DataError(
        f"{spec.display} not found in {abs_path(root)}{hint}: expected {spec.expected}. "
        f"{spec.how_to_get}"
    )


def _require(spec: DatasetSpec, folder: Path, names: Sequence[str]) -> list[Path]:
    paths = [folder / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{spec.display} incomplete: {', '.join(missing)} not found in {abs_path(folder)}; "
            f"expected {spec.expected}. {spec.how_to_get}"
        )
    return paths


def _load_python(spec: DatasetSpec, layout: _Layout, folder: Path) -> Raw:
    *train_paths, test_path, meta_path = _require(spec, folder, layout.python_files)

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        record = _pickle_dict(path)
        data = record.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{abs_path(path)}: 'data' must be a uint8 (N, {_PIXELS}) array")
        if data.shape[1] != _PIXELS:
            raise DataError(
                f"{abs_path(path)}: 'data' rows have {data.shape[1]} values, expected {_PIXELS}"
            )
        labels = _int_array(record.get(layout.label_key), path, layout.label_key)
        if len(labels) != len(data):
            raise DataError(
                f"{abs_path(path)}: {len(data)} images but {len(labels)} {layout.label_key}"
            )
        check_labels(labels, layout.classes, path)
        # Each row is the red, green, then blue 32x32 plane, row-major.
        return data.reshape(-1, 3, 32, 32), labels

    parts = _train_test([batch(p) for p in train_paths], batch(test_path))
    names = _pickle_dict(meta_path).get(layout.names_key)
    if (
        not isinstance(names, (list, tuple))
        or len(names) != layout.classes
        or not all(isinstance(n, (str, bytes)) for n in names)
    ):
        raise DataError(
            f"{abs_path(meta_path)}: '{layout.names_key}' must list {layout.classes} class names "
            "as strings"
        )
    return Raw(parts, [text(n) for n in names], abs_path(folder))


def _load_binary(spec: DatasetSpec, layout: _Layout, folder: Path) -> Raw:
    *train_paths, test_path, names_path = _require(spec, folder, layout.binary_files)
    # A record is <label byte> (CIFAR-100: <coarse byte><fine byte>) then the pixel bytes.
    record = layout.label_bytes + _PIXELS

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        data = np.fromfile(path, dtype=np.uint8)
        if data.size == 0 or data.size % record:
            raise DataError(
                f"{abs_path(path)} is truncated or corrupt: {data.size} bytes is not a whole "
                f"number of {record}-byte records"
            )
        data = data.reshape(-1, record)
        labels = data[:, layout.label_bytes - 1].astype(np.int64)  # the fine label is the last
        check_labels(labels, layout.classes, path)
        return data[:, layout.label_bytes :].reshape(-1, 3, 32, 32), labels

    parts = _train_test([batch(p) for p in train_paths], batch(test_path))
    try:
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {abs_path(names_path)}: {e}") from e
    if len(names) != layout.classes:
        raise DataError(
            f"{abs_path(names_path)} lists {len(names)} class names, expected {layout.classes}"
        )
    return Raw(parts, names, abs_path(folder))


def _train_test(
    train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, labels = zip(*train, strict=True)
    return {"train": (np.concatenate(images), np.concatenate(labels)), "test": test}


def _pickle_dict(path: Path) -> dict[str, Any]:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{abs_path(path)}: expected a pickled dict, got {type(obj).__name__}")
    return {text(k): v for k, v in obj.items()}


def _int_array(value: Any, path: Path, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value, dtype=np.int64).reshape(len(value))
    raise DataError(f"{abs_path(path)}: '{what}' must be a list of ints")


def _spec(name: str, display: str, layout: _Layout) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        summary=f"{display}, the official python or binary version, extracted "
        "(--data-dir required)",
        load=partial(_load_cifar, layout=layout),
        default_augment="crop+flip",
        default_model="resnet20",
        display=display,
        expected=(
            f"{layout.python_folder}/{{{', '.join(layout.python_files)}}} (python version) or "
            f"{layout.binary_folder}/{{{', '.join(layout.binary_files)}}} (binary version), "
            "the folder itself or its parent"
        ),
        how_to_get=f"Download {layout.archive} from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"extract it (tar xzf {layout.archive}) and pass --data-dir",
    )


register_dataset(_spec("cifar10", "CIFAR-10", _CIFAR10))
register_dataset(_spec("cifar100", "CIFAR-100", _CIFAR100))
