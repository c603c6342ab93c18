"""One server's part of every sparse table, and the SPARSE request that reads and updates it.

A SPARSE request carries, per table, the rows to update (unique IDs and their summed
gradients) and the rows to read (unique IDs); the server applies every update first, then
reads, so a worker's push of one batch and its pull of the next travel in one round trip.
Every part of the request is checked before any table changes: table names, dtypes and
shapes, repeated IDs, IDs that hash to another server, NaN/Inf and the key limit. Sparse
tables are updated as pushes arrive whatever the job's consistency (Persia's hybrid: dense
layers may be sync, embeddings are async).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from downpour.config import SparseConfig, SparseTableConfig
from downpour.errors import DataError, ProtocolError
from downpour.layout import Layout
from downpour.layout.spec import SERVER_SALT
from downpour.protocol import Message
from downpour.sparse import SparseTable, make_row_rule
from downpour.sparse.index import KERNEL, NATIVE
from downpour.storage import CheckpointStore, Manifest

log = logging.getLogger(__name__)


def sparse_file(rank: int) -> str:
    return f"sparse-server-{rank}.safetensors"


def make_table(cfg: SparseTableConfig, dim: int, seed: int) -> SparseTable:
    """A table as the job's ``sparse`` section describes it (the same seed on every server:
    a row's initial value depends only on its ID)."""
    rule = make_row_rule(cfg.optimizer.name, **cfg.optimizer.model_dump(exclude={"name"}))
    return SparseTable(dim, rule, seed=seed, init_scale=cfg.init_scale, admit_after=cfg.admit_after,
                       admit_probability=cfg.admit_probability, evict_after_steps=cfg.evict_after_steps,
                       max_rows=cfg.max_rows)


class SparseShard:
    """This server's rows of every table of the layout."""

    def __init__(self, layout: Layout, rank: int, sparse_cfg: SparseConfig, seed: int, max_keys: int) -> None:
        self.layout, self.rank, self.max_keys = layout, rank, max_keys
        self.cfg, self.seed = sparse_cfg, seed
        self.tables: dict[str, SparseTable] = {t.name: make_table(sparse_cfg.table(t.name), t.dim, seed) for t in layout.tables}
        self.counts: Counter[str] = Counter()  # requests, keys pushed, keys pulled
        # Checkpoints whose sparse files rebuild the tables as of the last one taken (a full
        # base first, then deltas), and the SHA-256 of each file once written.
        self.chain: list[str] = []
        self.written: dict[str, str] = {}
        if self.tables and KERNEL != "compiled":
            log.warning("server-%d: sparse tables run the SLOW numpy path: %s", rank, KERNEL)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def _keys(self, t: torch.Tensor, what: str, unique: bool) -> np.ndarray:
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ProtocolError(f"{what} must be a 1-d int64 tensor, got {t.dtype} {tuple(t.shape)}")
        keys = t.numpy()
        if NATIVE is not None and len(keys):  # both checks in one compiled pass
            verdict = NATIVE.check_ids(np.ascontiguousarray(keys), self.layout.num_servers, self.rank, SERVER_SALT, unique)
            owned, repeats = verdict != 1, verdict == 2
        else:
            owned = not (len(keys) and self.layout.num_servers > 1 and bool((self.layout.sparse_servers(keys) != self.rank).any()))
            repeats = unique and len(np.unique(keys)) != len(keys)
        if not owned:
            raise ProtocolError(f"{what} holds IDs that belong to another server")
        if repeats:
            raise ProtocolError(f"{what} repeats an ID (sum the gradients of one ID before pushing)")
        return keys

    def handle(self, msg: Message, replay: bool = False) -> Message:
        """Validate the whole request, then push, then pull; the reply holds the pulled rows.
        ``replay``: the request was applied already (a worker sent it again after a failover):
        nothing is pushed and the rows are read without creating any (a peek)."""
        spec, peek = msg.meta.get("tables"), msg.meta.get("peek", False)
        if not isinstance(spec, list) or not spec or type(peek) is not bool:
            raise ProtocolError("SPARSE needs tables: a non-empty list of [name, n_push, n_pull] (and peek: true/false)")
        if len(msg.tensors) != 3 * len(spec):
            raise ProtocolError(f"SPARSE for {len(spec)} tables carries {len(msg.tensors)} tensors, expected {3 * len(spec)}")
        work, total, seen = [], 0, set()
        for i, entry in enumerate(spec):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and all(type(n) is int and n >= 0 for n in entry[1:])):
                raise ProtocolError(f"SPARSE table entry {i} must be [name, n_push, n_pull], got {entry!r}")
            name = entry[0]
            table = self.tables.get(name)
            if table is None or name in seen:
                raise ProtocolError(f"no sparse table {name!r} here" if table is None else f"table {name!r} named twice")
            seen.add(name)
            push_keys, grads, pull_keys = msg.tensors[3 * i : 3 * i + 3]
            pk = self._keys(push_keys, f"{name}: pushed IDs", unique=True)
            qk = self._keys(pull_keys, f"{name}: pulled IDs", unique=False)
            if len(pk) != entry[1] or len(qk) != entry[2]:
                raise ProtocolError(f"{name}: the header says {entry[1]} pushed and {entry[2]} pulled IDs, "
                                    f"the tensors hold {len(pk)} and {len(qk)}")
            if grads.dtype != torch.float32 or tuple(grads.shape) != (len(pk), table.dim):
                raise ProtocolError(f"{name}: gradients must be float32 [{len(pk)}, {table.dim}], got {grads.dtype} {tuple(grads.shape)}")
            if len(pk) and peek:
                raise ProtocolError("a peek (read-only) SPARSE request cannot push")
            g = grads.numpy()
            if len(pk) and not math.isfinite(float(g.sum(dtype=np.float64))):
                raise ProtocolError(f"{name}: gradients contain NaN or Inf")
            total += len(pk) + len(qk)
            work.append((table, pk, g, qk))
        if total > self.max_keys:
            raise ProtocolError(f"{total} IDs in one request; the limit is {self.max_keys}")
        out = []
        for table, pk, g, qk in work:
            if len(pk) and not replay:
                table.push(pk, g, finite=True)  # (checked above, before any table changed)
                self.counts["keys_pushed"] += len(pk)
            rows = (table.peek(qk) if peek or replay else table.pull(qk)) if len(qk) else np.zeros((0, table.dim), np.float32)
            self.counts["keys_pulled"] += len(qk)
            out.append(torch.from_numpy(rows))
        self.counts["requests"] += 1
        return msg.reply({}, out)

    def stats(self) -> dict[str, Any]:
        return {"kernel": KERNEL, "requests": self.counts["requests"], "keys_pushed": self.counts["keys_pushed"],
                "keys_pulled": self.counts["keys_pulled"],
                "tables": {name: {"rows": len(t), "admitted": t.stats.admitted, "evicted": t.stats.evicted,
                                  "pending": t.stats.pending, "bytes_per_row": round(t.bytes_per_row(), 1)}
                           for name, t in self.tables.items()}}

    # -- checkpoints -------------------------------------------------------------------------------
    def snapshot(self, name: str, committed: str | None, full_every: int) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
        """This server's rows for checkpoint ``name``: only those changed since the previous
        checkpoint when that one was committed and the chain is shorter than ``full_every``,
        else every row (a new base). Returns (tensors, file metadata, the chain it belongs to)."""
        full = not self.chain or self.chain[-1] != committed or len(self.chain) >= full_every or committed not in self.written
        parent = None if full else self.chain[-1]
        tensors: dict[str, torch.Tensor] = {}
        for table_name, table in self.tables.items():
            for k, v in table.snapshot(full).items():
                tensors[f"{table_name}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        self.chain = [name] if full else [*self.chain, name]
        meta = {"parent": parent or "", "parent_sha256": self.written.get(parent, "") if parent else "", "rank": str(self.rank),
                "tables": json.dumps([[t.name, t.dim] for t in self.layout.tables])}
        return tensors, meta, list(self.chain)

    def restore(self, store: CheckpointStore, manifest: Manifest, old: Layout, full: bool) -> int:
        """Rebuild this server's rows from a checkpoint written by servers of layout ``old`` (any
        number of them): each old server's base and deltas are replayed, and the rows whose IDs
        hash to this server are kept. ``full`` (resume) keeps the optimizer state; a warm start
        (``init_from``) takes the values only. Returns the rows restored."""
        old_dims = {t.name: t.dim for t in old.tables}
        for name, table in self.tables.items():
            if name in old_dims and old_dims[name] != table.dim:
                raise DataError(f"{store.where(manifest.name)}: table {name!r} has dim {old_dims[name]}, the model says {table.dim}")
        parts: dict[str, list[dict[str, np.ndarray]]] = {}
        for file in sorted(f for f in manifest.files if f.startswith("sparse-server-")):
            chain = read_chain(store, manifest, file)
            for name, table in self.tables.items():
                if name not in old_dims:
                    continue
                replay = make_table(self.cfg.table(name), table.dim, self.seed)
                snaps = [{k[len(name) + 1 :]: v for k, v in snap.items() if k.startswith(name + "/")} for snap in chain]
                if not full:  # the rows' values only: the checkpoint's optimizer may be another one than this job's
                    snaps = [_fresh_state(snap, replay) for snap in snaps]
                replay.restore(snaps)
                parts.setdefault(name, []).append(self._mine(replay.snapshot(True)))
        rows = 0
        own = self.rank if old.num_servers == self.layout.num_servers else None
        for name, snaps in parts.items():
            table = self.tables[name]
            table.restore([_concat(snaps, own)], trim=True)  # (the replays above keep every row: they are split first)
            if not full:  # warm start: the parameters, not the optimizer state
                table.rule.reset(table.state, np.arange(len(table.values)))
            rows += len(table)
        self.chain = []  # the next checkpoint starts a new base
        return rows

    def _mine(self, snap: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows (and admission counts) of a full snapshot whose IDs belong to this server."""
        out = dict(snap)
        for ids, cols in (("keys", ["keys", "values", *(k for k in snap if k.startswith("state."))]),
                          ("pending.keys", ["pending.keys", "pending.counts"])):
            keys = snap[ids]
            keep = self.layout.sparse_servers(keys) == self.rank if len(keys) else np.zeros(0, bool)
            for c in cols:
                out[c] = snap[c][keep]
        return out


def _fresh_state(snap: dict[str, np.ndarray], table: Any) -> dict[str, np.ndarray]:
    """``snap`` with its rows' optimizer state replaced by ``table``'s rule's fresh state (a warm
    start takes the values of a checkpoint trained with any row optimizer)."""
    keys = snap.get("keys")
    n = len(keys) if isinstance(keys, np.ndarray) else 0
    out = {k: v for k, v in snap.items() if not k.startswith("state.")}
    out.update({f"state.{k}": v for k, v in table.rule.allocate(n, table.dim).items()})
    return out


def _concat(parts: list[dict[str, np.ndarray]], own: int | None) -> dict[str, np.ndarray]:
    """Full snapshots of disjoint IDs as one. Its counters (admitted, evicted) are those of part
    ``own`` (the old server of the same rank, when the number of servers is unchanged), else the
    rows restored and no evictions; its step is the latest."""
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in ("meta", "evicted")}
    meta = (parts[own]["meta"] if own is not None else parts[0]["meta"]).copy()
    meta[0] = max(int(p["meta"][0]) for p in parts)
    if own is None:
        meta[3], meta[4] = len(out["keys"]), 0
    out["meta"], out["evicted"] = meta, np.zeros(0, dtype=np.int64)
    return out


def read_chain(store: CheckpointStore, manifest: Manifest, file: str) -> list[dict[str, np.ndarray]]:
    """A server's sparse file in checkpoint ``manifest`` and the earlier ones it builds on, base
    first. Each file is verified against its own manifest, and a delta names the SHA-256 of
    its parent's file, so a chain cannot be spliced together from other checkpoints."""
    out = []
    m, want_sha = manifest, None
    for _ in range(10_000):
        data = store.read(m, file)
        where = store.where(m.name, file)
        if want_sha is not None and m.files[file]["sha256"] != want_sha:
            raise DataError(f"{where} is not the file the next checkpoint's delta was written on (SHA-256 differs)")
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        except (SafetensorError, ValueError) as err:
            raise DataError(f"{where}: not a readable sparse file: {err}") from None
        out.append({k: v.numpy() for k, v in tensors.items()})
        parent = meta.get("parent") or ""
        if not parent:
            return out[::-1]
        want_sha = meta.get("parent_sha256") or None
        try:
            m = store.manifest(parent)
        except (OSError, FileNotFoundError):
            raise DataError(f"{where} is a delta on checkpoint {parent}, which is missing") from None
    raise DataError(f"{store.where(manifest.name, file)}: a chain of more than 10,000 deltas")
