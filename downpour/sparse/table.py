"""A sparse embedding table: 64-bit feature IDs -> rows of ``dim`` float32, with row-wise optimizers.

The server-side core of issue 5 (not yet wired into the servers' request loop). Design:

* **Index**: open addressing with linear probing over a power-of-two array of int64
  keys (load kept at most 1/2), probed for a whole batch at once with numpy: each
  round handles every key still unresolved, so there is no per-key Python loop.
  The index stores the full 64-bit ID, so two IDs never share a row (no hashing of
  IDs into a fixed number of rows, which Monolith showed costs AUC).
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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from downpour.errors import ConfigError, ProtocolError
from downpour.sparse.rules import RowRule

EMPTY = np.iinfo(np.int64).min  # marks a free index slot; the one ID that cannot be stored
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each element (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


class Index:
    """int64 key -> int64 value (row number or count), batch operations only."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self.keys = np.full(cap, EMPTY, dtype=np.int64)
        self.vals = np.zeros(cap, dtype=np.int32)  # row numbers (or sighting counts): 2^31 is plenty
        self.size = 0

    @property
    def mask(self) -> int:
        return len(self.keys) - 1

    def _slots(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its slot if present (found=True), else the free slot that ends its probe."""
        slot = (mix(keys.view(np.uint64)) & np.uint64(self.mask)).astype(np.int64)
        found = np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        while len(todo):
            at = self.keys[slot[todo]]
            hit = at == keys[todo]
            found[todo[hit]] = True
            more = ~hit & (at != EMPTY)
            todo = todo[more]
            slot[todo] = (slot[todo] + 1) & self.mask
        return slot, found

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Each key's value, or -1 where absent."""
        slot, found = self._slots(keys)
        return np.where(found, self.vals[slot], -1)

    def put(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert or overwrite; ``keys`` must not repeat."""
        if self.size + len(keys) > len(self.keys) // 2:
            self._grow(self.size + len(keys))
        slot, found = self._slots(keys)
        self.vals[slot[found]] = vals[found]
        new_keys, new_vals, new_slot = keys[~found], vals[~found], slot[~found]
        while len(new_keys):  # two new keys may end on the same free slot: the first takes it, the rest probe on
            _, first = np.unique(new_slot, return_index=True)
            self.keys[new_slot[first]] = new_keys[first]
            self.vals[new_slot[first]] = new_vals[first]
            self.size += len(first)
            rest = np.ones(len(new_keys), dtype=bool)
            rest[first] = False
            new_keys, new_vals = new_keys[rest], new_vals[rest]
            if len(new_keys):
                new_slot, _ = self._slots(new_keys)
        return None

    def _grow(self, need: int) -> None:
        keys, vals = self.keys[self.keys != EMPTY], self.vals[self.keys != EMPTY]
        cap = len(self.keys)
        while cap // 2 < need:
            cap *= 2
        self.keys = np.full(cap, EMPTY, dtype=np.int64)
        self.vals = np.zeros(cap, dtype=np.int32)
        self.size = 0
        self.put(keys, vals)

    def rebuild(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Replace the contents (after eviction: linear probing has no cheap delete)."""
        self.keys[:] = EMPTY
        self.size = 0
        self.put(keys, vals)

    def __len__(self) -> int:
        return self.size


@dataclass
class TableStats:
    rows: int = 0
    admitted: int = 0
    evicted: int = 0
    pending: int = 0  # IDs seen but not admitted yet


class SparseTable:
    def __init__(self, dim: int, rule: RowRule, seed: int = 0, init_scale: float = 0.01, capacity: int = 1024,
                 admit_after: int = 1, admit_probability: float = 1.0, evict_after_steps: int | None = None,
                 max_rows: int | None = None) -> None:
        if dim < 1 or admit_after < 1 or not 0 < admit_probability <= 1:
            raise ConfigError(f"sparse table: bad dim {dim}, admit_after {admit_after} or admit_probability {admit_probability}")
        self.dim, self.rule, self.seed, self.init_scale = dim, rule, seed, init_scale
        self.admit_after, self.admit_probability = admit_after, admit_probability
        self.evict_after_steps, self.max_rows = evict_after_steps, max_rows
        self.index = Index(capacity * 2 + 1)
        self.seen = Index(64)  # sightings of IDs not admitted yet
        self.values = np.zeros((capacity, dim), dtype=np.float32)
        self.state = rule.allocate(capacity, dim)
        self.row_key = np.full(capacity, EMPTY, dtype=np.int64)
        self.touched = np.zeros(capacity, dtype=np.int32)  # the push count when each row was last pushed
        self.free: list[np.ndarray] = []  # row numbers freed by eviction
        self.next_row = 0
        self.step = 0  # pushes applied
        self.stats = TableStats()

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
        grow = cap - len(self.values)
        self.values = np.concatenate([self.values, np.zeros((grow, self.dim), dtype=np.float32)])
        self.state = {k: np.concatenate([v, np.zeros((grow, *v.shape[1:]), dtype=v.dtype)]) for k, v in self.state.items()}
        self.row_key = np.concatenate([self.row_key, np.full(grow, EMPTY, dtype=np.int64)])
        self.touched = np.concatenate([self.touched, np.zeros(grow, dtype=np.int32)])

    def _check(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys)
        if keys.dtype != np.int64 or keys.ndim != 1:
            raise ProtocolError(f"sparse keys must be a 1-d int64 array, got {keys.dtype} {keys.shape}")
        if len(keys) and bool((keys == EMPTY).any()):
            raise ProtocolError(f"feature ID {EMPTY} is reserved")
        return keys

    def _admit(self, keys: np.ndarray) -> np.ndarray:
        """Rows for unique ``keys`` (-1 for those not admitted), creating rows for new admissions."""
        rows = self.index.get(keys)
        missing = keys[rows < 0]
        if not len(missing):
            return rows
        if self.admit_after > 1 or self.admit_probability < 1:
            count = np.maximum(self.seen.get(missing), 0) + 1
            ok = count >= self.admit_after
            if self.admit_probability < 1:
                with np.errstate(over="ignore"):
                    draw = mix(missing.view(np.uint64) ^ mix(np.full(len(missing), self.step + self.seed, dtype=np.uint64)))
                ok &= (draw >> np.uint64(11)).astype(np.float64) / float(1 << 53) < self.admit_probability
            self.seen.put(missing[~ok], count[~ok])
            missing = missing[ok]
        if len(missing):
            new = self._alloc(len(missing))
            self.values[new] = 0.0 if self.rule.zero_init else self.initial(missing)
            self.rule.reset(self.state, new)
            self.row_key[new] = missing
            self.touched[new] = self.step
            self.index.put(missing, new)
            self.stats.admitted += len(missing)
            rows = self.index.get(keys)
        self.stats.rows = len(self.index)
        self.stats.pending = len(self.seen)
        return rows

    # -- the two operations -------------------------------------------------------------------
    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (unique IDs), shape (n, dim); an ID not admitted reads as zeros.
        Pulling counts as a sighting for admission and creates the rows admitted."""
        keys = self._check(keys)
        rows = self._admit(keys)
        out = self.values[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step on the rows of ``keys`` (unique IDs; grads shape (n, dim)). Gradients
        of IDs without a row (not admitted) are dropped. Then the eviction rules run."""
        keys = self._check(keys)
        if grads.shape != (len(keys), self.dim) or grads.dtype != np.float32:
            raise ProtocolError(f"sparse gradients must be float32 of shape ({len(keys)}, {self.dim}), got {grads.dtype} {grads.shape}")
        if len(grads) and not np.isfinite(grads).all():
            raise ProtocolError("sparse gradients contain NaN or Inf")
        self.step += 1
        rows = self.index.get(keys)
        have = rows >= 0
        rows, grads = rows[have], grads[have]
        self.rule.apply(self.values, self.state, rows, grads)
        self.touched[rows] = self.step
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
        self.row_key[gone] = EMPTY
        self.free.append(gone)
        stay = np.flatnonzero(self.row_key[: self.next_row] != EMPTY)
        self.index.rebuild(self.row_key[stay], stay)
        self.stats.evicted += len(gone)
        self.stats.rows = len(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def bytes_per_row(self) -> float:
        """Memory of the table (index, values, state, bookkeeping) per live row."""
        total = self.index.keys.nbytes + self.index.vals.nbytes + self.values.nbytes + self.row_key.nbytes + self.touched.nbytes
        total += sum(v.nbytes for v in self.state.values())
        return total / max(1, len(self))
