"""An async checkpoint's cut (server/snapshot.py, coordinator/checkpoints.py): every server copies
its shard with the same pushes of each worker applied, however the pushes and the CHECKPOINT
interleave on each server, so a resumed job neither repeats nor loses a push."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from downpour.api import resolve_job
from downpour.config import parse_job
from downpour.coordinator import checkpoints
from downpour.coordinator.checkpointing import clock_margin
from downpour.launch import LocalLauncher
from downpour.layout import make_layout
from downpour.nn import attach
from downpour.protocol import Op
from downpour.server.snapshot import Snapshotter, load_shard_file
from downpour.server.sparse import SparseShard, sparse_file
from downpour.server.store import ShardStore
from tests.checkpoint_helpers import SHAPES, initialised, layout_of, read_raw, wait_reports
from tests.test_coordinator_state import JOB, SERVERS, WORKERS, Sim, ident
from tests.test_sparse_job import _ctr_job
from tests.test_sparse_prefetch import _batches as sparse_batches
from tests.test_sparse_prefetch import _cluster as sparse_cluster
from tests.test_sparse_prefetch import counting


class Server:
    """A server's handling of pushes around a checkpoint, as ParameterServer does it: a push past
    the cut is held, any other is applied; after each, the copy is taken once due, and then the
    held pushes are applied in the order they came."""

    def __init__(self, store: ShardStore, rank: int) -> None:
        self.store = store
        self.snap = Snapshotter(store, rank, "sgd", f"server-{rank}")
        self.positions: dict[str, list[int]] = {}
        self.members: set[str] = set()
        self.snap.members = lambda: self.members
        self.held: list[tuple[str, int, bool]] = []
        self.copied_at: int | None = None  # this server's version when its copy was taken

    def push(self, who: str, clock: int, whole: bool = True) -> str:
        if self.snap.holds(who, clock):
            self.held.append((who, clock, whole))
            self._take()
            return "held"
        self.store.apply(self.store.all, torch.full((self.store.numel,), 0.01 * clock))
        self.positions[who] = [0, 0, 32 * clock]
        self.snap.applied(who, clock, whole)
        self._take()
        return "applied"

    def checkpoint(self, name: str, url: str, at_clock: dict[str, int], timeout_s: float = 60.0) -> None:
        self.snap.request({"name": name, "url": url, "keep": 3, "at_clock": at_clock, "timeout_s": timeout_s}, self.positions)
        if self.snap.armed is None:
            self.copied_at = self.copied_at if self.copied_at is not None else self.snap.version()
            self._release()

    def _take(self) -> None:
        version = self.snap.version()
        if self.snap.armed is not None and self.snap.maybe_take(self.positions):
            self.copied_at = version
            self._release()

    def _release(self) -> None:
        held, self.held = self.held, []
        for who, clock, whole in held:
            self.push(who, clock, whole)


def two_servers() -> list[Server]:
    return [Server(st, r) for r, st in enumerate(initialised(layout_of(2)))]


def test_two_servers_a_push_apart_both_copy_after_the_same_push(url):
    a, b = two_servers()
    for clock in (1, 2, 3):
        a.push("worker-0", clock)
    for clock in (1, 2):  # push 3 is still on its way to b
        b.push("worker-0", clock)
    for s in (a, b):
        s.checkpoint("ckpt-cut", url, {"worker-0": 3})
    assert a.snap.armed is None and b.snap.armed is not None  # a holds push 3 whole: copied at once
    b.push("worker-0", 3)  # b copies right after it
    assert b.snap.armed is None
    assert a.push("worker-0", 4) == b.push("worker-0", 4) == "applied"  # the live shards go on
    reports = wait_reports([a.snap, b.snap])
    assert [r["positions"] for r in reports] == [{"worker-0": [0, 0, 96]}] * 2
    assert [r["version"] for r in reports] == [3, 3]


def test_a_push_past_the_cut_waits_for_the_copy_and_is_applied_right_after(url):
    [a, _] = two_servers()
    a.members = {"worker-0", "worker-1"}
    a.push("worker-0", 1)
    a.checkpoint("ckpt-hold", url, {"worker-0": 1, "worker-1": 1})
    assert a.push("worker-0", 2) == "held"  # worker-1 has not reached its push 1 here yet
    assert a.push("worker-1", 1) == "applied"  # the cut is complete: copy, then worker-0's push 2
    assert a.snap.armed is None and a.held == [] and a.snap.clocks["worker-0"] == (2, True)
    [ref, _] = two_servers()  # the same shard with only the pushes of the cut
    ref.push("worker-0", 1)
    ref.push("worker-1", 1)
    [report] = wait_reports([a.snap])
    tensors, _ = load_shard_file(read_raw(f"{url}/ckpt-hold/{report['file']}"), "here")
    assert torch.equal(tensors["values"], ref.store.data) and not torch.equal(tensors["values"], a.store.data)
    assert report["positions"] == {"worker-0": [0, 0, 32], "worker-1": [0, 0, 32]}


def test_a_push_split_into_several_requests_is_in_the_copy_once_the_next_push_arrives(url):
    [a, _] = two_servers()
    a.checkpoint("ckpt-split", url, {"worker-0": 1})
    a.push("worker-0", 1, whole=False)  # one request of push 1: others may follow
    assert a.snap.armed is not None
    assert a.push("worker-0", 2, whole=False) == "held"  # push 2 is sent only once push 1 was answered whole
    assert a.snap.armed is None and a.snap.clocks["worker-0"] == (2, False)
    assert wait_reports([a.snap])[0]["positions"] == {"worker-0": [0, 0, 32]}


def test_a_server_already_past_the_cut_says_missed_and_holds_nothing(url):
    [a, _] = two_servers()
    a.push("worker-0", 1)
    a.push("worker-0", 2)
    a.checkpoint("ckpt-late", url, {"worker-0": 1})
    assert a.snap.finished() == [{"name": "ckpt-late", "missed": True, "version": 2}]
    assert a.snap.armed is None and a.push("worker-0", 3) == "applied"


def test_a_worker_not_in_the_cut_waits_and_one_that_left_is_not_awaited(url):
    [a, _] = two_servers()
    a.members = {"worker-0", "worker-1"}
    a.checkpoint("ckpt-join", url, {"worker-0": 1, "worker-1": 5})
    assert a.push("worker-2", 1) == "held"  # joined after the cut was placed: none of its pushes are in it
    a.push("worker-0", 1)
    assert a.snap.armed is not None  # worker-1 is still a member that has not reached push 5
    a.members = {"worker-0"}  # it left (waits for a shard, or died): nothing more of it will come
    a._take()
    assert a.snap.armed is None and a.held == []
    assert wait_reports([a.snap])[0]["positions"] == {"worker-0": [0, 0, 32]}


def test_a_cut_not_reached_in_time_is_given_up_and_what_it_held_is_applied(url):
    [a, _] = two_servers()
    a.members = {"worker-0", "worker-1"}
    a.checkpoint("ckpt-stuck", url, {"worker-0": 0, "worker-1": 3}, timeout_s=0.01)
    assert a.push("worker-0", 1) == "held"
    assert not a.snap.expired(a.snap.armed.asked)
    assert a.snap.expired(a.snap.armed.asked + 1.0)
    [report] = a.snap.finished()
    assert report["name"] == "ckpt-stuck" and "worker-1" in report["error"]
    a._release()
    assert a.held == [] and a.snap.clocks["worker-0"] == (1, True)


def test_the_cut_is_placed_a_heartbeat_and_a_half_of_pushes_ahead():
    assert clock_margin(0.0, 1.0) == 3
    assert clock_margin(100.0, 0.2) == 43


def heartbeats(job) -> Sim:
    """A coordinator to which worker-i reported 100(i+1) pushes at 10(i+1) pushes/s."""
    sim = Sim(job)
    sim.start()
    for i, w in enumerate(WORKERS):
        sim.send(w, Op.HEARTBEAT, progress={"pushes": 100 * (i + 1), "examples": 3200 * (i + 1), "examples_per_s": 320.0 * (i + 1)})
    return sim


def test_without_a_probe_the_cut_is_placed_a_heartbeat_and_a_half_of_each_workers_pushes_ahead():
    # a heartbeat (0.5 s) and a half, plus 0.1 s, of each one's pushes, plus 3 (the servers' answers unknown)
    assert checkpoints.cut_clocks(heartbeats(JOB).state, 0) == {"worker-0": 100 + 11, "worker-1": 200 + 20, "worker-2": 300 + 28}


def test_an_ssp_cut_is_one_margin_past_where_each_worker_stands():
    # (the workers as far apart as they are: a cut within the bound of the lowest number would be behind
    # a worker whose count began before a replacement's, and every checkpoint would be abandoned)
    ssp = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "ssp", "staleness_bound": 3})})
    assert checkpoints.cut_clocks(heartbeats(ssp).state, 0) == {"worker-0": 128, "worker-1": 228, "worker-2": 328}


def test_a_worker_with_no_push_count_yet_is_left_out_of_an_async_cut_but_cut_at_0_under_ssp():
    # (a joiner: the servers hold the pushes of a worker outside the cut until the copy, and under ssp the
    # others wait for it, the slowest, so that none would reach the cut)
    ssp = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "ssp", "staleness_bound": 3})})
    for job, has in ((JOB, False), (ssp, True)):
        sim = heartbeats(job)
        sim.state.nodes["worker-2"].progress = {}
        cut = checkpoints.cut_clocks(sim.state, 0)
        assert ("worker-2" in cut) == has and (not has or 0 < cut["worker-2"] < 100), cut


def test_an_ssp_worker_joining_abandons_the_pending_checkpoint():
    from downpour.coordinator import failures, membership

    ssp = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "ssp", "staleness_bound": 3})})
    for job, abandoned in ((JOB, 0), (ssp, 1)):
        sim = heartbeats(job)
        sim.state.checkpoints.start_due = False
        checkpoints.begin(sim.state, 1.0)
        assert sim.state.checkpoints.pending is not None
        failures.lose(sim.state, 1.1, sim.state.nodes["worker-2"], "killed", "dead")
        sim.register("worker-2-new", "worker")
        membership.admit_joiners(sim.state, 1.2)
        assert "worker-2.2" in sim.state.nodes and sim.state.checkpoints.abandoned == abandoned
        assert (sim.state.checkpoints.pending is None) == bool(abandoned)


def test_the_coordinator_asks_the_servers_where_the_workers_stand_and_cuts_just_past_that():
    sim = heartbeats(JOB)
    sim.state.checkpoints.start_due = False
    probes = checkpoints.begin(sim.state, 1.0)
    assert sorted(r.to for r in probes) == sorted(ident(s) for s in SERVERS)
    [name] = {r.msg.meta["name"] for r in probes if r.msg.op == Op.CHECKPOINT and r.msg.meta["probe"]}
    # The heartbeats are up to one old: the servers have seen more pushes (each server its own).
    sim.now = 1.05
    first = sim.send(SERVERS[0], Op.REPORT, kind="checkpoint", data={"name": name, "probe": True,
                                                                      "clocks": {"worker-0": 104, "worker-1": 205}})
    assert [r.msg.op for r in first] == [Op.OK]  # (the report's answer) nothing asked before every server answered
    asked = sim.send(SERVERS[1], Op.REPORT, kind="checkpoint", data={"name": name, "probe": True,
                                                                      "clocks": {"worker-0": 103, "worker-1": 207, "worker-2": 301}})
    asked = [r for r in asked if r.msg.op == Op.CHECKPOINT]
    [at] = {json.dumps(r.msg.meta["at_clock"]) for r in asked}
    assert sorted(r.to for r in asked) == sorted(ident(s) for s in SERVERS) and asked[0].msg.meta["name"] == name
    # past the highest number either server saw, by twice the probe's round trip (0.05 s) of each one's pushes, plus 2
    assert json.loads(at) == {"worker-0": 104 + 3, "worker-1": 207 + 4, "worker-2": 301 + 5}


def test_a_server_answers_the_probe_with_the_highest_push_of_each_worker_it_has_seen(url):
    [a, _] = row_servers()
    a.members = {"worker-0", "worker-1"}
    a.push("worker-0", 3)
    a.rows("worker-0", 4)  # (push 4's request on its way here)
    a.push("worker-1", 2)
    a.snap.probe("ckpt-probe", [("worker-1", 5), ("worker-1", None)])  # worker-1's push 5 held for an earlier cut
    assert a.snap.finished() == [{"name": "ckpt-probe", "probe": True, "clocks": {"worker-0": 4, "worker-1": 5}}]
    assert a.snap.armed is None


# -- sparse-table rows in the cut ---------------------------------------------------------------
# A worker's step T produces its dense push T and row gradients that travel in a SPARSE request of
# its own, sent after that push (with the next batch's pull) and numbered T too (``meta.clock``).
# The copy must hold the rows of pushes 1..T_w exactly: a server holds SPARSE requests past T_w
# as it holds pushes, and takes the copy only once a later request of every worker is held (the
# rows of T_w come after push T_w, so push T_w applied is not enough).
COUNTING = {"optimizer": {"name": "sgd", "lr": 0.5}, "tables": {"count": {"optimizer": {"name": "sgd", "lr": 1.0}, "init_scale": 0.0}}}


class RowServer(Server):
    """A server with a sparse table ``count``: a worker's rows of push T add 1 to its own row."""

    def __init__(self, store: ShardStore, rank: int, layout) -> None:
        super().__init__(store, rank)
        self.rank = rank
        job = parse_job({"model": {"name": "mlp"}, "sparse": COUNTING})
        self.sparse = SparseShard(layout, rank, job.sparse, seed=0, max_keys=1000)
        self.snap.sparse = self.sparse
        ids = np.arange(200, dtype=np.int64)
        self.ids = ids[layout.sparse_servers(ids) == rank]

    def row(self, who: str) -> np.ndarray:
        return self.ids[WORKERS.index(who) : WORKERS.index(who) + 1]

    def rows(self, who: str, clock: int) -> str:
        if self.snap.holds(who, clock) or any(h[0] == who and h[1] == ("rows", clock) for h in self.held):
            self.held.append((who, ("rows", clock), True))
            self._take()
            return "held"
        self.sparse.tables["count"].pull(self.row(who))  # (a row exists once pulled)
        self.sparse.tables["count"].push(self.row(who), np.full((1, 1), -1.0, np.float32))
        self.snap.rows_applied(who, clock)
        self._take()
        return "applied"

    def count(self, who: str) -> float:
        return float(self.sparse.tables["count"].peek(self.row(who))[0, 0])

    def _release(self) -> None:
        held, self.held = self.held, []
        for who, clock, whole in held:
            if isinstance(clock, tuple):
                self.rows(who, clock[1])
            else:
                self.push(who, clock, whole)


def row_servers() -> list[RowServer]:
    layout = make_layout(SHAPES, 2, "f32", "bytes", 16, tables=[("count", 1)])
    return [RowServer(st, r, layout) for r, st in enumerate(initialised(layout))]


def copied_rows(url: str, name: str, server: RowServer) -> dict[str, float]:
    """Each worker's ``count`` row in ``server``'s sparse file of checkpoint ``name``."""
    tensors = st_load(read_raw(f"{url}/{name}/{sparse_file(server.rank)}"))
    rows = dict(zip(tensors["count/keys"].tolist(), tensors["count/values"][:, 0].tolist(), strict=True))
    return {w: rows.get(int(server.row(w)[0]), 0.0) for w in WORKERS[:2]}


def test_the_rows_of_a_workers_last_push_in_the_cut_are_copied_with_it_and_later_rows_wait(url):
    [a, _] = row_servers()
    a.members = {"worker-0"}
    a.checkpoint("ckpt-rows", url, {"worker-0": 2})
    for clock in (1, 2):
        assert a.push("worker-0", clock) == a.rows("worker-0", clock) == "applied"
        assert a.snap.armed is not None  # push 2 applied whole, but its rows might still be on their way
    assert a.push("worker-0", 3) == "held"  # sent after the rows of push 2: all of push 2 is here
    assert a.snap.armed is None and a.count("worker-0") == 2.0
    [report] = wait_reports([a.snap])
    assert report["version"] == 2 and copied_rows(url, "ckpt-rows", a)["worker-0"] == 2.0
    assert a.rows("worker-0", 3) == "applied" and a.count("worker-0") == 3.0


def test_two_servers_copy_the_same_pushes_of_rows_however_the_requests_interleave(url):
    a, b = row_servers()
    for s in (a, b):
        s.members = {"worker-0", "worker-1"}
        s.checkpoint("ckpt-both", url, {"worker-0": 2, "worker-1": 1})
    # a: worker-0 runs ahead; its rows of push 3 come while worker-1 has not reached the cut.
    for clock in (1, 2):
        a.push("worker-0", clock)
        a.rows("worker-0", clock)
    assert a.push("worker-0", 3) == a.rows("worker-0", 3) == "held"
    a.push("worker-1", 1)
    a.rows("worker-1", 1)
    assert a.snap.armed is not None
    assert a.push("worker-1", 2) == "held" and a.snap.armed is None
    # b: worker-1's rows of push 1 come last; worker-0's rows of push 2 come after its push 3.
    b.push("worker-1", 1)
    b.push("worker-0", 1)
    b.rows("worker-0", 1)
    b.push("worker-0", 2)
    assert b.push("worker-0", 3) == "held"
    assert b.rows("worker-0", 2) == "applied"  # (a worker settles a push's requests before the next)
    assert b.snap.armed is not None and b.rows("worker-1", 1) == "applied"
    assert b.rows("worker-1", 2) == "held" and b.snap.armed is None
    reports = wait_reports([a.snap, b.snap])
    assert [r["version"] for r in reports] == [3, 3]
    assert copied_rows(url, "ckpt-both", a) == copied_rows(url, "ckpt-both", b) == {"worker-0": 2.0, "worker-1": 1.0}
    assert a.held == b.held == [] and a.count("worker-0") == 3.0 and b.count("worker-1") == 2.0  # the held ones, after the copy


def test_a_server_whose_rows_are_past_the_cut_already_says_missed(url):
    [a, _] = row_servers()
    a.push("worker-0", 1)
    a.rows("worker-0", 1)
    a.rows("worker-0", 2)  # (push 2's request on its way to this server, its rows here)
    a.checkpoint("ckpt-late-rows", url, {"worker-0": 1})
    assert a.snap.finished() == [{"name": "ckpt-late-rows", "missed": True, "version": 1}]


def test_a_sync_cut_with_rows_waits_for_the_rows_of_its_round_and_holds_the_next(url):
    [a, _] = row_servers()
    a.members = {"worker-0"}
    a.snap.request({"name": "ckpt-sync-rows", "url": url, "keep": 3, "at_version": 2}, a.positions)
    a.push("worker-0", 1)
    a.rows("worker-0", 1)
    a.push("worker-0", 2)  # version 2: the round is in, the rows of it are not yet
    assert a.snap.armed is not None and a.snap.armed.at_clock == {"worker-0": 2}
    assert a.rows("worker-0", 2) == "applied" and a.push("worker-0", 3) == "held"
    assert a.snap.armed is None
    [report] = wait_reports([a.snap])
    assert report["version"] == 2 and copied_rows(url, "ckpt-sync-rows", a)["worker-0"] == 2.0


@pytest.mark.parametrize("ahead", [False, True], ids=["pulled-when-read", "pulled-ahead"])
def test_a_workers_row_gradients_carry_the_number_of_the_push_of_their_step(ahead):
    """The rows of step T travel after its dense push T (with a later batch's pull): the request
    says T, and a request without row gradients says nothing (it is never held)."""
    client, _ = sparse_cluster()
    pushes = [0]
    client.clock = lambda: pushes[0] + 1  # the number the worker's next dense push will carry
    sent: list[tuple[int, dict]] = []
    request = client.rpc.request

    def recording(peer, msg):
        sent.append((pushes[0], dict(msg.meta)))
        return request(peer, msg)

    client.rpc.request = recording
    model, batches = counting(), sparse_batches(6)
    attach(model, client)
    for i, ((dense, ids), y) in enumerate(batches):
        if ahead:
            client.prepare((dense, ids), batches[i + 1][0] if i + 1 < len(batches) else None)
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, ids), y).backward()
        client.after_backward()
        pushes[0] += 1  # the step's dense push
    client.flush()
    with_rows = [(made, meta) for made, meta in sent if any(n for _, n, _ in meta["tables"])]
    assert len(with_rows) >= 2 * len(batches)  # every step's rows, to both servers
    assert all(meta["clock"] == made for made, meta in with_rows)  # (sent after push `made`, of its step)
    assert all("clock" not in meta for made, meta in sent if (made, meta) not in with_rows)


def _counting_ctr_job(consistency: str = "async") -> dict:
    """The tiny CTR job with the counting model: ``count`` rows and two dense counters (one on
    each server) that add up the same occurrences, by the server keeping the IDs' rows."""
    # (worker-1 four times slower: the workers reach their cuts at their own rates)
    job = _ctr_job(consistency=consistency, epochs=3, slowdown={"factor": 4.0, "rank": 1})
    job["model"] = {"factory": "tests.ctr_factories:counting_wide_deep",
                    "args": {**job["model"]["args"], "dense_count": 1024.0, "count_servers": 2}}
    job["optimizer"] = {"name": "sgd", "lr": 2.0 ** -10}
    job["sparse"] = {"optimizer": {"name": "adagrad", "lr": 0.1},
                     "tables": {"count": {"optimizer": {"name": "sgd", "lr": 1.0}, "init_scale": 0.0}}}
    job["checkpoint"] = {"enabled": True, "every_steps": 12, "every_s": None, "at_start": False, "keep": 100,
                         "sparse_full_every": 3}
    return job


@pytest.mark.slow
@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_a_ctr_jobs_checkpoints_hold_the_rows_and_dense_values_of_the_same_pushes_on_both_servers(tmp_path, consistency):
    from downpour.serving.export import CheckpointState
    from downpour.storage import CheckpointStore

    summary = LocalLauncher(resolve_job(_counting_ctr_job(consistency)), str(tmp_path / "run")).run().summary
    assert summary["status"] == "ok"
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    seen = []
    for name in store.names():
        state = CheckpointState(store, store.manifest(name))
        keys, rows = state.tables["count"]
        per_server = np.bincount(state.layout.sparse_servers(keys), weights=rows[:, 0].astype(np.float64), minlength=2)
        head, tail = state.dense["head"], state.dense["tail.occurrences"]
        assert head.tolist() == tail.tolist(), (name, head, tail)  # both servers' dense values: the same pushes
        seen.append((name, per_server, head.astype(np.float64), store.manifest(name).job.get("needs")))
    # Each server's rows hold the occurrences of the pushes its dense counters hold. Async: exactly.
    # Sync: the dense counters' first rounds are scaled, so they differ from the rows by what they
    # differ at the end (rows a round behind would differ by that round's occurrences more).
    *_, (_, end_rows, end_dense, _) = seen
    for name, per_server, dense, _ in seen:
        want = 0.0 if consistency == "async" else end_rows - end_dense
        np.testing.assert_allclose(per_server - dense, want, atol=0.01, err_msg=name)
    assert any(0 < dense.sum() < 4 * 4000 * 3 for _, _, dense, _ in seen), seen  # taken while training
    assert any(needs for *_, needs in seen)  # some are deltas on earlier ones
