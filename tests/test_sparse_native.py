"""The compiled kernels (downpour/sparse/_native.c): the same rows and state as the numpy path, and clean
refusals of bad buffers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from downpour.errors import ConfigError
from downpour.sparse import EMPTY, Index, SparseTable, make_row_rule
from downpour.sparse import table as table_module

NATIVE = table_module.NATIVE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 8
needs_kernels = pytest.mark.skipif(NATIVE is None, reason="the compiled kernels are not built (pip install -e .)")

CONFIGS = {
    "plain": {},
    "admission": {"admit_after": 2, "admit_probability": 0.7},
    "eviction": {"evict_after_steps": 10, "max_rows": 250},
}


def same_table(a: SparseTable, b: SparseTable) -> None:
    """Identical contents, row for row: both paths allocate rows in the same order."""
    np.testing.assert_array_equal(a.values, b.values)
    assert a.state.keys() == b.state.keys()
    for name in a.state:
        np.testing.assert_array_equal(a.state[name], b.state[name], err_msg=name)
    np.testing.assert_array_equal(a.row_key, b.row_key)
    np.testing.assert_array_equal(a.touched, b.touched)
    assert (a.step, a.next_row, a.stats) == (b.step, b.next_row, b.stats)
    for index in ("index", "seen"):  # the same entries (slots may differ: the paths insert in another order)
        (ka, va), (kb, vb) = getattr(a, index).items(), getattr(b, index).items()
        np.testing.assert_array_equal(np.sort(ka), np.sort(kb))
        np.testing.assert_array_equal(va[np.argsort(ka)], vb[np.argsort(kb)])


@needs_kernels
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "ftrl"])
def test_both_paths_give_bit_identical_rows_and_state_on_a_random_workload(rule, config):
    def make() -> SparseTable:
        return SparseTable(DIM, make_row_rule(rule), seed=9, capacity=8, **CONFIGS[config])

    native, numpy_path, switching = make(), make(), make()
    numpy_path.native = False
    tables = (native, numpy_path, switching)
    rng = np.random.default_rng(1)
    universe = np.unique(rng.integers(-(2**63) + 1, 2**63 - 1, 1000))  # full-range IDs that recur across batches
    for step in range(80):
        switching.native = step % 3 != 0
        keys = rng.choice(universe, rng.integers(1, 150), replace=False)
        pulled = [t.pull(keys) for t in tables]
        looked_at = rng.choice(universe, 40, replace=False)
        peeked = [t.peek(looked_at) for t in tables]
        for got in (pulled, peeked):
            np.testing.assert_array_equal(got[1], got[0])
            np.testing.assert_array_equal(got[2], got[0])
        pushed = keys[rng.random(len(keys)) < 0.8]
        grads = (rng.standard_normal((len(pushed), DIM)) * 3).astype(np.float32)
        for t in tables:
            t.push(pushed, grads)
    same_table(numpy_path, native)
    same_table(switching, native)
    assert len(native.values) > 8 and len(native.index.keys) > 32  # the pool and the index grew
    if config == "eviction":
        assert native.stats.evicted > 100
    if config == "admission":
        assert 0 < native.stats.admitted < len(universe) and native.stats.pending > 0
    a, b = native.snapshot(full=True), numpy_path.snapshot(full=True)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_kernels
def test_the_index_kernels_agree_with_numpy_on_a_growing_index():
    rng = np.random.default_rng(3)
    native, numpy_index = Index(16, NATIVE), Index(16, None)
    for _ in range(6):
        keys = np.unique(rng.integers(-(2**62), 2**62, 3000))
        vals = rng.integers(0, 2**31 - 1, len(keys)).astype(np.int32)
        native.put(keys, vals)
        numpy_index.put(keys, vals)
        probe = np.concatenate([keys[:500], rng.integers(-(2**62), 2**62, 500)])
        np.testing.assert_array_equal(native.get(probe), numpy_index.get(probe))
    assert len(native) == len(numpy_index) > 15_000


def _push_args(values: np.ndarray, touched: np.ndarray) -> dict:
    index = Index(16, NATIVE)
    index.put(np.array([1, 2, 3], np.int64), np.array([0, 1, 2], np.int32))
    keys = np.array([1, 2, 3], np.int64)
    return {
        "index_keys": index.keys,
        "index_vals": index.vals,
        "keys": keys,
        "grads": np.ones((3, DIM), np.float32),
        "dim": DIM,
        "values": values,
        "touched": touched,
        "step": 1,
        "lr": 0.1,
    }


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


# Each case: the error, and what replaces the good arguments (a function of them).
BAD_PUSH = {
    "keys of float64": (TypeError, lambda a: {"keys": np.array([1.0, 2.0, 3.0])}),
    "keys of int32": (TypeError, lambda a: {"keys": np.array([1, 2, 3], np.int32)}),
    "strided keys": (TypeError, lambda a: {"keys": np.arange(6, dtype=np.int64)[::2]}),
    "keys as a list": (TypeError, lambda a: {"keys": [1, 2, 3]}),
    "gradients of float64": (TypeError, lambda a: {"grads": np.ones((3, DIM))}),
    "too few gradients": (ValueError, lambda a: {"grads": np.ones((2, DIM), np.float32)}),
    "read-only values": (TypeError, lambda a: {"values": _read_only(a["values"])}),
    "values of another row count": (ValueError, lambda a: {"touched": np.zeros(4, np.int32)}),
    "dim zero": (ValueError, lambda a: {"dim": 0}),
    "an index not a power of two long": (ValueError, lambda a: {"index_keys": np.full(12, EMPTY), "index_vals": np.zeros(12, np.int32)}),
    "index arrays of two lengths": (ValueError, lambda a: {"index_vals": np.zeros(32, np.int32)}),
    "an index naming a row outside the pool": (ValueError, lambda a: {"index_vals": np.where(a["index_keys"] == 3, 7, a["index_vals"])}),
}


@needs_kernels
@pytest.mark.parametrize("case", list(BAD_PUSH))
def test_a_push_kernel_refuses_bad_buffers_and_writes_nothing(case):
    values, touched = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM), np.zeros(3, np.int32)
    args = _push_args(values, touched)
    error, changes = BAD_PUSH[case]
    args.update(changes(args))
    with pytest.raises(error):
        NATIVE.push_sgd(*args.values())
    np.testing.assert_array_equal(values, np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM))
    assert (touched == 0).all()
    NATIVE.push_sgd(*_push_args(values, touched).values())  # the good arguments work
    assert (touched == 1).all() and (values < np.arange(3 * DIM).reshape(3, DIM)).all()


@needs_kernels
def test_the_other_kernels_refuse_bad_buffers():
    values, touched = np.zeros((3, DIM), np.float32), np.zeros(3, np.int32)
    a = _push_args(values, touched)
    common = [a["index_keys"], a["index_vals"], a["keys"], a["grads"], DIM, values, touched, 1]
    with pytest.raises(ValueError, match="sums"):  # optimizer state of too few rows
        NATIVE.push_adagrad(*common, np.zeros((2, DIM), np.float32), 0.1, 1e-10)
    with pytest.raises(TypeError, match="t"):  # Adam's step counts must be int32
        NATIVE.push_adam(*common, values.copy(), values.copy(), np.zeros(3, np.float32), 0.1, 0.9, 0.999, 1e-8)
    with pytest.raises(TypeError):  # too few arguments
        NATIVE.push_ftrl(*common, values.copy())
    out, rows = np.zeros((3, DIM), np.float32), np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="out"):
        NATIVE.gather(a["index_keys"], a["index_vals"], a["keys"], values, DIM, out[:2], rows)
    with pytest.raises(ValueError, match="whole rows"):
        NATIVE.gather(a["index_keys"], a["index_vals"], a["keys"], values.ravel()[:-1], DIM, out, rows)
    with pytest.raises(TypeError, match="out"):
        NATIVE.lookup(a["index_keys"], a["index_vals"], a["keys"], np.zeros(3, np.int64))


@needs_kernels
def test_insert_refuses_the_reserved_id_and_a_full_index_without_looping():
    keys, vals = np.full(16, EMPTY), np.zeros(16, np.int32)
    with pytest.raises(ValueError, match="reserved"):
        NATIVE.insert(keys, vals, np.array([5, EMPTY], np.int64), np.zeros(2, np.int32))
    assert (keys == EMPTY).all()  # checked before anything is written
    assert NATIVE.insert(keys, vals, np.arange(16, dtype=np.int64), np.arange(16, dtype=np.int32)) == 16
    with pytest.raises(ValueError, match="no free slot"):
        NATIVE.insert(keys, vals, np.array([99], np.int64), np.zeros(1, np.int32))
    out = np.zeros(2, np.int32)
    assert NATIVE.lookup(keys, vals, np.array([7, 99], np.int64), out) == 1  # a full index still answers
    assert out.tolist() == [7, -1]


def test_downpour_sparse_native_0_forces_the_numpy_path():
    code = "from downpour.sparse import SGD, SparseTable; print(SparseTable(4, SGD()).native)"
    built = importlib.util.find_spec("downpour.sparse._native") is not None  # NATIVE is None here under the switch
    for setting, expect in [("0", "False"), ("1", str(built))]:
        env = {**os.environ, "DOWNPOUR_SPARSE_NATIVE": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == expect


def test_asking_for_kernels_that_are_not_there_is_a_config_error(monkeypatch):
    monkeypatch.setattr(table_module, "NATIVE", None)
    table = SparseTable(4, make_row_rule("sgd"))
    assert not table.native
    with pytest.raises(ConfigError, match="not available"):
        table.native = True


@needs_kernels
@pytest.mark.parametrize("dim", [5, 16])
@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam", "ftrl"])
def test_both_paths_agree_for_row_lengths_with_their_own_compiled_loop_and_without(rule, dim):
    native, numpy_path = (SparseTable(dim, make_row_rule(rule), seed=2, capacity=8) for _ in range(2))
    numpy_path.native = False
    rng = np.random.default_rng(4)
    universe = rng.integers(-(2**62), 2**62, 300)
    for _ in range(20):
        keys = np.unique(rng.choice(universe, 100))
        grads = rng.standard_normal((len(keys), dim)).astype(np.float32)
        for t in (native, numpy_path):
            t.pull(keys)
            t.push(keys, grads)
    same_table(numpy_path, native)


def test_row_pools_start_on_a_cache_line_after_growth_and_restore():
    table = SparseTable(16, make_row_rule("adagrad"), capacity=4)
    table.pull(np.arange(1, 100, dtype=np.int64))  # grows the pool
    restored = SparseTable(16, make_row_rule("adagrad"))
    restored.restore([table.snapshot(full=True)])
    for t in (table, restored):
        assert t.values.ctypes.data % 64 == 0 and t.state["sum"].ctypes.data % 64 == 0
        assert t.values.flags.c_contiguous and t.values.shape == (len(t.values), 16)


@needs_kernels
@pytest.mark.parametrize("servers", [1, 2, 3, 5])
def test_the_request_check_kernel_agrees_with_numpy(servers):
    """check_ids: the server's two checks of a request's IDs (they are its own; none repeats) in one pass."""
    from downpour.layout import Layout
    from downpour.layout.spec import SERVER_SALT

    layout = Layout(params=(), slices=(), num_servers=servers, dtype="f32")
    rng = np.random.default_rng(servers)
    for trial in range(60):
        keys = rng.integers(-(2**63), 2**63 - 1, int(rng.integers(1, 400)), dtype=np.int64)
        rank = int(rng.integers(0, servers))
        if trial % 3:  # mostly the IDs a worker would send this server
            keys = keys[layout.sparse_servers(keys) == rank]
        if trial % 4 == 0 and len(keys) > 1:
            keys[int(rng.integers(0, len(keys)))] = keys[int(rng.integers(0, len(keys)))]  # maybe a repeat
        if trial % 7 == 0 and len(keys) > 2:
            keys[:2] = EMPTY  # the reserved ID, twice
        owned = servers == 1 or not len(keys) or bool((layout.sparse_servers(keys) == rank).all())
        repeats = len(np.unique(keys)) != len(keys)
        for unique in (True, False):
            got = NATIVE.check_ids(keys, servers, rank, SERVER_SALT, unique)
            assert got == (1 if not owned else 2 if unique and repeats else 0), (trial, unique)


@needs_kernels
def test_row_initialisation_in_place_matches_the_hash_and_refuses_bad_rows():
    table = SparseTable(DIM, make_row_rule("adagrad"), seed=123456789, init_scale=0.05)
    keys = np.array([EMPTY + 1, -7, 0, 42, 2**63 - 1], np.int64)
    values = np.zeros((10, DIM), np.float32)
    rows = np.array([9, 0, 4, 2, 7], np.int64)
    NATIVE.init_rows(keys, rows, table.seed, table.init_scale, values, DIM)
    np.testing.assert_array_equal(values[rows], table.initial(keys))
    assert not values[[1, 3, 5, 6, 8]].any()  # nothing else written
    with pytest.raises(ValueError, match="outside the pool"):
        NATIVE.init_rows(keys, np.array([0, 1, 2, 3, 10], np.int64), 0, 0.01, values, DIM)
    with pytest.raises(ValueError, match="rows"):
        NATIVE.init_rows(keys, rows[:3], 0, 0.01, values, DIM)
    with pytest.raises(ValueError, match="check_ids"):
        NATIVE.check_ids(keys, 2, 2, 0, True)


def test_growing_a_row_pool_keeps_every_row_and_zeroes_the_new_ones():
    table = SparseTable(4, make_row_rule("adagrad"), capacity=4)
    first = table.pull(np.arange(1, 4, dtype=np.int64)).copy()
    table.pull(np.arange(10, 30, dtype=np.int64))  # grows the pool from 4 to 32 rows
    assert len(table.values) == 32
    np.testing.assert_array_equal(table.values[:3], first)
    assert not table.values[table.next_row :].any() and (table.state["sum"][table.next_row :] == 0).all()
    np.testing.assert_array_equal(table.pull(np.arange(1, 4, dtype=np.int64)), first)
