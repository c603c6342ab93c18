"""Events into training batches: Criteo rows (``tsv``) or JSON objects with the same fields.

An event is a set of text fields. ``tsv`` holds one Criteo-format row (label, I1-I13,
C1-C26, tab-separated); ``json`` holds an object ``{"label": 0|1, "I1": int|null, ...,
"C1": "hex"|null, ...}`` (absent fields are missing); ``ts`` is the event's time in seconds
since the epoch (optional: freshness is measured from it); ``eos`` marks the end of a
partition (a bounded stream's last event). A malformed event is counted and skipped with
its reason kept for the log, never raised: one bad producer must not stop training.

The batch holds what :class:`~downpour.data.criteo.CriteoSplit` gives a model: ``dense``
float32 [n, 13], ``ids`` int64 [n, 26], ``y`` float32 [n].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from downpour.data.criteo_format import FIELD_BITS, FIELD_NAMES, FIELD_STRIDE, MISSING, NUM_CAT, parse_bytes
from downpour.errors import DataError
from downpour.stream.api import RawEvent

_KEEP_REASONS = 5  # reasons kept per batch for the log


@dataclass
class EventBatch:
    offsets: np.ndarray  # int64 [n]: each good event's offset
    dense: torch.Tensor
    ids: torch.Tensor
    y: torch.Tensor
    ts: np.ndarray  # float64 [n]: event time (s since the epoch), NaN where the event had none
    last_offset: int  # the offset after every event read (good, malformed or eos)
    malformed: int = 0
    reasons: list[str] = field(default_factory=list)
    eos: bool = False  # the partition's end marker was read (events after it are ignored)

    def __len__(self) -> int:
        return len(self.offsets)


def _json_row(text: str) -> str:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = set(obj) - set(FIELD_NAMES) - {"ts"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)[:3]}")
    cells = []
    for name in FIELD_NAMES:
        v = obj.get(name)
        if v is None:
            if name == "label":
                raise ValueError("no label")
            cells.append("")
        elif name == "label" or name.startswith("I"):
            if type(v) is not int:
                raise ValueError(f"{name} is {v!r}, expected an integer")
            if not -(2**63) <= v < 2**63:
                raise ValueError(f"{name} is {v}, beyond the 64-bit integer range")
            cells.append(str(v))
        else:
            if not isinstance(v, str):
                raise ValueError(f"{name} is {v!r}, expected a hex string")
            cells.append(v)
    return "\t".join(cells)


def _seconds(value: object) -> float:
    """An event's ``ts``: a finite number of seconds since the epoch, else a ValueError naming the field."""
    try:
        if isinstance(value, bool):  # (JSON true is not a time)
            raise TypeError
        ts = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"ts is {str(value)[:40]!r}, expected seconds since the epoch") from None
    if not math.isfinite(ts):
        raise ValueError(f"ts is {str(value)[:40]!r}, expected seconds since the epoch")
    return ts


def _row_of(ev: RawEvent) -> tuple[str, float]:
    """One event's Criteo row and time; ValueError/DataError if malformed."""
    f = ev.fields
    ts = float("nan")
    if "ts" in f:
        ts = _seconds(f["ts"])
    if "tsv" in f:
        row = f["tsv"]
    elif "json" in f:
        row = _json_row(f["json"])
        obj_ts = json.loads(f["json"]).get("ts")
        if obj_ts is not None:
            ts = _seconds(obj_ts)
    else:
        raise ValueError(f"neither a 'tsv' nor a 'json' field (fields: {sorted(f)[:5]})")
    if "\n" in row or "\r" in row:
        raise ValueError("a row with a line break")
    return row, ts


def parse_events(events: list[RawEvent], where: str, after: int) -> EventBatch:
    """The good events of ``events`` as one batch; ``after``: the offset before the first.
    Events after an ``eos`` marker are not part of the batch."""
    rows: list[str] = []
    offsets: list[int] = []
    times: list[float] = []
    reasons: list[str] = []
    bad = 0
    eos = False
    last = after
    for ev in events:
        last = ev.offset
        if "eos" in ev.fields:
            eos = True
            break
        try:
            row, ts = _row_of(ev)
        except (ValueError, TypeError, UnicodeError, RecursionError) as err:  # (JSON nested too deep: RecursionError)
            bad += 1
            if len(reasons) < _KEEP_REASONS:
                reasons.append(f"{where}@{ev.offset}: {err}")
            continue
        rows.append(row)
        offsets.append(ev.offset)
        times.append(ts)
    try:  # the whole batch in one vectorised pass; row by row only when some row is bad
        d = parse_bytes(("\n".join(rows) + "\n").encode(), where) if rows else None
    except DataError:
        keep = []
        for i, row in enumerate(rows):
            try:
                parse_bytes(row.encode() + b"\n", f"{where}@{offsets[i]}")
                keep.append(i)
            except DataError as err:
                bad += 1
                if len(reasons) < _KEEP_REASONS:
                    reasons.append(str(err))
        rows, offsets, times = [rows[i] for i in keep], [offsets[i] for i in keep], [times[i] for i in keep]
        d = parse_bytes(("\n".join(rows) + "\n").encode(), where) if rows else None
    if d is not None:
        missing = (d.missing[:, None] & FIELD_BITS) != 0
        ids = d.values.astype(np.int64)
        ids += np.arange(NUM_CAT, dtype=np.int64) * FIELD_STRIDE
        ids[missing] += MISSING
        dense, y = torch.from_numpy(np.ascontiguousarray(d.dense)), torch.from_numpy(d.label.astype(np.float32))
        ids_t = torch.from_numpy(ids)
    else:
        dense, ids_t, y = torch.zeros(0, 13), torch.zeros(0, NUM_CAT, dtype=torch.int64), torch.zeros(0)
    return EventBatch(np.asarray(offsets, dtype=np.int64), dense, ids_t, y, np.asarray(times, dtype=np.float64),
                      last, bad, reasons, eos)
