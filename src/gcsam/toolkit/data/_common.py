"""What every loader shares: the error type, a loader's raw result, resizing and label checks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

DIGIT_NAMES: tuple[str, ...] = tuple(str(k) for k in range(10))


class DataError(ValueError):
    """A data set's files are missing or malformed; the message says what, where and how to fix."""


@dataclass
class Raw:
    """A loader's result, before resizing and splitting.

    Attributes:
        parts: 'train' (always), 'val' and 'test' (when the data set has them officially), each
            (uint8 ``(N, C, H, W)``, int64 ``(N,)``) numpy arrays.
        class_names: ``K`` names; label ``k`` is ``class_names[k]``.
        source: where the data was read from, for the run's record.
    """

    parts: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: Sequence[str]
    source: str


def abs_path(path: Path | str) -> str:
    """The absolute path, as every error message names files."""
    return os.path.abspath(path)


def text(value: Any) -> str:
    """``value`` as str: Python 2 pickles hold names as bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_labels(labels: np.ndarray, num_classes: int, path: Path | str) -> None:
    """A DataError naming ``path`` unless every label is in ``0..num_classes - 1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{abs_path(path)}: labels span {labels.min()}..{labels.max()}, expected "
            f"0..{num_classes - 1}"
        )


def prepare(
    part: tuple[np.ndarray, np.ndarray], image_size: int | None, grayscale_to_rgb: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``image_size`` (when given and different) and repeat a single channel."""
    images, labels = part
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        images = resize(images, image_size)
    if grayscale_to_rgb and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images, labels.astype(np.int64, copy=False)


def resize(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
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
