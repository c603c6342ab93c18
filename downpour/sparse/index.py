"""The index of a sparse table: int64 feature ID -> int32 row number, batch operations only.

Open addressing with linear probing over a power-of-two array of int64 keys (load kept at
most 1/2), hashed with splitmix64's finaliser. The compiled kernels (``_native.c``) and the
numpy fallback use the same layout, so either can read what the other wrote.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from downpour.hashing import mix

EMPTY = np.iinfo(np.int64).min  # marks a free index slot; the one ID that cannot be stored


def _load_native() -> tuple[ModuleType | None, str]:
    """The compiled kernels (None where the extension was not built or DOWNPOUR_SPARSE_NATIVE=0), and
    which path sparse tables take, in words (see :data:`KERNEL`)."""
    if os.environ.get("DOWNPOUR_SPARSE_NATIVE", "1") == "0":
        return None, "numpy (DOWNPOUR_SPARSE_NATIVE=0)"
    try:
        from downpour.sparse import _native
    except ImportError as err:
        return None, f"numpy (the C kernel is not built: {err}; install a C compiler and reinstall for the fast path)"
    return _native, "compiled"


# Decided once, at import: the process-wide switch for debugging and comparisons. KERNEL is
# "compiled" or says why the numpy fallback runs; servers log it and summary.json reports it.
NATIVE, KERNEL = _load_native()


class Index:
    """int64 key -> int32 value (row number or count), batch operations only.

    ``native``: the compiled kernels (``NATIVE``) to probe and insert with, or None for numpy.
    Both read and write the same arrays the same way, so it may change between calls."""

    def __init__(self, capacity: int = 1024, native: ModuleType | None = None) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self.keys = np.full(cap, EMPTY, dtype=np.int64)
        self.vals = np.zeros(cap, dtype=np.int32)  # row numbers (or sighting counts): 2^31 is plenty
        self.size = 0
        self.native = native

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
        """Each key's value (int32), or -1 where absent. ``keys``: C-contiguous int64."""
        if self.native is not None:
            out = np.empty(len(keys), dtype=np.int32)
            self.native.lookup(self.keys, self.vals, keys, out)
            return out
        slot, found = self._slots(keys)
        return np.where(found, self.vals[slot], -1)

    def put(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert or overwrite; ``keys`` must not repeat."""
        if self.size + len(keys) > len(self.keys) // 2:
            self._grow(self.size + len(keys))
        if self.native is not None:
            self.size += self.native.insert(self.keys, self.vals, keys, np.ascontiguousarray(vals, dtype=np.int32))
            return
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

    def _grow(self, need: int) -> None:
        used = self.keys != EMPTY
        keys, vals = self.keys[used], self.vals[used]
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

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored keys and their values."""
        used = self.keys != EMPTY
        return self.keys[used], self.vals[used]

    def __len__(self) -> int:
        return self.size
