"""Replication in-process: a primary's stream keeps a backup bit-equal (dense keys, rule state, sparse
rows, sync rounds), sync replication holds a reply until the backup has the push, a replayed push
applies exactly once, and a backup refuses (and counts) messages out of order, repeated or for
another rank without changing anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from downpour.config import parse_job
from downpour.layout import make_layout
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.ops import Code
from downpour.server.replays import MAX_SKIPPED, is_replay, parse_skipped, record
from downpour.server.replica import Backup, BackupHost, NullListener
from downpour.server.service import ParameterServer
from downpour.transport import Listener

LAYOUT = make_layout([("w", (4, 3)), ("b", (4,))], 2, max_slice_bytes=16, tables=[("emb", 3)])
KEYS = [s.key for s in LAYOUT.server_slices(0)]
NUMEL = LAYOUT.server_numel(0)
W0, W1 = b"worker-0", b"worker-1"


def job(consistency: str = "async", replication: str = "sync", optimizer: str = "adam"):
    return parse_job({
        "model": {"name": "mlp", "args": {"input_shape": [3], "hidden": [4], "num_classes": 2}},
        "optimizer": {"name": optimizer, "lr": 0.1},
        "training": {"consistency": consistency},
        "sparse": {"optimizer": {"name": "adagrad", "lr": 0.1}},
        "cluster": {"num_servers": 2, "replicas": 1, "replication": replication, "replication_max_lag": 2},
    })


class Pair:
    """A primary (its sends captured) and one backup fed by hand with what the primary streams."""

    def __init__(self, ctx: zmq.Context, consistency: str = "async", replication: str = "sync") -> None:
        j = job(consistency, replication)
        self.listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 30)
        self.primary = ParameterServer(ctx, j, LAYOUT, 0, self.listener, "server-0")
        self.sent: list[tuple[bytes, Message]] = []
        self.primary.listener.send = self.capture  # type: ignore[method-assign]
        self.primary.replicate()
        self.backup = Backup(ParameterServer(ctx, j, LAYOUT, 0, NullListener(), "backup-0"), "inproc://x", "server-1")  # type: ignore[arg-type]
        self._id = 100

    def capture(self, peer: bytes, frames, track: bool = False) -> list:
        self.sent.append((peer, decode([bytearray(f) for f in frames])))
        return []

    def take(self, peer: bytes) -> list[Message]:
        mine = [m for p, m in self.sent if p == peer]
        self.sent = [(p, m) for p, m in self.sent if p != peer]
        return mine

    def request(self, op: Op, meta: dict, tensors: list, peer: bytes = W0) -> int:
        self._id += 1
        self.primary.handle(peer, encode(Message(op, self._id, meta, tensors)))
        return self._id

    def hello(self) -> None:
        self.request(Op.REPLICA_HELLO, {"rank": 0, "node": "server-1"}, [], peer=b"bk")

    def stream(self) -> int:
        """Hand the backup what the primary sent it; returns how many messages it took."""
        return sum(self.backup.handle(m) for m in self.take(b"bk"))

    def ack(self) -> None:
        self.request(Op.REPLICA_ACK, {"rank": 0, "seq": self.backup.status.seq, "node": "server-1"}, [], peer=b"bk")

    def push(self, value: float, peer: bytes = W0, seq: int | None = None, version: int = 0) -> int:
        meta = {"keys": KEYS, "version": version, "weight": 1.0, **({"seq": seq} if seq else {})}
        return self.request(Op.PUSHPULL, meta, [torch.full((NUMEL,), value)], peer)

    def sparse(self, ids: list[int], value: float, seq: int) -> int:
        k = torch.tensor(ids, dtype=torch.int64)
        return self.request(Op.SPARSE, {"tables": [["emb", len(ids), len(ids)]], "seq": seq},
                            [k, torch.full((len(ids), 3), value), k])


@pytest.fixture
def pair():
    ctx = zmq.Context()
    made: list[Pair] = []

    def make(**kw) -> Pair:
        made.append(Pair(ctx, **kw))
        return made[-1]

    yield make
    for p in made:
        p.listener.close()
    ctx.term()


def own_ids(n: int) -> list[int]:
    ids = np.arange(1000, dtype=np.int64)
    return [int(i) for i in ids[LAYOUT.sparse_servers(ids) == 0][:n]]


def same_state(a: ParameterServer, b: ParameterServer) -> None:
    assert torch.equal(a.store.data, b.store.data)
    assert a.store.versions == b.store.versions and a.store.steps == b.store.steps
    for k, v in a.store.rule.state().items():
        assert torch.equal(v, b.store.rule.state()[k]), k
    assert a.applied == b.applied and a.skipped == b.skipped
    for name, t in a.sparse.tables.items():
        ids = np.array(sorted(int(x) for x in t.row_key[: t.next_row] if x >= 0), dtype=np.int64)
        u = b.sparse.tables[name]
        assert len(t) == len(u)
        assert np.array_equal(t.peek(ids), u.peek(ids))


def test_a_backup_that_joins_late_gets_the_state_then_follows_the_stream_bit_for_bit(pair):
    p = pair()
    p.request(Op.INIT, {"keys": KEYS}, [torch.linspace(-1, 1, NUMEL)])
    for i in range(3):  # before the backup exists
        p.push(0.1 * (i + 1), seq=i + 1)
    p.sparse(own_ids(4), 0.5, seq=1)
    p.hello()
    assert p.stream() == 1 and p.backup.status.ready
    p.ack()
    for i in range(3, 8):  # streamed
        p.push(0.1 * (i + 1), seq=i + 1)
        p.sparse(own_ids(6), -0.25 * i, seq=i)
        p.stream()
        p.ack()
    same_state(p.primary, p.backup.server)
    assert p.primary.replicas.lag() == 0 and p.primary.replicas.stats()["backups"] == ["server-1"]
    # What the rank applied is counted across the state transfer (a promoted backup reports the rank's whole history).
    assert p.backup.server.counts["push"] == p.primary.counts["push"] == 8
    assert p.backup.server.sparse.counts["keys_pushed"] == p.primary.sparse.counts["keys_pushed"] > 0


def test_sync_replication_answers_a_push_only_once_the_backup_acknowledged_it(pair):
    p = pair()
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.hello()
    p.stream()
    p.ack()
    p.take(W0)
    rid = p.push(1.0, seq=1)
    assert p.take(W0) == []  # held: the backup does not hold it yet
    p.stream()
    assert p.take(W0) == []
    p.ack()
    [reply] = p.take(W0)
    assert reply.op == Op.OK and reply.req_id == rid
    # The coordinator's plan no longer has that backup (its process died): it is dropped at once
    # and the held answer goes, instead of waiting for the backup to time out.
    rid = p.push(2.0, seq=2)
    assert p.take(W0) == [] and p.primary.replicas.keep(["server-1"]) == []  # still planned: still held
    [(to, held)] = p.primary.replicas.keep(["server-2"])
    assert to == W0 and held.req_id == rid and p.primary.replicas.stats()["dropped"] == 1


def test_async_replication_answers_at_once_while_the_lag_is_within_its_bound(pair):
    p = pair(replication="async")  # replication_max_lag: 2
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.hello()
    p.stream()
    p.ack()
    p.take(W0)
    for seq in (1, 2):
        p.push(1.0, seq=seq)
        assert len(p.take(W0)) == 1  # lag 1, 2: answered
    p.push(1.0, seq=3)
    assert p.take(W0) == []  # lag 3: held until the backup catches up
    p.stream()
    p.ack()
    assert len(p.take(W0)) == 1 and p.primary.replicas.lag() == 0


def test_a_replayed_push_is_applied_once_and_answered_with_the_current_values(pair):
    p = pair()
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.take(W0)
    p.push(1.0, seq=1)
    p.push(2.0, seq=2)
    before = p.primary.store.data.clone()
    rid = p.push(2.0, seq=2)  # the same push again (a replay after a failover)
    [(_, reply)] = [(to, m) for to, m in p.sent if m.req_id == rid]
    assert reply.op == Op.OK and torch.equal(reply.tensors[0], before)
    assert torch.equal(p.primary.store.data, before) and p.primary.counts["replayed"] == 1
    p.sparse(own_ids(3), 1.0, seq=1)
    rows = p.primary.sparse.tables["emb"].peek(np.array(own_ids(3)))
    p.sparse(own_ids(3), 1.0, seq=1)  # replayed: read, not pushed
    assert np.array_equal(p.primary.sparse.tables["emb"].peek(np.array(own_ids(3))), rows)


def test_a_row_request_overtaken_by_a_later_one_after_a_failover_is_applied_once_when_replayed(pair):
    """Row request 2 was lost with a primary that died before forwarding it, and the worker sent
    request 3 (rows pulled a batch ahead) to the promoted backup before it sent 2 again: 2 is not
    a duplicate there, though 3 is past it. The backup of that server (joining after 3, through a
    state transfer) applies the replay too, and a second replay of 2 is read only on both."""
    p = pair()
    ids = np.array(own_ids(3))
    p.sparse(own_ids(3), 1.0, seq=1)
    p.sparse(own_ids(3), 1.0, seq=3)
    assert p.primary.skipped == {"worker-0/sparse": [2]}
    p.hello()
    p.stream()
    p.ack()
    p.sparse(own_ids(3), 1.0, seq=2)  # the replay: applied
    assert p.primary.skipped == {} and p.primary.counts["replayed"] == 0
    p.stream()
    p.ack()
    rows = p.primary.sparse.tables["emb"].peek(ids)
    p.sparse(own_ids(3), 1.0, seq=2)  # again: read only
    p.stream()
    assert np.array_equal(p.primary.sparse.tables["emb"].peek(ids), rows) and p.primary.counts["replayed"] == 1
    assert p.primary.sparse.counts["keys_pushed"] == p.backup.server.sparse.counts["keys_pushed"] == 9
    same_state(p.primary, p.backup.server)


def test_a_stream_keeps_only_its_newest_skipped_seqs():
    last: dict[str, int] = {}
    skipped: dict[str, list[int]] = {}
    record(last, skipped, "w", 1)
    record(last, skipped, "w", 4)
    assert skipped == {"w": [2, 3]} and not is_replay(last, skipped, "w", 3) and is_replay(last, skipped, "w", 1)
    record(last, skipped, "w", 3)
    assert skipped == {"w": [2]}
    record(last, skipped, "w", 1000)  # never past its bound, however far a stream jumps: the oldest go
    assert skipped["w"] == list(range(1000 - MAX_SKIPPED, 1000)) and is_replay(last, skipped, "w", 2)
    assert parse_skipped({"w": [5, 3], "x": ["a"], "y": []}) == {"w": [3, 5]} and parse_skipped([1]) == {}


def test_a_sync_round_survives_a_promotion_and_a_replay_waits_for_its_round(pair):
    """Worker 0 pushed round 0 (forwarded); the primary dies; the promoted backup takes worker 0's
    replay as a duplicate that waits, and worker 1's push completes the round for both."""
    p = pair(consistency="sync")
    p.primary.set_workers(["worker-0", "worker-1"])
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.hello()
    p.stream()
    p.ack()
    p.push(1.0, W0, seq=1)
    p.stream()  # the backup holds worker 0's push of round 0
    promoted, harness = p.backup.server, []
    promoted.listener.send = lambda peer, frames, track=False: harness.append((peer, decode([bytearray(f) for f in frames]))) or []
    grad = [torch.full((NUMEL,), 1.0)]
    promoted.handle(W0, encode(Message(Op.PUSHPULL, 7, {"keys": KEYS, "version": 0, "weight": 1.0, "seq": 1}, grad)))
    assert harness == []  # a replay of a push waiting in the round: answered when the round completes
    promoted.handle(W1, encode(Message(Op.PUSHPULL, 8, {"keys": KEYS, "version": 0, "weight": 1.0, "seq": 1},
                                       [torch.full((NUMEL,), 3.0)])))
    assert sorted((to, m.req_id) for to, m in harness) == [(W0, 7), (W1, 8)]
    assert promoted.store.versions == [1] * len(KEYS) and promoted.counts["replayed"] == 1


def test_a_backup_refuses_duplicates_gaps_and_other_ranks_and_changes_nothing(pair):
    p = pair()
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.hello()
    p.stream()
    p.push(1.0, seq=1)
    p.push(2.0, seq=2)
    first, second = p.take(b"bk")
    assert p.backup.handle(first)
    state = p.backup.server.store.data.clone()
    other = Message(Op.REPLICATE, 0, {**second.meta, "rank": 1}, second.tensors)
    assert not p.backup.handle(other) and not p.backup.handle(first)
    assert torch.equal(p.backup.server.store.data, state) and p.backup.status.ready
    gap = Message(Op.REPLICATE, 0, {**second.meta, "seq": second.meta["seq"] + 1}, second.tensors)
    assert not p.backup.handle(gap)
    assert not p.backup.status.ready  # it asks for the state again
    assert not p.backup.handle(second)  # nothing after a gap is applied until the state comes
    assert torch.equal(p.backup.server.store.data, state)
    refused = p.backup.status.refused
    assert refused[Code.REPLICA_RANK] == 1 and refused[Code.REPLICA_DUPLICATE] == 1 and refused[Code.REPLICA_ORDER] == 2
    bad_state = Message(Op.REPLICA_STATE, 0, {"rank": 0, "seq": 1, "info": {}}, [torch.zeros(5, dtype=torch.uint8)])
    assert not p.backup.handle(bad_state) and refused[Code.INVALID] == 1


def test_a_primary_refuses_a_hello_for_another_rank_and_a_backup_cannot_push(pair):
    p = pair()
    rid = p.request(Op.REPLICA_HELLO, {"rank": 1, "node": "server-1"}, [], peer=b"bk")
    [reply] = [m for _, m in p.sent if m.req_id == rid]
    assert reply.op == Op.ERROR and reply.meta["code"] == Code.REPLICA_RANK
    assert p.primary.replicas.followers == {}
    assert isinstance(p.backup.server.listener, NullListener)  # no socket a worker could reach


def test_a_backup_host_starts_and_stops_backups_as_the_coordinator_assigns_them():
    made: list[int] = []
    host = BackupHost(zmq.Context.instance(), job(), LAYOUT, "server-1", None,
                      lambda r, name: made.append(r) or ParameterServer(None, job(), LAYOUT, r, NullListener(), name))  # type: ignore[arg-type]
    started: list[Backup] = []
    Backup.start = lambda self, ctx, security: started.append(self)  # type: ignore[method-assign]
    try:
        host.offer({"replica_gen": 1, "backups": [{"rank": 0, "address": "inproc://a"}]})
        host.offer({"replica_gen": 0, "backups": []})  # an older answer: ignored
        assert list(host.backups) == [0] and made == [0]
        host.offer({"replica_gen": 2, "backups": [{"rank": 0, "address": "inproc://b"}]})  # its primary moved
        assert host.backups[0].primary == "inproc://b" and made == [0, 0]
        assert host.take(0) is None  # not caught up: nothing to promote
    finally:
        del Backup.start
        host.close()


def test_a_primary_exports_its_replication_as_prometheus_metrics(pair):
    from downpour.monitor import metrics_route, node_labels
    from downpour.server.metrics import server_metrics

    p = pair()
    p.request(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)])
    p.hello()
    p.stream()
    p.ack()
    p.push(1.0, seq=1)  # held until the backup acknowledges it: lag 1
    _, body = metrics_route(server_metrics(p.primary, LAYOUT), node_labels("j", "server", 0, "server-0"))()
    text = body.decode() if isinstance(body, bytes) else body
    assert 'downpour_server_replication_lag{' in text and 'downpour_server_replication_backups{' in text
    lag = next(line for line in text.splitlines() if line.startswith("downpour_server_replication_lag{"))
    assert lag.endswith(" 1") or lag.endswith(" 1.0")


def test_a_backup_whose_thread_stopped_on_an_error_is_started_again_a_bounded_number_of_times():
    from downpour.server import replica

    made: list[int] = []
    host = BackupHost(zmq.Context.instance(), job(), LAYOUT, "server-1", None,
                      lambda r, name: made.append(r) or ParameterServer(None, job(), LAYOUT, r, NullListener(), name))  # type: ignore[arg-type]
    Backup.start = lambda self, ctx, security: None  # type: ignore[method-assign]
    try:
        host.offer({"replica_gen": 1, "backups": [{"rank": 0, "address": "inproc://a"}]})
        host.offer({"replica_gen": 1, "backups": [{"rank": 0, "address": "inproc://a"}]})  # not started, no error: kept
        assert made == [0]
        for _ in range(replica._RESTARTS + 2):  # its thread fails again and again (no thread here: error set by hand)
            host.backups[0].error = "RuntimeError: boom"
            host.offer({"replica_gen": 1, "backups": [{"rank": 0, "address": "inproc://a"}]})
        assert made == [0] * (1 + replica._RESTARTS) and host.restarts[0] == replica._RESTARTS
        assert host.stats()["0"]["restarts"] == replica._RESTARTS and host.stats()["0"]["error"] == "RuntimeError: boom"
        assert host.report()["0"][0] is False  # reported not ready: the coordinator does not promote it
    finally:
        del Backup.start
        host.close()
