"""A restricted unpickler for the CIFAR "python version" batches: it never runs code from the file,
and a hostile file can neither exhaust memory nor change anything outside its own load.

Why: ``pickle.load`` calls whatever callable a file names, so a doctored ``data_batch_1`` would
run arbitrary code the moment it is read. The CIFAR files are pickled dicts whose numpy arrays
pickle as calls to ``numpy.core.multiarray._reconstruct``, ``numpy.dtype`` and
``ndarray.__setstate__``; that is all this module lets through, and even those are never the
real functions.

Allowed, each as a fresh inert stand-in per reference (so a BUILD aimed at one changes nothing
that outlives the load) that only records its arguments:

* ``numpy.ndarray`` (only as ``_reconstruct``'s argument), ``numpy.dtype``,
  ``numpy.core.multiarray._reconstruct`` / ``scalar`` and ``numpy.core.numeric._frombuffer``
  (also under numpy 2's ``numpy._core``);
* ``_codecs.encode``, only as the latin1 idiom Python 3 uses to pickle bytes at protocol < 3.

After loading, the stubs become real numpy arrays and Python numbers through ``np.frombuffer``
of validated plain data. Refused, as a :class:`DataError` naming the file: any other global,
persistent ids, sets, dict keys other than strings and numbers, structured, object or non-numeric
dtypes, data whose length does not match its shape, objects other than dicts, lists, tuples,
strings, bytes and numbers, and anything past the limits below (shared references, which cost
the file two bytes each, count every time they are used).
"""

from __future__ import annotations

import math
import os
import pickle
import reprlib
from collections.abc import Callable
from pathlib import Path
from struct import unpack
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np

from ._common import DataError, abs_path, text

__all__ = ["load_pickle"]

# The largest real batch, CIFAR-100's train file, holds 50,000 x 3,072 bytes (~158 MB on disk as
# written by Python 2, up to twice that re-pickled by Python 3 at protocol 2) and ~150,000
# other objects (file names and two label lists). Each limit is per file, with a wide margin.
MAX_FILE_BYTES = 384 * 2**20
MAX_OBJECTS = 1_000_000
MAX_BYTES = 256 * 2**20  # of arrays, strings and bytes materialized
_MAX_DEPTH = 32
_MAX_NDIM = 64  # numpy's own
_CORES = ("numpy.core", "numpy._core")  # numpy 1 and 2

_PLAIN_DTYPES = frozenset({f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)} | {"f4", "f8", "b1"})
_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))
_short = reprlib.Repr()  # a hostile value's repr is bounded: shared references make it huge
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` without running any code from it; a DataError on anything refused or
    malformed."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise _Refused(
                    f"the file is {size:,} bytes, more than the {MAX_FILE_BYTES:,}-byte limit "
                    "for one CIFAR batch"
                )
            # encoding='bytes': Python 2 str (the original CIFAR files) arrives as bytes.
            obj = _SafeUnpickler(_Capped(f, size), encoding="bytes").load()
        return _Materializer().run(obj)
    except _Refused as e:
        raise DataError(f"{abs_path(path)}: unsafe or unexpected pickle content: {e}") from e
    except Exception as e:  # any other malformation: truncated file, bad opcode, ...
        raise DataError(f"{abs_path(path)} is not a valid CIFAR pickle: {e}") from e


class _Refused(pickle.UnpicklingError):
    pass


class _Global:
    """A fresh stand-in for one allowed global, made per reference: calling it calls ``make``.

    It has no attributes a file could set and refuses BUILD, and ``make`` is never handed out,
    so nothing a file does to it outlives the load.
    """

    __slots__ = ("make",)
    make: Callable[..., Any]

    def __init__(self, make: Callable[..., Any]) -> None:
        object.__setattr__(self, "make", make)

    def __call__(self, *args: Any) -> Any:
        return self.make(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused("a pickle may not set attributes of a global")

    def __setstate__(self, state: Any) -> None:
        raise _Refused("a pickle may not set the state of a global")


def _ndarray(*_: Any) -> None:
    raise _Refused("numpy.ndarray is only allowed as _reconstruct's argument")


class _DtypeStub:
    """Records a ``numpy.dtype(spec, align, copy)`` call and its ``__setstate__``."""

    __slots__ = ("byteorder", "spec")

    def __init__(self, spec: Any = None, *_: Any) -> None:
        self.spec = spec
        self.byteorder: Any = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise _Refused("only simple numeric dtypes are allowed (no structured dtypes)")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        # Checked as strings before text(): str() of a hostile object could be huge.
        if not isinstance(self.spec, (str, bytes)) or text(self.spec) not in _PLAIN_DTYPES:
            raise _Refused(f"dtype {_short.repr(self.spec)} is not a plain numeric dtype")
        spec = text(self.spec)
        if self.byteorder not in ("<", ">", "|", "=", b"<", b">", b"|", b"="):
            raise _Refused(f"bad dtype byte order {_short.repr(self.byteorder)}")
        order = text(self.byteorder)
        return np.dtype(spec).newbyteorder(order) if order != "|" else np.dtype(spec)


class _ArrayStub:
    """Records ``_reconstruct(ndarray, ...)`` + ``__setstate__`` (or ``_frombuffer``)."""

    __slots__ = ("dtype", "fortran", "raw", "shape")

    def __init__(self) -> None:
        self.shape: Any = None
        self.dtype: Any = None
        self.fortran: Any = False
        self.raw: Any = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw); very old numpy omitted the version.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _Refused("unexpected ndarray state")
        self.shape, self.dtype, self.fortran, self.raw = state

    def nbytes(self) -> int:
        """The raw data's length, checked against the shape and dtype (nothing allocated)."""
        if not isinstance(self.dtype, _DtypeStub):
            raise _Refused("ndarray without a dtype")
        itemsize = self.dtype.to_numpy().itemsize
        shape = self.shape
        if (
            not isinstance(shape, tuple)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _Refused(f"bad ndarray shape {_short.repr(shape)}")
        if not isinstance(self.raw, (str, bytes, bytearray)):
            raise _Refused("ndarray data must be raw bytes (object arrays are refused)")
        # A Python 2 str read without encoding='bytes' holds one latin1 character per byte.
        if len(self.raw) != math.prod(shape) * itemsize:
            raise _Refused(
                f"ndarray data is {len(self.raw)} bytes, shape {_short.repr(shape)} needs more or "
                "less"
            )
        return len(self.raw)

    def to_numpy(self) -> np.ndarray:
        """The array; call :meth:`nbytes` first."""
        raw = self.raw.encode("latin1") if isinstance(self.raw, str) else self.raw
        array = np.frombuffer(raw, dtype=self.dtype.to_numpy())
        return array.reshape(self.shape, order="F" if self.fortran else "C").copy()


class _ScalarStub:
    """Records ``numpy.core.multiarray.scalar(dtype, raw)``: a numpy scalar such as a label."""

    __slots__ = ("array",)

    def __init__(self, dtype: Any, raw: Any) -> None:
        self.array = _ArrayStub()
        self.array.shape, self.array.dtype, self.array.raw = (), dtype, raw

    def __setstate__(self, state: Any) -> None:
        raise _Refused("a numpy scalar has no state to set")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if not (isinstance(subtype, _Global) and subtype.make is _ndarray):
        raise _Refused("_reconstruct of anything but numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    array = _ArrayStub()
    array.raw = buffer
    array.dtype, array.shape, array.fortran = dtype, shape, order == "F"
    return array


def _latin1_encode(value: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 pickles bytes for protocol < 3 as _codecs.encode(str, 'latin1').
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is only allowed as the latin1 bytes encoding")
    return value.encode("latin1")


_SAFE_GLOBALS: MappingProxyType[tuple[str, str], Callable[..., Any]] = MappingProxyType(
    {
        ("numpy", "ndarray"): _ndarray,
        ("numpy", "dtype"): _DtypeStub,
        ("_codecs", "encode"): _latin1_encode,
        **{(f"{m}.multiarray", "_reconstruct"): _reconstruct for m in _CORES},
        **{(f"{m}.multiarray", "scalar"): _ScalarStub for m in _CORES},
        **{(f"{m}.numeric", "_frombuffer"): _frombuffer for m in _CORES},
    }
)


class _Capped:
    """``f`` whose reads never ask for more than its ``size``: a length the file declares for a
    string allocates nothing past the file's own size."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.readline, self.size, self._read = f.readline, size, f.read

    def read(self, n: int = -1) -> bytes:
        return self._read(self.size if n < 0 else min(n, self.size))


def _check_keys(keys: Any) -> None:
    # Hashing a tuple walks it, and shared references make a ~1 kB tuple take 2**100 steps.
    if not all(isinstance(k, _SCALAR_KEYS) for k in keys):
        raise _Refused("dict keys must be strings or numbers")


class _SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, whose opcodes can be overridden: the C one allocates its memo up
    to any index a file names (9 bytes ask for 32 GB) and hashes any key a file builds."""

    def __init__(self, file: _Capped, *, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._size = file.size

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _Global(_SAFE_GLOBALS[(module, name)])
        except KeyError:
            raise _Refused(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids are not allowed")

    def _refuse_set(self) -> None:
        raise _Refused("sets are not allowed")

    def _load_dict(self) -> None:
        _check_keys(self.stack[::2])  # the items after the mark
        super().load_dict()

    def _load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1])
        super().load_setitem()

    def _load_setitems(self) -> None:
        _check_keys(self.stack[::2])  # the items after the mark
        super().load_setitems()

    def _load_bytearray8(self) -> None:
        # The pure-Python unpickler zero-fills bytearray(n) for any declared n before reading.
        (n,) = unpack("<Q", self.read(8))
        if n > self._size:
            raise _Refused(f"a bytearray of {n:,} bytes in a {self._size:,}-byte file")
        self.append(bytearray(self.read(n)))

    dispatch = MappingProxyType(
        {
            **pickle._Unpickler.dispatch,
            **dict.fromkeys(
                (op[0] for op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET)), _refuse_set
            ),
            pickle.DICT[0]: _load_dict,
            pickle.SETITEM[0]: _load_setitem,
            pickle.SETITEMS[0]: _load_setitems,
            pickle.BYTEARRAY8[0]: _load_bytearray8,
        }
    )


class _Materializer:
    """Replaces the stubs in an unpickled tree by numpy arrays and Python numbers, counting what
    it produces: every use of a shared object counts again, as it is copied again."""

    def __init__(self) -> None:
        self.objects = 0
        self.bytes = 0

    def run(self, obj: Any) -> Any:
        return self._visit(obj, 0)

    def _charge(self, objects: int, nbytes: int = 0) -> None:
        self.objects += objects
        self.bytes += nbytes
        if self.objects > MAX_OBJECTS:
            raise _Refused(f"more than {MAX_OBJECTS:,} objects (the limit for one CIFAR file)")
        if self.bytes > MAX_BYTES:
            raise _Refused(
                f"more than {MAX_BYTES:,} bytes of arrays and strings (the limit for one CIFAR "
                "file)"
            )

    def _visit(self, obj: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _Refused("nested too deeply")
        if isinstance(obj, (_ArrayStub, _ScalarStub)):
            array = obj if isinstance(obj, _ArrayStub) else obj.array
            self._charge(1, array.nbytes())  # checked and charged before allocating
            return array.to_numpy() if array is obj else array.to_numpy().item()
        if isinstance(obj, _DtypeStub):
            self._charge(1)
            return obj.to_numpy()
        if isinstance(obj, (str, bytes, bytearray)):
            self._charge(1, len(obj))
            return obj
        if obj is None or isinstance(obj, (bool, int, float)):
            self._charge(1)
            return obj
        if isinstance(obj, dict):
            self._charge(1)
            return {self._visit(k, depth + 1): self._visit(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, list) and all(type(v) is int for v in obj):
            # Long lists of plain ints (labels) are the common case: no recursion for them.
            self._charge(1 + len(obj))
            return obj
        if isinstance(obj, (list, tuple)):
            self._charge(1)
            items = [self._visit(v, depth + 1) for v in obj]
            return items if isinstance(obj, list) else tuple(items)
        raise _Refused(f"unexpected object of type {type(obj).__name__}")
