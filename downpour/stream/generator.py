"""Synthetic click events into a stream, at a given rate, optionally with concept drift.

Rows come from the Criteo generator (docs/ctr-data.md). With ``drift_every = D`` the hidden
model changes every D events: phase k draws its labels from the weights of seed
``seed + k`` while the IDs keep their values (``CriteoSpec.id_seed``), so what an ID means
changes and a model frozen at the start falls behind one that keeps learning. Event i
goes to partition i mod P with its creation time in ``ts``; ``end_marker`` appends one
``eos`` event to every partition at the end (a bounded stream: the job ends there).

The events are rows from 2^39 on of the generator's sequence, where no data set of files holds
any (``downpour datagen criteo`` writes rows from 0): a stream and a file data set of the same
seed share their hidden model (phase 0) but no row, so a file test split scores a model trained
on the stream honestly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from downpour.data.criteo_format import format_lines
from downpour.data.criteo_gen import CriteoSpec, generate_rows, solve_bias

log = logging.getLogger(__name__)

_BLOCK = 32768  # rows drawn at a time: one chunk of the generator (it draws whole chunks)
STREAM_ROWS_FROM = 1 << 39  # the stream's first row in the generator's sequence (files use rows from 0)


def _phase_rows(seed: int, phase: int, start: int, stop: int, biases: dict[int, tuple[CriteoSpec, float]]):
    if phase not in biases:
        spec = CriteoSpec(rows=1 << 40, seed=seed + phase, id_seed=seed)
        biases[phase] = (spec, solve_bias(spec, pilot_rows=20_000))
    spec, bias = biases[phase]
    yield from generate_rows(spec, bias, STREAM_ROWS_FROM + start, STREAM_ROWS_FROM + stop)


def stream_events(source, events: int, rate: float = 0.0, seed: int = 0, drift_every: int | None = None,
                  end_marker: bool = False, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
    """Append ``events`` events to ``source`` (``rate`` events/s; 0: as fast as possible).
    Returns {"events", "seconds", "phases"}."""
    parts = source.spec.partitions
    biases: dict[int, tuple[CriteoSpec, float]] = {}
    t0 = clock()
    sent = 0
    while sent < events:
        n = min(_BLOCK, events - sent)
        if drift_every:
            phase = sent // drift_every
            n = min(n, (phase + 1) * drift_every - sent)
            lo = sent - phase * drift_every
        else:
            phase, lo = 0, sent
        for rows in _phase_rows(seed, phase, lo, lo + n, biases):
            lines = format_lines(rows.label, rows.ints, rows.int_missing, rows.values, rows.cat_missing).split(b"\n")[:-1]
            for start in range(0, len(lines), 256):  # small slices: the rate is kept within ~256 events
                chunk = lines[start : start + 256]
                if rate > 0:
                    ahead = (sent + len(chunk)) / rate - (clock() - t0)
                    if ahead > 0:
                        sleep(ahead)
                now = f"{time.time():.6f}"
                by_part: dict[int, list[dict[str, str]]] = {}
                for i, line in enumerate(chunk):
                    by_part.setdefault((sent + i) % parts, []).append({"tsv": line.decode(), "ts": now})
                for p, evs in by_part.items():
                    _append_many(source, p, evs)
                sent += len(chunk)
    if end_marker:
        for p in range(parts):
            source.append(p, {"eos": "1"})
    return {"events": sent, "seconds": clock() - t0, "phases": len(biases)}


def _append_many(source, partition: int, events: list[dict[str, str]]) -> None:
    many = getattr(source, "append_many", None)
    if many is not None:
        many(partition, events)
    else:
        for e in events:
            source.append(partition, e)
