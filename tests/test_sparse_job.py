"""Sparse tables in a job: the SPARSE request on a server, SparseEmbedding on a worker, a CTR job end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from downpour.api import resolve_job
from downpour.config import parse_job
from downpour.errors import ConfigError, DownpourError, ProtocolError
from downpour.launch import LocalLauncher
from downpour.layout import make_layout
from downpour.models import WideDeep
from downpour.nn import LocalTables, SparseEmbedding, attach, merge_row_grads, sparse_tables
from downpour.protocol import Message, Op
from downpour.server.sparse import SparseShard, make_table
from tests.conftest import FAST_CLUSTER


def _shard(rank: int = 0, servers: int = 2, **sparse) -> SparseShard:
    job = parse_job({"model": {"name": "mlp"}, "sparse": {"optimizer": {"name": "sgd", "lr": 0.5}, **sparse}})
    layout = make_layout([("w", (4,))], servers, tables=[("t", 3), ("u", 1)])
    return SparseShard(layout, rank, job.sparse, seed=0, max_keys=1000)


def _mine(shard: SparseShard, n: int, start: int = 0) -> np.ndarray:
    """``n`` distinct IDs that hash to ``shard``'s server."""
    ids = np.arange(start, start + 50 * n, dtype=np.int64)
    return ids[shard.layout.sparse_servers(ids) == shard.rank][:n]


def _request(entries: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], peek: bool = False) -> Message:
    spec, tensors = [], []
    for name, pk, g, qk in entries:
        spec.append([name, len(pk), len(qk)])
        tensors += [torch.from_numpy(pk), torch.from_numpy(g), torch.from_numpy(qk)]
    meta = {"tables": spec, "peek": True} if peek else {"tables": spec}
    return Message(Op.SPARSE, 1, meta, tensors)


def test_a_sparse_request_pushes_then_pulls_and_each_id_lives_on_one_server():
    shard = _shard()
    ids = _mine(shard, 5)
    first = shard.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)]))
    rows = first.tensors[0].numpy().copy()
    assert rows.shape == (5, 3) and np.abs(rows).max() > 0  # seeded initial rows
    grad = np.ones((2, 3), np.float32)
    second = shard.handle(_request([("t", ids[:2], grad, ids[:3])]))
    after = second.tensors[0].numpy()
    np.testing.assert_allclose(after[:2], rows[:2] - 0.5, atol=1e-6)  # pushed, then read: SGD lr 0.5
    np.testing.assert_array_equal(after[2], rows[2])
    # The other server refuses IDs that hash to this one: a row never exists twice.
    other = _shard(rank=1)
    with pytest.raises(ProtocolError, match="another server"):
        other.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)]))


@pytest.mark.parametrize("case", ["nan", "repeat", "shape", "table", "count", "dtype", "peek_push", "limit"])
def test_a_bad_sparse_request_is_refused_and_changes_nothing(case):
    shard = _shard()
    ids = _mine(shard, 4)
    before = shard.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)])).tensors[0].numpy().copy()
    good_u = ("u", ids[:1], np.ones((1, 1), np.float32), ids[:0])
    g = np.ones((2, 3), np.float32)
    entries = {
        "nan": [good_u, ("t", ids[:2], np.array([[1, 2, np.nan], [0, 0, 0]], np.float32), ids[:0])],
        "repeat": [good_u, ("t", ids[[0, 0]], g, ids[:0])],
        "shape": [good_u, ("t", ids[:2], np.ones((2, 4), np.float32), ids[:0])],
        "table": [good_u, ("nope", ids[:2], g, ids[:0])],
        "dtype": [good_u, ("t", ids[:2].astype(np.int32), g, ids[:0])],
        "peek_push": [("t", ids[:2], g, ids[:0])],
        "limit": [good_u, ("t", ids[:2], g, np.repeat(ids, 300))],
        "count": [good_u, ("t", ids[:2], g, ids[:0])],
    }[case]
    msg = _request(entries, peek=case == "peek_push")
    if case == "count":
        msg.meta["tables"][1][1] = 3
    with pytest.raises(ProtocolError):
        shard.handle(msg)
    after = shard.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)], peek=True)).tensors[0].numpy()
    np.testing.assert_array_equal(after, before)
    assert shard.tables["u"].pull(ids[:1])[0, 0] == shard.tables["u"].peek(ids[:1])[0, 0]
    assert shard.counts["keys_pushed"] == 0


def test_peek_reads_without_creating_rows():
    shard = _shard()
    ids = _mine(shard, 3)
    rows = shard.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)], peek=True)).tensors[0].numpy()
    assert len(shard.tables["t"]) == 0
    pulled = shard.handle(_request([("t", ids[:0], np.zeros((0, 3), np.float32), ids)])).tensors[0].numpy()
    np.testing.assert_array_equal(rows, pulled)  # what a pull would create
    assert len(shard.tables["t"]) == 3


def test_sparse_embedding_gradients_match_a_dense_embedding():
    """Repeated IDs in a batch get one row whose gradient is the sum, as nn.Embedding's."""
    job = parse_job({"model": {"name": "mlp"}, "sparse": {"optimizer": {"name": "sgd", "lr": 0.1}}})
    local = LocalTables(lambda name, dim: make_table(job.sparse.table(name), dim, seed=3))
    emb, bag = SparseEmbedding("t", 4), SparseEmbedding("t", 4, mode="sum")
    model = nn.ModuleList([emb, bag])
    attach(model, local)
    ids = torch.tensor([[5, 9, 5], [9, 9, 2]])
    uniq = torch.tensor([2, 5, 9])
    dense = nn.Embedding(3, 4)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(local._table("t", 4).peek(uniq.numpy())))
    w = torch.randn(2, 3, 4)
    (emb(ids) * w).sum().add(bag(ids).pow(2).sum()).backward()
    dense_ids = torch.searchsorted(uniq, ids)
    (dense(dense_ids) * w).sum().add(dense(dense_ids).sum(1).pow(2).sum()).backward()
    merged = merge_row_grads(local.pending)
    assert len(merged) == 1 and merged[0][0] == "t"
    torch.testing.assert_close(merged[0][1], uniq)
    torch.testing.assert_close(merged[0][2], dense.weight.grad)
    local.step()
    torch.testing.assert_close(torch.from_numpy(local.tables["t"].peek(uniq.numpy())), dense.weight.detach() - 0.1 * dense.weight.grad)


def test_a_model_lists_its_tables_and_refuses_one_table_with_two_dims():
    assert sparse_tables(WideDeep(num_dense=2, num_fields=3, dim=8)) == [("embedding", 8), ("wide", 1)]
    with pytest.raises(ConfigError, match="dim"):
        sparse_tables(nn.ModuleList([SparseEmbedding("t", 2), SparseEmbedding("t", 3)]))
    with pytest.raises(DownpourError, match="no row source"):
        SparseEmbedding("t", 2)(torch.tensor([1]))


def _ctr_job(**training) -> dict:
    return {
        "name": "ctr-tiny",
        "model": {"name": "wide_deep", "args": {"num_dense": 3, "num_fields": 4, "dim": 4, "hidden": [16]}},
        "data": {"factory": "tests.ctr_factories:tiny_ctr", "shard_size": 500},
        "optimizer": {"name": "adagrad", "lr": 0.05},
        "sparse": {"optimizer": {"name": "adagrad", "lr": 0.1}},
        "training": {"loss": "binary_cross_entropy", "epochs": 3, "batch_size": 64, "seed": 0, **training},
        "cluster": {"num_servers": 2, "num_workers": 2, **FAST_CLUSTER},
        "checkpoint": {"enabled": False},
        "monitor": {"dashboard": False, "tensorboard": False},
    }


def test_a_ctr_job_learns_the_ids_and_spreads_their_rows_over_the_servers(tmp_path):
    result = LocalLauncher(resolve_job(_ctr_job()), str(tmp_path / "run")).run()
    s = result.summary
    assert s["status"] == "ok"
    assert s["test_auc"] > 0.75  # the tiny data's hidden weights are learnable; chance is 0.5
    assert 0 < s["test_logloss"] < 0.69
    tables = [srv["sparse"]["tables"] for srv in s["servers"].values()]
    # 4 fields x 50 values: every ID once, split over both servers; the wide table has the same IDs.
    assert sum(t["embedding"]["rows"] for t in tables) == 200 and all(t["embedding"]["rows"] > 50 for t in tables)
    assert sum(t["wide"]["rows"] for t in tables) == 200
    pushed = sum(srv["sparse"]["keys_pushed"] for srv in s["servers"].values())
    assert pushed > 0 and all(w["sparse"]["ids_pushed"] > 0 for w in s["workers"].values())
    assert s["wire"]["push"]["indices"] > 0


def test_a_ctr_job_whose_test_split_holds_one_class_ends_ok_with_no_auc_and_says_why(tmp_path):
    """A small sample of rare clicks can hold no positive: the AUC is undefined, the job is not failed."""
    spec = _ctr_job(epochs=1)
    spec["data"]["args"] = {"n_test": 50, "test_label": 0.0}
    result = LocalLauncher(resolve_job(spec), str(tmp_path / "run")).run()
    s = result.summary
    assert s["status"] == "ok" and s.get("test_auc") is None and 0 < s["test_logloss"]
    assert s["test_auc_undefined"] == "the test split holds one class only (0 positives, 50 negatives): no AUC"


def _checkpoint(store, shards, name: str, committed: str | None, full_every: int = 3) -> list[str]:
    """What the servers and the coordinator do for one checkpoint: each shard writes its file,
    then the manifest lists them and the chains they need. Returns the union of the chains."""
    from safetensors.torch import save as st_save

    from downpour.server.sparse import sparse_file
    from downpour.storage import Manifest

    files, needs = {}, set()
    for shard in shards:
        tensors, meta, chain = shard.snapshot(name, committed, full_every)
        entry = store.write_file(name, sparse_file(shard.rank), st_save(tensors, metadata=meta))
        shard.written[name] = entry["sha256"]
        files[sparse_file(shard.rank)] = entry
        needs.update(chain)
    needs.discard(name)
    store.commit(Manifest(name, 0, files, {"needs": sorted(needs)}))
    return sorted(needs)


def _train_shards(shards, rng, ids: np.ndarray, steps: int) -> None:
    for _ in range(steps):
        batch = np.unique(rng.choice(ids, 40))
        for shard in shards:
            mine = batch[shard.layout.sparse_servers(batch) == shard.rank]
            grads = rng.normal(size=(len(mine), 3)).astype(np.float32)
            shard.handle(_request([("t", mine, grads, mine)]))


@pytest.mark.parametrize("new_servers", [2, 3])
def test_sparse_checkpoints_are_a_base_plus_deltas_and_restore_onto_any_number_of_servers(new_servers):
    from downpour.storage import CheckpointStore

    store = CheckpointStore(f"memory://sparse-ckpt-{new_servers}", keep=2)
    shards = [_shard(rank=r, evict_after_steps=10) for r in range(2)]
    rng = np.random.default_rng(0)
    ids = np.arange(1, 400, dtype=np.int64) * 7919
    committed = None
    for i in range(5):  # base, delta, delta, base, delta (full_every=3)
        _train_shards(shards, rng, ids, 6)
        name = f"ckpt-{i:012d}-0001"
        needs = _checkpoint(store, shards, name, committed)
        assert needs == ([] if i in (0, 3) else [f"ckpt-{j:012d}-0001" for j in range(3 if i > 3 else 0, i)])
        committed = name
    # keep=2 keeps ckpt 3 and 4; 4 is a delta on 3, so nothing older is needed and all else went.
    assert store.names() == ["ckpt-000000000003-0001", "ckpt-000000000004-0001"]
    manifest = store.latest()
    new_layout = make_layout([("w", (4,))], new_servers, tables=[("t", 3), ("u", 1)])
    job = parse_job({"model": {"name": "mlp"}, "sparse": {"optimizer": {"name": "sgd", "lr": 0.5}, "evict_after_steps": 10}})
    restored = [SparseShard(new_layout, r, job.sparse, seed=0, max_keys=1000) for r in range(new_servers)]
    for shard in restored:
        shard.restore(store, manifest, shards[0].layout, full=True)
    live = {int(k): shard for shard in shards for k in shard.tables["t"].snapshot(True)["keys"]}
    back = {int(k): shard for shard in restored for k in shard.tables["t"].snapshot(True)["keys"]}
    assert set(back) == set(live) and len(back) == sum(len(s.tables["t"]) for s in restored)
    keys = np.array(sorted(live), dtype=np.int64)
    for k in keys:
        want = live[int(k)].tables["t"].peek(np.array([k]))
        np.testing.assert_array_equal(back[int(k)].tables["t"].peek(np.array([k])), want)


def test_a_delta_whose_base_was_replaced_is_refused():
    from downpour.errors import DataError
    from downpour.storage import CheckpointStore

    store = CheckpointStore("memory://sparse-ckpt-tamper", keep=5)
    shards = [_shard(rank=r) for r in range(2)]
    rng = np.random.default_rng(1)
    ids = np.arange(1, 200, dtype=np.int64)
    _train_shards(shards, rng, ids, 3)
    _checkpoint(store, shards, "ckpt-000000000001-0001", None)
    _train_shards(shards, rng, ids, 3)
    _checkpoint(store, shards, "ckpt-000000000002-0001", "ckpt-000000000001-0001")
    # Rewrite the base as another consistent checkpoint (its own manifest verifies): the delta pins its SHA-256.
    other = [_shard(rank=r) for r in range(2)]
    _train_shards(other, rng, ids, 1)
    _checkpoint(store, other, "ckpt-000000000001-0001", None)
    fresh = _shard(rank=0)
    with pytest.raises(DataError, match="SHA-256"):
        fresh.restore(store, store.manifest("ckpt-000000000002-0001"), shards[0].layout, full=True)


def test_a_ctr_job_checkpoints_its_tables_incrementally_and_a_resume_gets_them_back(tmp_path):
    # Every checkpoint after the first is a delta while its predecessor was committed (the one at
    # the end is a new base if it replaced one still being written): enough steps for several.
    # An async checkpoint's cut lies about 1.5 heartbeats of pushes ahead of its request, so the
    # count depends on pushes per heartbeat, not on every_steps: 768 steps at batch 16 and a 0.1 s
    # heartbeat made 7-12 here, where 192 steps and 0.2 s made 2 on a quiet machine.
    job = _ctr_job(epochs=3, batch_size=16)
    job["cluster"]["heartbeat_interval_s"] = 0.1
    job["checkpoint"] = {"enabled": True, "every_steps": 10, "every_s": None, "keep": 2, "sparse_full_every": 100}
    first = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert first["status"] == "ok" and first["checkpoints"]["count"] >= 3
    from downpour.storage import CheckpointStore

    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"), keep=2)
    latest = store.latest()
    assert {"sparse-server-0.safetensors", "sparse-server-1.safetensors"} <= set(latest.files)
    # Every checkpoint a kept one builds on is still there.
    kept = store.names()
    needs = [store.manifest(name).job["needs"] for name in kept]
    assert any(needs)  # some kept checkpoint is a delta
    assert all(set(n) <= set(kept) for n in needs)
    # Resuming from the final checkpoint finds nothing left to train: the evaluation sees the
    # restored tables (base + deltas) and dense parameters, so it scores exactly as the first run.
    job["checkpoint"] = {**job["checkpoint"], "resume_from": str(tmp_path / "run")}
    again = LocalLauncher(resolve_job(job), str(tmp_path / "run2")).run().summary
    assert again["status"] == "ok"
    assert again["test_auc"] == pytest.approx(first["test_auc"], abs=1e-9)
    assert again["test_logloss"] == pytest.approx(first["test_logloss"], abs=1e-7)


def test_a_changed_row_optimizer_is_refused_on_resume_and_taken_by_a_warm_start_that_starts_its_state_afresh(tmp_path):
    """The rows' optimizer state is the checkpoint's on --resume, so another row optimizer is refused
    before anything starts (before, every server failed to restore it and the job hung for minutes);
    init_from takes the rows' values only, so it starts any row optimizer from them (before, the
    servers failed on the checkpoint's state as on a resume)."""
    from downpour.api import check_data

    job = _ctr_job(epochs=3)
    job["checkpoint"] = {"enabled": True, "every_s": None}
    first = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert first["status"] == "ok" and first["test_auc"] > 0.75
    resume = {**job, "checkpoint": {**job["checkpoint"], "resume_from": str(tmp_path / "run")},
              "sparse": {"optimizer": {"name": "adam", "lr": 0.01}}}
    with pytest.raises(ConfigError, match=r"another row optimizer \(table 'embedding': 'adagrad' in the checkpoint, 'adam' now"):
        check_data(resolve_job(resume))
    # One table only changed: named alone.
    one = {**resume, "sparse": {"optimizer": {"name": "adagrad", "lr": 0.1}, "tables": {"wide": {"optimizer": {"name": "ftrl"}}}}}
    with pytest.raises(ConfigError, match=r"\(table 'wide': 'adagrad' in the checkpoint, 'ftrl' now\)"):
        check_data(resolve_job(one))
    warm = {**job, "init_from": str(tmp_path / "run"), "training": {**job["training"], "epochs": 1},
            "sparse": {"optimizer": {"name": "ftrl"}, "tables": {"embedding": {"optimizer": {"name": "sgd", "lr": 0.05}}}}}
    check_data(resolve_job(warm))
    s = LocalLauncher(resolve_job(warm), str(tmp_path / "warm")).run().summary
    assert s["status"] == "ok" and s["test_auc"] > 0.75, s.get("error")
    assert {srv["sparse"]["tables"]["embedding"]["rows"] for srv in s["servers"].values()} == {
        srv["sparse"]["tables"]["embedding"]["rows"] for srv in first["servers"].values()}


def test_settings_for_a_sparse_table_the_model_does_not_have_are_refused_naming_the_tables_it_has():
    from downpour.api import check_data

    job = _ctr_job()
    job["sparse"] = {"tables": {"embeding": {"init_scale": 1.0}}}
    with pytest.raises(ConfigError, match=r"sparse.tables: 'embeding' is no table of the model \(its sparse tables: "):
        check_data(resolve_job(job))
