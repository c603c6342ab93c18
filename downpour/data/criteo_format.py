"""The Criteo display-ads text format: its fields, a parser and a writer.

One example per line, 40 tab-separated fields: the label (0 or 1), 13 integer
features (decimal, may be negative) and 26 categorical features (up to 8 hex
digits, 32-bit hashes in Criteo's release); any feature may be empty (missing).

Parsing is numpy over the raw bytes, a block of lines at a time: the separators'
positions give every field's end and length, then each field's last 8 bytes are
read as one uint64 and decoded two characters per table lookup (SWAR), so no
Python runs per line or per field. The ``criteo`` dataset (:mod:`downpour.data.criteo`)
reads files through this parser and caches the result.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from downpour.errors import DataError

NUM_INT, NUM_CAT = 13, 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
FIELD_NAMES = ["label"] + [f"I{j + 1}" for j in range(NUM_INT)] + [f"C{j + 1}" for j in range(NUM_CAT)]
FIELD_STRIDE = 1 << 33  # ids of field f are f * 2**33 + value; value 2**32 means "missing"
MISSING = 1 << 32
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
FIELD_BITS = np.uint32(1) << np.arange(NUM_CAT, dtype=np.uint32)  # bit f: categorical field f (Parsed.missing)
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
