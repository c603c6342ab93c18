"""A coordinator that dies is restarted and picks up the running job from its saved state.

The state machine is tested with a fake clock (Sim): its state goes through the SQLite store
into a fresh CoordinatorState, the nodes repeat what the old one had not answered, and the job
ends with every shard trained once. The end-to-end tests SIGKILL the coordinator of a real
`downpour train` job (and, in the chaos test, workers and a server too).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import yaml

from downpour.config import job_to_dict
from downpour.coordinator.client import ATTEMPT_S
from downpour.coordinator.persist import STATE_FILE, StateStore, adopt_state, export_state, open_store
from downpour.coordinator.state import CoordinatorState
from downpour.errors import ConfigError
from downpour.protocol import Op
from tests.cluster import QUIET, query_status, start_job, stop_job, wait_training
from tests.conftest import tiny_job
from tests.test_coordinator_state import JOB, LAYOUT, NUM_TRAIN, SERVERS, WORKERS, Sim, error_code, ident, ok, one, replies


def restarted(sim: Sim, tmp_path, at: float) -> Sim:
    """The coordinator dies and another takes over from the state the first one saved."""
    store = StateStore(str(tmp_path / STATE_FILE))
    store.save(export_state(sim.state, sim.now), sim.state.ledger.journal)
    store.close()
    again = Sim()
    again.now = at
    again.state = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, at)
    store, parts = open_store(str(tmp_path), recover=True)
    adopt_state(again.state, parts, at, lost_at=time.time())
    store.close()
    again.req = sim.req
    return again


def ledger_view(ledger) -> tuple:
    """Everything a ledger holds (to compare two)."""
    return (ledger.epoch, list(ledger.queue), ledger.assigned, ledger.completed, ledger.skips, ledger.base_skip,
            ledger.log, ledger.handed_at, ledger.requeued, ledger.released)


def training() -> Sim:
    """A job whose nodes all registered and passed the init barrier."""
    sim = Sim()
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    return sim


def shard_of(actions: list, who: str) -> dict | None:
    return ok(one(actions, to=who))["shard"]


def test_a_restarted_coordinator_continues_the_job_and_every_shard_is_trained_once(tmp_path):
    sim = training()
    first = shard_of(sim.send(WORKERS[0], Op.NEXT_SHARD), WORKERS[0])
    sim.send(WORKERS[0], Op.SHARD_DONE, epoch=first["epoch"], shard=first["shard"], examples=4)
    held = shard_of(sim.send(WORKERS[1], Op.NEXT_SHARD), WORKERS[1])
    sim.send(WORKERS[2], Op.HEARTBEAT, progress={"steps": 7, "examples": 224})
    before = ledger_view(sim.state.ledger)

    sim = restarted(sim, tmp_path, at=2.0)
    st = sim.state
    assert st.phase == "training" and st.restarts == 1 and ledger_view(st.ledger) == before
    assert {n.name: n.state for n in st.nodes.values()} == {**dict.fromkeys(SERVERS + WORKERS, "alive")}
    assert st.nodes[WORKERS[2]].progress["steps"] == 7
    # The worker whose NEXT_SHARD answer was lost asks again: the same shard, not a second one.
    assert shard_of(sim.send(WORKERS[1], Op.NEXT_SHARD), WORKERS[1]) == held
    [failure] = st.failures
    assert failure.node == "coordinator"
    assert failure.recovered_after_s is not None  # worker-1 got an answer: it serves again
    assert failure.reconnected_after_s is None and failure.detected_after_s is not None
    for who in SERVERS + [WORKERS[0], WORKERS[2]]:
        sim.send(who, Op.HEARTBEAT)
    assert failure.reconnected_after_s is not None

    # Train the rest; workers finish their shard before asking for the next. A NEXT_SHARD with
    # nothing to hand out yet waits at the coordinator: its answer comes with a later request's.
    holds, asking, finished = {WORKERS[1]: held}, set(), set()

    def answers(actions: list) -> None:
        for r in replies(actions):
            who = r.to.decode().removeprefix("id-")
            if who in asking and "shard" in r.msg.meta:
                asking.discard(who)
                if r.msg.meta["shard"] is not None:
                    holds[who] = r.msg.meta["shard"]
                elif "wait_s" not in r.msg.meta:
                    finished.add(who)

    for _ in range(100):
        if finished == set(WORKERS):
            break
        for w in WORKERS:
            if w in asking or w in finished:
                continue
            if w in holds:
                s = holds.pop(w)
                answers(sim.send(w, Op.SHARD_DONE, epoch=s["epoch"], shard=s["shard"], examples=4))
            asking.add(w)
            answers(sim.send(w, Op.NEXT_SHARD))
    assert finished == set(WORKERS) and not holds
    assert st.ledger.summary()["completed_per_epoch"] == {"0": 3, "1": 3} and st.ledger.summary()["unfinished"] == 0


def test_requests_the_old_coordinator_held_are_repeated_and_answered_once(tmp_path):
    sim = Sim()
    sim.start()
    sim.send(WORKERS[0], Op.BARRIER, name="init")  # waiting inside the old coordinator
    sim = restarted(sim, tmp_path, at=1.0)
    for w in WORKERS:  # worker-0 repeats its BARRIER; the others arrive
        out = sim.send(w, Op.BARRIER, name="init")
    assert sorted(r.to for r in replies(out)) == sorted(ident(w) for w in WORKERS)
    assert sim.state.train_started is not None
    # Two workers report they are done; the coordinator dies; they repeat; the third finishes.
    for w in WORKERS[:2]:
        sim.send(w, Op.WORKER_DONE, stats={"steps": 1})
    sim = restarted(sim, tmp_path, at=2.0)
    for w in WORKERS[:2]:  # they wait on
        assert replies(sim.send(w, Op.WORKER_DONE, stats={"steps": 1}), to=w) == []
    out = sim.send(WORKERS[2], Op.WORKER_DONE, stats={"steps": 1})
    answers = {r.to.decode()[3:]: r.msg.meta["evaluate"] for r in replies(out) if r.msg.op == Op.OK and "evaluate" in r.msg.meta}
    assert sorted(answers) == sorted(WORKERS) and sum(answers.values()) == 1
    evaluator = next(w for w, e in answers.items() if e)
    # The evaluator's answer was lost: it asks again and is still the one to evaluate.
    again = ok(one(sim.send(evaluator, Op.WORKER_DONE, stats={"steps": 1})))
    assert again["evaluate"] is True
    other = next(w for w in WORKERS if w != evaluator)
    assert ok(one(sim.send(other, Op.WORKER_DONE, stats={"steps": 1})))["evaluate"] is False


def test_a_register_repeated_after_a_restart_gets_the_same_rank_and_waits_for_the_job_to_start(tmp_path):
    sim = Sim()
    for i, s in enumerate(SERVERS):
        sim.register(s, "server", i)
    sim.register(WORKERS[0], "worker", 0)
    sim = restarted(sim, tmp_path, at=1.0)
    assert sim.state.phase == "registering"
    assert sim.register(WORKERS[0], "worker", 0) == []  # the same node, waiting again
    assert len(sim.state.nodes) == len(SERVERS) + 1
    sim.register(WORKERS[1], "worker", 1)
    out = sim.register(WORKERS[2], "worker", 2)
    started = {r.to.decode()[3:]: r.msg.meta["rank"] for r in replies(out) if r.msg.op == Op.OK and "rank" in r.msg.meta}
    assert started == {w: i for i, w in enumerate(WORKERS)}
    # A server that repeats REGISTER once the job runs gets its old answer, not a second rank.
    meta = ok(one(sim.register(SERVERS[1], "server", 1)))
    assert meta["node"] == "server-1" and meta["rank"] == 1


def test_the_state_store_writes_only_what_changed_and_refuses_another_jobs_state(tmp_path):
    sim = Sim()
    sim.start()
    store = StateStore(str(tmp_path / STATE_FILE))
    assert store.save(export_state(sim.state, 0.0), sim.state.ledger.journal) == 4  # job, nodes, failures, checkpoints
    sim.send(WORKERS[0], Op.NEXT_SHARD)  # its first request: the nodes part notes that it was heard from
    assert store.save(export_state(sim.state, 0.0), sim.state.ledger.journal) == 3  # the job part's clock, nodes, one ledger event
    assert store.save(export_state(sim.state, 0.0), sim.state.ledger.journal) == 1  # only the clock: the event is saved
    sim.send(WORKERS[1], Op.HEARTBEAT)
    store.save(export_state(sim.state, 0.0), sim.state.ledger.journal)
    sim.send(WORKERS[0], Op.SHARD_DONE, epoch=0, shard=sim.state.ledger.log[WORKERS[0]][0][1], examples=4)
    assert store.save(export_state(sim.state, 0.0), sim.state.ledger.journal) == 2  # the clock, one ledger event
    store.close()
    other = JOB.model_copy(update={"training": JOB.training.model_copy(update={"epochs": 9})})
    _, parts = open_store(str(tmp_path), recover=True)
    with pytest.raises(ConfigError, match="another job"):
        adopt_state(CoordinatorState(other, LAYOUT, NUM_TRAIN, 0.0), parts, 0.0)
    with pytest.raises(ConfigError, match="does not exist"):
        open_store(str(tmp_path / "elsewhere"), recover=True)
    fresh, _ = open_store(str(tmp_path), recover=False)  # a new job in this folder starts afresh
    assert fresh.load() == {"journal": []} and fresh.journal_saved == 0


@pytest.mark.parametrize("phase, code", [("finished", 0), ("failed", 1)])
def test_recovering_a_job_that_has_ended_says_so_with_the_exit_its_end_had_instead_of_serving_for_ever(tmp_path, phase, code):
    from downpour.cli.main import main
    from downpour.errors import JobEnded

    sim = Sim()
    sim.start()
    sim.state.phase = phase
    store = StateStore(str(tmp_path / STATE_FILE))
    store.save(export_state(sim.state, sim.now), sim.state.ledger.journal)
    store.close()
    with pytest.raises(JobEnded, match=f"has ended already \\({phase}") as ended:
        open_store(str(tmp_path), recover=True)
    assert ended.value.code == code
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_to_dict(JOB)))
    assert main(["coordinator", str(job), "--run-dir", str(tmp_path), "--recover", "--insecure"]) == code
    assert not (tmp_path / "coordinator.addr").exists()  # it did not start
    assert main(["coordinator", str(job), "--run-dir", str(tmp_path / "nothere"), "--recover", "--insecure"]) == 2
    assert not (tmp_path / "nothere").exists()


def test_a_node_that_died_while_the_coordinator_was_down_is_declared_dead_after_the_restart(tmp_path):
    sim = training()
    held = shard_of(sim.send(WORKERS[2], Op.NEXT_SHARD), WORKERS[2])
    sim = restarted(sim, tmp_path, at=1.0)
    for t in (2.0, 4.0, 6.0):  # everyone but worker-2 heartbeats
        sim.now = t
        for who in SERVERS + WORKERS[:2]:
            sim.send(who, Op.HEARTBEAT)
    sim.tick(6.5)
    sim.tick(6.6)  # the next turn: nobody else is awaited, so the coordinator counts as recovered
    assert sim.state.nodes[WORKERS[2]].state == "dead"
    coordinator, worker = sim.state.failures
    assert coordinator.node == "coordinator" and coordinator.reconnected_after_s is not None
    assert worker.node == WORKERS[2] and worker.requeued == [[held["epoch"], held["shard"], 0]]
    assert error_code(one(sim.send(WORKERS[2], Op.NEXT_SHARD))) == "declared_dead"


def test_a_node_admitted_just_before_the_coordinator_died_has_time_to_repeat_its_register(tmp_path):
    """The old coordinator admitted a replacement worker and saved that, but died before the answer
    left: the worker sends no heartbeat until it repeats REGISTER (after ``ATTEMPT_S``). The
    restarted coordinator waits that long before declaring it dead, and answers the repeat with the
    same name. (Seen in CI: such a worker was reported as a second failure.)"""
    sim = training()
    sim.now = 3.0
    for who in SERVERS + [WORKERS[0], WORKERS[2]]:
        sim.send(who, Op.HEARTBEAT)
    sim.tick(5.5)
    assert sim.state.nodes[WORKERS[1]].state == "dead"
    assert ok(one(sim.register("joiner", "worker", 1), to="joiner"))["node"] == "worker-1.2"  # the answer is lost
    sim = restarted(sim, tmp_path, at=6.0)
    timeout = JOB.cluster.heartbeat_timeout_s
    for t in (7.0, 9.0, 11.0, 6.0 + timeout + ATTEMPT_S - 0.5):
        sim.now = t
        for who in SERVERS + [WORKERS[0], WORKERS[2]]:
            sim.send(who, Op.HEARTBEAT)
        sim.tick(t)
    assert sim.state.nodes["worker-1.2"].state == "alive"  # silent past the heartbeat timeout, not dead
    meta = ok(one(sim.register("joiner", "worker", 1)))  # its repeat
    assert meta["node"] == "worker-1.2" and meta["rank"] == 1
    assert "stop" not in ok(one(sim.send("joiner", Op.HEARTBEAT, node="worker-1.2")))
    assert [f.node for f in sim.state.failures] == [WORKERS[1], "coordinator"]

    # The job's start, saved, but no worker got its answer: two repeat theirs, one never comes back
    # and is declared dead once that time is up too.
    sim = Sim()
    sim.start()
    sim = restarted(sim, tmp_path, at=1.0)
    for t in (2.0, 4.0, 1.0 + timeout + 0.5, 8.0, 1.0 + timeout + ATTEMPT_S + 0.5):
        sim.now = t
        for who in SERVERS:
            sim.send(who, Op.HEARTBEAT)
        if t == 4.0:
            for who in WORKERS[:2]:
                assert ok(one(sim.register(who, "worker", None)))["node"] == who
        for who in WORKERS[:2] if t > 4.0 else []:
            sim.send(who, Op.HEARTBEAT)
        sim.tick(t)
        assert sim.state.nodes[WORKERS[2]].state == ("dead" if t > 1.0 + timeout + ATTEMPT_S else "alive")
    assert [f.node for f in sim.state.failures] == ["coordinator", WORKERS[2]]


def test_a_request_without_an_answer_is_sent_again_until_its_time_limit():
    """What a node does while its coordinator restarts: the first NEXT_SHARD is lost (the old
    process took it with it), the repeat is answered; with nobody answering, the call fails once
    its own limit is over, naming the coordinator."""
    import threading

    from downpour.coordinator.client import CoordinatorClient
    from downpour.errors import RequestTimeout
    from downpour.protocol import decode, encode
    from downpour.transport import Listener, Poller, new_context

    ctx = new_context()
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 20)
    client = CoordinatorClient(ctx, listener.address, "worker-0", request_timeout_s=30.0, attempt_s=0.3)
    seen: list[int] = []

    def coordinator() -> None:  # drops the first request, answers the second
        poller = Poller()
        poller.register(listener)
        while len(seen) < 2 and poller.poll(5.0):
            peer, frames = listener.recv()
            msg = decode(frames)
            seen.append(msg.req_id)
            if len(seen) == 2:
                listener.send(peer, encode(msg.reply({"shard": None})))

    thread = threading.Thread(target=coordinator)
    thread.start()
    try:
        assert client.call(Op.NEXT_SHARD) == {"shard": None}
        thread.join(5.0)
        assert len(seen) == 2 and seen[0] != seen[1]  # sent twice, each a request of its own
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="coordinator got no reply within 1s"):
            client.call(Op.NEXT_SHARD, timeout_s=1.0)  # nobody answers now
        assert 0.9 <= time.monotonic() - t0 < 3.0
    finally:
        client.close()
        listener.close()
        ctx.term()


def test_a_finished_shard_travels_with_the_next_shard_request_or_ahead_of_any_other():
    """One request per shard: SHARD_DONE's report rides on the following NEXT_SHARD; a worker
    that asks anything else first (LEAVE, WORKER_DONE...) reports it on its own, first."""
    import threading

    from downpour.coordinator.client import CoordinatorClient
    from downpour.protocol import decode, encode
    from downpour.transport import Listener, Poller, new_context

    ctx = new_context()
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 20)
    client = CoordinatorClient(ctx, listener.address, "worker-0", request_timeout_s=10.0, attempt_s=5.0)
    seen: list[tuple[Op, dict]] = []

    def coordinator(n: int) -> None:
        poller = Poller()
        poller.register(listener)
        while len(seen) < n and poller.poll(5.0):
            peer, frames = listener.recv()
            msg = decode(frames)
            seen.append((msg.op, {k: v for k, v in msg.meta.items() if k != "node"}))
            listener.send(peer, encode(msg.reply({"shard": {"epoch": 0, "shard": 2, "start": 8, "stop": 10}}
                                                 if msg.op == Op.NEXT_SHARD else {})))

    try:
        thread = threading.Thread(target=coordinator, args=(3,))
        thread.start()
        client.shard_done(0, 1, 4)
        assert client.next_shard()["shard"] == 2
        client.shard_done(0, 2, 2)
        client.call(Op.LEAVE, {"position": [0, 2, 2], "stats": {}})
        thread.join(5.0)
        assert seen == [(Op.NEXT_SHARD, {"done": [0, 1, 4]}),
                        (Op.SHARD_DONE, {"epoch": 0, "shard": 2, "examples": 2}),
                        (Op.LEAVE, {"position": [0, 2, 2], "stats": {}})]
    finally:
        client.close()
        listener.close()
        ctx.term()


# -- end to end -----------------------------------------------------------------------------------


def _summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _every_shard_once(summary: dict, epochs: int) -> None:
    shards = summary["data_shards"]
    assert shards["unfinished"] == 0
    assert shards["completed_per_epoch"] == {str(e): shards["num_shards"] for e in range(epochs)}


@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_a_killed_coordinator_is_restarted_and_the_job_finishes_with_every_shard_once(tmp_path, tiny_data, consistency):
    epochs = 30
    job = tiny_job(tiny_data, training={"epochs": epochs, "consistency": consistency}, monitor=QUIET, checkpoint={"enabled": False},
                   cluster={"num_workers": 2, "heartbeat_timeout_s": 2.0})
    job["data"]["shard_size"] = 200
    proc, run_dir = start_job(tmp_path, job)
    try:
        status = wait_training(run_dir, steps=5)
        os.kill(status["coordinator"]["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=150)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    summary = _summary(run_dir)
    assert summary["status"] == "ok"
    [failure] = summary["failures"]
    assert failure["node"] == "coordinator" and failure["kind"] == "dead"
    assert 0 <= failure["detected_after_s"] < 5 and 0 < failure["recovered_after_s"] < 30
    assert "starting coordinator.2" in err
    _every_shard_once(summary, epochs)
    assert summary["test_accuracy"] > 0.5


def test_chaos_workers_a_server_and_the_coordinator_killed_during_one_run(tmp_path, tiny_data):
    """SIGKILL a random worker every few seconds, one server once and the coordinator once: the run
    finishes, every shard is trained exactly once per epoch, and each failure is reported with its
    detection and recovery time. (The accuracy against an undisturbed run with the same seed is
    measured on the reference job by ``benchmarks/recovery.py --chaos``.)"""
    epochs = 150  # about 40 s undisturbed on 2 cores: time for five kills and their recoveries
    job = tiny_job(tiny_data, training={"epochs": epochs}, monitor=QUIET,
                   checkpoint={"enabled": True, "every_steps": 20, "every_s": None, "keep": 2},
                   cluster={"num_workers": 3, "heartbeat_timeout_s": 2.0, "worker_restarts": 10})
    job["data"]["shard_size"] = 200
    rng = random.Random(0)
    proc, run_dir = start_job(tmp_path, job)
    killed: list[str] = []
    try:
        wait_training(run_dir, steps=5)
        plan = ["worker", "server", "worker", "coordinator", "worker"]
        deadline = time.monotonic() + 120
        while plan and time.monotonic() < deadline and proc.poll() is None:
            status = query_status(run_dir)
            if not status or status["phase"] != "training":
                time.sleep(0.2)
                continue
            kind = plan[0]
            if kind == "server" and not (status.get("checkpoints") or {}).get("count"):
                time.sleep(0.2)  # a server is recovered from a committed checkpoint
                continue
            if kind == "coordinator":
                pid, name = status["coordinator"]["pid"], "coordinator"
            else:
                live = [n for n in status["nodes"] if n["role"] == kind and n["state"] == "alive"
                        and (kind != "worker" or n["progress"].get("steps", 0) > 0)]
                if not live:
                    time.sleep(0.2)
                    continue
                victim = rng.choice(live)
                pid, name = victim["pid"], victim["name"]
            os.kill(pid, signal.SIGKILL)
            killed.append(name)
            plan.pop(0)
            time.sleep(2.0)
        _, err = proc.communicate(timeout=240)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    assert len(killed) == 5, f"the job ended before all kills: {killed}"
    summary = _summary(run_dir)
    assert summary["status"] == "ok"
    failed = [f["node"] for f in summary["failures"]]
    assert sorted(n.split(".")[0] for n in failed) == sorted(k.split(".")[0] for k in killed), (failed, killed)
    for f in summary["failures"]:
        assert f["detected_after_s"] is not None and f["recovered_after_s"] is not None, f
    _every_shard_once(summary, epochs)
    assert summary["test_accuracy"] > 0.5
