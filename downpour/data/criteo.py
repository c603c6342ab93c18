"""The ``criteo`` dataset: click logs in the Criteo display-ads format, with a parse cache.

The format, its parser and its writer are in :mod:`downpour.data.criteo_format`. A split
is every file under ``data.path`` matching its pattern (``train-*.tsv*``, ``test-*.tsv*``;
gzipped files too), read in sorted order through fsspec.

``take`` gives ``((dense, ids), y)``: ``dense`` float32 [n, 13] = log1p(max(x, 0)),
0 where missing; ``ids`` int64 [n, 26] = field · 2³³ + value (value < 2³²), or
field · 2³³ + 2³² where missing, so no two fields share an ID and each field's
missing value is an ID of its own; ``y`` float32 [n] of 0/1.

A split is parsed once: the result is cached as ``.npy`` files that later readers
memory-map (:class:`ParseCache`), so a job's processes parse a data set once between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from fsspec.utils import infer_compression

from downpour.data.criteo_format import FIELD_BITS, FIELD_STRIDE, MISSING, NUM_CAT, Buffer, Parsed, parse_buffers
from downpour.data.dataset import Dataset, register_dataset
from downpour.errors import DataError

log = logging.getLogger(__name__)

META_FILE = "criteo.json"  # written by the generator: counts, optimum, parameters
SPLIT_PATTERNS = ("train-*.tsv*", "test-*.tsv*")  # the files of each split under data.path (any compression)
TRUTH_FILE = "test-truth.npy"  # the generator's true click probability of every test row
CACHE_VERSION = 1  # bump when the cached arrays change meaning


# -- the cache --------------------------------------------------------------------------


class ParseCache:
    """Parsed splits as ``.npy`` files in ``folder/<split>-<key>/``, loaded memory-mapped.

    The key hashes the files' URLs, sizes and modification stamps, so a changed,
    added or removed file misses. A writer fills a private temporary folder and renames
    it into place (atomic on one filesystem); when another process got there first its
    folder stands and ours is dropped, so concurrent writers never mix files. An
    unwritable folder costs only a warning: the split is then kept in memory."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @staticmethod
    def key(fs: fsspec.AbstractFileSystem, paths: list[str]) -> str:
        h = hashlib.sha256(f"criteo-cache-v{CACHE_VERSION}".encode())
        for p in paths:
            info = fs.info(p)
            stamp = (
                os.stat(p).st_mtime_ns
                if _is_local(fs)
                else (info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created"))
            )
            h.update(f"\n{fs.unstrip_protocol(p)}|{info.get('size')}|{stamp}".encode())
        return h.hexdigest()[:24]

    def load(self, split: str, key: str) -> Parsed | None:
        where = os.path.join(self.folder, f"{split}-{key}")
        if not os.path.isdir(where):
            return None
        try:
            return Parsed(*(np.load(os.path.join(where, f"{k}.npy"), mmap_mode="r", allow_pickle=False) for k in Parsed.NAMES))
        except (OSError, ValueError) as err:
            log.warning("criteo: ignoring unreadable parse cache %s: %s", where, err)
            return None

    def store(self, split: str, key: str, parsed: Parsed) -> None:
        final = os.path.join(self.folder, f"{split}-{key}")
        tmp = os.path.join(self.folder, f".tmp-{split}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(tmp)
            for k in Parsed.NAMES:
                np.save(os.path.join(tmp, f"{k}.npy"), getattr(parsed, k), allow_pickle=False)
            os.rename(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(final):  # not merely a lost race
                log.warning("criteo: cannot write the parse cache in %s (%s); keeping the data in memory", self.folder, err)
            return
        for entry in os.listdir(self.folder):  # older versions of this split's files
            if entry.startswith(f"{split}-") and entry != f"{split}-{key}":
                shutil.rmtree(os.path.join(self.folder, entry), ignore_errors=True)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol if isinstance(fs.protocol, tuple) else fs.protocol == "file"


# -- splits and the dataset ---------------------------------------------------------------


class CriteoSplit:
    """The examples of a list of files. Nothing is read until the first ``len`` or ``take``;
    then the cache is tried and, on a miss, the files are parsed (and the cache filled)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, paths: list[str], split: str, cache: ParseCache | None) -> None:
        self.fs, self.paths, self.split, self.cache = fs, paths, split, cache
        self._data: Parsed | None = None

    def _load(self) -> Parsed:
        if self._data is None:
            key = ParseCache.key(self.fs, self.paths) if self.cache is not None else ""
            data = self.cache.load(self.split, key) if self.cache is not None else None
            if data is None:
                data = parse_buffers([(self._read(p), self.fs.unstrip_protocol(p)) for p in self.paths])
                if self.cache is not None:
                    self.cache.store(self.split, key, data)
            self._data = data
        return self._data

    def _read(self, path: str) -> Buffer:
        """The file's bytes: memory-mapped when local and uncompressed (no copy), else read."""
        compression = infer_compression(path)
        try:
            if _is_local(self.fs) and compression is None:
                with open(path, "rb") as f:
                    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            with self.fs.open(path, "rb", compression=compression) as f:
                return f.read()
        except OSError as err:
            raise DataError(f"cannot read {self.fs.unstrip_protocol(path)}: {err}") from None

    def __len__(self) -> int:
        return len(self._load().label)

    @property
    def labels(self) -> np.ndarray:
        """Every label of the split, uint8 0/1."""
        return np.asarray(self._load().label)

    def take(self, indices: np.ndarray) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        d = self._load()
        idx = np.asarray(indices, dtype=np.int64)
        missing = (d.missing[idx][:, None] & FIELD_BITS) != 0
        ids = d.values[idx].astype(np.int64)
        ids += np.arange(NUM_CAT, dtype=np.int64) * FIELD_STRIDE
        ids[missing] += MISSING
        dense = torch.from_numpy(np.ascontiguousarray(d.dense[idx]))
        return (dense, torch.from_numpy(ids)), torch.from_numpy(d.label[idx].astype(np.float32))


@dataclass
class CriteoDataset(Dataset):
    """A :class:`Dataset` plus what the generator knows: ``optimum`` (``test_auc`` and
    ``test_logloss`` of the true probabilities; None for data without ``criteo.json``)
    and ``test_truth`` (the true click probability of each test row, or None)."""

    optimum: dict | None = None
    truth_url: str | None = None

    @property
    def test_truth(self) -> np.ndarray | None:
        if self.truth_url is None:
            return None
        with fsspec.open(self.truth_url, "rb") as f:
            truth = np.load(f, allow_pickle=False)
        if len(truth) != len(self.test):
            raise DataError(f"{self.truth_url} holds {len(truth)} probabilities for {len(self.test)} test rows")
        return truth


HOW_TO_GET = "make synthetic data with `downpour datagen criteo --rows 3000000 --out DIR`, or point data.path at Criteo TSV files"


@register_dataset("criteo")
def load_criteo_dataset(
    path: str, train: str = SPLIT_PATTERNS[0], test: str = SPLIT_PATTERNS[1], cache: bool = True, cache_dir: str | None = None
) -> CriteoDataset:
    """The Criteo-format files under ``path`` (a folder or fsspec URL). ``train``/``test`` are
    glob patterns relative to it. The parse cache goes to ``cache_dir``, by default
    ``path/.criteo-cache`` for a local folder and nowhere for a remote URL."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    found = {
        split: sorted(p for p in fs.glob(f"{root}/{pattern}") if fs.isfile(p)) for split, pattern in (("train", train), ("test", test))
    }
    empty = [f"{split} ({root}/{pattern})" for split, pattern in (("train", train), ("test", test)) if not found[split]]
    if empty:
        raise DataError(f"no Criteo files for {' or '.join(empty)} under {path}. To get them: {HOW_TO_GET}")
    if cache_dir is None and cache and _is_local(fs):
        cache_dir = os.path.join(root, ".criteo-cache")
    store = ParseCache(cache_dir) if cache and cache_dir else None
    meta_path, truth_path = f"{root}/{META_FILE}", f"{root}/{TRUTH_FILE}"
    optimum = None
    if fs.isfile(meta_path):
        try:
            optimum = json.loads(fs.cat_file(meta_path)).get("optimum")
        except (ValueError, AttributeError) as err:
            raise DataError(f"{fs.unstrip_protocol(meta_path)}: not a generator metadata file: {err}") from None
    return CriteoDataset(
        train=CriteoSplit(fs, found["train"], "train", store),
        test=CriteoSplit(fs, found["test"], "test", store),
        optimum=optimum,
        truth_url=fs.unstrip_protocol(truth_path) if fs.isfile(truth_path) else None,
    )
