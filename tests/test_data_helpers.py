"""Helpers shared by the ``tests/test_data_*.py`` files of :mod:`gcsam.toolkit.data`.

Fixture images carry their own index in their first two pixels (``id = 256 * p0 + p1``), so a
test can tell exactly which source image landed in which split and check pixels round-trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gcsam.toolkit.data import DatasetSpec, DataSplits, Raw, Split, register_dataset
from gcsam.toolkit.data import registry as registry_module


def coded_images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 (n, c, h, w) whose pixels [0, 0, 0:2] encode the image index."""
    images = np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) // 256
    images[:, 0, 0, 1] = np.arange(n) % 256
    return images


def ids(split: Split) -> np.ndarray:
    px = split.images[:, 0, 0, :2].to(torch.int64)
    return (px[:, 0] * 256 + px[:, 1]).numpy()


def check_round_trip(split: Split, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The split's images and labels are exactly the source items its ids name."""
    index = ids(split)
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    np.testing.assert_array_equal(split.images.numpy(), images[index])
    np.testing.assert_array_equal(split.labels.numpy(), labels[index])
    return index


def check_partition(parts: list[np.ndarray], n: int) -> None:
    """The id arrays are pairwise disjoint and together cover 0..n-1."""
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def assert_same_splits(a: DataSplits, b: DataSplits) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images), name
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels), name
    assert a.class_names == b.class_names and a.mean == b.mean and a.std == b.std


def toy_spec(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> DatasetSpec:
    """A data set served from memory: ``parts`` as a loader returns them (see ``Raw``)."""
    classes = int(max(labels.max() for _, labels in parts.values())) + 1

    def load(spec: DatasetSpec, data_dir: Path | None, image_size: int | None) -> Raw:
        return Raw(parts, [f"class-{k}" for k in range(classes)], f"memory:{data_dir}")

    return DatasetSpec(name=name, summary="in-memory test data", load=load)


def register_toys(monkeypatch: pytest.MonkeyPatch, *specs: DatasetSpec) -> None:
    """Register ``specs`` for one test only: the real registry is restored afterwards."""
    monkeypatch.setattr(registry_module, "DATASETS", dict(registry_module.DATASETS))
    for spec in specs:
        register_dataset(spec)


def test_coded_images_carry_their_index() -> None:
    images = coded_images(700, 2, 3, 4)
    split = Split(torch.from_numpy(images), torch.zeros(700, dtype=torch.int64))
    np.testing.assert_array_equal(ids(split), np.arange(700))
