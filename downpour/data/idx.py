"""MNIST-format IDX files (gzipped or not): the reference job's data.

IDX layout: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension and the raw data. Uncompressed files are
memory-mapped, so a worker reads only the pages of the examples it trains on;
gzipped files are decompressed once into memory.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from downpour.data.dataset import ArrayDataset, Dataset, register_dataset
from downpour.errors import DataError

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = (
    "install Debian's Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
    "(files land in /usr/share/datasets/fashion-mnist), or point data.path / --data at a folder of MNIST-format IDX files"
)


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """An IDX file's element type and shape, reading only its header, and checking that the data it
    promises is there: from an uncompressed file's size, or a gzipped one's stored length (read
    through only where that differs: a damaged file, or a gzip of several members)."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * 8)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _TYPES or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        raise DataError(f"{path} is not an IDX file (bad magic or truncated header)")
    dtype, ndim = np.dtype(_TYPES[head[2]]), head[3]
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    need = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if not path.endswith(".gz"):
        if os.path.getsize(path) < need:
            raise DataError(f"{path}: file holds {os.path.getsize(path)} bytes, header promises {need}")
    elif _gzip_length(path) != need % (1 << 32):
        try:
            got = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    got += len(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(f"cannot read IDX file {path} (damaged or cut short?): {err}") from None
        if got < need:
            raise DataError(f"{path}: holds {got} bytes once decompressed, header promises {need}")
    return dtype, shape


def _gzip_length(path: str) -> int:
    """The uncompressed length a gzip file's trailer states (of its last member; modulo 2**32)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


class IdxSplit:
    """Images and labels in two IDX files. Only the headers are read up front (length and
    type checks); the data is read at the first ``take``, so a process that only needs
    the split's length (the coordinator, the launcher's check) never reads it."""

    def __init__(self, images: str, labels: str) -> None:
        (xtype, xshape), (_, yshape) = read_idx_header(images), read_idx_header(labels)
        if xshape[0] != yshape[0]:
            raise DataError(f"{xshape[0]} inputs but {yshape[0]} labels ({images}, {labels})")
        self.paths = (images, labels)
        self.shape = tuple(xshape[1:])  # one example's
        self.scale = 1.0 / 255.0 if xtype == np.uint8 else None
        self._len = xshape[0]
        self._arrays: ArrayDataset | None = None

    def __len__(self) -> int:
        return self._len

    def take(self, indices: np.ndarray):
        return self._data().take(indices)

    @property
    def y(self) -> np.ndarray:
        """Every label (read at the first use, as ``take`` reads them)."""
        return self._data().y

    def _data(self) -> ArrayDataset:
        if self._arrays is None:
            self._arrays = ArrayDataset(read_idx(self.paths[0]), read_idx(self.paths[1]), self.scale)
        return self._arrays


def read_idx(path: str) -> np.ndarray:
    """One IDX file as a numpy array (memory-mapped when not compressed)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
            return _parse(memoryview(raw), path, None)
        with open(path, "rb") as f:
            head = f.read(4 + 4 * 8)
        return _parse(memoryview(head), path, path)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None


def _parse(buf: memoryview, name: str, mmap_path: str | None) -> np.ndarray:
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _TYPES:
        raise DataError(f"{name} is not an IDX file (bad magic)")
    dtype, ndim = np.dtype(_TYPES[buf[2]]), buf[3]
    if ndim == 0 or len(buf) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", bytes(buf[4 : 4 + 4 * ndim]))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if mmap_path is not None:
        size = os.path.getsize(mmap_path)
        if size < offset + count * dtype.itemsize:
            raise DataError(f"{name}: file holds {size} bytes, header promises {offset + count * dtype.itemsize}")
        return np.memmap(mmap_path, dtype=dtype, mode="r", offset=offset, shape=shape)
    if len(buf) < offset + count * dtype.itemsize:
        raise DataError(f"{name}: data is shorter than its header says")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)


def find_idx_files(folder: str) -> dict[str, str]:
    """The four standard file paths in ``folder`` (plain or .gz); DataError saying how to get them if absent."""
    found, missing = {}, []
    for key, base in FILES.items():
        for cand in (base, base + ".gz"):
            p = os.path.join(folder, cand)
            if os.path.isfile(p):
                found[key] = p
                break
        else:
            missing.append(base)
    if missing:
        where = (folder if os.path.isdir(folder) else f"{folder} (a file, not a folder of IDX files)" if os.path.exists(folder)
                 else f"{folder} (no such folder)")
        raise DataError(f"training data not found in {where}: missing {', '.join(missing)}[.gz]. To get it: {HOW_TO_GET}")
    return found


@register_dataset("idx")
def load_idx_dataset(path: str) -> Dataset:
    """MNIST-format images and labels from a folder; pixels scaled to [0, 1] as floats."""
    f = find_idx_files(path)
    train, test = IdxSplit(f["train_x"], f["train_y"]), IdxSplit(f["test_x"], f["test_y"])
    if train.shape != test.shape:  # (the model would train, then fail on the first test batch)
        raise DataError(f"{path}: the test examples are {'x'.join(map(str, test.shape))} ({f['test_x']}), the training "
                        f"examples {'x'.join(map(str, train.shape))} ({f['train_x']}): one model cannot take both")
    return Dataset(train=train, test=test)
