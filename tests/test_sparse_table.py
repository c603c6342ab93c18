"""The sparse table: collision-free rows, seeded initial values, row-wise optimizers, admission, eviction,
read-only peeks, and full and delta snapshots. Every test runs on both paths: the compiled kernels (where
built) and numpy (tests/test_sparse_native.py compares the two directly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from downpour.errors import ConfigError, DataError, ProtocolError
from downpour.sparse import EMPTY, FTRL, SGD, Adagrad, Index, SparseTable, make_row_rule
from downpour.sparse import table as table_module

DIM = 4


@pytest.fixture(autouse=True, params=["native", "numpy"])
def kernels(request, monkeypatch):
    """The kernels tables made in the test use: the compiled ones, or None (numpy)."""
    if request.param == "native" and table_module.NATIVE is None:
        pytest.skip("the compiled kernels are not built")
    if request.param == "numpy":
        monkeypatch.setattr(table_module, "NATIVE", None)
    return table_module.NATIVE


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def ones(n: int) -> np.ndarray:
    return np.ones((n, DIM), dtype=np.float32)


def test_distinct_ids_never_share_a_row_even_when_their_low_bits_agree():
    table = SparseTable(DIM, SGD(0.1), capacity=16)
    # IDs equal modulo 2^40 (a table indexing by low bits would put them all in one row), and random ones.
    keys = np.concatenate([np.arange(1, 2001, dtype=np.int64) << 40, np.random.default_rng(0).integers(-(2**62), 2**62, 3000)])
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


@pytest.mark.parametrize(
    "name,torch_opt,kwargs",
    [
        ("sgd", torch.optim.SGD, {"lr": 0.1}),
        ("adagrad", torch.optim.Adagrad, {"lr": 0.1}),
        ("adam", torch.optim.Adam, {"lr": 0.01}),
    ],
)
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
    assert table.stats.pending == 0 and len(table.snapshot(full=True)["pending.keys"]) == 0  # admitted: no longer pending


def test_the_sightings_of_admitted_ids_are_dropped_from_the_pending_index():
    table = SparseTable(DIM, SGD(0.1), admit_after=2)
    many = np.arange(1, 5001, dtype=np.int64)
    table.pull(many)
    assert table.stats.pending == 5000 and len(table.seen) == 5000
    table.pull(many[:4000])  # admitted: their sightings go (in one rebuild, once they are most of the index)
    assert len(table) == 4000 and table.stats.pending == 1000 and len(table.seen) == 1000
    table.pull(many[4000:])
    assert len(table) == 5000 and table.stats.pending == 0


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


def test_the_index_grows_and_keeps_every_key(kernels):
    index = Index(16, kernels)
    keys = np.unique(np.random.default_rng(2).integers(-(2**62), 2**62, 10_000))
    for part in np.array_split(keys, 7):
        index.put(part, (part % 1000).astype(np.int32))
    assert len(index) == len(keys)
    np.testing.assert_array_equal(index.get(keys), (keys % 1000).astype(np.int32))
    assert (index.get(ids(12345678901)) == -1).all()


# -- peek ---------------------------------------------------------------------------------------------
def contents(table: SparseTable) -> dict:
    """What a restore must reproduce, ordered by ID: membership, values, optimizer state, counters."""
    live = np.flatnonzero(table.row_key[: table.next_row] != EMPTY)
    rows = live[np.argsort(table.row_key[live])]
    return {
        "keys": table.row_key[rows],
        "values": table.values[rows],
        **{f"state.{k}": v[rows] for k, v in table.state.items()},
        "step": table.step,
        "rows": len(table),
        "admitted": table.stats.admitted,
        "evicted": table.stats.evicted,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_peek_reads_what_a_pull_would_without_creating_rows_or_marking_changes():
    table = SparseTable(DIM, SGD(0.1), seed=2)
    table.pull(ids(1, 2))
    table.push(ids(1), ones(1))
    table.snapshot(full=True)
    before = contents(table)
    seen = table.peek(ids(1, 2, 3))
    assert_same(contents(table), before)
    delta = table.snapshot(full=False)
    assert len(delta["keys"]) == 0 and len(delta["evicted"]) == 0
    np.testing.assert_array_equal(table.pull(ids(1, 2, 3)), seen)  # ID 3 reads as the row its pull creates
    assert np.abs(seen[2]).max() > 0


def test_peek_reads_zeros_where_a_first_sighting_would_not_admit_and_counts_no_sighting():
    table = SparseTable(DIM, SGD(0.1), admit_after=2)
    for _ in range(3):
        assert (table.peek(ids(7)) == 0).all()
    assert len(table) == 0 and table.stats.pending == 0
    table.pull(ids(7))
    assert len(table) == 0  # the first real sighting: the peeks did not count
    assert (SparseTable(DIM, SGD(0.1), admit_probability=0.5).peek(ids(7)) == 0).all()
    ftrl = SparseTable(DIM, FTRL())
    assert (ftrl.peek(ids(7)) == 0).all() and len(ftrl) == 0  # FTRL rows start at zero


# -- snapshots ------------------------------------------------------------------------------------------
def saved(snap: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A snapshot after a round trip through safetensors (what checkpoints store)."""
    return st_load(st_save(snap))


def churn(table: SparseTable, rng: np.random.Generator, steps: int) -> None:
    """Pulls and pushes of random IDs from a small universe, so IDs recur, wait for admission and age out."""
    for _ in range(steps):
        keys = np.unique(rng.integers(1, 400, 60))
        table.pull(keys)
        pushed = keys[rng.random(len(keys)) < 0.6]
        table.push(pushed, rng.standard_normal((len(pushed), DIM)).astype(np.float32))


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "ftrl"])
def test_a_full_snapshot_and_its_deltas_restore_the_live_table_exactly(rule):
    def make() -> SparseTable:
        return SparseTable(DIM, make_row_rule(rule), seed=4, capacity=16, admit_after=2, evict_after_steps=20, max_rows=150)

    live, rng = make(), np.random.default_rng(0)
    churn(live, rng, 10)
    chain = [saved(live.snapshot(full=True))]
    for _ in range(4):
        churn(live, rng, 8)
        chain.append(saved(live.snapshot(full=False)))
    assert live.stats.evicted > 50 and live.stats.pending > 0
    assert all(len(d["evicted"]) for d in chain[1:]) and all(0 < len(d["keys"]) < len(live) + 60 for d in chain[1:])
    restored = make()
    restored.pull(ids(999))  # whatever it held is replaced
    restored.restore(chain)
    assert_same(contents(restored), contents(live))
    keys = contents(live)["keys"][:30]  # and the two go on alike
    grads = np.random.default_rng(1).standard_normal((30, DIM)).astype(np.float32)
    live.push(keys, grads)
    restored.push(keys, grads)
    np.testing.assert_array_equal(restored.peek(keys), live.peek(keys))


def test_a_table_restored_under_a_smaller_max_rows_installs_only_that_many_rows_the_later_ones():
    """Before, every saved row was installed and evicted on the next push, leaving the pool the
    checkpoint's size: 1,000 rows kept ~50 kB each after a restore of 264k."""
    big = SparseTable(DIM, Adagrad(0.1))
    big.pull(ids(*range(1, 2001)))
    big.push(ids(*range(1, 2001)), ones(2000))
    base = saved(big.snapshot(full=True))
    big.push(ids(*range(1, 51)), ones(50))  # pushed last: a delta's rows
    delta = saved(big.snapshot(full=False))
    small = SparseTable(DIM, Adagrad(0.1), max_rows=100)
    untrimmed = SparseTable(DIM, Adagrad(0.1), max_rows=100)
    untrimmed.restore([base, delta])  # (a replay of an old server's rows, split among servers after: every row)
    assert len(untrimmed) == 2000
    small.restore([base, delta], trim=True)
    kept = contents(small)["keys"]
    assert len(small) == 100 and set(range(1, 51)) <= set(kept.tolist())  # the delta's rows stay
    assert small.stats.evicted == 1900 and len(small.values) <= 101  # the pool is the budget's size
    assert small.bytes_per_row() < 1.25 * big.bytes_per_row()  # (not 20x: the pool of 2,000 rows over 100)


def test_a_delta_holds_the_rows_created_or_pushed_and_the_ids_evicted_since_the_last_snapshot():
    table = SparseTable(DIM, Adagrad(0.1), max_rows=3)
    table.pull(ids(1, 2, 3))
    for k in (1, 2, 3):
        table.push(ids(k), ones(1))  # last pushed: 1 first, 3 last
    full = table.snapshot(full=True)
    assert sorted(full["keys"]) == [1, 2, 3] and len(full["evicted"]) == 0 and full["meta"][1] == 1
    table.pull(ids(4))
    table.push(ids(4), ones(1))  # four rows: the least recently pushed, 1, goes
    table.pull(ids(1))
    table.push(ids(1), ones(1))  # 1 is back, and 2 goes
    table.pull(ids(3))  # a read changes nothing
    delta = table.snapshot(full=False)
    assert sorted(delta["keys"]) == [1, 4] and delta["evicted"].tolist() == [2] and delta["meta"][1] == 0
    assert set(delta) == {"meta", "keys", "values", "state.sum", "evicted"}  # admission counts: full snapshots only
    empty = table.snapshot(full=False)
    assert len(empty["keys"]) == 0 and len(empty["evicted"]) == 0
    restored = SparseTable(DIM, Adagrad(0.1), max_rows=3)
    restored.restore([full, delta, empty])
    assert_same(contents(restored), contents(table))


def test_a_row_created_right_after_a_snapshot_is_in_the_next_delta():
    table = SparseTable(DIM, SGD(0.1))
    table.pull(ids(1))
    table.push(ids(1), ones(1))
    table.snapshot(full=True)
    table.pull(ids(2))  # created at the step of the snapshot, and never pushed
    assert table.snapshot(full=False)["keys"].tolist() == [2]


def test_a_full_snapshot_carries_the_admission_counts():
    table = SparseTable(DIM, SGD(0.1), admit_after=3)
    table.pull(ids(5, 6))
    table.pull(ids(5))
    restored = SparseTable(DIM, SGD(0.1), admit_after=3)
    restored.restore([saved(table.snapshot(full=True))])
    restored.pull(ids(5, 6))
    assert len(restored) == 1 and restored.index.get(ids(5))[0] >= 0  # 5's third sighting admits it; 6 is at two


def test_a_delta_before_any_snapshot_is_refused():
    table = SparseTable(DIM, SGD(0.1))
    table.pull(ids(1))
    with pytest.raises(ConfigError, match="earlier snapshot"):
        table.snapshot(full=False)


def _chain() -> tuple[dict, dict, dict]:
    source = SparseTable(DIM, Adagrad(0.1), seed=1)
    source.pull(ids(1, 2, 3))
    full = source.snapshot(full=True)
    source.push(ids(2), ones(1))
    first = source.snapshot(full=False)
    source.push(ids(3), ones(1))
    return full, first, source.snapshot(full=False)


def _with(snap: dict, **changes) -> dict:
    """A copy of ``snap`` with arrays replaced (or dropped: None); names with dots passed as state_sum etc."""
    out = dict(snap)
    for name, value in changes.items():
        name = name.replace("_", ".", 1) if name.startswith(("state_", "pending_")) else name
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


MALFORMED = {
    "no snapshots": lambda full, d1, d2: [],
    "one snapshot, not in a list": lambda full, d1, d2: full,
    "a delta first": lambda full, d1, d2: [d1, d2],
    "a second full one": lambda full, d1, d2: [full, full],
    "deltas out of order": lambda full, d1, d2: [full, d2, d1],
    "rows of another dim": lambda full, d1, d2: [_with(full, values=np.zeros((3, DIM + 1), np.float32))],
    "meta of another dim": lambda full, d1, d2: [_with(full, meta=full["meta"] * np.array([1, 1, 2, 1, 1]))],
    "meta of the wrong dtype": lambda full, d1, d2: [_with(full, meta=full["meta"].astype(np.int32))],
    "optimizer state missing": lambda full, d1, d2: [_with(full, state_sum=None)],
    "another optimizer's state": lambda full, d1, d2: [_with(full, state_m=np.zeros((3, DIM), np.float32))],
    "state of the wrong dtype": lambda full, d1, d2: [full, _with(d1, state_sum=d1["state.sum"].astype(np.float64))],
    "fewer rows than IDs": lambda full, d1, d2: [_with(full, values=full["values"][:2])],
    "IDs of the wrong dtype": lambda full, d1, d2: [_with(full, keys=full["keys"].astype(np.int32))],
    "IDs not an array": lambda full, d1, d2: [_with(full, keys=full["keys"].tolist())],
    "an ID twice": lambda full, d1, d2: [_with(full, keys=ids(1, 1, 2))],
    "the reserved ID": lambda full, d1, d2: [_with(full, keys=ids(1, 2, EMPTY))],
    "NaN values": lambda full, d1, d2: [_with(full, values=np.full((3, DIM), np.nan, np.float32))],
    "evicted IDs of two dims": lambda full, d1, d2: [full, _with(d1, evicted=np.zeros((1, 1), np.int64))],
    "admission counts missing": lambda full, d1, d2: [_with(full, pending_counts=None)],
    "admission counts not aligned": lambda full, d1, d2: [_with(full, pending_counts=np.zeros(1, np.int32))],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_snapshot_is_refused_and_changes_nothing(case):
    table = SparseTable(DIM, Adagrad(0.1), seed=1)
    table.pull(ids(9))
    table.push(ids(9), ones(1))
    before = contents(table)
    with pytest.raises(DataError, match="sparse table restore"):
        table.restore(MALFORMED[case](*_chain()))
    assert_same(contents(table), before)
    assert table.index.get(ids(9))[0] >= 0 and (table.index.get(ids(1, 2, 3)) == -1).all()
