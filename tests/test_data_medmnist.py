"""MedMNIST: ``.npz`` fixtures with the official splits, as the medmnist package writes them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import coded_images

from gcsam.toolkit.data import DATASETS, DataError, load_dataset
from gcsam.toolkit.data.medmnist import MEDMNIST_DATASETS


def write_medmnist(path: Path, sizes: dict, classes: int, shape: tuple, seed: int = 0) -> dict:
    arrays, offset = {}, 0
    for split, n in sizes.items():
        images = coded_images(offset + n, 1, *shape[:2], seed=seed)[offset:, 0]
        if len(shape) == 3:  # RGB: (N, H, W, 3)
            rgb = coded_images(offset + n, 3, *shape[:2], seed=seed)[offset:]
            images = rgb.transpose(0, 2, 3, 1)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
        offset += n
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_official_splits(tmp_path: Path) -> None:
    sizes = {"train": 40, "val": 10, "test": 12}
    arrays = write_medmnist(tmp_path / "breastmnist.npz", sizes, 2, (8, 8))
    data = load_dataset("breastmnist", tmp_path)
    assert data.class_names == ["malignant", "normal, benign"]
    assert data.image_shape == (1, 8, 8)
    for split in sizes:
        got = getattr(data, split)
        np.testing.assert_array_equal(got.images[:, 0].numpy(), arrays[f"{split}_images"])
        np.testing.assert_array_equal(got.labels.numpy(), arrays[f"{split}_labels"][:, 0])

    rgb = write_medmnist(tmp_path / "bloodmnist.npz", sizes, 8, (6, 7, 3))
    blood = load_dataset("bloodmnist", tmp_path)
    assert blood.image_shape == (3, 6, 7) and blood.num_classes == 8
    np.testing.assert_array_equal(
        blood.train.images.numpy(), rgb["train_images"].transpose(0, 3, 1, 2)
    )


def test_medmnist_size_suffix_folds_and_names(tmp_path: Path) -> None:
    sizes = {"train": 40, "val": 10, "test": 12}
    write_medmnist(tmp_path / "pneumoniamnist.npz", sizes, 2, (8, 8))
    big = write_medmnist(tmp_path / "pneumoniamnist_16.npz", sizes, 2, (16, 16), seed=5)
    data = load_dataset("pneumoniamnist", tmp_path, image_size=16)
    assert data.class_names == ["normal", "pneumonia"]
    np.testing.assert_array_equal(data.test.images[:, 0].numpy(), big["test_images"])  # no resize
    assert data.source.endswith("pneumoniamnist_16.npz")
    assert load_dataset("pneumoniamnist", tmp_path, image_size=12).image_shape == (1, 12, 12)
    # k-fold pools the official train and val: 50 images, 10 per fold.
    val_sets = [load_dataset("pneumoniamnist", tmp_path, folds=5, fold=k).val for k in range(5)]
    assert [len(v) for v in val_sets] == [10] * 5
    assert all(v.labels.bincount().tolist() == [5, 5] for v in val_sets)


def test_medmnist_errors(tmp_path: Path) -> None:
    assert "chestmnist" not in DATASETS and set(MEDMNIST_DATASETS) <= set(DATASETS)
    with pytest.raises(ValueError, match="multi-label"):
        load_dataset("chestmnist", tmp_path)
    with pytest.raises(DataError, match=r"dermamnist\.npz") as err:
        load_dataset("dermamnist", tmp_path)
    assert os.path.abspath(tmp_path) in str(err.value) and "medmnist" in str(err.value)
    arrays = write_medmnist(tmp_path / "octmnist.npz", {"train": 8, "val": 4, "test": 4}, 4, (5, 5))
    arrays["train_labels"] = np.zeros((8, 14), np.uint8)
    np.savez(tmp_path / "octmnist.npz", **arrays)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset("octmnist", tmp_path)
    arrays["train_labels"] = np.zeros((8, 1), np.uint8)
    del arrays["val_labels"]
    np.savez(tmp_path / "octmnist.npz", **arrays)
    with pytest.raises(DataError, match="lacks val_labels"):
        load_dataset("octmnist", tmp_path)
    (tmp_path / "octmnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a valid MedMNIST") as err:
        load_dataset("octmnist", tmp_path)
    assert os.path.abspath(tmp_path / "octmnist.npz") in str(err.value)
