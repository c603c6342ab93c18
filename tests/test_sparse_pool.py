"""A sparse table's row pool grows in place within a reservation (downpour/sparse/pool.py)."""

from __future__ import annotations

import numpy as np

from downpour.sparse import EMPTY
from downpour.sparse import pool as pool_module
from downpour.sparse.pool import Pool


def test_growing_within_the_reservation_keeps_the_memory_and_the_rows():
    pool = Pool()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    first = pool.array("values", a, 8)
    assert first.shape == (8, 4) and first.ctypes.data % 4096 == 0
    np.testing.assert_array_equal(first[:3], a)
    assert not first[3:].any()
    first[3] = 7.0
    second = pool.array("values", first, 64)  # a longer view: no copy
    assert second.ctypes.data == first.ctypes.data and second.shape == (64, 4)
    np.testing.assert_array_equal(second[:4], first[:4])
    assert not second[4:].any()


def test_fill_and_a_shorter_array_of_the_same_reservation_get_clean_rows():
    pool = Pool()
    keys = pool.array("row_key", np.array([5, 6], np.int64), 4, fill=EMPTY)
    assert keys.tolist() == [5, 6, EMPTY, EMPTY]
    big = pool.array("touched", np.ones(2, np.int32), 10)
    big[:] = 3
    again = pool.array("touched", big[:2], 6)  # rows 2..5 held 3 once: zeros again
    assert again.tolist() == [3, 3, 0, 0, 0, 0]


def test_an_array_that_is_not_the_reservation_is_copied_and_past_the_reservation_too(monkeypatch):
    monkeypatch.setattr(pool_module, "RESERVE", 1)
    monkeypatch.setattr(pool_module, "MIN_ROWS", 1)
    pool = Pool()
    a = pool.array("values", np.ones((2, 4), np.float32), 4)
    b = pool.array("values", a, 8)  # past its reservation (4 rows and a page): a new one, copied
    np.testing.assert_array_equal(b[:2], 1.0)
    other = np.full((3, 4), 2.0, np.float32)  # e.g. restored from a checkpoint: not a view of the pool
    c = pool.array("values", other, 16)
    np.testing.assert_array_equal(c[:3], 2.0)
    assert not c[3:].any()


def test_a_refused_reservation_falls_back_to_the_rows_asked_for(monkeypatch):
    calls = []
    real = pool_module._mapped

    def refuse_big(rows, tail, dtype):
        calls.append(rows)
        if rows > 100:
            raise OSError(12, "Cannot allocate memory")
        return real(rows, tail, dtype)

    monkeypatch.setattr(pool_module, "_mapped", refuse_big)
    out = Pool().array("values", np.ones((2, 4), np.float32), 8)
    assert calls == [pool_module.MIN_ROWS, 8] and out.shape == (8, 4) and not out[2:].any()
