"""Models and streams for the online-learning tests (workers import the model by name).

``counting_ctr``: Wide & Deep plus a table ``count`` (dim 1) over each event's C26, whose
gradient is forced to -1 per event: with sparse SGD at lr 1 and rows starting at 0, row
``C26`` holds how many times that event's update reached the model. The events written by
:func:`write_serial_events` carry their serial number in C26, so the model's state says
whether each event was applied exactly once.
"""

from __future__ import annotations

import numpy as np
import torch

from downpour.data.criteo_format import FIELD_STRIDE, format_lines
from downpour.data.criteo_gen import CriteoSpec, generate_rows, solve_bias
from downpour.models import WideDeep
from downpour.nn import SparseEmbedding

COUNT_FIELD = 25  # C26


class _Tail(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.events = torch.nn.Parameter(torch.zeros(1))


class CountingCTR(torch.nn.Module):
    """With ``dense_count`` s > 0, also two dense parameters whose gradient is forced to -s per
    event of the batch: with dense SGD at lr 1/s (a power of two, so the sum is exact) each holds
    how many events' dense updates reached it. ``head`` comes first in the model's parameters
    and ``tail.events`` last, so with two servers (partitioned by bytes) one is on each."""

    def __init__(self, dense_count: float = 0.0, **args) -> None:
        super().__init__()
        self.dense_count = float(dense_count)
        if self.dense_count:
            self.head = torch.nn.Parameter(torch.zeros(1))
        self.model = WideDeep(**args)
        self.count = SparseEmbedding("count", 1)
        if self.dense_count:
            self.tail = _Tail()

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(dense, ids)
        c = self.count(ids[:, COUNT_FIELD])  # [B, 1]
        if c.requires_grad:
            c.register_hook(lambda g: torch.full_like(g, -1.0))
        out = out + (c - c.detach()).reshape(out.shape)
        if self.dense_count:
            for p in (self.head, self.tail.events):
                d = p.expand(len(ids))  # one element per event: the parameter's gradient is their sum
                if d.requires_grad:
                    d.register_hook(lambda g: torch.full_like(g, -self.dense_count))
                out = out + (d - d.detach()).reshape(out.shape)
        return out


def counting_ctr(**args) -> torch.nn.Module:
    return CountingCTR(**args)


def serial_rows(n: int, seed: int = 0) -> list[bytes]:
    """``n`` Criteo rows from the generator, row i with C26 = i (hex)."""
    spec = CriteoSpec(rows=1 << 30, seed=seed)
    bias = solve_bias(spec, pilot_rows=20_000)
    lines: list[bytes] = []
    for rows in generate_rows(spec, bias, 0, n):
        at = len(lines)
        rows.values[:, COUNT_FIELD] = np.arange(at, at + len(rows.label), dtype=np.uint32)
        rows.cat_missing[:, COUNT_FIELD] = False
        lines += format_lines(rows.label, rows.ints, rows.int_missing, rows.values, rows.cat_missing).split(b"\n")[:-1]
    return lines


def write_serial_events(source, lines: list[bytes], start: int = 0, stop: int | None = None, bad_every: int = 0) -> int:
    """Append rows [start, stop) round-robin over the partitions (row i to partition i mod P);
    with ``bad_every`` k, a malformed event follows every k-th row. Returns malformed events written."""
    parts, bad = source.spec.partitions, 0
    stop = len(lines) if stop is None else stop
    for p in range(parts):
        evs = []
        for i in range(start + (p - start) % parts, stop, parts):
            evs.append({"tsv": lines[i].decode(), "ts": "0"})
            if bad_every and i % bad_every == 0:
                evs.append({"tsv": "1\tnot a row"})
                bad += 1
        source.append_many(p, evs)
    return bad


def counts_in(checkpoint_dir: str) -> np.ndarray:
    """The ``count`` table of a checkpoint (every server's rows) as {serial: count} arrays: (serials, counts)."""
    from downpour.server.sparse import read_chain
    from downpour.sparse.rules import SGD
    from downpour.sparse.table import SparseTable
    from downpour.storage import CheckpointStore

    store = CheckpointStore(checkpoint_dir)
    manifest = store.latest()
    keys, values = [], []
    for file in sorted(f for f in manifest.files if f.startswith("sparse-server-")):
        chain = read_chain(store, manifest, file)
        table = SparseTable(1, SGD(1.0), init_scale=0.0)
        table.restore([{k[len("count/"):]: v for k, v in snap.items() if k.startswith("count/")} for snap in chain])
        snap = table.snapshot(True)
        keys.append(snap["keys"])
        values.append(snap["values"][:, 0])
    k, v = np.concatenate(keys), np.concatenate(values)
    return k - COUNT_FIELD * FIELD_STRIDE, v


def dense_counts_in(checkpoint_dir: str) -> dict[str, tuple[int, float]]:
    """The dense counters of a ``counting_ctr`` model with ``dense_count``, from the newest
    checkpoint in ``checkpoint_dir`` (the servers' files): {name: (server holding it, events)}."""
    from downpour.serving.export import CheckpointState
    from downpour.storage import CheckpointStore

    store = CheckpointStore(checkpoint_dir)
    state = CheckpointState(store, store.latest())
    out = {}
    for name in ("head", "tail.events"):
        p = next(p for p in state.layout.params if p.name == name)
        server = next(s.server for s in state.layout.slices if s.start <= p.offset < s.stop)
        out[name] = (server, float(state.dense[name][0]))
    return out
