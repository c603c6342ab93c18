"""An async checkpoint's cut (server/snapshot.py, coordinator/checkpoints.py): every server copies
its shard with the same pushes of each worker applied, however the pushes and the CHECKPOINT
interleave on each server, so a resumed job neither repeats nor loses a push."""

from __future__ import annotations

import json

import torch

from downpour.coordinator import checkpoints
from downpour.coordinator.checkpointing import clock_margin
from downpour.protocol import Op
from downpour.server.snapshot import Snapshotter, load_shard_file
from downpour.server.store import ShardStore
from tests.checkpoint_helpers import initialised, layout_of, read_raw, wait_reports
from tests.test_coordinator_state import JOB, WORKERS, Sim


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


def cut_asked(job) -> dict[str, int]:
    """The push numbers a CHECKPOINT names when worker-i reported 100(i+1) pushes at 10(i+1) pushes/s."""
    sim = Sim(job)
    sim.start()
    for i, w in enumerate(WORKERS):
        sim.send(w, Op.HEARTBEAT, progress={"pushes": 100 * (i + 1), "examples": 3200 * (i + 1), "examples_per_s": 320.0 * (i + 1)})
    [at] = {json.dumps(r.msg.meta["at_clock"]) for r in checkpoints.begin(sim.state, 1.0)}
    return json.loads(at)


def test_the_coordinator_places_each_workers_cut_ahead_of_it_at_its_own_push_rate():
    # a heartbeat (0.5 s) and a half, plus 0.1 s, of each one's pushes, plus 3
    assert cut_asked(JOB) == {"worker-0": 100 + 11, "worker-1": 200 + 20, "worker-2": 300 + 28}


def test_an_ssp_cut_keeps_the_workers_within_the_staleness_bound_of_each_other():
    ssp = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "ssp", "staleness_bound": 3})})
    assert cut_asked(ssp) == {"worker-0": 128, "worker-1": 131, "worker-2": 131}
