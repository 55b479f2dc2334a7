"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no files needed)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ._common import DIGIT_NAMES, Raw
from .registry import DatasetSpec, register_dataset


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(N, 1, 8, 8)`` uint8 images and ``(N,)`` int64 labels, read once per process: a
    comparison loads the data set for every run, and scikit-learn parses its CSV each time."""
    from sklearn.datasets import load_digits  # lazy: only this data set needs scikit-learn

    digits = load_digits()
    # 0..16 ink levels to 0..255, rounded so 16 maps to 255 exactly.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


def _load_digits(spec: DatasetSpec, data_dir: Path | None, image_size: int | None) -> Raw:
    images, labels = _digits_arrays()
    return Raw(
        {"train": (images.copy(), labels.copy())},  # copies: the cached arrays stay pristine
        DIGIT_NAMES,
        "sklearn.datasets.load_digits",
    )


register_dataset(
    DatasetSpec(
        name="digits",
        summary="scikit-learn's bundled 8x8 handwritten digits (no files needed; the default)",
        load=_load_digits,
        # 1,437 training images: 12 epochs reach the plateau and keep `gcsam compare` (three
        # optimizers x three seeds) under a minute on 2 CPU cores.
        default_epochs=12,
    )
)
