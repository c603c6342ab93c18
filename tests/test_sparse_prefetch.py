"""The worker's row pipeline (SparseClient): one plan per batch's IDs, rows pulled a batch ahead.

The client talks to real SparseShards through an in-process fake of the RPC client, which
answers each request when it is sent (a server answers a worker's requests in order), so
that a worker's sequence of pulls and pushes is exactly what the servers see.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from downpour.config import parse_job
from downpour.errors import ConfigError, RemoteError
from downpour.layout import make_layout
from downpour.models import WideDeep
from downpour.nn import LocalTables, attach
from downpour.protocol import Message
from downpour.server.replays import is_replay, record
from downpour.server.sparse import SparseShard, make_table
from downpour.worker.sparse import SparseClient
from tests.ctr_factories import CountingWideDeep


class _Future:
    def __init__(self, peer: str, req_id: int, reply: Message | None, error: Exception | None) -> None:
        self.peer, self.req_id, self._reply, self._error = peer, req_id, reply, error

    def result(self) -> Message:
        if self._error is not None:
            raise self._error
        return self._reply


class FakeRpc:
    """Each request handled by its server's SparseShard when it is sent (as a server applies a
    worker's requests in the order they arrive). ``fail``: request numbers (1-based) answered
    ``peer_replaced`` without being applied (a server replaced meanwhile, before it got them:
    the next request goes to the replacement, which holds the same rows). A request is read only
    where a real server reads it so (server/replays.py: ``seq`` applied already)."""

    def __init__(self, shards: dict[str, SparseShard], fail: tuple[int, ...] = ()) -> None:
        self.shards, self.fail, self.n = shards, set(fail), 0
        self.applied: dict[str, int] = {}
        self.skipped: dict[str, list[int]] = {}
        self.order: dict[str, list[int]] = {}  # per server, the seqs applied, in the order applied

    def request(self, peer: str, msg: Message) -> _Future:
        self.n += 1
        if self.n in self.fail:
            return _Future(peer, self.n, None, RemoteError("replaced", peer=peer, code="peer_replaced"))
        seq = msg.meta.get("seq")
        replay = seq is not None and is_replay(self.applied, self.skipped, peer, seq)
        if seq is not None and not replay:
            record(self.applied, self.skipped, peer, seq)
            self.order.setdefault(peer, []).append(seq)
        reply = self.shards[peer].handle(Message(msg.op, self.n, msg.meta, list(msg.tensors)), replay=replay)
        return _Future(peer, self.n, reply, None)


SPARSE = {"optimizer": {"name": "adagrad", "lr": 0.1}, "tables": {"count": {"optimizer": {"name": "sgd", "lr": 1.0}, "init_scale": 0.0}}}
TABLES = [("embedding", 4), ("wide", 1), ("count", 1)]


def _cluster(servers: int = 2, fail: tuple[int, ...] = (), replay: bool = False) -> tuple[SparseClient, dict[str, SparseShard]]:
    job = parse_job({"model": {"name": "mlp"}, "sparse": SPARSE})
    layout = make_layout([("w", (4,))], servers, tables=TABLES)
    shards = {f"server-{r}": SparseShard(layout, r, job.sparse, seed=0, max_keys=1 << 20) for r in range(servers)}
    client = SparseClient(FakeRpc(shards, fail), layout, {r: f"server-{r}" for r in range(servers)}, replay=replay)
    return client, shards


def counting() -> nn.Module:
    """Wide & Deep plus a table ``count`` whose rows count their IDs' trained occurrences
    (tests/ctr_factories.py), with the same dense weights in every call."""
    torch.manual_seed(0)
    return CountingWideDeep(num_dense=3, num_fields=5, dim=4, hidden=[8])


def _batches(n: int = 12, size: int = 64, seed: int = 1) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = (np.arange(5, dtype=np.int64) << 33) + rng.integers(0, 40, size=(size, 5))
        out.append(((torch.from_numpy(rng.normal(size=(size, 3)).astype(np.float32)), torch.from_numpy(ids)),
                    torch.from_numpy((rng.random(size) < 0.3).astype(np.float32))))
    return out


def _train(model: nn.Module, source, batches, ahead: bool = False, stop_before: int | None = None) -> None:
    """SGD on the dense layers, the tables through ``source`` (a SparseClient or LocalTables)."""
    attach(model, source)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i, ((dense, ids), y) in enumerate(batches):
        if stop_before is not None and i == stop_before:
            break
        if ahead:
            source.prepare((dense, ids), batches[i + 1][0] if i + 1 < len(batches) else None)
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(dense, ids), y).backward()
        opt.step()
        source.after_backward() if isinstance(source, SparseClient) else source.step()
    if isinstance(source, SparseClient):
        source.flush()


def _rows(shards: dict[str, SparseShard], table: str, keys: np.ndarray) -> np.ndarray:
    """Every key's row, read from the server that holds it."""
    out = np.zeros((len(keys), shards["server-0"].tables[table].dim), np.float32)
    for s in shards.values():
        mine = s.layout.sparse_servers(keys) == s.rank
        out[mine] = s.tables[table].peek(keys[mine])
    return out


def _occurrences(batches, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.cat([x[1].reshape(-1) for x, _ in batches[:upto]]).numpy()
    return np.unique(ids, return_counts=True)


def test_without_the_pipeline_the_rows_are_those_of_training_in_one_process_bit_for_bit():
    """Sync jobs (no rows pulled ahead): each batch's pull follows the previous batch's push, so
    two servers end with exactly the rows of one process training the same batches, whatever
    order the client keeps the keys in."""
    batches = _batches()
    client, shards = _cluster()
    _train(counting(), client, batches)
    job = parse_job({"model": {"name": "mlp"}, "sparse": SPARSE})
    local = LocalTables(lambda name, dim: make_table(job.sparse.table(name), dim, seed=0))
    _train(counting(), local, batches)
    keys, counts = _occurrences(batches)
    for table, _ in TABLES:
        np.testing.assert_array_equal(_rows(shards, table, keys), local.tables[table].peek(keys))
    np.testing.assert_array_equal(_rows(shards, "count", keys)[:, 0], counts.astype(np.float32))
    assert client.reads_ahead == 0


def test_one_plan_serves_both_tables_read_from_the_same_ids_and_pushes_are_slices_of_the_gradient():
    client, shards = _cluster()
    model = WideDeep(num_dense=3, num_fields=5, dim=4, hidden=[8])
    attach(model, client)
    (dense, ids), y = _batches(1)[0]
    nn.functional.binary_cross_entropy_with_logits(model(dense, ids), y).backward()
    (_, k1, r1), (_, k2, r2) = client.fetched
    assert k1 is k2  # one unique(), one split by server
    client.after_backward()
    for s, waiting in client.pending.items():
        keys, grads = waiting["embedding"]
        assert client.grouped == (keys.base is not None)  # grouped: views of the gradient, not gathered copies
        assert (client.layout.sparse_servers(keys) == s).all() and (np.diff(keys) > 0).all()


def test_with_rows_pulled_ahead_every_gradient_is_pushed_exactly_once():
    batches = _batches()
    client, shards = _cluster()
    _train(counting(), client, batches, ahead=True)
    keys, counts = _occurrences(batches)
    np.testing.assert_array_equal(_rows(shards, "count", keys)[:, 0], counts.astype(np.float32))
    # The first forward finds which tables read which input; from the second batch on, all three
    # tables' rows came from the pull sent a step ahead, one request per server for all of them.
    assert client.reads_ahead == 3 * (len(batches) - 2)
    assert client.ahead_dropped == 0
    pushed = sum(s.counts["keys_pushed"] for s in shards.values())
    assert pushed == client.ids_pushed


def test_rows_pulled_ahead_for_a_batch_never_trained_are_dropped_and_their_pushes_stay_applied():
    batches = _batches()
    client, shards = _cluster()
    _train(counting(), client, batches, ahead=True, stop_before=7)  # batch 7 was pulled ahead, not trained
    client.prepare(batches[0][0], None)  # a later step (another shard): the rows of batch 7 are dropped
    client.flush()
    assert client.ahead_dropped == 1
    keys, counts = _occurrences(batches, upto=7)
    np.testing.assert_array_equal(_rows(shards, "count", keys)[:, 0], counts.astype(np.float32))


def test_after_a_failover_the_requests_are_replayed_in_the_order_they_were_sent():
    """Request 7 (batch 2's rows pulled ahead, with the pushes waiting for server 0) meets a
    replaced server, and so does its replay (9). It is sent until answered before batch 1's own
    pulls go out (rows pulled ahead are answered first), so the replacement applies every request
    once and in the order it was sent."""
    batches = _batches()
    client, shards = _cluster(fail=(7, 9), replay=True)
    _train(counting(), client, batches, ahead=True)
    keys, counts = _occurrences(batches)
    assert client.replayed == 2
    np.testing.assert_array_equal(_rows(shards, "count", keys)[:, 0], counts.astype(np.float32))
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in client.rpc.order.values())


@pytest.mark.parametrize("replay", [False, True])
def test_a_pull_ahead_refused_by_a_replaced_server_is_sent_again(replay):
    """Request 15 (batch 3's rows pulled ahead, with batch 1's pushes: batch 0 sends 6 pulls, batch 1
    2 ahead and 6 pulls of its own) is answered peer_replaced without being applied. With
    replay (backups), the same request goes again and every count holds, though the next
    batch's pull ahead (17, one seq later) reached the replacement first: the server applies the
    replay all the same (server/replays.py); without, the rows are pulled again and the pushes it
    carried are lost, as with any request to a replaced server."""
    batches = _batches()
    client, shards = _cluster(fail=(15,), replay=replay)
    _train(counting(), client, batches, ahead=True)
    keys, counts = _occurrences(batches)
    got = _rows(shards, "count", keys)[:, 0]
    if replay:
        assert client.replayed == 1
        np.testing.assert_array_equal(got, counts.astype(np.float32))
    else:
        assert client.replayed == 0 and (got <= counts).all() and (got < counts).any()


def test_prefetch_is_on_for_async_jobs_and_refused_where_rows_must_be_of_the_last_round():
    assert parse_job({"model": {"name": "mlp"}}).sparse_prefetch
    assert not parse_job({"model": {"name": "mlp"}, "training": {"consistency": "sync"}}).sparse_prefetch
    assert not parse_job({"model": {"name": "mlp"}, "training": {"consistency": "ssp"}}).sparse_prefetch
    assert not parse_job({"model": {"name": "mlp"}, "sparse": {"prefetch": False}}).sparse_prefetch
    for consistency in ("sync", "ssp"):
        with pytest.raises(ConfigError, match="sparse.prefetch"):
            parse_job({"model": {"name": "mlp"}, "sparse": {"prefetch": True}, "training": {"consistency": consistency}})
    # Replicated servers too (a failover loses no row update: test_replication_job's CTR test).
    replicated = {"model": {"name": "mlp"}, "cluster": {"num_servers": 2, "replicas": 1}}
    assert parse_job(replicated).sparse_prefetch and parse_job({**replicated, "sparse": {"prefetch": True}}).sparse_prefetch
    # Per-table settings do not inherit it.
    job = parse_job({"model": {"name": "mlp"}, "sparse": {"prefetch": False, "tables": {"t": {"init_scale": 0.0}}}})
    assert job.sparse.table("t").init_scale == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_a_ctr_job_applies_every_row_gradient_once_with_and_without_rows_pulled_ahead(tmp_path, consistency):
    """A real job (2 servers, 2 workers, 2 epochs): the async one pulls rows ahead (the default),
    the sync one never does; in both, every ID's ``count`` row ends at 2 × its occurrences."""
    from downpour.api import resolve_job
    from downpour.export import read_tables
    from downpour.launch import LocalLauncher
    from tests.ctr_factories import tiny_ctr
    from tests.test_sparse_job import _ctr_job

    job = _ctr_job(epochs=2, consistency=consistency)
    job["model"] = {"factory": "tests.ctr_factories:counting_wide_deep", "args": job["model"]["args"]}
    job["sparse"] = SPARSE
    job["checkpoint"] = {"enabled": True, "every_s": None, "at_start": False}  # one at the end: the tables to read
    run = tmp_path / "run"
    s = LocalLauncher(resolve_job(job), str(run)).run().summary
    assert s["status"] == "ok"
    ahead = sum(w["sparse"]["reads_ahead"] for w in s["workers"].values())
    assert (ahead > 0) == (consistency == "async")
    keys, rows = read_tables(str(run))["count"]
    want, counts = np.unique(tiny_ctr().train.ids, return_counts=True)
    np.testing.assert_array_equal(keys.numpy(), want)
    np.testing.assert_array_equal(rows[:, 0].numpy(), 2 * counts.astype(np.float32))
    assert s["test_auc"] > 0.7
