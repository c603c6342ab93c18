"""Room for a sparse table's row pool to grow in place.

A table doubles its row pool as IDs arrive. Copying the pool into a new, larger array at each
doubling costs a copy of every row and, worse on virtual machines, a page fault for every new
4 KiB page of the copy: in a CTR job's first epoch that was a fifth of a server's busy time.
Instead each array of the pool lives at the start of a larger anonymous mapping reserved
ahead (``RESERVE`` times the rows asked for, ``MAP_NORESERVE``: address space, not memory; pages
are backed, zeroed, when first touched), and growing within it is a longer view of the same
memory: no copy, no new fault for the rows already there. Only past the reservation is the array
copied, into a new one reserved the same way. Where the system refuses the reservation
(``vm.overcommit_memory=2``), the mapping is of the rows asked for and growing copies.

Every array starts on a page, hence on a cache line: a row of 16 float32 is one line, not two.
"""

from __future__ import annotations

import mmap

import numpy as np

RESERVE = 16  # rows reserved per row asked for, when a reservation is made
MIN_ROWS = 1 << 16  # the least rows a reservation holds
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)


def _mapped(rows: int, tail: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zeroed array of ``rows`` rows on a fresh anonymous mapping (at least one page)."""
    per_row = max(1, int(np.prod(tail, dtype=np.int64)))  # items
    nbytes = max(mmap.PAGESIZE, dtype.itemsize * rows * per_row)
    m = mmap.mmap(-1, nbytes, flags=_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    count = nbytes // (dtype.itemsize * per_row)  # rows that fit (a page may hold more than asked)
    return np.frombuffer(m, dtype=dtype, count=count * per_row).reshape((count, *tail))


class Pool:
    """The reservations behind a table's arrays, by name (``values``, ``state.sum``, ...)."""

    def __init__(self) -> None:
        self._room: dict[str, np.ndarray] = {}
        self._used: dict[str, int] = {}  # the most rows of each reservation handed out (past them: zeros)

    def array(self, name: str, a: np.ndarray, rows: int, fill: int | float = 0) -> np.ndarray:
        """``a`` with ``rows`` rows (at least ``len(a)``): its rows, then ``fill``. A view of
        ``a``'s reservation when ``a`` is one and it has room; else a copy into a new one."""
        room = self._room.get(name)
        if room is None or len(room) < rows or not _starts_at(a, room):
            try:
                room = _mapped(max(rows * RESERVE, MIN_ROWS), a.shape[1:], a.dtype)
            except (OSError, ValueError, OverflowError):  # no such reservation here: just the rows
                room = _mapped(rows, a.shape[1:], a.dtype)
            room[: len(a)] = a
            self._room[name], self._used[name] = room, len(a)
        out = room[:rows]
        used = self._used[name]
        if used > len(a):  # rows a longer view of this reservation held once: zeros again
            out[len(a) : min(used, rows)] = 0
        if fill != 0 and rows > len(a):
            out[len(a) :] = fill
        self._used[name] = max(used, rows)
        return out


def _starts_at(a: np.ndarray, room: np.ndarray) -> bool:
    """Whether ``a`` is the first rows of ``room`` (the same memory, not a copy)."""
    return (a.ctypes.data == room.ctypes.data and a.flags.c_contiguous and len(a) <= len(room)
            and a.dtype == room.dtype and a.shape[1:] == room.shape[1:])
