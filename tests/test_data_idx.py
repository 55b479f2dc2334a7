"""``mnist`` and ``fashion-mnist``: IDX fixtures written in the real on-disk format."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_data_helpers import check_partition, check_round_trip, coded_images

from gcsam.toolkit.data import DataError, DataSplits, load_dataset


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


MNIST_TRAIN, MNIST_TEST = 200, 50


@pytest.fixture
def mnist(tmp_path: Path) -> dict:
    """IDX files, train gzipped and test plain (both are accepted), 6x5 images, 10 classes."""
    train_x = coded_images(MNIST_TRAIN, 1, 6, 5, seed=1)[:, 0]
    train_y = (np.arange(MNIST_TRAIN) % 10).astype(np.uint8)
    test_x = coded_images(MNIST_TEST, 1, 6, 5, seed=2)[:, 0]
    test_y = (np.arange(MNIST_TEST) % 10).astype(np.uint8)
    root = tmp_path / "mnist"
    root.mkdir()
    files = {
        "train_x": write_idx(root / "train-images-idx3-ubyte", train_x, gz=True),
        "train_y": write_idx(root / "train-labels-idx1-ubyte", train_y, gz=True),
        "test_x": write_idx(root / "t10k-images-idx3-ubyte", test_x, gz=False),
        "test_y": write_idx(root / "t10k-labels-idx1-ubyte", test_y, gz=False),
    }
    return {
        "root": root,
        "files": files,
        "train": (train_x[:, None], train_y.astype(np.int64)),
        "test": (test_x[:, None], test_y.astype(np.int64)),
    }


def test_mnist_round_trip_and_stratified_val(mnist: dict) -> None:
    data = load_dataset("mnist", mnist["root"])
    assert isinstance(data, DataSplits)
    assert data.name == "mnist" and data.class_names == [str(k) for k in range(10)]
    assert data.num_classes == 10 and data.image_shape == (1, 6, 5)
    # The official test split, in its file order.
    np.testing.assert_array_equal(check_round_trip(data.test, *mnist["test"]), np.arange(50))
    train = check_round_trip(data.train, *mnist["train"])
    val = check_round_trip(data.val, *mnist["train"])
    check_partition([train, val], MNIST_TRAIN)
    # val_fraction 0.1 of every class's 20 training images.
    assert data.val.labels.bincount(minlength=10).tolist() == [2] * 10
    assert data.source == os.path.abspath(mnist["root"])


def test_mnist_layouts_and_fashion_names(mnist: dict, tmp_path: Path) -> None:
    # torchvision's <root>/MNIST/raw layout, found from the parent folder.
    (tmp_path / "tv" / "MNIST").mkdir(parents=True)
    mnist["root"].rename(tmp_path / "tv" / "MNIST" / "raw")
    data = load_dataset("mnist", tmp_path / "tv")
    assert len(data.train) + len(data.val) == MNIST_TRAIN
    fashion = load_dataset("fashion-mnist", tmp_path / "tv" / "MNIST" / "raw")
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert torch.equal(fashion.train.images, data.train.images)


def test_mnist_resize_and_grayscale_to_rgb(mnist: dict) -> None:
    data = load_dataset("mnist", mnist["root"], image_size=8, grayscale_to_rgb=True)
    assert data.image_shape == (3, 8, 8) and len(data.mean) == 3
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])
    native = load_dataset("mnist", mnist["root"])
    expected = F.interpolate(native.test.images.float(), size=(8, 8), mode="bilinear")
    diff = data.test.images[:, :1].int() - expected.round().int()
    assert int(diff.abs().max()) <= 1  # uint8 bilinear rounds within one level of float


@pytest.mark.parametrize("damage", ["truncate", "magic", "count", "label", "gzip"])
def test_mnist_corrupt_files(mnist: dict, damage: str) -> None:
    files = mnist["files"]
    if damage == "truncate":
        target = files["test_x"]
        target.write_bytes(target.read_bytes()[:-7])
        match = "truncated"
    elif damage == "magic":
        target = files["test_x"]
        target.write_bytes(b"\x01" + target.read_bytes()[1:])
        match = "magic"
    elif damage == "count":  # 49 labels for 50 images
        target = write_idx(files["test_y"], np.zeros(49, np.uint8), gz=False)
        match = "49 labels"
    elif damage == "label":
        target = write_idx(files["test_y"], np.full(50, 10, np.uint8), gz=False)
        match = "labels span"
    else:
        target = files["train_x"]
        target.write_bytes(b"\x1f\x8b\x08garbage")
        match = "cannot read"
    with pytest.raises(DataError, match=match) as err:
        load_dataset("mnist", mnist["root"])
    assert os.path.abspath(target) in str(err.value)


def test_missing_files_and_directories(mnist: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory") as err:
        load_dataset("mnist", tmp_path / "nowhere")
    assert os.path.abspath(tmp_path / "nowhere") in str(err.value)
    assert "--data-dir" in str(err.value)
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_dataset("fashion-mnist", tmp_path)  # a folder without the files
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert os.path.abspath(tmp_path) in str(err.value)
    mnist["files"]["test_y"].unlink()
    with pytest.raises(DataError, match="t10k-labels not found"):
        load_dataset("mnist", mnist["root"])
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("cifar10")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist absent"
)
def test_fashion_mnist_debian_default() -> None:
    data = load_dataset("fashion-mnist")  # the Debian package's folder
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert data.test.labels.bincount().tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------
