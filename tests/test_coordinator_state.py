"""The coordinator's state machine, driven by hand with a fake clock and fake identities."""

from __future__ import annotations

import pytest

from downpour.config import parse_job
from downpour.coordinator.membership import shard_wait_s
from downpour.coordinator.state import CoordinatorState, Finish, Reply, SaveModel
from downpour.layout import Layout, make_layout
from downpour.models import build_model, param_shapes
from downpour.protocol import Message, Op

NUM_TRAIN = 10  # shards of 4: three shards per epoch (4, 4, 2 examples)
JOB = parse_job({
    "name": "tiny",
    "model": {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}},
    "data": {"shard_size": 4},
    "training": {"epochs": 2},
    "cluster": {"num_servers": 2, "num_workers": 3, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0,
                "startup_timeout_s": 60.0},
})
LAYOUT = make_layout(param_shapes(build_model(JOB.model, 0)), 2)
# The same job where a lost worker stops the job (cluster.on_worker_failure: fail).
FAIL_JOB = JOB.model_copy(update={"cluster": JOB.cluster.model_copy(update={"on_worker_failure": "fail"})})
SERVERS = [f"server-{i}" for i in range(2)]
WORKERS = [f"worker-{i}" for i in range(3)]


def ident(name: str) -> bytes:
    return f"id-{name}".encode()


class Sim:
    """A CoordinatorState, a clock, and helpers that speak for the nodes."""

    def __init__(self, job=JOB) -> None:
        self.now = 0.0
        self.state = CoordinatorState(job, LAYOUT, NUM_TRAIN, self.now)
        self.req = 0

    def send(self, who: str, op: Op, **meta) -> list:
        self.req += 1
        if op not in (Op.REGISTER, Op.STATUS):
            meta.setdefault("node", who)
        return self.state.handle(ident(who), Message(op, self.req, meta), self.now)

    def tick(self, now: float) -> list:
        self.now = now
        return self.state.tick(now)

    def register(self, who: str, role: str, rank: int | None = None) -> list:
        address = f"tcp://127.0.0.1:{6000 + len(self.state.nodes)}" if role == "server" else None
        return self.send(who, Op.REGISTER, role=role, rank=rank, address=address, host="test", pid=123)

    def start(self) -> list:
        """Register every server and worker (in rank order); returns all actions."""
        out = []
        for i, s in enumerate(SERVERS):
            out += self.register(s, "server", i)
        for i, w in enumerate(WORKERS):
            out += self.register(w, "worker", i)
        assert self.state.phase == "training"
        return out

    def train(self) -> None:
        """Start, pass the init barrier, train every shard, and finish training; rank 0 evaluates."""
        self.start()
        for w in WORKERS:
            self.send(w, Op.BARRIER, name="init")
        while (shard := one(self.send(WORKERS[0], Op.NEXT_SHARD)).msg.meta["shard"]) is not None:
            self.send(WORKERS[0], Op.SHARD_DONE, epoch=shard["epoch"], shard=shard["shard"], examples=shard["stop"] - shard["start"])
        for i, w in enumerate(WORKERS):
            self.send(w, Op.WORKER_DONE, stats={"examples": 100 * (i + 1), "steps": 10 * (i + 1)})
        assert self.state.phase == "evaluating"


def replies(actions: list, to: str | None = None) -> list[Reply]:
    return [a for a in actions if isinstance(a, Reply) and (to is None or a.to == ident(to))]


def one(actions: list, to: str | None = None) -> Reply:
    [r] = replies(actions, to)
    return r


def finishes(actions: list) -> list[Finish]:
    return [a for a in actions if isinstance(a, Finish)]


def ok(r: Reply) -> dict:
    assert r.msg.op == Op.OK, r.msg.meta
    return r.msg.meta


def error_code(r: Reply) -> str:
    assert r.msg.op == Op.ERROR
    return r.msg.meta["code"]


# -- registration -----------------------------------------------------------------


def test_a_server_is_answered_at_once_with_its_rank_job_and_layout():
    sim = Sim()
    meta = ok(one(sim.register("s", "server")))
    assert meta["node"] == "server-0" and meta["rank"] == 0
    assert parse_job(meta["job"]) == JOB
    assert Layout.from_dict(meta["layout"]) == LAYOUT
    assert sim.state.phase == "registering"


def test_a_worker_is_answered_only_once_every_node_registered():
    sim = Sim()
    for i, w in enumerate(WORKERS):
        assert replies(sim.register(w, "worker", i)) == []
    sim.register(SERVERS[0], "server", 0)
    out = sim.register(SERVERS[1], "server", 1)
    assert sim.state.phase == "training"
    servers = [{"rank": i, "name": s, "address": f"tcp://127.0.0.1:{6003 + i}", "pid": 123} for i, s in enumerate(SERVERS)]
    for i, w in enumerate(WORKERS):
        meta = ok(one(out, w))
        assert meta["node"] == w and meta["rank"] == i
        assert meta["servers"] == servers
        assert meta["initializer"] is (i == 0)
        assert Layout.from_dict(meta["layout"]) == LAYOUT and parse_job(meta["job"]) == JOB


def test_once_training_starts_every_server_is_told_the_membership():
    out = Sim().start()
    for s in SERVERS:
        membership = [r.msg for r in replies(out, s) if r.msg.op == Op.MEMBERSHIP]
        assert [m.meta for m in membership] == [{"workers": WORKERS}]


def test_requested_ranks_are_honoured_and_a_taken_rank_gets_a_free_one():
    sim = Sim()
    sim.register("a", "worker", 2)
    sim.register("b", "worker", 2)
    sim.register("c", "worker", None)
    assert {n.name for n in sim.state.nodes.values()} == {"worker-2", "worker-0", "worker-1"}
    assert sim.state.nodes["worker-2"].identity == ident("a")
    assert ok(one(sim.register("s", "server", 1)))["node"] == "server-1"


def test_a_fourth_worker_is_refused_as_job_full():
    sim = Sim()
    for w in WORKERS:
        sim.register(w, "worker")
    assert error_code(one(sim.register("extra", "worker"))) == "job_full"


def test_a_node_registering_after_the_start_is_refused():
    sim = Sim()
    sim.start()
    assert error_code(one(sim.register("late", "server"))) == "job_running"


@pytest.mark.parametrize(("role", "address", "code"), [("ps", "tcp://x:1", "bad_role"), ("server", None, "bad_address")])
def test_a_bad_registration_is_refused(role, address, code):
    sim = Sim()
    out = sim.send("x", Op.REGISTER, role=role, rank=None, address=address)
    assert error_code(one(out)) == code and sim.state.nodes == {}


def test_a_request_from_an_unregistered_node_is_refused():
    assert error_code(one(Sim().send("ghost", Op.HEARTBEAT))) == "unknown_node"


def test_status_answers_anyone():
    meta = ok(one(Sim().send("cli", Op.STATUS)))
    assert meta["phase"] == "registering" and meta["planned_examples"] == NUM_TRAIN * 2


# -- training -------------------------------------------------------------------------


def test_the_init_barrier_releases_only_when_every_live_worker_arrived():
    sim = Sim()
    sim.start()
    assert replies(sim.send(WORKERS[0], Op.BARRIER, name="init")) == []
    assert replies(sim.send(WORKERS[1], Op.BARRIER, name="init")) == []
    out = sim.send(WORKERS[2], Op.BARRIER, name="init")
    assert sorted(r.to for r in replies(out)) == sorted(ident(w) for w in WORKERS)
    assert all(r.msg.op == Op.OK for r in replies(out))


def test_a_barrier_waits_only_for_workers_still_training():
    sim = Sim()
    sim.start()
    sim.send(WORKERS[0], Op.BARRIER, name="b")
    sim.send(WORKERS[1], Op.BARRIER, name="b")
    out = sim.send(WORKERS[2], Op.WORKER_DONE, stats={})
    assert sorted(r.to for r in replies(out) if r.msg.op == Op.OK) == [ident(WORKERS[0]), ident(WORKERS[1])]


def test_every_shard_of_every_epoch_is_handed_out_exactly_once_then_none():
    sim = Sim()
    sim.start()
    handed = []
    holds: dict[str, dict] = {}
    for turn in range(20):
        w = WORKERS[turn % 3]
        if w in holds and turn < 6:  # a worker asks for its next shard once it finished the last one
            done = holds.pop(w)
            ok(one(sim.send(w, Op.SHARD_DONE, epoch=done["epoch"], shard=done["shard"], examples=1)))
        shard = ok(one(sim.send(w, Op.NEXT_SHARD), to=w))["shard"]
        if turn >= 6:  # asking again while it holds one (its answer was lost): the same shard
            assert shard == holds[w]
            continue
        handed.append((shard["epoch"], shard["shard"], w))
        holds[w] = shard
        assert (shard["start"], shard["stop"]) == [(0, 4), (4, 8), (8, 10)][shard["shard"]]
    assert sorted((e, s) for e, s, _ in handed) == [(e, s) for e in range(2) for s in range(3)]
    assert [e for e, _, _ in handed] == [0, 0, 0, 1, 1, 1]  # one epoch after the other
    # All handed out but not all done: a worker asking now is told to wait (one may come back).
    done = holds.pop(WORKERS[0])
    ok(one(sim.send(WORKERS[0], Op.SHARD_DONE, epoch=done["epoch"], shard=done["shard"], examples=1)))
    assert ok(one(sim.send(WORKERS[0], Op.SHARD_DONE, epoch=done["epoch"], shard=done["shard"], examples=1))) == {}  # a repeat
    # The request waits at the coordinator (parked), answered when something changes or after a while.
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0])
    waiting = ok(one(sim.tick(sim.now + shard_wait_s(sim.state) + 0.01), to=WORKERS[0]))
    assert waiting["shard"] is None and waiting["wait_s"] > 0
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0])  # it asks again: parked again
    left = [(e, s, w) for e, s, w in handed if w != WORKERS[0] or (e, s) != (done["epoch"], done["shard"])]
    for e, s, w in left[:-1]:
        sim.send(w, Op.SHARD_DONE, epoch=e, shard=s, examples=4)
        assert WORKERS[0] in sim.state.shard_waiters  # still parked: a shard is still held
    # The last shard done answers the parked request at once: training is over for it.
    e, s, w = left[-1]
    out = sim.send(w, Op.SHARD_DONE, epoch=e, shard=s, examples=4)
    final = ok(one(out, to=WORKERS[0]))
    assert final["shard"] is None and "wait_s" not in final
    assert not sim.state.shard_waiters


ONE_EPOCH = JOB.model_copy(update={"training": JOB.training.model_copy(update={"epochs": 1})})


def _one_shard_each(sim: Sim) -> dict[str, dict]:
    """Start a one-epoch job (three shards) and hand each worker one."""
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    return {w: ok(one(sim.send(w, Op.NEXT_SHARD), to=w))["shard"] for w in WORKERS}


def test_a_parked_shard_request_gets_the_shard_of_a_worker_that_died():
    sim = Sim(ONE_EPOCH)
    held = _one_shard_each(sim)
    mine = held[WORKERS[0]]
    ok(one(sim.send(WORKERS[0], Op.SHARD_DONE, epoch=mine["epoch"], shard=mine["shard"], examples=4)))
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0])  # parked: others still hold shards
    # worker-1 goes silent; the others keep heartbeating. Its death puts its shard back, and the
    # parked request gets it in the same tick.
    for t in (0.8, 1.6, 2.4, 3.2, 4.0, 4.8):
        sim.now = t
        for name in [*SERVERS, WORKERS[0], WORKERS[2]]:
            sim.send(name, Op.HEARTBEAT)
        assert not replies(sim.tick(t), to=WORKERS[0])  # a heartbeat or a tick inside the wait: still parked
        assert WORKERS[0] in sim.state.shard_waiters
        sim.send(WORKERS[0], Op.NEXT_SHARD)  # the worker's own repeat (told to wait) replaces the parked one
    got = ok(one(sim.tick(5.5), to=WORKERS[0]))
    assert got["shard"] == held[WORKERS[1]]
    assert sim.state.ledger.assigned[(mine["epoch"], held[WORKERS[1]]["shard"])] == WORKERS[0]


def test_a_parked_shard_request_is_answered_at_a_graceful_stop_and_when_the_job_fails():
    sim = Sim(ONE_EPOCH)
    held = _one_shard_each(sim)
    mine = held[WORKERS[0]]
    sim.send(WORKERS[0], Op.SHARD_DONE, epoch=mine["epoch"], shard=mine["shard"], examples=4)
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0])
    # A graceful stop: the worker must see its leave order (a heartbeat's), so it is told to wait, not parked.
    answer = ok(one(sim.state.request_stop(sim.now), to=WORKERS[0]))
    assert answer["shard"] is None and answer["wait_s"] > 0
    assert ok(one(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0]))["wait_s"] > 0  # and not parked again

    # A failed job answers every parked request with the failure.
    sim = Sim(ONE_EPOCH)
    mine = _one_shard_each(sim)[WORKERS[0]]
    sim.send(WORKERS[0], Op.SHARD_DONE, epoch=mine["epoch"], shard=mine["shard"], examples=4)
    sim.send(WORKERS[0], Op.NEXT_SHARD)
    out = sim.send(SERVERS[0], Op.REPORT, kind="error", data={"error": "disk full"})
    assert sim.state.phase == "failed"
    assert error_code(one(out, WORKERS[0])) == "job_failed" and not sim.state.shard_waiters


def test_next_shard_reports_the_finished_shard_and_hands_out_the_next_in_one_request():
    sim = Sim(ONE_EPOCH)
    held = _one_shard_each(sim)
    mine = held[WORKERS[0]]
    done = [mine["epoch"], mine["shard"], 4]
    before = len(sim.state.ledger.journal)
    # A shard it never held: refused, and nothing handed out or recorded.
    other = held[WORKERS[1]]
    assert error_code(one(sim.send(WORKERS[0], Op.NEXT_SHARD, done=[other["epoch"], other["shard"], 4]))) == "bad_shard"
    assert len(sim.state.ledger.journal) == before and not sim.state.shard_waiters
    # Its own: recorded as done; nothing is left to hand out while others train, so it waits.
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD, done=done), to=WORKERS[0])
    assert (mine["epoch"], mine["shard"]) in sim.state.ledger.completed
    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD, done=done), to=WORKERS[0])  # a repeat: harmless
    # The last two shards reported the same way end training for everyone waiting.
    assert not replies(sim.send(WORKERS[1], Op.NEXT_SHARD, done=[other["epoch"], other["shard"], 4]), to=WORKERS[1])
    last = held[WORKERS[2]]
    out = sim.send(WORKERS[2], Op.NEXT_SHARD, done=[last["epoch"], last["shard"], 2])
    assert {r.to: r.msg.meta for r in replies(out) if r.msg.op == Op.OK} == {ident(w): {"shard": None} for w in WORKERS}
    assert sim.state.ledger.complete()


@pytest.mark.parametrize("done", [[0, 1], [0, 1, 2, 3], [-1, 0, 4], ["0", 0, 4], 7])
def test_a_malformed_done_is_refused_as_invalid(done):
    sim = Sim(ONE_EPOCH)
    _one_shard_each(sim)
    assert error_code(one(sim.send(WORKERS[0], Op.NEXT_SHARD, done=done))) == "invalid"


def test_no_shard_is_handed_out_before_training():
    sim = Sim()
    sim.register(SERVERS[0], "server")
    assert ok(one(sim.send(SERVERS[0], Op.NEXT_SHARD)))["shard"] is None


def test_shard_done_is_accepted_only_from_the_worker_that_was_assigned_it_and_a_repeat_changes_nothing():
    sim = Sim()
    sim.start()
    shard = ok(one(sim.send(WORKERS[0], Op.NEXT_SHARD)))["shard"]
    where = {"epoch": shard["epoch"], "shard": shard["shard"], "examples": 4}
    assert error_code(one(sim.send(WORKERS[1], Op.SHARD_DONE, **where))) == "bad_shard"
    ok(one(sim.send(WORKERS[0], Op.SHARD_DONE, **where)))
    before = (dict(sim.state.ledger.assigned), dict(sim.state.ledger.completed), len(sim.state.ledger.journal))
    ok(one(sim.send(WORKERS[0], Op.SHARD_DONE, **where)))  # its answer was lost, so it asks again
    assert (sim.state.ledger.assigned, sim.state.ledger.completed, len(sim.state.ledger.journal)) == before
    assert error_code(one(sim.send(WORKERS[1], Op.SHARD_DONE, **where))) == "bad_shard"


@pytest.mark.parametrize(("where", "code"), [({"epoch": 0, "shard": 2}, "bad_shard"), ({"epoch": 5, "shard": 0}, "bad_shard"),
                                           ({"epoch": "0", "shard": 0}, "invalid"), ({}, "invalid")], ids=repr)
def test_shard_done_for_a_shard_never_assigned_is_an_error(where, code):
    sim = Sim()
    sim.start()
    assert error_code(one(sim.send(WORKERS[0], Op.SHARD_DONE, **where))) == code


def test_worker_done_answers_nobody_until_every_worker_is_done_then_exactly_one_evaluates():
    sim = Sim()
    sim.start()
    for w in (WORKERS[2], WORKERS[0]):
        assert [r for r in replies(sim.send(w, Op.WORKER_DONE, stats={})) if r.msg.op == Op.OK] == []
    out = sim.send(WORKERS[1], Op.WORKER_DONE, stats={})
    answers = {r.to: ok(r)["evaluate"] for r in replies(out) if r.msg.op == Op.OK}
    assert answers == {ident(WORKERS[0]): True, ident(WORKERS[1]): False, ident(WORKERS[2]): False}
    assert sim.state.phase == "evaluating"


def test_each_worker_done_shrinks_the_servers_membership():
    sim = Sim()
    sim.start()
    out = sim.send(WORKERS[1], Op.WORKER_DONE, stats={})
    for s in SERVERS:
        assert [r.msg.meta for r in replies(out, s) if r.msg.op == Op.MEMBERSHIP] == [{"workers": [WORKERS[0], WORKERS[2]]}]


# -- the end of a job ---------------------------------------------------------------------


def test_the_eval_report_moves_to_stopping_and_servers_heartbeats_are_told_to_stop():
    sim = Sim()
    sim.train()
    assert ok(one(sim.send(WORKERS[0], Op.HEARTBEAT))) == {}
    ok(one(sim.send(WORKERS[0], Op.REPORT, kind="eval", data={"test_accuracy": 0.875, "test_loss": 0.4})))
    assert sim.state.phase == "stopping"
    for s in SERVERS:
        assert ok(one(sim.send(s, Op.HEARTBEAT, progress={"pushes": 5})))["stop"]


def test_once_every_server_reported_the_job_finishes_with_a_summary():
    sim = Sim()
    sim.train()
    sim.send(WORKERS[0], Op.REPORT, kind="eval", data={"test_accuracy": 0.875, "test_loss": 0.4})
    assert finishes(sim.send(SERVERS[0], Op.REPORT, kind="server", data={"staleness_histogram": {"0": 3, "2": 1}})) == []
    sim.now = 12.0
    [finish] = finishes(sim.send(SERVERS[1], Op.REPORT, kind="server", data={"staleness_histogram": {"0": 1, "1": 3}}))
    assert finish.code == 0 and sim.state.phase == "finished"
    s = finish.summary
    assert s["status"] == "ok" and s["error"] is None and s["job"] == "tiny"
    assert s["test_accuracy"] == 0.875 and s["test_loss"] == 0.4
    assert s["examples"] == 600 and s["steps"] == 60
    assert s["num_servers"] == 2 and s["num_workers"] == 3 and s["consistency"] == "async"
    assert s["staleness"]["pushes"] == 8 and s["staleness"]["histogram"] == {"0": 4, "1": 3, "2": 1}
    assert s["staleness"]["mean"] == pytest.approx(5 / 8) and s["staleness"]["max"] == 2
    assert s["data_shards"]["completed_per_epoch"] == {"0": 3, "1": 3} and s["data_shards"]["unfinished"] == 0
    assert set(s["workers"]) == set(WORKERS) and set(s["servers"]) == set(SERVERS)
    assert s["wall_s"] == 12.0


# -- failures ----------------------------------------------------------------------------


def test_a_node_silent_past_the_heartbeat_timeout_fails_the_job_naming_it():
    sim = Sim(FAIL_JOB)
    sim.start()
    sim.now = 3.0
    for name in [*SERVERS, WORKERS[0], WORKERS[2]]:
        sim.send(name, Op.HEARTBEAT)
    assert sim.tick(4.9) == [] and sim.state.phase == "training"
    sim.tick(5.5)
    assert sim.state.phase == "failed" and sim.state.failed_node == WORKERS[1]
    for name in [*SERVERS, WORKERS[0], WORKERS[2]]:  # everyone else hears "stop" on the next heartbeat
        assert WORKERS[1] in ok(one(sim.send(name, Op.HEARTBEAT)))["stop"]
    [finish] = finishes(sim.tick(5.6))
    assert finish.code == 1
    assert finish.summary["status"] == "failed" and finish.summary["failed_node"] == WORKERS[1]
    assert WORKERS[1] in finish.summary["error"] and "heartbeat" in finish.summary["error"]


def test_a_failed_job_finishes_at_its_deadline_even_if_nodes_never_hear_stop():
    sim = Sim()
    sim.start()
    sim.tick(6.0)
    assert sim.state.phase == "failed"
    assert finishes(sim.tick(6.1)) == []
    [finish] = finishes(sim.tick(6.0 + 3 * 0.5 + 1.0))
    assert finish.code == 1


def test_waiting_requests_are_answered_with_job_failed_when_the_job_fails():
    sim = Sim(FAIL_JOB)
    sim.start()
    sim.send(WORKERS[0], Op.BARRIER, name="init")
    out = sim.send(WORKERS[1], Op.REPORT, kind="error", data={"error": "out of memory"})
    assert error_code(one(out, WORKERS[0])) == "job_failed"


def test_after_a_failure_a_survivor_told_no_shard_cannot_take_the_job_on_to_its_evaluation():
    """The survivors of a failure get no shard; one that then says it finished training, or waits at a
    barrier, is answered that the job failed: the job stays failed (exit 1), nothing is evaluated."""
    sim = Sim(FAIL_JOB)
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    sim.send(WORKERS[1], Op.REPORT, kind="error", data={"error": "out of memory"})
    assert ok(one(sim.send(WORKERS[0], Op.NEXT_SHARD)))["shard"] is None
    assert error_code(one(sim.send(WORKERS[0], Op.WORKER_DONE, stats={}))) == "job_failed"
    assert error_code(one(sim.send(WORKERS[2], Op.BARRIER, name="epoch-1"))) == "job_failed"
    assert sim.state.phase == "failed" and sim.state.evaluator is None
    for name in [*SERVERS, WORKERS[0], WORKERS[2]]:
        sim.send(name, Op.HEARTBEAT)
    [finish] = finishes(sim.tick(0.1))
    assert finish.code == 1 and finish.summary["status"] == "failed"


def test_registration_past_the_startup_timeout_fails_naming_the_counts():
    sim = Sim()
    sim.register(SERVERS[0], "server")
    sim.register(WORKERS[0], "worker")
    sim.register(WORKERS[1], "worker")
    for t in range(4, 61, 4):  # the server keeps heartbeating: only the start is late
        sim.now = float(t)
        sim.send(SERVERS[0], Op.HEARTBEAT)
        assert sim.tick(float(t)) == []
    out = sim.tick(61.0)
    assert sim.state.phase == "failed" and sim.state.failed_node == "coordinator"
    assert "1/2 servers" in sim.state.error and "2/3 workers" in sim.state.error
    assert {r.to for r in replies(out)} == {ident(WORKERS[0]), ident(WORKERS[1])}  # parked registrations hear why
    assert all(error_code(r) == "job_failed" for r in replies(out))


def test_a_server_silent_during_registration_fails_the_job():
    sim = Sim()
    sim.register(SERVERS[0], "server")
    sim.tick(5.5)
    assert sim.state.phase == "failed" and sim.state.failed_node == SERVERS[0]


def test_an_error_report_fails_the_job_naming_the_node_and_its_error():
    sim = Sim(FAIL_JOB)
    sim.start()
    ok(one(sim.send(WORKERS[2], Op.REPORT, kind="error", data={"error": "CUDA out of memory"})))
    assert sim.state.phase == "failed" and sim.state.failed_node == WORKERS[2]
    assert sim.state.error == f"{WORKERS[2]}: CUDA out of memory"
    assert WORKERS[2] in ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))["stop"]


def test_a_job_whose_evaluation_fails_after_training_still_saves_the_trained_model():
    sim = Sim(FAIL_JOB)
    sim.train()  # every shard trained; rank 0 evaluates
    out = sim.send(WORKERS[0], Op.REPORT, kind="error", data={"error": "the test split is damaged"})
    assert sim.state.phase == "failed"
    saves = [a for a in out if isinstance(a, SaveModel)]
    assert len(saves) == 1 and {s["name"] for s in saves[0].servers} == set(SERVERS)


def test_a_job_that_fails_while_training_or_with_a_server_lost_saves_no_model():
    sim = Sim(FAIL_JOB)
    sim.start()
    out = sim.send(WORKERS[1], Op.REPORT, kind="error", data={"error": "out of memory"})
    assert sim.state.phase == "failed" and not [a for a in out if isinstance(a, SaveModel)]
    sim = Sim(FAIL_JOB)
    sim.train()
    out = sim.send(SERVERS[1], Op.REPORT, kind="error", data={"error": "disk full"})  # its parameters are gone
    assert sim.state.phase == "failed" and not [a for a in out if isinstance(a, SaveModel)]


def test_only_the_first_failure_is_reported():
    sim = Sim(FAIL_JOB)
    sim.start()
    sim.send(WORKERS[2], Op.REPORT, kind="error", data={"error": "first"})
    sim.send(WORKERS[1], Op.REPORT, kind="error", data={"error": "second"})
    assert sim.state.failed_node == WORKERS[2] and sim.state.error.endswith("first")


def test_a_servers_heartbeat_answer_repeats_who_trains():
    sim = Sim()
    sim.start()
    assert ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))["workers"] == WORKERS
    sim.send(WORKERS[1], Op.WORKER_DONE, stats={})
    assert ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))["workers"] == [WORKERS[0], WORKERS[2]]


def test_the_launchers_abort_fails_the_job_and_its_summary_says_why():
    sim = Sim()
    sim.start()
    [ok] = sim.state.handle(ident("launcher"), Message(Op.ABORT, 1, {"reason": "every worker process has died", "node": "worker-1"}), 0.5)
    assert ok.msg.op == Op.OK and sim.state.phase == "failed"
    assert sim.state.error == "worker-1: every worker process has died" and sim.state.failed_node == "worker-1"
    [done] = finishes(sim.tick(60.0))
    assert done.code == 1 and done.summary["status"] != "ok" and "every worker process has died" in done.summary["error"]


@pytest.mark.parametrize("role", ["worker", "server", "unknown"])
def test_only_the_launchers_key_may_abort_a_job(role):
    sim = Sim()
    sim.start()
    [refused] = sim.state.handle(ident("x"), Message(Op.ABORT, 1, {"reason": "no"}), 0.5, role)
    assert refused.msg.op == Op.ERROR and refused.msg.meta["code"] == "forbidden" and sim.state.phase == "training"
    [refused] = sim.state.handle(ident("x"), Message(Op.ABORT, 2, {"reason": 7}), 0.5)  # (checked like any request)
    assert refused.msg.meta["code"] == "invalid" and sim.state.phase == "training"


@pytest.mark.parametrize("steps, planned", [(None, None), (10, 10 * 32 * 3)])
def test_a_stream_jobs_status_plans_no_examples_unless_its_steps_end_it(steps, planned):
    from downpour.config import STREAM_SPAN

    job = parse_job({**{k: v for k, v in JOB.model_dump(mode="json").items() if k in ("name", "model", "cluster")},
                     "data": {"name": "stream", "url": "file:///tmp/nowhere.jsonl"}, "training": {"steps": steps}})
    state = CoordinatorState(job, LAYOUT, 2 * STREAM_SPAN, 0.0)
    assert state.status(0.0)["planned_examples"] == planned
