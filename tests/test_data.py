"""``gcsam.data``: every loader on small fixtures written in the real on-disk formats.

Fixture images carry their own index in their first two pixels (``id = 256 * p0 + p1``), so a
test can tell exactly which source image landed in which split and check pixels round-trip.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from gcsam.data import (
    DATASETS,
    MEDMNIST_DATASETS,
    Augment,
    DataError,
    DataSplits,
    Split,
    iterate_batches,
    load_dataset,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


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


def py2_pickle(obj: object) -> bytes:
    """Protocol 2 as Python 2's cPickle wrote the original CIFAR files: str as (SHORT_)BINSTRING
    and numpy arrays through numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(
            b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b
        )

    def emit(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, (list, tuple)):
            out.extend(b"](" if isinstance(o, list) else b"(")
            for v in o:
                emit(v)
            out.extend(b"e" if isinstance(o, list) else b"t")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            out.extend(b"K\x00\x85")  # (0,)
            string(b"b")
            out.extend(b"\x87R(K\x01")  # _reconstruct(ndarray, (0,), 'b'); state: (1,
            emit(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")  # dtype('u1', 0, 1); state (3, '|', ...)
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    return bytes(out + b".")


CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------

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
    torch.testing.assert_close(fashion.train.images, data.train.images, rtol=0, atol=0)


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


def cifar_arrays(n_train: int, n_test: int, classes: int) -> dict:
    train = coded_images(n_train, 3, 32, 32, seed=3)
    test = coded_images(n_test, 3, 32, 32, seed=4)
    return {
        "train": (train, np.arange(n_train) % classes),
        "test": (test, (np.arange(n_test) * 7) % classes),
    }


def write_cifar10(root: Path, arrays: dict, binary: bool, py2: bool = False) -> Path:
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    batches = [(f"data_batch_{i + 1}", slice(20 * i, 20 * (i + 1))) for i in range(5)]
    if binary:
        folder = root / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        for name, rows, x, y in [(n, s, train_x, train_y) for n, s in batches] + [
            ("test_batch", slice(None), test_x, test_y)
        ]:
            record = np.concatenate([y[rows, None].astype(np.uint8), x[rows].reshape(-1, 3072)], 1)
            (folder / f"{name}.bin").write_bytes(record.tobytes())
        (folder / "batches.meta.txt").write_text(
            "\n".join(n.decode() for n in CIFAR10_NAMES) + "\n\n"
        )
        return folder
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(path: Path, obj: dict) -> None:
        path.write_bytes(py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2))

    for name, x, y in [(n, train_x[s], train_y[s]) for n, s in batches] + [
        ("test_batch", test_x, test_y)
    ]:
        dump(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": [int(v) for v in y],
                b"data": x.reshape(len(x), 3072),
                b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
            },
        )
    dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": 20, b"label_names": CIFAR10_NAMES, b"num_vis": 3072},
    )
    return folder


@pytest.fixture
def cifar10() -> dict:
    return cifar_arrays(100, 20, 10)


def assert_same_splits(a: DataSplits, b: DataSplits) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images), name
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels), name
    assert a.class_names == b.class_names and a.mean == b.mean and a.std == b.std


def test_cifar10_python_binary_and_py2_agree(cifar10: dict, tmp_path: Path) -> None:
    write_cifar10(tmp_path / "py", cifar10, binary=False)
    bin_folder = write_cifar10(tmp_path / "bin", cifar10, binary=True)
    write_cifar10(tmp_path / "py2", cifar10, binary=False, py2=True)
    data = load_dataset("cifar10", tmp_path / "py")  # the parent of cifar-10-batches-py
    assert data.image_shape == (3, 32, 32)
    assert data.class_names == [n.decode() for n in CIFAR10_NAMES]
    np.testing.assert_array_equal(check_round_trip(data.test, *cifar10["test"]), np.arange(20))
    train = check_round_trip(data.train, *cifar10["train"])
    check_partition([train, check_round_trip(data.val, *cifar10["train"])], 100)
    assert_same_splits(data, load_dataset("cifar10", bin_folder))  # the folder itself
    assert_same_splits(data, load_dataset("cifar10", tmp_path / "py2"))


def test_py2_pickle_writer_is_real_pickle() -> None:
    """The hand-written Python 2 pickle above is what stdlib pickle itself reads back."""
    arr = coded_images(3, 1, 2, 4)
    obj = pickle.loads(py2_pickle({b"data": arr, b"labels": [1, 2]}), encoding="bytes")
    np.testing.assert_array_equal(obj[b"data"], arr)
    assert obj[b"labels"] == [1, 2]


def test_cifar_protocol5_and_numpy_scalar_labels(cifar10: dict, tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, cifar10, binary=False)
    x, y = cifar10["test"]
    record = {b"labels": [np.int64(v) for v in y], b"data": x.reshape(20, 3072)}
    (folder / "test_batch").write_bytes(pickle.dumps(record, protocol=5))
    data = load_dataset("cifar10", folder)
    np.testing.assert_array_equal(data.test.labels.numpy(), y)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "eval", "object-array", "codecs"])
def test_cifar_malicious_pickle_refused(cifar10: dict, tmp_path: Path, payload: str) -> None:
    folder = write_cifar10(tmp_path, cifar10, binary=False)
    marker = tmp_path / "pwned"
    data: object
    if payload == "os.system":
        data = _Evil(marker)
    elif payload == "eval":
        data = [eval, ("1",)]  # a global the file names, never called
    elif payload == "object-array":
        data = np.array([1, "a"], dtype=object)
    else:  # _codecs.encode is allowed only as the latin1 bytes idiom
        data = b"x"
    blob = pickle.dumps({b"data": data, b"labels": []}, protocol=2)
    if payload == "codecs":
        blob = blob.replace(b"latin1", b"rot13_")
    (folder / "data_batch_3").write_bytes(blob)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", folder)
    message = str(err.value)
    assert os.path.abspath(folder / "data_batch_3") in message
    assert "unsafe" in message or "not a valid" in message
    assert not marker.exists()


def test_cifar_broken_files(cifar10: dict, tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "bin", cifar10, binary=True)
    bad = folder / "data_batch_2.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="whole number") as err:
        load_dataset("cifar10", folder)
    assert os.path.abspath(bad) in str(err.value)

    folder = write_cifar10(tmp_path / "py", cifar10, binary=False)
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"batches\.meta not found"):
        load_dataset("cifar10", folder)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    (folder / "batches.meta").write_bytes(b"")
    with pytest.raises(DataError, match="not a valid CIFAR pickle"):
        load_dataset("cifar10", folder)

    empty = tmp_path / "archive"
    empty.mkdir()
    (empty / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"tar xzf cifar-10-python\.tar\.gz") as err:
        load_dataset("cifar10", empty)
    assert "cifar.html" in str(err.value)


def test_cifar100_python_and_binary(tmp_path: Path) -> None:
    arrays = cifar_arrays(300, 100, 100)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    fine_names = [f"class_{k:02d}" for k in range(100)]
    py = tmp_path / "cifar-100-python"
    py.mkdir()
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        record = {
            b"filenames": [b"f.png"] * len(x),
            b"batch_label": name.encode(),
            b"fine_labels": [int(v) for v in y],
            b"coarse_labels": [int(v) // 5 for v in y],
            b"data": x.reshape(len(x), 3072),
        }
        (py / name).write_bytes(pickle.dumps(record, protocol=2))
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [f"super_{k}".encode() for k in range(20)],
    }
    (py / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    binary = tmp_path / "other" / "cifar-100-binary"
    binary.mkdir(parents=True)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        labels = np.stack([y // 5, y], 1).astype(np.uint8)  # coarse byte, then fine byte
        record = np.concatenate([labels, x.reshape(len(x), 3072)], 1)
        (binary / f"{name}.bin").write_bytes(record.tobytes())
    (binary / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")

    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.class_names == fine_names
    check_round_trip(data.test, test_x, test_y)
    train = check_round_trip(data.train, train_x, train_y)
    check_partition([train, check_round_trip(data.val, train_x, train_y)], 300)
    assert data.val.labels.bincount(minlength=100).tolist() == [1] * 100  # >= 1 per class
    assert_same_splits(data, load_dataset("cifar100", tmp_path / "other"))


# --------------------------------------------------------------------------------------------
# MedMNIST
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def save_coded(path: Path, index: int, mode: str, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A PNG/JPEG whose first two pixels of the first channel encode ``index``; returns the
    (3, H, W) uint8 array a loader should read back (grayscale repeated)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    channels = 1 if mode == "L" else 3
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 1, 0] = index // 256, index % 256
    # Best-quality 4:4:4 JPEG: still lossy, but close enough to tell the images apart.
    options = {"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path, **options)
    return np.repeat(pixels, 3 // channels, axis=2).transpose(2, 0, 1)


@pytest.fixture
def busi(tmp_path: Path) -> dict:
    """BUSI layout: benign/ (grayscale PNG), malignant/ (RGB PNG), normal/ (JPEG), with masks."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    expected: dict[int, tuple[np.ndarray, int]] = {}
    index = 0
    for label, (name, mode, ext, count) in enumerate(
        [("benign", "L", "png", 10), ("malignant", "RGB", "png", 10), ("normal", "RGB", "jpg", 5)]
    ):
        (root / name).mkdir(parents=True)
        for i in range(count):
            expected[index] = (save_coded(root / name / f"{name} ({i}).{ext}", index, mode), label)
            save_coded(root / name / f"{name} ({i})_mask.png", 900 + index, "L")
            index += 1
        save_coded(root / name / f"{name} (0)_mask_1.png", 999, "L")
    (root / "notes.txt").write_text("not a class")
    return {"root": root, "expected": expected, "n": index}


def folder_ids(split: Split, busi: dict) -> np.ndarray:
    """Which fixture image each loaded one is: the nearest (JPEG is lossy, so not exact)."""
    keys = sorted(busi["expected"])
    bank = torch.from_numpy(np.stack([busi["expected"][k][0] for k in keys])).float()
    dist = (split.images.float()[:, None] - bank[None]).abs().mean((2, 3, 4))
    return np.asarray(keys)[dist.argmin(1).numpy()]


def test_image_folder_busi(busi: dict) -> None:
    data = load_dataset("image-folder", busi["root"], image_size=16, seed=3)
    assert data.class_names == ["benign", "malignant", "normal"]
    assert data.image_shape == (3, 16, 16)
    parts = [folder_ids(s, busi) for s in (data.train, data.val, data.test)]
    check_partition(parts, busi["n"])  # every image once; and 25 images means no mask
    for split, part in zip((data.train, data.val, data.test), parts, strict=True):
        for image, label, i in zip(split.images, split.labels, part, strict=True):
            pixels, expected_label = busi["expected"][int(i)]
            assert int(label) == expected_label
            if expected_label != 2:  # PNG is lossless; JPEG is not
                np.testing.assert_array_equal(image.numpy(), pixels)
            else:
                assert np.abs(image.numpy().astype(int) - pixels).mean() < 5
    # Every class in every split (5..10 images per class, 70 / 10 / 20).
    for split in (data.train, data.val, data.test):
        assert split.labels.bincount(minlength=3).min() >= 1
    default = load_dataset("image-folder", busi["root"])
    assert default.image_shape == (3, 64, 64)  # the default size


def test_image_folder_covid_layout(tmp_path: Path) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for k, name in enumerate(["Viral Pneumonia", "COVID", "Normal"]):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for i in range(6):
            save_coded(root / name / "images" / f"{name}-{i}.png", 10 * k + i, "L", (20, 12))
            save_coded(root / name / "masks" / f"{name}-{i}.png", 200 + i, "L")
    (root / "COVID.metadata.xlsx").write_bytes(b"")
    data = load_dataset("image-folder", root, image_size=8)
    assert data.class_names == ["COVID", "Normal", "Viral Pneumonia"]
    assert len(data.train) + len(data.val) + len(data.test) == 18
    assert data.image_shape == (3, 8, 8)


def test_image_folder_16_bit_png(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    values = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    for folder in ("a", "b"):
        for i in range(3):
            Image.fromarray(values).save(tmp_path / folder / f"{i}.png")
    data = load_dataset("image-folder", tmp_path, image_size=2)
    image = data.train.images[0]
    assert image[0].tolist() == [[0, 100], [255, 7]] and torch.equal(image[0], image[2])


def test_image_folder_errors(busi: dict, tmp_path: Path) -> None:
    bad = busi["root"] / "benign" / "benign (3).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match="cannot read image") as err:
        load_dataset("image-folder", busi["root"])
    assert os.path.abspath(bad) in str(err.value)
    good = busi["root"] / "benign" / "benign (4).png"
    good.write_bytes(good.read_bytes()[:60])  # truncated
    bad.unlink()
    with pytest.raises(DataError, match="cannot read image") as err:
        load_dataset("image-folder", busi["root"])
    assert os.path.abspath(good) in str(err.value)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x_mask.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("image-folder", empty)
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset("image-folder", empty / "a")
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("image-folder")


# --------------------------------------------------------------------------------------------
# digits, splitting, arguments
# --------------------------------------------------------------------------------------------


def test_digits_stratified_and_complete() -> None:
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    splits = (data.train, data.val, data.test)
    assert sum(len(s) for s in splits) == 1797
    assert int(data.train.images.max()) == 255
    # The union is exactly the data set (as a multiset of image + label).
    digits = load_digits()
    original = np.rint(digits.images * 255 / 16).astype(np.uint8)
    want = Counter((img.tobytes(), int(y)) for img, y in zip(original, digits.target, strict=True))
    got = Counter(
        (img.numpy().tobytes(), int(y))
        for s in splits
        for img, y in zip(s.images[:, 0], s.labels, strict=True)
    )
    assert got == want
    # Stratified: each class's share of each split is within one image of its proportion.
    per_class = np.bincount(digits.target)
    for split, share in ((data.val, 0.1), (data.test, 0.2)):
        counts = split.labels.bincount(minlength=10).numpy()
        assert np.all(np.abs(counts - share * per_class) <= 1)


def test_splits_deterministic_and_seeded(mnist: dict) -> None:
    a = load_dataset("mnist", mnist["root"], seed=7)
    assert_same_splits(a, load_dataset("mnist", mnist["root"], seed=7))
    b = load_dataset("mnist", mnist["root"], seed=8)
    assert not np.array_equal(ids(a.val), ids(b.val))
    assert torch.equal(a.test.images, b.test.images)  # the official test split never moves


def test_kfold_partitions_pool_and_keeps_test(mnist: dict) -> None:
    vals = []
    for k in range(5):
        data = load_dataset("mnist", mnist["root"], folds=5, fold=k, seed=1)
        train, val = ids(data.train), ids(data.val)
        check_partition([train, val], MNIST_TRAIN)
        assert data.val.labels.bincount(minlength=10).tolist() == [4] * 10
        np.testing.assert_array_equal(ids(data.test), np.arange(MNIST_TEST))
        vals.append(val)
    check_partition(vals, MNIST_TRAIN)  # the folds are disjoint and cover the pool


def test_kfold_without_official_test(busi: dict) -> None:
    plain = load_dataset("image-folder", busi["root"], image_size=4, seed=2)
    folds = [
        load_dataset("image-folder", busi["root"], image_size=4, seed=2, folds=3, fold=k)
        for k in range(3)
    ]
    pool = np.sort(np.concatenate([ids(plain.train), ids(plain.val)]))
    for data in folds:
        # The test split is the same with and without folds, for the same seed.
        np.testing.assert_array_equal(ids(data.test), ids(plain.test))
        np.testing.assert_array_equal(
            np.sort(np.concatenate([ids(data.train), ids(data.val)])), pool
        )
    vals = np.concatenate([ids(d.val) for d in folds])
    np.testing.assert_array_equal(np.sort(vals), pool)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "imagenet"}, "valid names: digits, mnist"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"folds": 1}, "folds"),
        ({"folds": 3, "fold": 3}, r"fold must be in 0\.\.2"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name", "digits")
    with pytest.raises(ValueError, match=match):
        load_dataset(name, **kwargs)


def test_names() -> None:
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "image-folder"):
        assert name in DATASETS
    assert {"breastmnist", "pneumoniamnist", "bloodmnist", "organamnist"} <= set(DATASETS)
    assert load_dataset("DIGITS").name == "digits"


# --------------------------------------------------------------------------------------------
# statistics, normalize, Split
# --------------------------------------------------------------------------------------------


def test_mean_std_and_normalize(cifar10: dict, tmp_path: Path) -> None:
    data = load_dataset("cifar10", write_cifar10(tmp_path, cifar10, binary=True))
    x = data.train.images.double() / 255
    torch.testing.assert_close(torch.tensor(data.mean), x.mean((0, 2, 3)).float())
    torch.testing.assert_close(torch.tensor(data.std), x.std((0, 2, 3), correction=0).float())
    batch = data.test.images[:4]
    out = data.normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    mean = torch.tensor(data.mean).view(3, 1, 1)
    std = torch.tensor(data.std).view(3, 1, 1)
    torch.testing.assert_close(out, (batch.float() / 255 - mean) / std)
    torch.testing.assert_close(data.normalize(batch[0]), out[0])
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(batch.float())
    with pytest.raises(ValueError, match="3, H, W"):
        data.normalize(batch[:, :1])


def test_split_validation() -> None:
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    assert len(Split(images, torch.zeros(3, dtype=torch.int64))) == 3
    with pytest.raises(ValueError, match="uint8"):
        Split(images.float(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(images, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        Split(images, torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# iterate_batches
# --------------------------------------------------------------------------------------------


def make_split(n: int) -> Split:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Split(images, torch.arange(n))


def test_iterate_batches_covers_each_index_once() -> None:
    split = make_split(23)
    batches = list(
        iterate_batches(split, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    )
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    for images, labels in batches:  # images travel with their labels
        assert images.dtype == torch.uint8 and torch.equal(images[:, 0, 0, 0].long(), labels)
    plain = torch.cat([y for _, y in iterate_batches(split, 5, shuffle=False)])
    assert plain.tolist() == list(range(23))
    dropped = list(iterate_batches(split, 5, shuffle=False, drop_last=True))
    assert [len(y) for _, y in dropped] == [5, 5, 5, 5]


def test_iterate_batches_indices_and_resume() -> None:
    split = make_split(23)
    shard = torch.tensor([4, 0, 22, 9, 9 - 1])
    got = torch.cat([y for _, y in iterate_batches(split, 2, shuffle=True, indices=shard)])
    assert got.tolist() == shard.tolist()  # indices override shuffling
    with pytest.raises(ValueError, match="indices must be in"):
        iterate_batches(split, 2, shuffle=False, indices=torch.tensor([23]))
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(split, 0, shuffle=False)

    gen = torch.Generator().manual_seed(123)
    saved = gen.get_state()
    first = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=gen)])
    second = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=gen)])
    assert first.tolist() != second.tolist()  # a new order every epoch
    resumed = torch.Generator()
    resumed.set_state(saved)
    again = torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=resumed)])
    assert again.tolist() == first.tolist()
    # The permutation is drawn at the call, not at the first batch.
    gen.set_state(saved)
    iterate_batches(split, 4, shuffle=True, generator=gen)
    assert not torch.equal(gen.get_state(), saved)


# --------------------------------------------------------------------------------------------
# Augment
# --------------------------------------------------------------------------------------------


def test_augment_shape_and_determinism() -> None:
    images = torch.randn(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    saved = gen.get_state()
    aug = Augment(crop_padding=2, generator=gen)
    out = aug(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.equal(aug(images), out)  # the generator moved on
    gen.set_state(saved)
    assert torch.equal(aug(images), out)
    assert Augment(crop_padding=0, flip=False)(images) is images
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)


@pytest.mark.parametrize(("padding", "flip"), [(2, True), (0, True), (3, False)])
def test_augment_matches_manual_crop_and_flip(padding: int, flip: bool) -> None:
    n, c, h, w = 32, 2, 5, 6
    images = torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w) + 1
    gen = torch.Generator().manual_seed(42)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    out = Augment(crop_padding=padding, flip=flip, generator=gen)(images)
    # Replay the documented draws: vertical offsets, horizontal offsets, then flip coins.
    if padding:
        dy = torch.randint(2 * padding + 1, (n,), generator=replay)
        dx = torch.randint(2 * padding + 1, (n,), generator=replay)
    else:
        dy = dx = torch.zeros(n, dtype=torch.int64)
    coins = torch.randint(2, (n,), generator=replay) if flip else torch.zeros(n, dtype=torch.int64)
    padded = F.pad(images, (padding,) * 4)
    for i in range(n):
        y, x = int(dy[i]), int(dx[i])
        want = padded[i, :, y : y + h, x : x + w]
        if coins[i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want), i
    if padding:
        assert (out == 0).any()  # some crops reach into the zero padding
    if flip:
        assert 0 < int(coins.sum()) < n
