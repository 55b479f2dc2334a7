"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no files needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import DIGIT_NAMES, Raw
from .registry import DatasetSpec, register_dataset


def _load_digits(spec: DatasetSpec, data_dir: Path | None, image_size: int | None) -> Raw:
    from sklearn.datasets import load_digits  # lazy: only this data set needs scikit-learn

    digits = load_digits()
    # 0..16 ink levels to 0..255, rounded so 16 maps to 255 exactly.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return Raw(
        {"train": (images, digits.target.astype(np.int64))},
        DIGIT_NAMES,
        "sklearn.datasets.load_digits",
    )


register_dataset(
    DatasetSpec(
        name="digits",
        summary="scikit-learn's bundled 8x8 handwritten digits (no files needed; the default)",
        load=_load_digits,
    )
)
