"""The sparse table: collision-free rows, seeded initial values, row-wise optimizers, admission, eviction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downpour.errors import ConfigError, ProtocolError
from downpour.sparse import EMPTY, FTRL, SGD, Index, SparseTable, make_row_rule

DIM = 4


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_distinct_ids_never_share_a_row_even_when_their_low_bits_agree():
    table = SparseTable(DIM, SGD(0.1), capacity=16)
    # IDs equal modulo 2^40 (a table indexing by low bits would put them all in one row), and random ones.
    keys = np.concatenate([np.arange(1, 2001, dtype=np.int64) << 40, np.random.default_rng(0).integers(-2**62, 2**62, 3000)])
    keys = np.unique(keys)
    table.pull(keys)
    rows = table.index.get(keys)
    assert len(table) == len(keys) and (rows >= 0).all()
    assert len(np.unique(rows)) == len(keys)  # one row per ID
    assert (table.row_key[rows] == keys).all()


def test_a_row_starts_at_a_seeded_value_that_does_not_depend_on_arrival_order():
    keys = np.random.default_rng(1).integers(0, 2**62, 500)
    keys = np.unique(keys)
    a, b = SparseTable(DIM, SGD(), seed=7), SparseTable(DIM, SGD(), seed=7)
    first = a.pull(keys)
    b.pull(keys[::-1])
    np.testing.assert_array_equal(b.pull(keys), first)
    assert np.abs(first).max() <= 0.01 and np.abs(first).max() > 0.005
    assert not np.array_equal(SparseTable(DIM, SGD(), seed=8).pull(keys), first)


@pytest.mark.parametrize("name,torch_opt,kwargs", [
    ("sgd", torch.optim.SGD, {"lr": 0.1}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.1}),
    ("adam", torch.optim.Adam, {"lr": 0.01}),
])
def test_row_wise_optimizers_match_torch_on_the_rows_pushed(name, torch_opt, kwargs):
    table = SparseTable(DIM, make_row_rule(name, **kwargs), seed=3)
    touched, other = ids(11, 22, 33), ids(44)
    start = table.pull(np.concatenate([touched, other]))
    ref = torch.nn.Parameter(torch.from_numpy(start[:3].copy()))
    opt = torch_opt([ref], **kwargs)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.standard_normal((3, DIM)).astype(np.float32)
        table.push(touched, g)
        ref.grad = torch.from_numpy(g)
        opt.step()
    np.testing.assert_allclose(table.pull(touched), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.pull(other), start[3:])  # untouched rows do not move (lazy)


def test_ftrl_with_l1_leaves_exact_zeros_and_moves_weights_with_strong_gradients():
    table = SparseTable(DIM, FTRL(alpha=0.1, l1=1.0), seed=0)
    keys = ids(1, 2)
    assert (table.pull(keys) == 0).all()  # FTRL weights start at zero
    for _ in range(3):
        table.push(keys, np.array([[0.1] * DIM, [5.0] * DIM], dtype=np.float32))
    w = table.pull(keys)
    assert (w[0] == 0.0).all()  # |z| = 0.3 <= l1: exactly zero
    assert (w[1] < 0).all()  # a strong positive gradient pushes the weight below zero


def test_an_id_is_admitted_only_after_it_was_seen_n_times_and_reads_as_zeros_until_then():
    table = SparseTable(DIM, SGD(0.1), admit_after=3)
    key = ids(99)
    assert (table.pull(key) == 0).all() and len(table) == 0
    table.push(key, np.ones((1, DIM), np.float32))  # no row: the gradient is dropped
    assert (table.pull(key) == 0).all() and len(table) == 0 and table.stats.pending == 1
    row = table.pull(key)  # the third sighting
    assert len(table) == 1 and table.stats.admitted == 1 and np.abs(row).max() > 0


def test_probabilistic_admission_admits_about_that_fraction():
    table = SparseTable(DIM, SGD(0.1), admit_probability=0.25, seed=5)
    table.pull(np.arange(1, 4001, dtype=np.int64))
    assert 800 < len(table) < 1200


def test_rows_not_pushed_for_t_steps_are_evicted_and_come_back_fresh():
    table = SparseTable(DIM, SGD(1.0), evict_after_steps=10)
    hot, cold = ids(1), ids(2)
    start = table.pull(np.concatenate([hot, cold]))
    table.push(cold, np.ones((1, DIM), np.float32))
    for _ in range(12):
        table.push(hot, np.zeros((1, DIM), np.float32))
    assert table.index.get(cold)[0] == -1 and table.index.get(hot)[0] >= 0
    assert table.stats.evicted == 1 and len(table) == 1
    np.testing.assert_array_equal(table.pull(cold), start[1:])  # re-admitted with its initial values


def test_a_capped_table_keeps_the_most_recently_pushed_rows():
    table = SparseTable(DIM, SGD(0.1), max_rows=3)
    for k in range(1, 6):
        table.pull(ids(k))
        table.push(ids(k), np.zeros((1, DIM), np.float32))
    assert len(table) == 3
    assert (table.index.get(ids(3, 4, 5)) >= 0).all() and (table.index.get(ids(1, 2)) == -1).all()


def test_bad_input_is_refused_and_changes_nothing():
    table = SparseTable(DIM, SGD(0.1))
    keys = ids(1, 2)
    before = table.pull(keys).copy()
    for bad_keys, grads in [
        (keys.astype(np.int32), np.zeros((2, DIM), np.float32)),
        (ids(1, EMPTY), np.zeros((2, DIM), np.float32)),
        (keys, np.zeros((2, DIM + 1), np.float32)),
        (keys, np.zeros((2, DIM), np.float64)),
        (keys, np.array([[np.nan] * DIM, [0.0] * DIM], np.float32)),
    ]:
        with pytest.raises(ProtocolError):
            table.push(bad_keys, grads)
    np.testing.assert_array_equal(table.pull(keys), before)
    assert table.step == 0
    with pytest.raises(ConfigError, match="known"):
        make_row_rule("lamb")


def test_the_index_grows_and_keeps_every_key():
    index = Index(16)
    keys = np.unique(np.random.default_rng(2).integers(-2**62, 2**62, 10_000))
    for part in np.array_split(keys, 7):
        index.put(part, (part % 1000).astype(np.int32))
    assert len(index) == len(keys)
    np.testing.assert_array_equal(index.get(keys), (keys % 1000).astype(np.int32))
    assert (index.get(ids(12345678901)) == -1).all()
