"""``cifar10`` and ``cifar100``: python (pickled) and binary fixtures in the real formats, and the
restricted unpickler refusing what the real files never hold."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import (
    assert_same_splits,
    check_partition,
    check_round_trip,
    coded_images,
)

from gcsam.toolkit.data import DataError, load_dataset


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
