"""A sparse embedding table: 64-bit feature IDs -> rows of ``dim`` float32, with row-wise optimizers.

Each server holds its rows of every table of a job (``downpour/server/sparse.py``). Design:

* **Index**: open addressing with linear probing over a power-of-two array of int64
  keys (load kept at most 1/2). The index stores the full 64-bit ID, so two IDs never
  share a row (no hashing of IDs into a fixed number of rows, which Monolith showed
  costs AUC).
* **Two paths, one result.** Where the C extension ``_native.c`` is built, pull and push
  each run as one call that probes the index and copies or updates the rows, without the
  GIL. Otherwise (or with ``DOWNPOUR_SPARSE_NATIVE=0`` at import) numpy probes the whole
  batch per round, each round handling every key still unresolved, so there is no per-key
  Python loop either way. Both paths give bit-identical rows (tests/test_sparse_native.py).
* **Rows** live in a pool addressed by row number (values, optimizer state, the
  row's ID and the step it was last touched); rows freed by eviction are reused.
* **Initial values** come from a hash of (seed, ID, column): a row reads the same
  whatever order IDs arrive in, on any server.
* **Admission**: an ID gets a row only once seen ``admit_after`` times (counted in
  a second index) and, if ``admit_probability`` < 1, with that probability per
  sighting; until then it reads as zeros and costs no row.
* **Eviction**: rows untouched for ``evict_after_steps`` pushes are dropped (checked every
  tenth of that), and the table is kept at ``max_rows`` by dropping the least recently
  pushed rows (checked on every push).
* **Snapshots** for incremental checkpoints: after a first snapshot the table tracks the
  rows created or pushed and the IDs evicted since the last one, so ``snapshot(full=False)``
  returns only those; ``restore`` applies a full snapshot and then deltas.

Why one module over 400 lines: it is one data structure. Pull, push, admission, eviction and
snapshots all read and write the same index and row pool (the index itself and the row-wise
rules are in ``index.py`` and ``rules.py`` already); split further, each part would reach into
the others' arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from downpour.errors import ConfigError, DataError, ProtocolError
from downpour.sparse.index import EMPTY, NATIVE, Index, mix
from downpour.sparse.pool import Pool
from downpour.sparse.rules import RowRule

__all__ = ["EMPTY", "NATIVE", "Index", "SparseTable", "TableStats", "mix"]

@dataclass
class TableStats:
    rows: int = 0
    admitted: int = 0
    evicted: int = 0
    pending: int = 0  # IDs seen but not admitted yet


# snapshot()["meta"], int64: these fields in this order
META_FIELDS = ("step", "full", "dim", "admitted", "evicted")
_U64 = (1 << 64) - 1
LINE = 64  # bytes: the row pools start on a cache line, so a row of 16 float32 is one line, not two


def _aligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` whose data starts on a cache-line boundary (numpy's own allocations start 16
    bytes past one). A push touches each pushed row of values and optimizer state at random: a 64-byte
    row that straddles two lines costs two cache misses instead of one. (A grown pool is aligned by
    pool.py: its arrays start on a page.)"""
    buf = np.empty(a.nbytes + LINE, dtype=np.uint8)
    start = -buf.ctypes.data % LINE
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _run(rows: np.ndarray) -> np.ndarray | slice:
    """``rows`` as a slice when they are one ascending run (fresh rows of a pool without freed ones
    are): written as a slice, not scattered."""
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
        return slice(first, last + 1)
    return rows


class SparseTable:
    """Rows of ``dim`` float32 for int64 feature IDs, updated by ``rule``.

    Not thread-safe: one thread at a time calls its methods (the compiled kernels release the
    GIL, but the table's arrays are shared). ``native`` says which path runs.
    """

    def __init__(
        self,
        dim: int,
        rule: RowRule,
        seed: int = 0,
        init_scale: float = 0.01,
        capacity: int = 1024,
        admit_after: int = 1,
        admit_probability: float = 1.0,
        evict_after_steps: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        if dim < 1 or admit_after < 1 or not 0 < admit_probability <= 1:
            raise ConfigError(f"sparse table: bad dim {dim}, admit_after {admit_after} or admit_probability {admit_probability}")
        self.dim, self.rule, self.seed, self.init_scale = dim, rule, seed, init_scale
        self.admit_after, self.admit_probability = admit_after, admit_probability
        self.evict_after_steps, self.max_rows = evict_after_steps, max_rows
        self._kernels = NATIVE
        self.index = Index(capacity * 2 + 1, self._kernels)
        self.seen = Index(64, self._kernels)  # sightings of IDs not admitted yet
        self._seen_stale = 0  # entries of ``seen`` admitted since (linear probing: dropped by a rebuild)
        self.values = _aligned(np.zeros((capacity, dim), dtype=np.float32))
        self.state = {k: _aligned(v) for k, v in rule.allocate(capacity, dim).items()}
        self.row_key = np.full(capacity, EMPTY, dtype=np.int64)
        self.touched = np.zeros(capacity, dtype=np.int32)  # the push count when each row was last pushed (or created)
        self.free: list[np.ndarray] = []  # row numbers freed by eviction
        self._pool = Pool()  # where the row pool grows (pool.py)
        self.next_row = 0
        self.step = 0  # pushes applied
        self.stats = TableStats()
        # Change tracking for snapshot(), on from the first snapshot: rows pushed since the last one are
        # those with touched > _snap_step (a push marks its rows with the new step); rows created and IDs
        # evicted since then are listed here.
        self._tracking = False
        self._snap_step = 0
        self._created: list[np.ndarray] = []
        self._evicted: list[np.ndarray] = []

    @property
    def native(self) -> bool:
        """Whether pull, push and peek run the compiled kernels (``_native.c``): True where they are built
        (and not switched off by DOWNPOUR_SPARSE_NATIVE=0). Set False to force the numpy path; both paths
        give identical rows and state, and may be switched between calls."""
        return self._kernels is not None

    @native.setter
    def native(self, on: bool) -> None:
        if on and NATIVE is None:
            raise ConfigError("sparse table: the compiled kernels are not available (not built, or DOWNPOUR_SPARSE_NATIVE=0)")
        self._kernels = NATIVE if on else None
        self.index.native = self.seen.native = self._kernels

    # -- rows -------------------------------------------------------------------------------
    def initial(self, keys: np.ndarray) -> np.ndarray:
        """The seeded initial rows of ``keys``: uniform in [-init_scale, init_scale)."""
        cols = np.arange(self.dim, dtype=np.uint64)
        with np.errstate(over="ignore"):
            h = mix(mix(keys.view(np.uint64) ^ np.uint64(self.seed))[:, None] + cols[None, :])
        return ((h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) * 2 - 1) * np.float32(self.init_scale)

    def _alloc(self, n: int) -> np.ndarray:
        reuse = np.concatenate(self.free) if self.free else np.zeros(0, dtype=np.int64)
        take = reuse[:n]
        self.free = [reuse[n:]] if len(reuse) > n else []
        fresh = n - len(take)
        if self.next_row + fresh > len(self.values):
            cap = len(self.values)
            while cap < self.next_row + fresh:
                cap *= 2
            self._resize(cap)
        rows = np.concatenate([take, np.arange(self.next_row, self.next_row + fresh, dtype=np.int64)])
        self.next_row += fresh
        return rows

    def _resize(self, cap: int) -> None:
        """Room for ``cap`` rows: in place within the pool's reservations (pool.py), else copied once."""
        self.values = self._pool.array("values", self.values, cap)
        self.state = {k: self._pool.array(f"state.{k}", v, cap) for k, v in self.state.items()}
        self.row_key = self._pool.array("row_key", self.row_key, cap, fill=EMPTY)
        self.touched = self._pool.array("touched", self.touched, cap)

    def _check(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys)  # the kernels take contiguous arrays; copies only a strided view
        if keys.dtype != np.int64 or keys.ndim != 1:
            raise ProtocolError(f"sparse keys must be a 1-d int64 array, got {keys.dtype} {keys.shape}")
        if len(keys) and bool((keys == EMPTY).any()):
            raise ProtocolError(f"feature ID {EMPTY} is reserved")
        return keys

    def _gather(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``keys`` (zeros where an ID has none) and their row numbers (-1 there). Changes nothing."""
        if self._kernels is not None:
            out = np.empty((len(keys), self.dim), dtype=np.float32)
            rows = np.empty(len(keys), dtype=np.int32)
            self._kernels.gather(self.index.keys, self.index.vals, keys, self.values, self.dim, out, rows)
            return out, rows
        rows = self.index.get(keys)
        out = self.values[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out, rows

    def _pending(self) -> tuple[np.ndarray, np.ndarray]:
        """The IDs seen and not admitted, with their sightings (``seen`` less the ones admitted since)."""
        keys, counts = self.seen.items()
        keep = self.index.get(keys) < 0
        return keys[keep], counts[keep]

    def _admit(self, missing: np.ndarray) -> np.ndarray:
        """Rows for unique IDs that have none (-1 for those not admitted), creating rows for new admissions."""
        rows = np.full(len(missing), -1, dtype=np.int64)
        ok = np.ones(len(missing), dtype=bool)
        if self.admit_after > 1 or self.admit_probability < 1:
            before = self.seen.get(missing)
            count = np.maximum(before, 0) + 1
            ok = count >= self.admit_after
            if self.admit_probability < 1:
                with np.errstate(over="ignore"):
                    draw = mix(missing.view(np.uint64) ^ mix(np.full(len(missing), self.step + self.seed, dtype=np.uint64)))
                ok &= (draw >> np.uint64(11)).astype(np.float64) / float(1 << 53) < self.admit_probability
            self.seen.put(missing[~ok], count[~ok])
            self._seen_stale += int(np.count_nonzero(ok & (before >= 0)))
            self.stats.pending = len(self.seen) - self._seen_stale
        if ok.any():
            keys = missing[ok]
            new = self._alloc(len(keys))
            at = _run(new)
            if self.rule.zero_init:
                self.values[at] = 0.0
            elif self._kernels is not None:  # the same numbers, written in place
                self._kernels.init_rows(keys, new, int(self.seed) & _U64, self.init_scale, self.values, self.dim)
            else:
                self.values[at] = self.initial(keys)
            self.rule.reset(self.state, at)
            self.row_key[at] = keys
            self.touched[at] = self.step
            self.index.put(keys, new)
            if self._tracking:
                self._created.append(new)
            rows[ok] = new
            self.stats.admitted += len(keys)
            if self._seen_stale > max(1024, len(self.seen) // 2):  # the admitted IDs' sightings go, in one pass
                self.seen.rebuild(*self._pending())
                self._seen_stale = 0
            self.stats.rows = len(self.index)
        return rows

    # -- the operations -----------------------------------------------------------------------
    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (unique IDs), shape (n, dim); an ID not admitted reads as zeros.
        Pulling counts as a sighting for admission and creates the rows admitted."""
        keys = self._check(keys)
        out, rows = self._gather(keys)
        miss = np.flatnonzero(rows < 0)
        if len(miss):
            new = self._admit(keys[miss])
            got = new >= 0
            out[miss[got]] = self.values[new[got]]
        return out

    def peek(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` as they read now, shape (n, dim) float32, changing nothing (for evaluation).

        An ID without a row reads as the row a pull would create for it if admission admits at its
        first sighting (``admit_after`` 1 and ``admit_probability`` 1): the seeded initial row, or zeros
        for rules whose rows start at zero (FTRL); otherwise as zeros, as a pull would return. No row is
        created and no sighting counted."""
        keys = self._check(keys)
        out, rows = self._gather(keys)
        if self.admit_after == 1 and self.admit_probability == 1 and not self.rule.zero_init:
            miss = np.flatnonzero(rows < 0)
            if len(miss):
                out[miss] = self.initial(keys[miss])
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray, finite: bool = False) -> None:
        """One optimizer step on the rows of ``keys`` (unique IDs; grads shape (n, dim)). Gradients
        of IDs without a row (not admitted) are dropped. Then the eviction rules run. ``finite``: the
        caller has checked that every gradient is finite (the server does, for a whole request before
        any of its tables changes), so that pass is not made twice."""
        keys = self._check(keys)
        if grads.shape != (len(keys), self.dim) or grads.dtype != np.float32:
            raise ProtocolError(f"sparse gradients must be float32 of shape ({len(keys)}, {self.dim}), got {grads.dtype} {grads.shape}")
        if len(grads) and not finite and not np.isfinite(grads).all():
            raise ProtocolError("sparse gradients contain NaN or Inf")
        step = self.step + 1
        kernel = self.rule.kernel(self.state) if self._kernels is not None else None
        if kernel is not None:
            name, args = kernel
            push = getattr(self._kernels, f"push_{name}")
            push(self.index.keys, self.index.vals, keys, np.ascontiguousarray(grads), self.dim, self.values, self.touched, step, *args)
        else:
            rows = self.index.get(keys)
            have = rows >= 0
            rows, grads = rows[have], grads[have]
            self.rule.apply(self.values, self.state, rows, grads)
            self.touched[rows] = step
        self.step = step
        self._evict()

    def _evict(self) -> None:
        # The age rule scans every row, so it runs every evict_after_steps/10 pushes (a row lives at
        # most 10% past its limit); the size cap is checked on every push.
        age_due = self.evict_after_steps is not None and self.step % max(1, self.evict_after_steps // 10) == 0
        over = self.max_rows is not None and len(self.index) > self.max_rows
        if not (age_due or over):
            return
        live = self.row_key[: self.next_row] != EMPTY
        drop = np.zeros(self.next_row, dtype=bool)
        if age_due:
            drop |= live & (self.touched[: self.next_row] < self.step - self.evict_after_steps)
        if self.max_rows is not None and int(live.sum()) - int(drop.sum()) > self.max_rows:
            keep = np.flatnonzero(live & ~drop)
            excess = len(keep) - self.max_rows
            oldest = keep[np.argpartition(self.touched[keep], excess - 1)[:excess]]
            drop[oldest] = True
        if not drop.any():
            return
        gone = np.flatnonzero(drop)
        if self._tracking:
            self._evicted.append(self.row_key[gone])
        self.row_key[gone] = EMPTY
        self.free.append(gone)
        stay = np.flatnonzero(self.row_key[: self.next_row] != EMPTY)
        self.index.rebuild(self.row_key[stay], stay)
        self.stats.evicted += len(gone)
        self.stats.rows = len(self.index)

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(self, full: bool) -> dict[str, np.ndarray]:
        """The table's rows as plain C-contiguous numpy arrays (for safetensors), and a new baseline.

        ``full=True``: every live row. ``full=False`` (a delta): the rows created or pushed since the
        previous snapshot, and the IDs evicted since then that have no row now; a delta needs a previous
        snapshot (ConfigError otherwise), since change tracking starts at the first one. Either way the
        change tracking restarts here. Arrays, rows aligned with ``keys``:

        * ``keys`` int64 (n,); ``values`` float32 (n, dim); ``state.<name>`` one per optimizer state
          array (Adagrad ``sum``, Adam ``m``/``v``/``t``, FTRL ``z``/``n``);
        * ``evicted`` int64: IDs to remove before applying the rows (empty in a full snapshot);
        * ``meta`` int64: ``META_FIELDS`` = [step, full (0/1), dim, admitted, evicted] (the last two are
          the ``stats`` counters);
        * full snapshots only: ``pending.keys`` int64 and ``pending.counts`` int32, the admission
          sighting counts. Deltas leave them out, as they change on almost every pull and can outnumber
          the rows (the long tail of rare IDs): after restoring base + deltas, an ID seen since the base
          counts its sightings again from the base's count, delaying its admission by at most that.

        Cost: a delta reads ``touched`` of every row (4 bytes per row, sequential) and copies only the
        rows it returns; a full snapshot copies the whole table."""
        n = self.next_row
        live = self.row_key[:n] != EMPTY
        if full:
            rows = np.flatnonzero(live)
            evicted = np.zeros(0, dtype=np.int64)
        elif not self._tracking:
            raise ConfigError("sparse table: a delta snapshot needs an earlier snapshot to be relative to")
        else:
            changed = self.touched[:n] > self._snap_step
            if self._created:
                changed[np.concatenate(self._created)] = True
            rows = np.flatnonzero(changed & live)
            evicted = np.unique(np.concatenate(self._evicted)) if self._evicted else np.zeros(0, dtype=np.int64)
            evicted = evicted[self.index.get(evicted) < 0]  # evicted, then admitted again: its row is in the delta
        meta = dict(step=self.step, full=int(full), dim=self.dim, admitted=self.stats.admitted, evicted=self.stats.evicted)
        snap = {
            "meta": np.array([meta[f] for f in META_FIELDS], dtype=np.int64),
            "keys": self.row_key[rows],
            "values": self.values[rows],
            "evicted": evicted,
        }
        snap.update({f"state.{name}": arr[rows] for name, arr in self.state.items()})
        if full:
            pending, counts = self._pending()
            order = np.argsort(pending)  # by ID, not by slot: the same snapshot whichever path built the index
            snap["pending.keys"], snap["pending.counts"] = pending[order], counts[order]
        self._tracking, self._snap_step = True, self.step
        self._created, self._evicted = [], []
        return snap

    def restore(self, snapshots: Sequence[Mapping[str, np.ndarray]], trim: bool = False) -> None:
        """Replace the table's contents with a full snapshot followed by deltas, in the order taken.

        Each delta removes its evicted IDs, then inserts or overwrites its rows. Every snapshot is
        checked against this table (dim, optimizer state names, dtypes, shapes, unique IDs, finite
        values, order) before anything changes: on any fault DataError names it and the table is as it
        was. Configuration (rule, seed, admission and eviction settings) is the table's own. Afterwards
        the table equals the one the last snapshot was taken from (see ``snapshot`` for the admission
        counts, and the rows' last-push steps: every row counts as pushed at the restored step, so age
        and size eviction start afresh) and deltas can follow from there. ``trim``: install at most
        ``max_rows`` rows (a server's own table restored under a smaller budget than it was saved
        with); which ones is arbitrary, as eviction's choice among rows of one step would be."""
        if not isinstance(snapshots, list | tuple) or not snapshots:
            raise DataError("sparse table restore: need a non-empty list of snapshots, a full one first")
        snaps = [self._validate(s, i) for i, s in enumerate(snapshots)]
        steps = [int(s["meta"][0]) for s in snaps]
        if not snaps[0]["meta"][1] or any(s["meta"][1] for s in snaps[1:]):
            raise DataError("sparse table restore: the first snapshot must be full and the rest deltas")
        if steps != sorted(steps):
            raise DataError(f"sparse table restore: snapshots out of order (steps {steps})")
        names = ["values", *(f"state.{k}" for k in self.state)]
        keys, cols = snaps[0]["keys"], {c: snaps[0][c] for c in names}
        for d in snaps[1:]:
            keep = ~(np.isin(keys, d["evicted"]) | np.isin(keys, d["keys"]))
            keys = np.concatenate([keys[keep], d["keys"]])
            cols = {c: np.concatenate([cols[c][keep], d[c]]) for c in names}
        meta = snaps[-1]["meta"].copy()
        if trim and self.max_rows is not None and len(keys) > self.max_rows:
            # Only max_rows rows are installed, so the pool is the budget's size from the start, not
            # the checkpoint's with most of it left empty once the first push evicted the rest.
            cut = len(keys) - self.max_rows
            keys, cols = keys[cut:], {c: v[cut:] for c, v in cols.items()}
            meta[4] += cut  # (the evicted counter)
        self._install(keys, cols, snaps[0]["pending.keys"], snaps[0]["pending.counts"], meta)

    def _validate(self, snap: Mapping[str, np.ndarray], i: int) -> Mapping[str, np.ndarray]:
        where = f"sparse table restore: snapshot {i}"
        if not isinstance(snap, Mapping) or "meta" not in snap:
            raise DataError(f"{where}: not a snapshot (a mapping with 'meta')")
        meta = snap["meta"]
        if not isinstance(meta, np.ndarray) or meta.dtype != np.int64 or meta.shape != (len(META_FIELDS),):
            raise DataError(f"{where}: 'meta' must be int64 of shape ({len(META_FIELDS)},)")
        step, full, dim = (int(v) for v in meta[:3])
        if dim != self.dim or full not in (0, 1) or step < 0 or (meta[3:] < 0).any():
            raise DataError(f"{where}: meta {meta.tolist()} ({', '.join(META_FIELDS)}) does not fit a table of dim {self.dim}")
        n = len(snap["keys"]) if isinstance(snap.get("keys"), np.ndarray) else -1
        want = {"keys": (np.int64, (n,)), "values": (np.float32, (n, dim)), "evicted": (np.int64, (None,))}
        want.update({f"state.{k}": (v.dtype, (n, *v.shape[1:])) for k, v in self.state.items()})
        if full:
            p = len(snap["pending.keys"]) if isinstance(snap.get("pending.keys"), np.ndarray) else -1
            want.update({"pending.keys": (np.int64, (p,)), "pending.counts": (np.int32, (p,))})
        if set(snap) != {"meta", *want}:
            raise DataError(f"{where}: arrays {sorted(snap)}, expected {sorted(['meta', *want])} for this table's optimizer")
        for name, (dtype, shape) in want.items():
            a = snap[name]
            fits = isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == len(shape)
            if not fits or any(w is not None and w != g for w, g in zip(shape, a.shape)):
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise DataError(f"{where}: {name!r} must be {np.dtype(dtype)} of shape {shape}, got {got}")
        for name in ("keys", "pending.keys") if full else ("keys",):
            ids = snap[name]
            if len(np.unique(ids)) != len(ids) or (ids == EMPTY).any():
                raise DataError(f"{where}: {name!r} repeats an ID or holds the reserved {EMPTY}")
        if not all(np.isfinite(snap[c]).all() for c in ("values", *(f"state.{k}" for k in self.state))):
            raise DataError(f"{where}: values or optimizer state hold NaN or Inf")
        return snap

    def _install(self, keys, cols, pending_keys, pending_counts, meta) -> None:
        """Make (validated) rows the table's whole contents, as of a snapshot with ``meta``."""
        n = len(keys)
        index = Index(2 * n + 1, self._kernels)
        index.put(np.ascontiguousarray(keys), np.arange(n, dtype=np.int32))
        seen = Index(max(64, 2 * len(pending_keys) + 1), self._kernels)
        seen.put(np.ascontiguousarray(pending_keys), pending_counts)
        # Nothing can fail from here on: the table changes only now.
        spare = 1 if n == 0 else 0  # a pool grows by doubling, so it never has zero rows
        self.index, self.seen, self._seen_stale = index, seen, 0
        self.values = _aligned(np.concatenate([cols["values"], np.zeros((spare, self.dim), dtype=np.float32)]))
        self.state = {k: _aligned(np.concatenate([cols[f"state.{k}"], self.rule.allocate(spare, self.dim)[k]])) for k in self.state}
        self.row_key = np.concatenate([keys, np.full(spare, EMPTY, dtype=np.int64)])
        self.step = int(meta[0])
        self.touched = np.full(n + spare, self.step, dtype=np.int32)
        self.free, self.next_row = [], n
        self.stats = TableStats(rows=n, admitted=int(meta[3]), evicted=int(meta[4]), pending=len(seen))
        self._tracking, self._snap_step = True, self.step
        self._created, self._evicted = [], []

    def __len__(self) -> int:
        return len(self.index)

    def bytes_per_row(self) -> float:
        """Memory of the table (index, values, state, bookkeeping) per live row."""
        total = self.index.keys.nbytes + self.index.vals.nbytes + self.values.nbytes + self.row_key.nbytes + self.touched.nbytes
        total += sum(v.nbytes for v in self.state.values())
        return total / max(1, len(self))
