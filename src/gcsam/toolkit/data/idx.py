"""``mnist`` and ``fashion-mnist``: the four IDX files, plain or ``.gz``."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ._common import DIGIT_NAMES, DataError, Raw, abs_path, check_labels
from .registry import DatasetSpec, register_dataset

_FASHION_NAMES = (
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
)
# MNIST's train images are 47 MB; a header declaring more than this is refused unread.
MAX_IDX_BYTES = 256 * 2**20
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
_EXPECTED = (
    "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
    "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
)


def _load_idx(
    spec: DatasetSpec,
    data_dir: Path | None,
    image_size: int | None,
    *,
    subdirs: Sequence[str],
    class_names: Sequence[str],
) -> Raw:
    """The official train and test splits from ``data_dir`` or one of its ``subdirs``."""
    root = spec.folder(data_dir)
    folder = next(
        (d for d in (root, *(root / s for s in subdirs)) if _idx_path(d, "train", "images")),
        None,
    )
    if folder is None:
        raise DataError(
            f"{spec.display} not found: expected {spec.expected} in {abs_path(root)}. "
            f"{spec.how_to_get}"
        )
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _idx_path(folder, prefix, "images")
        labels_path = _idx_path(folder, prefix, "labels")
        if images_path is None or labels_path is None:
            found = (("images", images_path), ("labels", labels_path))
            missing = ", ".join(f"{prefix}-{kind}" for kind, p in found if p is None)
            raise DataError(
                f"{spec.display} incomplete: {missing} not found in {abs_path(folder)}; "
                f"expected {spec.expected}. {spec.how_to_get}"
            )
        images = _read_idx(images_path, ndim=3)
        labels = _read_idx(labels_path, ndim=1)
        if len(images) != len(labels):
            raise DataError(
                f"{abs_path(images_path)} holds {len(images)} images but "
                f"{abs_path(labels_path)} holds {len(labels)} labels"
            )
        check_labels(labels, len(class_names), labels_path)
        parts[split] = (images[:, None], labels.astype(np.int64))
    return Raw(parts, class_names, abs_path(folder))


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
    """An unsigned-byte IDX file as a uint8 array of ``ndim`` dimensions.

    The header's dimensions are checked against the limit and (plain files) the file's size
    before anything is allocated, and a ``.gz`` is never decompressed past what they declare.
    """
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            dims = _idx_dims(f, path, ndim)
            header, payload = 4 + 4 * ndim, math.prod(dims)
            if payload > MAX_IDX_BYTES:
                raise DataError(
                    f"{abs_path(path)}: the header declares dimensions {dims}, {payload:,} bytes, "
                    f"more than the {MAX_IDX_BYTES:,}-byte limit for an IDX file"
                )
            size = None if gz else os.fstat(f.fileno()).st_size
            if size is None or size == header + payload:
                data = np.empty(payload, dtype=np.uint8)
                got = header + f.readinto(memoryview(data))
                size = got + len(f.read(1))  # one byte past the end tells "too long"
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {abs_path(path)}: {e}") from e
    if size != header + payload:
        held = f"more than {header + payload}" if size > header + payload else str(size)
        raise DataError(
            f"{abs_path(path)} is truncated or corrupt: {held} bytes, the header's dimensions "
            f"{dims} need {header + payload}"
        )
    return data.reshape(dims)


def _idx_dims(f: BinaryIO, path: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions an IDX header declares, read from the start of ``f``."""
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataError(f"{abs_path(path)} is not an IDX file (bad magic number {magic.hex()})")
    if magic[2] != 0x08:
        raise DataError(f"{abs_path(path)}: IDX type code 0x{magic[2]:02x}, expected 0x08 (uint8)")
    if magic[3] != ndim:
        raise DataError(f"{abs_path(path)}: {magic[3]} dimensions, expected {ndim}")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(
            f"{abs_path(path)} is truncated: {4 + len(dims)} bytes, header alone is {4 + 4 * ndim}"
        )
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


register_dataset(
    DatasetSpec(
        name="mnist",
        summary="MNIST IDX files, plain or .gz (--data-dir required)",
        # The torchvision layouts too, found from their parent folder.
        load=partial(_load_idx, subdirs=("mnist", "MNIST/raw", "MNIST"), class_names=DIGIT_NAMES),
        display="MNIST",
        default_model="convnet",
        expected=_EXPECTED,
        how_to_get="Download the four .gz files from https://ossci-datasets.s3.amazonaws.com/"
        "mnist/ (the mirror of http://yann.lecun.com/exdb/mnist/) and pass --data-dir",
    )
)
register_dataset(
    DatasetSpec(
        name="fashion-mnist",
        summary=f"Fashion-MNIST IDX files (default folder {_DEBIAN_FASHION} from Debian's "
        "dataset-fashion-mnist)",
        load=partial(
            _load_idx,
            subdirs=("fashion-mnist", "fashion", "FashionMNIST/raw", "FashionMNIST"),
            class_names=_FASHION_NAMES,
        ),
        display="Fashion-MNIST",
        default_model="convnet",
        expected=_EXPECTED,
        how_to_get="Install Debian's dataset-fashion-mnist (apt-get install "
        f"dataset-fashion-mnist; files in {_DEBIAN_FASHION}) or download the four .gz files "
        "from https://github.com/zalandoresearch/fashion-mnist and pass --data-dir",
        default_dir=_DEBIAN_FASHION,
    )
)
