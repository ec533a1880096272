"""CIFAR-10's python-pickle batches (cifar-10-batches-py), read without executing code and without handing numpy
any state it has not checked: a truncated, byte-flipped or crafted batch file gives a DataError naming the file,
never a crash of the interpreter.

The batch format is a pickled dict {b"data": uint8 (N, 3072), b"labels": [N ints in 0..9], ...}. The unpickler
below resolves every global the file names to a checked stand-in (a dtype from a short allow-list, an array built
only from bytes of the right length), so numpy never sees the pickle's own reconstruction state. Imports numpy,
torch and the project's DataError only; data.py loads the folder with it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from tokenizer import DataError, _listing

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FILES", "read_cifar10"]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


_CIFAR_MAX_BYTES = 1 << 28  # a CIFAR-10 batch is ~31 MB; anything far larger is not one
_CIFAR_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")  # uint8 images; integer labels


class _PickledDtype:
    """Stands in for numpy.dtype while unpickling: holds a checked type code and byte order; numpy never sees the
    pickled dtype state (a crafted one crashed the interpreter)."""

    def __init__(self, spec, align=False, copy=False):
        spec = spec.decode("ascii") if isinstance(spec, bytes) else spec
        if not isinstance(spec, str) or spec not in _CIFAR_DTYPES:
            raise pickle.UnpicklingError(f"dtype {spec!r} is not an integer dtype ({', '.join(_CIFAR_DTYPES)})")
        self.spec, self.byteorder = spec, "|" if spec[1] == "1" else "<"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=", b"<", b">",
                                                                                 b"|", b"=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise pickle.UnpicklingError("a dtype state other than a plain integer type")
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        self.byteorder = "<" if order in ("=", "|") else order

    def numpy(self) -> np.dtype:
        return np.dtype(self.spec if self.spec[1] == "1" else self.byteorder + self.spec)


def _checked_array(shape, dtype, fortran, raw) -> np.ndarray:
    """An array built by numpy only from a byte string, a checked dtype and a shape whose size matches it."""
    if not (isinstance(shape, tuple) and len(shape) <= 4
            and all(type(n) is int and 0 <= n <= 2**31 for n in shape)):
        raise pickle.UnpicklingError(f"array shape {shape!r}: expected up to 4 non-negative ints")
    if not isinstance(dtype, _PickledDtype) or type(fortran) is not bool:
        raise pickle.UnpicklingError("array state: expected a dtype and a bool")
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"array data: expected bytes, found {type(raw).__name__}")
    dt = dtype.numpy()
    if len(raw) != math.prod(shape) * dt.itemsize:
        raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dt} needs {math.prod(shape) * dt.itemsize} "
                                     f"bytes, found {len(raw)}")
    return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")


class _PickledArray:
    """Stands in for numpy.ndarray while unpickling (numpy.core.multiarray._reconstruct, then its state)."""
    array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("an array state other than (shape, dtype, fortran, bytes)")
        self.array = _checked_array(*state)


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,) or not isinstance(typecode, (bytes, str)) or len(typecode) > 8:
        raise pickle.UnpicklingError("numpy _reconstruct with arguments other than (ndarray, (0,), code)")
    return _PickledArray()


def _frombuffer(buf, dtype, shape, order):
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"array order {order!r}")
    return _checked_array(shape, dtype, order == "F", buf)


def _latin1_encode(obj, encoding="utf-8"):
    """_codecs.encode, as protocol-2 pickles use it for bytes: only str -> latin-1 bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode of a {type(obj).__name__} with encoding {encoding!r}")
    return obj.encode("latin-1")


_NDARRAY = object()  # what the pickle's numpy.ndarray resolves to: only ever an argument of _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, ints, bytes and strings, and numpy arrays of integer dtype rebuilt by
    _checked_array: every global the pickle names resolves to one of the checked stand-ins above, never to
    numpy's own functions, so a CIFAR batch can neither run code nor hand numpy an unchecked dtype or array
    state (both numpy 1's numpy.core and numpy 2's numpy._core names; protocols 2 to 5)."""
    _GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy.core.numeric", "_frombuffer"): _frombuffer,
                ("numpy._core.numeric", "_frombuffer"): _frombuffer,
                ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _PickledDtype,
                ("_codecs", "encode"): _latin1_encode}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds arrays only)")
        return self._GLOBALS[(module, name)]


def _as_array(x):
    return x.array if isinstance(x, _PickledArray) else x


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    Any malformed file (truncated, flipped bytes, foreign pickle) is a DataError naming it: the unpickler calls
    only the checked stand-ins of _ArrayUnpickler, and every exception it raises on a bad stream is reported."""
    expected = "a pickled dict with b'data' uint8 (N, 3072) and b'labels' (N ints in 0..9)"
    size = path.stat().st_size
    if size > _CIFAR_MAX_BYTES:
        raise DataError(f"{path}: expected {expected}, found a file of {size:,} bytes (a batch is ~31 MB)")
    try:
        raw = path.read_bytes()
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # the stream is untrusted: every failure to parse it is the file's fault
        raise DataError(f"{path}: expected {expected}, found an unreadable file ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected {expected}, found a {type(d).__name__}")
    data = _as_array(d.get(b"data", d.get("data")))
    labels = _as_array(d.get(b"labels", d.get("labels")))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected {expected}, found data = {found}")
    if isinstance(labels, list) and all(type(v) is int and 0 <= v <= 9 for v in labels):
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        found = (f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else
                 "nothing" if labels is None else f"a {type(labels).__name__} of {len(labels)} items"
                 if isinstance(labels, list) else type(labels).__name__)
        raise DataError(f"{path}: expected {expected}, found labels = {found}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are R(1024) G(1024) B(1024), row-major
    return x, torch.from_numpy(labels.astype(np.int64))


def read_cifar10(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the CIFAR-10 python folder (cifar-10-batches-py, or a folder containing it) with pickle + numpy.

    Returns (x_train uint8 (50000, 3, 32, 32), y_train int64 (50000,), x_test uint8 (10000, 3, 32, 32),
    y_test int64 (10000,)).
    """
    folder = Path(path).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataError(f"expected the CIFAR-10 python folder cifar-10-batches-py (data_batch_1..5, test_batch) at "
                        f"{folder}, found {'a file' if folder.exists() else 'nothing'}")
    missing = [n for n in CIFAR10_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: CIFAR-10 python folder is missing {', '.join(missing)}; expected "
                        f"{', '.join(CIFAR10_FILES)}, found {_listing(folder)}")
    train = [_read_cifar_batch(folder / n) for n in CIFAR10_FILES[:5]]
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test
