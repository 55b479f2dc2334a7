"""A restricted unpickler for the CIFAR "python version" batches: it never runs code from the file.

Why: ``pickle.load`` calls whatever callable a file names, so a doctored ``data_batch_1`` would
run arbitrary code the moment it is read. The CIFAR files are pickled dicts whose numpy arrays
pickle as calls to ``numpy.core.multiarray._reconstruct``, ``numpy.dtype`` and
``ndarray.__setstate__``; that is all this module lets through, and even those are never the
real functions.

Allowed, each mapped to an inert stub that only records its arguments:

* ``numpy.ndarray`` (only as ``_reconstruct``'s argument), ``numpy.dtype``,
  ``numpy.core.multiarray._reconstruct`` / ``scalar`` and ``numpy.core.numeric._frombuffer``
  (also under numpy 2's ``numpy._core``);
* ``_codecs.encode``, only as the latin1 idiom Python 3 uses to pickle bytes at protocol < 3.

After loading, the stubs become real numpy arrays and Python numbers through ``np.frombuffer``
of validated plain data. Refused, as a :class:`DataError` naming the file: any other global,
persistent ids, structured, object or non-numeric dtypes, data whose length does not match its
shape, and objects other than dicts, lists, tuples, strings, bytes and numbers.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._common import DataError, abs_path, text

__all__ = ["load_pickle"]

_PLAIN_DTYPES = {f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)} | {"f4", "f8", "b1"}
_MAX_DEPTH = 32


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` without running any code from it; a DataError on anything refused or
    malformed."""
    try:
        with open(path, "rb") as f:
            # encoding='bytes': Python 2 str (the original CIFAR files) arrives as bytes.
            return _materialize(_SafeUnpickler(f, encoding="bytes").load())
    except _Refused as e:
        raise DataError(f"{abs_path(path)}: unsafe or unexpected pickle content: {e}") from e
    except Exception as e:  # any other malformation: truncated file, bad opcode, ...
        raise DataError(f"{abs_path(path)} is not a valid CIFAR pickle: {e}") from e


class _Refused(pickle.UnpicklingError):
    pass


class _NdarrayMarker:
    """Stands in for numpy.ndarray; only _reconstruct accepts it."""


class _DtypeStub:
    """Records a ``numpy.dtype(spec, align, copy)`` call and its ``__setstate__``."""

    def __init__(self, spec: Any = None, *_: Any) -> None:
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise _Refused("only simple numeric dtypes are allowed (no structured dtypes)")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        spec = text(self.spec)
        if spec not in _PLAIN_DTYPES:
            raise _Refused(f"dtype {spec!r} is not a plain numeric dtype")
        order = text(self.byteorder)
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"bad dtype byte order {self.byteorder!r}")
        return np.dtype(spec).newbyteorder(order) if order != "|" else np.dtype(spec)


class _ArrayStub:
    """Records ``_reconstruct(ndarray, ...)`` + ``__setstate__`` (or ``_frombuffer``)."""

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

    def to_numpy(self) -> np.ndarray:
        if not isinstance(self.dtype, _DtypeStub):
            raise _Refused("ndarray without a dtype")
        dtype = self.dtype.to_numpy()
        shape = self.shape
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _Refused(f"bad ndarray shape {shape!r}")
        raw = self.raw
        if isinstance(raw, str):  # a Python 2 str read without encoding='bytes'
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused("ndarray data must be raw bytes (object arrays are refused)")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise _Refused(f"ndarray data is {len(raw)} bytes, shape {shape} needs more or less")
        order = "F" if self.fortran else "C"
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


class _ScalarStub:
    """Records ``numpy.core.multiarray.scalar(dtype, raw)``: a numpy scalar such as a label."""

    def __init__(self, dtype: Any, raw: Any) -> None:
        self.dtype, self.raw = dtype, raw

    def to_python(self) -> Any:
        array = _ArrayStub()
        array.shape, array.dtype, array.raw = (), self.dtype, self.raw
        return array.to_numpy().item()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if subtype is not _NdarrayMarker:
        raise _Refused("_reconstruct of anything but numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    array = _ArrayStub()
    array.raw = bytes(buffer) if isinstance(buffer, (bytes, bytearray)) else buffer
    array.dtype, array.shape, array.fortran = dtype, shape, order == "F"
    return array


def _latin1_encode(value: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 pickles bytes for protocol < 3 as _codecs.encode(str, 'latin1').
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is only allowed as the latin1 bytes encoding")
    return value.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _latin1_encode,
    **{(f"{m}.multiarray", "_reconstruct"): _reconstruct for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.multiarray", "scalar"): _ScalarStub for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids are not allowed")


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace the stubs in an unpickled tree by numpy arrays and Python numbers."""
    if depth > _MAX_DEPTH:
        raise _Refused("nested too deeply")
    if isinstance(obj, (_ArrayStub, _DtypeStub)):
        return obj.to_numpy()
    if isinstance(obj, _ScalarStub):
        return obj.to_python()
    if isinstance(obj, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        # Long lists of plain ints (labels) are the common case: skip the recursion for them.
        if all(type(v) is int for v in obj):
            return obj
        return [_materialize(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray)):
        return obj
    raise _Refused(f"unexpected object of type {type(obj).__name__}")
