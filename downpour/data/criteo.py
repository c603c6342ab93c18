"""Click logs in the Criteo display-ads format: parser, writer, parse cache and the ``criteo`` dataset.

One example per line, 40 tab-separated fields: the label (0 or 1), 13 integer
features (decimal, may be negative) and 26 categorical features (up to 8 hex
digits, 32-bit hashes in Criteo's release); any feature may be empty (missing).
A split is every file under ``data.path`` matching its pattern (``train-*.tsv*``,
``test-*.tsv*``; gzipped files too), read in sorted order through fsspec.

``take`` gives ``((dense, ids), y)``: ``dense`` float32 [n, 13] = log1p(max(x, 0)),
0 where missing; ``ids`` int64 [n, 26] = field · 2³³ + value (value < 2³²), or
field · 2³³ + 2³² where missing, so no two fields share an ID and each field's
missing value is an ID of its own; ``y`` float32 [n] of 0/1.

Parsing is numpy over the raw bytes, a block of lines at a time: the separators'
positions give every field's end and length, then each field's last 8 bytes are
read as one uint64 and decoded two characters per table lookup (SWAR), so no
Python runs per line or per field. The result is cached as ``.npy`` files that
later readers memory-map (:class:`ParseCache`): a job's processes parse a data
set once between them.
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

from downpour.data.dataset import Dataset, register_dataset
from downpour.errors import DataError

log = logging.getLogger(__name__)

NUM_INT, NUM_CAT = 13, 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
FIELD_NAMES = ["label"] + [f"I{j + 1}" for j in range(NUM_INT)] + [f"C{j + 1}" for j in range(NUM_CAT)]
FIELD_STRIDE = 1 << 33  # ids of field f are f * 2**33 + value; value 2**32 means "missing"
MISSING = 1 << 32
META_FILE = "criteo.json"  # written by the generator: counts, optimum, parameters
TRUTH_FILE = "test-truth.npy"  # the generator's true click probability of every test row
CACHE_VERSION = 1  # bump when the cached arrays change meaning
BLOCK_BYTES = 256 << 10  # parse this much text at a time: its temporaries (~30x) stay in the CPU cache (1 MiB was 2x slower)

_TAB, _NL = 9, 10
Buffer = bytes | mmap.mmap  # a file's text, read or memory-mapped


def _pair_table(chars: bytes, base: int) -> np.ndarray:
    """uint16 lookup: two chars (first in the low byte) → their value in ``base``; 0x100 if invalid."""
    table = np.full(1 << 16, 0x100, dtype=np.uint16)
    for hi in chars:
        for lo in chars:
            table[hi | (lo << 8)] = int(chr(hi), 16) * base + int(chr(lo), 16)
    return table


_DEC_PAIRS = _pair_table(b"0123456789", 10)
_HEX_PAIRS = _pair_table(b"0123456789abcdefABCDEF", 16)
_BITS = np.uint32(1) << np.arange(NUM_CAT, dtype=np.uint32)
_INT_DIGITS = 18  # longer integers are refused
_PAD = 24  # bytes before a block: the widest window (_INT_DIGITS rounded up to whole words)
# _KEEP_LAST[k]: the last k bytes of a little-endian word (the field's own chars, right-aligned).
_KEEP_LAST = np.array([0] + [(0xFFFFFFFFFFFFFFFF << (8 * (8 - k))) & 0xFFFFFFFFFFFFFFFF for k in range(1, 9)], dtype=np.uint64)
_ZEROS = np.uint64(0x3030303030303030)  # eight '0' chars
_HIGH_BYTES = np.uint64(0xFF00FF00FF00FF00)  # set in a lane only where the pair lookup refused


@dataclass
class Parsed:
    """A split's examples as arrays (what the cache stores)."""

    label: np.ndarray  # uint8 [n]
    dense: np.ndarray  # float32 [n, 13]: log1p(max(x, 0)), 0 where missing
    values: np.ndarray  # uint32 [n, 26]: categorical values, 0 where missing
    missing: np.ndarray  # uint32 [n]: bit f set when categorical field f is missing

    NAMES = ("label", "dense", "values", "missing")

    @staticmethod
    def empty(n: int) -> Parsed:
        return Parsed(np.empty(n, np.uint8), np.empty((n, NUM_INT), np.float32), np.empty((n, NUM_CAT), np.uint32), np.empty(n, np.uint32))


# -- parsing ----------------------------------------------------------------------------


def parse_bytes(data: bytes, name: str) -> Parsed:
    """Parse one file's text. ``name`` is used in errors: ``DataError("NAME:LINE: ...")``."""
    return parse_buffers([(data, name)])


def parse_buffers(buffers: list[tuple[Buffer, str]]) -> Parsed:
    """Parse several files' text (bytes or mmaps, each with its name for errors) into one set
    of arrays, allocated once: lines are counted first, then each block of lines is parsed
    straight into its rows."""
    counts = [_count_lines(data) for data, _ in buffers]
    out = Parsed.empty(sum(counts))
    row = 0
    for (data, name), n in zip(buffers, counts):
        whole = data.rfind(b"\n") + 1  # bytes in whole lines; a last line without "\n" follows
        pos, line = 0, 0
        while pos < whole:
            end = data.find(b"\n", min(pos + BLOCK_BYTES, whole) - 1) + 1  # a block ends at a newline
            line += _parse_block(np.frombuffer(data, dtype=np.uint8, count=end - pos, offset=pos), name, line, out, row + line)
            pos = end
        if whole < len(data):
            tail = np.frombuffer(bytes(data[whole:]) + b"\n", dtype=np.uint8)
            line += _parse_block(tail, name, line, out, row + line)
        assert line == n, (line, n)
        row += n
    return out


def _count_lines(data: Buffer) -> int:
    if len(data) == 0:
        return 0
    buf = np.frombuffer(data, dtype=np.uint8)
    return int(np.count_nonzero(buf == _NL)) + (buf[-1] != _NL)


def _parse_block(buf: np.ndarray, name: str, first_line: int, out: Parsed, at: int) -> int:
    """Whole lines (the last ends with a newline) into rows ``at``... of ``out``; returns the
    number of lines. DataError at the first bad line."""
    sep = np.flatnonzero((buf == _TAB) | (buf == _NL))
    kinds = buf[sep]
    n = int(np.count_nonzero(kinds == _NL))
    if len(sep) != n * NUM_FIELDS or (kinds.reshape(n, NUM_FIELDS)[:, :-1] != _TAB).any():
        _field_count_error(buf, name, first_line)
    ends = sep.reshape(n, NUM_FIELDS)  # each field's separator
    lens = (np.diff(sep, prepend=-1) - 1).reshape(n, NUM_FIELDS)
    padded = np.concatenate([np.zeros(_PAD, dtype=np.uint8), buf])

    bad = np.zeros((n, NUM_FIELDS), dtype=bool)
    label = buf[ends[:, 0] - lens[:, 0]] - np.uint8(ord("0"))  # the label's one char (the separator if empty)
    bad[:, 0] = (lens[:, 0] != 1) | (label > 1)
    ints = slice(1, 1 + NUM_INT)
    dense, bad[:, ints] = _parse_ints(padded, buf[ends[:, ints] - lens[:, ints]], ends[:, ints], lens[:, ints])
    cats = slice(1 + NUM_INT, NUM_FIELDS)
    values, bad[:, cats] = _parse_hex(padded, ends[:, cats], lens[:, cats])
    if bad.any():
        row, field = np.argwhere(bad)[0]
        text = bytes(buf[ends[row, field] - lens[row, field] : ends[row, field]]).decode("utf-8", "replace")
        want = {0: "0 or 1"}.get(field, "an integer" if field <= NUM_INT else "up to 8 hex digits")
        raise DataError(f"{name}:{first_line + row + 1}: field {field + 1} ({FIELD_NAMES[field]}) is {text!r}, expected {want}")
    rows = slice(at, at + n)
    out.label[rows] = label
    out.dense[rows] = dense
    out.values[rows] = values
    out.missing[rows] = np.packbits(lens[:, cats] == 0, axis=1, bitorder="little").view("<u4")[:, 0]  # bit f: field f missing
    return n


def _field_count_error(buf: np.ndarray, name: str, first_line: int) -> None:
    nl = np.flatnonzero(buf == _NL)
    tabs_before = np.cumsum(buf == _TAB)[nl]
    per_line = np.diff(np.r_[0, tabs_before]) + 1
    row = int(np.flatnonzero(per_line != NUM_FIELDS)[0])
    raise DataError(
        f"{name}:{first_line + row + 1}: {per_line[row]} tab-separated fields, expected {NUM_FIELDS} "
        f"(label, {NUM_INT} integers, {NUM_CAT} categories)"
    )


def _pairs(padded: np.ndarray, ends: np.ndarray, nchars: np.ndarray, lut: np.ndarray, nwords: int) -> tuple[np.ndarray, np.ndarray]:
    """Each field's last ``8 * nwords`` bytes as uint64 words, each holding four uint16 lanes:
    the values of the field's chars two at a time through ``lut`` (two chars → value, or
    0x100 and up if either is invalid). Bytes before the field's last ``nchars`` read as
    '0', so short fields come out right-aligned. Also a mask of fields with an invalid char.
    ``padded`` is the block after _PAD zero bytes, so the words of the first fields stay in
    range. Lanes are little-endian: the first pair of a word is its lowest lane."""
    # One unaligned 8-byte load per word: a uint64 view of the bytes with a stride of one byte.
    at = np.ndarray(shape=(len(padded) - 7,), dtype=np.dtype("<u8"), buffer=padded, strides=(1,))
    if nwords == 1:
        words = at[ends + (_PAD - 8)]
        live = np.minimum(nchars, 8)
    else:
        words = at[ends[..., None] + (_PAD - 8 * np.arange(nwords, 0, -1))]
        live = np.clip(nchars[..., None] - 8 * np.arange(nwords - 1, -1, -1), 0, 8)
    keep = _KEEP_LAST[live]
    words = _ZEROS ^ ((words ^ _ZEROS) & keep)  # bytes outside `keep` become '0'

    pairs = lut[words.view(np.uint16)].view(np.dtype("<u8"))
    invalid = (pairs & _HIGH_BYTES) != 0
    return pairs, invalid if nwords == 1 else invalid.any(axis=-1)


def _parse_ints(padded: np.ndarray, first: np.ndarray, ends: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integers (first char ``first``) → log1p(max(x, 0)) as float32, and a bad-field mask.

    Eight digits at a time (SWAR): a lookup turns each pair of chars into 0..99, then two
    multiply-and-shift steps merge pairs into fours and fours into eights."""
    neg = (lens > 0) & (first == ord("-"))
    ndig = lens - neg
    bad = (neg & (ndig == 0)) | (ndig > _INT_DIGITS)
    nwords = -(-min(max(int(ndig.max(initial=1)), 1), _INT_DIGITS) // 8)
    x, invalid = _pairs(padded, ends, np.minimum(ndig, 8 * nwords), _DEC_PAIRS, nwords)
    with np.errstate(over="ignore"):
        x = ((x * np.uint64(100)) + (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
        x = ((x * np.uint64(10000)) + (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    if nwords == 1:
        value = x.astype(np.float32)
    else:
        value = x[..., 0].astype(np.float64)
        for w in range(1, nwords):
            value = value * 1e8 + x[..., w]
        value = value.astype(np.float32)
    value[neg] = 0.0  # log1p(max(x, 0))
    return np.log1p(value), bad | invalid


def _parse_hex(padded: np.ndarray, ends: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to 8 hex digits → uint32 values (0 where missing) and a bad-field mask."""
    x, invalid = _pairs(padded, ends, np.minimum(lens, 8), _HEX_PAIRS, 1)
    x = ((x << np.uint64(8)) | (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)  # byte lanes → 16-bit lanes
    x = ((x << np.uint64(16)) | (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return x.astype(np.uint32), invalid | (lens > 8)


# -- writing -----------------------------------------------------------------------------

_HEX2 = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)  # byte → two hex chars
_DEC5 = (np.arange(100_000)[:, None] // 10 ** np.arange(4, -1, -1) % 10 + ord("0")).astype(np.uint8)  # 0..99999 → 5 digits
_POW10 = 10 ** np.arange(1, 10, dtype=np.int64)
_INT_W = 11  # a sign and ten digit places (values keep at most nine)
_INT_AT = 2
_CAT_AT = _INT_AT + NUM_INT * (_INT_W + 1)
_ROW_W = _CAT_AT + NUM_CAT * 9


def format_lines(label: np.ndarray, ints: np.ndarray, int_missing: np.ndarray, values: np.ndarray, cat_missing: np.ndarray) -> bytes:
    """Rows as Criteo TSV text: labels 0/1 [n], integers [n, 13] (|x| < 10⁹), categorical
    values [n, 26] (uint32, written as 8 lowercase hex digits), and where each is missing
    (bool masks; written as empty fields). Every row is laid out at a fixed width, each
    character with a keep flag (leading zeros, plus signs and missing values are dropped),
    and the kept characters are gathered in one pass: no per-row Python."""
    n = len(label)
    mag = np.abs(ints)
    if n and mag.max() >= 10**9:
        raise DataError(f"integer features must be below 10**9 in magnitude, got {int(mag.max())}")
    buf = np.full((n, _ROW_W), ord("\t"), dtype=np.uint8)
    keep = np.ones((n, _ROW_W), dtype=bool)
    buf[:, 0] = label + ord("0")
    digits = buf[:, _INT_AT:_CAT_AT].reshape(n, NUM_INT, _INT_W + 1)
    ikeep = keep[:, _INT_AT:_CAT_AT].reshape(n, NUM_INT, _INT_W + 1)
    digits[:, :, 1:6] = _DEC5[mag // 100_000]
    digits[:, :, 6:11] = _DEC5[mag % 100_000]
    ndig = np.where(int_missing, 0, np.searchsorted(_POW10, mag, side="right") + 1)
    ikeep[:, :, 1:11] = np.arange(10) >= (10 - ndig)[:, :, None]
    digits[:, :, 0] = ord("-")
    ikeep[:, :, 0] = (ints < 0) & ~int_missing
    cats = buf[:, _CAT_AT:].reshape(n, NUM_CAT, 9)
    big_endian = values.astype(">u4").view(np.uint8).reshape(n, NUM_CAT, 4)
    cats[:, :, :8] = _HEX2[big_endian].view(np.uint8).reshape(n, NUM_CAT, 8)
    keep[:, _CAT_AT:].reshape(n, NUM_CAT, 9)[:, :, :8] = ~cat_missing[:, :, None]
    buf[:, -1] = ord("\n")
    return buf[keep].tobytes()


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
        missing = (d.missing[idx][:, None] & _BITS) != 0
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
    path: str, train: str = "train-*.tsv*", test: str = "test-*.tsv*", cache: bool = True, cache_dir: str | None = None
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
