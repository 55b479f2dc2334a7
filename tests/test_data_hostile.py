"""Hostile data files: each is tiny, built here, and refused before it can cost memory, CPU time
or state that outlives its load (issue 9). Where the unfixed loaders would allocate gigabytes,
the tests spy on the reader instead of letting it run."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
import types
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_data_cifar import cifar_arrays, write_cifar10
from test_data_idx import write_idx
from test_data_medmnist import write_medmnist

from gcsam.toolkit.data import DataError, load_dataset
from gcsam.toolkit.data import safe_unpickle as su

# --------------------------------------------------------------------------------------------
# CIFAR pickles, written opcode by opcode (protocol 2: Python 2 strings arrive as bytes)
# --------------------------------------------------------------------------------------------


def _get(i: int) -> bytes:
    return b"h" + bytes([i])  # BINGET i


def _put(i: int) -> bytes:
    return b"q" + bytes([i])  # BINPUT i


def _text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()  # BINUNICODE


def laughs(leaf: bytes, levels: int, width: int) -> bytes:
    """``levels`` nested lists, each holding the one below ``width`` times by reference: a few
    hundred bytes that stand for ``width ** levels`` leaves."""
    out = b"\x80\x02" + leaf + _put(0)
    for i in range(1, levels + 1):
        out += b"](" + _get(i - 1) * width + b"e" + _put(i)  # EMPTY_LIST MARK ... APPENDS
    return out + b"."


def _array_leaf(nbytes: int) -> bytes:
    """An ndarray as numpy pickles it at protocol 2, ``nbytes`` uint8 zeros."""
    array = np.zeros(nbytes, np.uint8)
    return pickle.dumps(array, protocol=2)[2:-1]  # without PROTO and STOP


@pytest.mark.parametrize(
    ("leaf", "limit"),
    [
        (b"U\x05hello", "objects"),  # SHORT_BINSTRING: 10**12 strings
        (b"](" + b"K\x07" * 1000 + b"e", "objects"),  # a list of 1000 labels, 10**15 labels
        (_array_leaf(2**16), "bytes"),  # a 64 KiB array, copied 10**12 times
    ],
    ids=["strings", "labels", "arrays"],
)
def test_shared_references_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaf: bytes, limit: str
) -> None:
    """A "billion laughs": each use of a shared object counts. The limits are lowered so the
    test stays fast and small; the real ones are 100x these."""
    monkeypatch.setattr(su, "MAX_OBJECTS", su.MAX_OBJECTS // 100)
    monkeypatch.setattr(su, "MAX_BYTES", su.MAX_BYTES // 100)
    path = tmp_path / "data_batch_1"
    path.write_bytes(laughs(leaf, levels=12, width=10))
    assert path.stat().st_size < 2**17
    with pytest.raises(DataError, match=f"more than [0-9,]+ {limit}") as err:
        su.load_pickle(path)
    assert os.path.abspath(path) in str(err.value) and "limit for one CIFAR file" in str(err.value)


def _tuple_dag(levels: int) -> bytes:
    """(t, t) of (t, t) of ... ``levels`` deep: hashing it walks 2**levels leaves."""
    out = b"K\x01" + _put(0)
    for i in range(1, levels + 1):
        out += _get(i - 1) * 2 + b"\x86" + _put(i)  # TUPLE2
    return out


@pytest.mark.parametrize(
    "blob",
    [
        b"\x80\x02" + _tuple_dag(100) + b"}" + _get(100) + b"K\x01s.",  # SETITEM
        b"\x80\x02" + _tuple_dag(100) + b"}(" + _get(100) + b"K\x01u.",  # SETITEMS
        b"\x80\x02" + _tuple_dag(100) + b"(" + _get(100) + b"K\x01d.",  # DICT
        b"\x80\x04" + _tuple_dag(100) + b"(" + _get(100) + b"\x91.",  # FROZENSET
    ],
    ids=["setitem", "setitems", "dict", "frozenset"],
)
def test_unhashable_work_is_refused(tmp_path: Path, blob: bytes) -> None:
    """A dict key or set element the file builds is never hashed unless it is a plain scalar:
    the C unpickler would hash this ~600-byte tuple for 2**100 steps."""
    path = tmp_path / "batches.meta"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=r"dict keys must be|sets are not allowed"):
        su.load_pickle(path)


def test_declared_lengths_allocate_nothing(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    # LONG_BINPUT 2**31 - 1: the C unpickler sizes its memo list to twice that (32 GB).
    path.write_bytes(b"\x80\x02Nr\xff\xff\xff\x7f.")
    assert su.load_pickle(path) is None
    # BYTEARRAY8 of 1 TB in a 12-byte file.
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".")
    with pytest.raises(DataError, match="a bytearray of 1,099,511,627,776 bytes in a 12-byte"):
        su.load_pickle(path)
    # A file larger than any CIFAR batch is refused unread (sparse: no disk used).
    with open(path, "wb") as f:
        f.truncate(su.MAX_FILE_BYTES + 1)
    with pytest.raises(DataError, match="-byte limit for one CIFAR batch") as err:
        su.load_pickle(path)
    assert os.path.abspath(path) in str(err.value)


def test_cifar_class_names_must_be_strings(tmp_path: Path) -> None:
    """Names that are lists would otherwise load as their repr, a silently wrong class name."""
    folder = write_cifar10(tmp_path, cifar_arrays(100, 20, 10), binary=False)
    meta = {b"label_names": [[b"cat"]] * 10}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DataError, match="must list 10 class names as strings") as err:
        load_dataset("cifar10", folder)
    assert os.path.abspath(folder / "batches.meta") in str(err.value)


# ---- no state reachable from a refused file ------------------------------------------------


def _snapshot() -> dict[str, Any]:
    """Everything a pickle could conceivably mutate in safe_unpickle: class and function
    attributes, and the contents of its containers."""
    state: dict[str, Any] = {}
    for name, value in vars(su).items():
        if name.startswith("__"):  # __builtins__ is the interpreter's, not the module's
            continue
        if isinstance(value, type) and value.__module__ == su.__name__:
            state[name] = dict(vars(value))
        elif isinstance(value, types.FunctionType) and value.__module__ == su.__name__:
            state[name] = (dict(vars(value)), value.__defaults__, value.__code__)
        elif isinstance(value, (dict, set, frozenset, list, types.MappingProxyType)):
            state[name] = type(value)(value) if not isinstance(value, dict) else dict(value)
    return state


@pytest.fixture
def restore_module() -> Iterator[dict[str, Any]]:
    """The module's state before the test, put back after it (a failing test must not break
    the others that share the process)."""
    before = _snapshot()
    yield before
    if _snapshot() == before:
        return
    for name, saved in before.items():
        value = getattr(su, name)
        if isinstance(value, type):
            for key in set(vars(value)) - set(saved):
                delattr(value, key)
            for key, attr in saved.items():
                if key not in ("__dict__", "__weakref__") and vars(value).get(key) is not attr:
                    setattr(value, key, attr)
        elif isinstance(value, types.FunctionType):
            value.__dict__.clear()
            value.__dict__.update(saved[0])
            value.__defaults__, value.__code__ = saved[1], saved[2]
        elif isinstance(value, (dict, set, list)):
            value.clear()
            value.update(saved) if not isinstance(value, list) else value.extend(saved)


_SCALAR = b"cnumpy.core.multiarray\nscalar\n"
_ENCODE = b"c_codecs\nencode\n"


@pytest.mark.parametrize(
    "blob",
    [
        # BUILD (None, {'to_python': encode}) on the scalar stand-in: a class attribute once.
        _SCALAR + b"N}" + _text("to_python") + _ENCODE + b"s\x86b.",
        # BUILD {'x': 1} on _codecs.encode: a function's __dict__ once.
        _ENCODE + b"}" + _text("x") + b"K\x01sb.",
        # BUILD (None, {'__defaults__': ('latin1',)}) on _codecs.encode.
        _ENCODE + b"N}" + _text("__defaults__") + _text("latin1") + b"\x85s\x86b.",
    ],
    ids=["scalar-class", "function-dict", "function-defaults"],
)
def test_refused_pickle_leaves_no_state(
    tmp_path: Path, blob: bytes, restore_module: dict[str, Any]
) -> None:
    hostile = tmp_path / "hostile"
    hostile.write_bytes(b"\x80\x02" + blob)
    with pytest.raises(DataError, match=re.escape(os.path.abspath(hostile))):
        su.load_pickle(hostile)
    assert _snapshot() == restore_module
    # A good file, with numpy scalar labels, still loads after it.
    arrays = cifar_arrays(100, 20, 10)
    folder = write_cifar10(tmp_path, arrays, binary=False)
    x, y = arrays["test"]
    record = {b"labels": [np.int64(v) for v in y], b"data": x.reshape(20, 3072)}
    (folder / "test_batch").write_bytes(pickle.dumps(record, protocol=2))
    data = load_dataset("cifar10", folder)
    np.testing.assert_array_equal(data.test.labels.numpy(), y)


def test_tables_are_immutable() -> None:
    with pytest.raises(TypeError):
        su._SAFE_GLOBALS[("os", "system")] = os.system  # type: ignore[index]
    with pytest.raises(AttributeError):
        su._PLAIN_DTYPES.add("O")  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# MedMNIST .npz: every member's header is checked before any array is read
# --------------------------------------------------------------------------------------------


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header declaring ``shape`` of ``descr``."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


@pytest.fixture
def no_array_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        pytest.fail("an array was read from a file that should have been refused by its header")

    monkeypatch.setattr(np.lib.format, "read_array", refuse)


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (npy_header("|u1", (2**40, 28, 28)), "-byte limit for one array"),
        (npy_header("|u1", (1000, 28, 28)) + bytes(10), "holds 10 bytes of data"),
        (npy_header("|O", (3,)) + bytes(24), r"dtype object refused"),
        (npy_header("|u1", (8, 1, 1, 1, 1)) + bytes(8), r"must be uint8 \(N, H, W\)"),
        (npy_header("|u1", (9, 5, 5)) + bytes(225), "9 train_images but 8 train_labels"),
        (npy_header("|u1", (30_000, 28, 28)) + bytes(30_000 * 784), "decompression bomb"),
    ],
    ids=["huge", "inconsistent", "object", "ndim", "count", "bomb"],
)
def test_npz_headers_checked_before_reading(
    tmp_path: Path, member: bytes, match: str, no_array_reads: None
) -> None:
    arrays = write_medmnist(tmp_path / "x.npz", {"train": 8, "val": 4, "test": 4}, 4, (5, 5))
    path = tmp_path / "octmnist.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, value)
            archive.writestr(f"{key}.npy", member if key == "train_images" else buffer.getvalue())
    with pytest.raises(DataError, match=match) as err:
        load_dataset("octmnist", tmp_path)
    assert os.path.abspath(path) in str(err.value) and "train_images" in str(err.value)


# --------------------------------------------------------------------------------------------
# IDX: the header's dimensions are checked before anything is allocated or decompressed
# --------------------------------------------------------------------------------------------


@pytest.fixture
def decompressed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of every read from a .gz, as the loader asks for them."""
    sizes: list[int] = []
    read = gzip.GzipFile.read

    def spy(self: gzip.GzipFile, size: int = -1) -> bytes:
        data = read(self, size)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", spy)
    return sizes


def _mnist_root(tmp_path: Path) -> Path:
    root = tmp_path / "mnist"
    root.mkdir()
    images, labels = np.zeros((10, 4, 4), np.uint8), np.arange(10, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=True)
    return root


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_huge_dimensions_refused_unread(
    tmp_path: Path, gz: bool, decompressed: list[int]
) -> None:
    root = _mnist_root(tmp_path)
    target = root / "train-images-idx3-ubyte.gz"
    target.unlink()
    header = bytes([0, 0, 8, 3]) + np.array([60_000, 60_000, 60_000], ">u4").tobytes()
    data = header + bytes(2**20)
    target = target if gz else target.with_suffix("")
    target.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="-byte limit for an IDX file") as err:
        load_dataset("mnist", root)
    assert os.path.abspath(target) in str(err.value)
    assert sum(decompressed) <= len(header)


def test_idx_gzip_never_decompressed_past_its_dimensions(
    tmp_path: Path, decompressed: list[int]
) -> None:
    """Ten declared labels followed by 8 MiB of zeros (8 kB compressed): 11 bytes are read."""
    root = _mnist_root(tmp_path)
    target = root / "train-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(10 + 2**23)))
    with pytest.raises(DataError, match="truncated or corrupt: more than 18 bytes") as err:
        load_dataset("mnist", root)
    assert os.path.abspath(target) in str(err.value)
    assert sum(decompressed) < 2**16


# --------------------------------------------------------------------------------------------
# Image folders: absurd pixel counts are refused from the header, before decoding
# --------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A grayscale PNG that declares ``width`` x ``height`` and holds one row of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(1 + width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("side", "pillow_limit"),
    [(10_000, "default"), (100_000, None)],
    ids=["pillow-warns-only", "pillow-check-off"],
)
def test_image_bomb_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int, pillow_limit: str | None
) -> None:
    """10**8 pixels, where Pillow only warns, and 10**10 with Pillow's check turned off (as some
    programs do): both refused from the header, naming the file."""
    from PIL import Image, ImageFile

    if pillow_limit is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    def refuse(*_: Any) -> None:
        pytest.fail("a decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bomb = tmp_path / "a" / "bomb.png"
    bomb.write_bytes(png_header(side, side))
    (tmp_path / "b" / "fine.png").write_bytes(png_header(4, 4))
    with pytest.raises(DataError, match=f"{side} x {side} pixels, more than the") as err:
        load_dataset("image-folder", tmp_path)
    assert os.path.abspath(bomb) in str(err.value)
