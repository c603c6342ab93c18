"""Worker failure, replacement, elastic join and clean leave: the job trains on and no shard is lost.

The coordinator's decisions are tested as a state machine with a fake clock (Sim from
test_coordinator_state); the end-to-end tests kill a real worker of a `downpour train` job.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time

import pytest
import torch

from downpour.config import SGDConfig, TrainingConfig
from downpour.coordinator.failures import EXIT_CHECK_S
from downpour.coordinator.shards import ShardLedger
from downpour.coordinator.state import CoordinatorState
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.server.consistency import Push, SSPPolicy
from downpour.server.optim import make_rule
from downpour.server.store import ShardStore
from tests.cluster import QUIET, query_status, run_train, start_job, stop_job, wait_training
from tests.conftest import tiny_job
from tests.test_coordinator_state import JOB, LAYOUT, NUM_TRAIN, SERVERS, WORKERS, Sim, error_code, ok, one, replies

ELASTIC_JOB = JOB.model_copy(update={"cluster": JOB.cluster.model_copy(update={"max_workers": 4})})


def training(sim: Sim) -> None:
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")


def take(sim: Sim, worker: str) -> dict:
    return ok(one(sim.send(worker, Op.NEXT_SHARD), to=worker))["shard"]


def membership(actions: list) -> list[str] | None:
    sent = [a.msg.meta["workers"] for a in actions if getattr(a, "msg", None) is not None and a.msg.op == Op.MEMBERSHIP]
    return sent[-1] if sent else None


def lose(sim: Sim, worker: str, at: float) -> list:
    """Every node but ``worker`` heartbeats until ``at``; then the clock passes its timeout."""
    for t in (1.0, 3.0, 5.0):
        if t < at:
            sim.now = t
            for name in sim.state.nodes:
                if name != worker and sim.state.nodes[name].state in ("alive", "done"):
                    sim.send(name, Op.HEARTBEAT)
    return sim.tick(at)


# -- the coordinator --------------------------------------------------------------------------


def test_a_dead_worker_does_not_stop_the_job_and_its_shard_resumes_after_its_last_push():
    sim = Sim()
    training(sim)
    shard = take(sim, WORKERS[1])
    sim.send(WORKERS[1], Op.HEARTBEAT, progress={"position": [shard["epoch"], shard["shard"], 2]})
    out = lose(sim, WORKERS[1], 5.5)
    assert sim.state.phase == "training"
    assert membership(out) == [WORKERS[0], WORKERS[2]]  # a sync round no longer waits for it
    [failure] = sim.state.failures
    assert failure.node == WORKERS[1] and failure.kind == "dead" and failure.detected_after_s > 5.0
    assert failure.requeued == [[shard["epoch"], shard["shard"], 2]] and failure.recovered_after_s is None
    sim.now = 6.0
    again = take(sim, WORKERS[0])  # the front of the queue: the shard the dead worker held
    assert (again["epoch"], again["shard"], again["skip"]) == (shard["epoch"], shard["shard"], 2)
    assert failure.recovered_after_s == 0.5


def test_a_finished_shards_report_counts_the_workers_steps_so_a_death_before_its_next_heartbeat_loses_none():
    sim = Sim()
    training(sim)
    first = take(sim, WORKERS[1])
    sim.send(WORKERS[1], Op.HEARTBEAT, progress={"steps": 2, "examples": 8, "pushes": 2})
    # The shard's end is reported with the worker's counters (1 step of 4 and 5 of 3 examples since
    # that heartbeat): the shard is not trained again, so its steps must count although no
    # heartbeat carries them.
    nxt = ok(one(sim.send(WORKERS[1], Op.NEXT_SHARD, done=[first["epoch"], first["shard"], 4],
                          progress={"steps": 3, "examples": 12}), to=WORKERS[1]))["shard"]
    assert sim.state.nodes[WORKERS[1]].progress["steps"] == 3
    sim.send(WORKERS[1], Op.SHARD_DONE, epoch=nxt["epoch"], shard=nxt["shard"], examples=4,
             progress={"steps": 4, "examples": 16, "pushes": 4})
    lose(sim, WORKERS[1], 5.5)
    summary = sim.state.summary(5.5)
    dead = summary["workers"][WORKERS[1]]  # its pushes move on with its steps (not the last heartbeat's)
    assert (dead["steps"], dead["examples"], dead["pushes"]) == (4, 16, 4)
    assert summary["failures"][0]["requeued"] == []  # both its shards were finished: nothing is trained twice
    # Counters never go back, and malformed ones are refused by the request's schema.
    refused = sim.send(WORKERS[0], Op.SHARD_DONE, epoch=0, shard=0, examples=4, progress={"steps": -1, "examples": 2})
    assert error_code(one(refused)) == "invalid"


def test_a_worker_that_reports_an_error_is_recovered_from_like_a_dead_one():
    sim = Sim()
    training(sim)
    take(sim, WORKERS[2])
    sim.send(WORKERS[2], Op.REPORT, kind="error", data={"error": "CUDA out of memory"})
    assert sim.state.phase == "training" and sim.state.failures[0].reason == "CUDA out of memory"


def test_a_replacement_takes_the_free_slot_at_once_under_a_new_name_and_skips_the_start():
    sim = Sim()
    training(sim)
    lose(sim, WORKERS[1], 5.5)
    out = sim.send("replacement", Op.REGISTER, role="worker", rank=1, host="test", pid=7)
    meta = ok(one(out, to="replacement"))
    assert meta["rank"] == 1 and meta["node"] == "worker-1.2" and meta["initializer"] is False
    assert len(meta["servers"]) == 2
    assert membership(out) == [WORKERS[0], "worker-1.2", WORKERS[2]]
    assert sim.state.failures[0].replaced_by == "worker-1.2"
    # Training started long ago: at once (from the connection it registered on, as every request of it).
    ok(one(sim.send("replacement", Op.BARRIER, name="init", node="worker-1.2"), to="replacement"))


def test_training_steps_is_a_cap_per_rank_that_a_replacement_and_a_resumed_job_continue_instead_of_starting_afresh():
    capped = JOB.model_copy(update={"training": JOB.training.model_copy(update={"steps": 10, "batch_size": 2})})
    sim = Sim(capped)
    out = sim.start()
    assert [ok(one(out, to=w))["steps_left"] for w in WORKERS] == [10, 10, 10]
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    sim.state.nodes[WORKERS[1]].progress = {"steps": 4}  # (its last heartbeat's)
    lose(sim, WORKERS[1], 5.5)
    meta = ok(one(sim.send("replacement", Op.REGISTER, role="worker", rank=1, host="test", pid=7), to="replacement"))
    assert meta["node"] == "worker-1.2" and meta["steps_left"] == 6  # the rank's 10, less what its first process trained
    resumed = Sim(capped)
    resumed.state.resume = {"trained": 14}  # the checkpoint holds 7 batches of 2: ranks 0, 1, 2 trained 3, 2, 2 of them
    out = resumed.start()
    assert [ok(one(out, to=w))["steps_left"] for w in WORKERS] == [7, 8, 8]
    assert "steps_left" not in ok(one(Sim().start(), to=WORKERS[0]))  # (no cap)


def test_a_joiner_waits_inside_register_until_a_slot_frees():
    sim = Sim()
    training(sim)
    assert sim.send("early", Op.REGISTER, role="worker", host="test", pid=7) == []
    out = lose(sim, WORKERS[0], 5.5)
    assert ok(one(out, to="early"))["rank"] == 0


def test_an_elastic_job_admits_workers_beyond_num_workers_up_to_max_workers():
    sim = Sim(ELASTIC_JOB)
    training(sim)
    meta = ok(one(sim.send("extra", Op.REGISTER, role="worker", host="test", pid=7), to="extra"))
    assert meta["rank"] == 3 and meta["node"] == "worker-3"
    assert sim.send("one-too-many", Op.REGISTER, role="worker", host="test", pid=8) == []  # waits for a slot
    for i, w in enumerate([*WORKERS, "worker-3"]):  # the summary counts every worker that trained, past num_workers
        sim.state.nodes[w].stats = {"examples": 32 * (i + 1), "steps": i + 1}
    summary = sim.state.summary(sim.now)
    assert (summary["num_workers"], summary["workers_trained"]) == (3, 4)


def test_a_worker_leaving_cleanly_gives_its_shard_back_and_keeps_its_stats_without_a_failure():
    sim = Sim()
    training(sim)
    shard = take(sim, WORKERS[1])
    out = sim.send(WORKERS[1], Op.LEAVE, position=[shard["epoch"], shard["shard"], 3], stats={"examples": 3, "steps": 1})
    ok(one(out, to=WORKERS[1]))
    assert sim.state.failures == [] and sim.state.nodes[WORKERS[1]].state == "finished"
    assert membership(out) == [WORKERS[0], WORKERS[2]]
    again = take(sim, WORKERS[2])
    assert (again["shard"], again["skip"]) == (shard["shard"], 3)


def test_a_worker_declared_dead_that_comes_back_is_told_to_stop_and_refused_work():
    sim = Sim()
    training(sim)
    lose(sim, WORKERS[1], 5.5)
    assert "declared dead" in ok(one(sim.send(WORKERS[1], Op.HEARTBEAT)))["stop"]
    assert error_code(one(sim.send(WORKERS[1], Op.NEXT_SHARD))) == "declared_dead"


def test_a_worker_waiting_for_a_shard_leaves_the_membership_and_takes_a_shard_that_comes_back():
    sim = Sim()
    training(sim)
    held = []
    for w in [*WORKERS, *WORKERS]:  # 2 epochs of 3 shards, all handed out; each finishes its first
        held.append(take(sim, w))
        if len(held) <= 3 or w == WORKERS[0]:
            ok(one(sim.send(w, Op.SHARD_DONE, epoch=held[-1]["epoch"], shard=held[-1]["shard"], examples=1)))
    out = sim.send(WORKERS[0], Op.NEXT_SHARD)
    assert not replies(out, to=WORKERS[0])  # it waits at the coordinator for a shard or the end
    assert membership(out) == [WORKERS[1], WORKERS[2]]
    for t in (1.0, 3.0, 5.0):  # worker-2 goes silent; worker-0 asks again whenever told to
        sim.now = t
        for name in (*SERVERS, WORKERS[0], WORKERS[1]):
            for r in replies(sim.send(name, Op.HEARTBEAT), to=WORKERS[0]):
                if "shard" in r.msg.meta:
                    assert r.msg.meta == {"shard": None, "wait_s": r.msg.meta["wait_s"]}
                    assert not replies(sim.send(WORKERS[0], Op.NEXT_SHARD), to=WORKERS[0])
    got = sim.tick(5.5)  # worker-2 declared dead: its shard goes to the waiting worker-0 at once
    assert ok(one(got, to=WORKERS[0]))["shard"] == held[5]  # the shard worker-2 held
    assert membership(got) == [WORKERS[0], WORKERS[1]]


def test_a_silent_server_still_stops_the_job():
    sim = Sim()
    training(sim)
    take(sim, WORKERS[0])
    sim.tick(5.5)  # nobody heartbeats: with no checkpoint to restart it from, a silent server stops the job
    assert sim.state.phase == "failed" and sim.state.failed_node.startswith("server-")
    assert "there is no checkpoint to restart a server from" in sim.state.error  # (checkpoints off in this sim)


def test_with_default_settings_a_server_lost_before_the_first_periodic_checkpoint_is_replaced_from_step_0():
    sim = Sim()
    sim.state = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0, checkpoint_url="memory://step0")
    training(sim)
    asked = [a for a in sim.tick(0.1) if a.msg.op == Op.CHECKPOINT]  # checkpoint.at_start: due at once
    assert len(asked) == len(SERVERS) and asked[0].msg.meta["name"].startswith("ckpt-000000000000-")
    name = asked[0].msg.meta["name"]
    for s in SERVERS:
        report = {"name": name, "file": f"{s}.safetensors", "sha256": "0" * 64, "bytes": 1, "version": 0}
        sim.send(s, Op.REPORT, kind="checkpoint", data=report)
    sim.state.checkpoint_committed(0.2, True)
    sim.now = 3.0
    sim.send(SERVERS[1], Op.HEARTBEAT, progress={"version": 37})
    sim.now = 8.0
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    sim.send(SERVERS[0], Op.HEARTBEAT)
    sim.tick(8.5)  # server-1 silent since 3: declared dead; the job goes on, well within checkpoint.every_s
    assert sim.state.phase == "training"
    [failure] = sim.state.failures
    assert failure.node == "server-1" and failure.restored_from == name
    assert failure.rolled_back_versions == 37  # what it applied since step 0, reported


def started_with_pids(sim: Sim) -> dict[int, bool]:
    """Every node registered with a pid of its own (servers 100.., workers 200..), training, and each
    process seen running; returns the pids' liveness, which the test changes."""
    for i, s in enumerate(SERVERS):
        sim.send(s, Op.REGISTER, role="server", rank=i, address=f"tcp://127.0.0.1:{6000 + i}", host="test", pid=100 + i)
    for i, w in enumerate(WORKERS):
        sim.send(w, Op.REGISTER, role="worker", rank=i, host="test", pid=200 + i)
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    running = {100 + i: True for i in range(len(SERVERS))} | {200 + i: True for i in range(len(WORKERS))}
    sim.state.pid_alive = running.get
    sim.tick(0.5)
    return running


def test_a_worker_whose_process_exited_is_declared_dead_at_once_and_nobody_waits_for_it():
    """Not after cluster.heartbeat_timeout_s: an async checkpoint's cut, a sync round or an ssp bound
    would hold the others until then (the servers hear the membership without it at once)."""
    sim = Sim()
    running = started_with_pids(sim)
    shard = take(sim, WORKERS[1])
    running[201] = False
    got = sim.tick(0.5 + EXIT_CHECK_S)
    [failure] = sim.state.failures
    assert failure.node == WORKERS[1] and "exited" in failure.reason and failure.detected_after_s < 1.0
    assert membership(got) == [WORKERS[0], WORKERS[2]]
    assert take(sim, WORKERS[0])["shard"] == shard["shard"]  # its shard, back at the front of the queue


@pytest.mark.parametrize("restarts", [0, 2])
def test_a_job_whose_initializing_worker_died_before_it_wrote_the_parameters_is_initialized_by_another(
        tmp_path, tiny_data, restarts):
    """Worker 0 writes the initial parameters before the start barrier; one that dies first left
    the others (and its replacement) pulling from uninitialized servers: every worker failed."""
    marker = str(tmp_path / "worker-0-died")
    job = tiny_job(tiny_data, training={"epochs": 2}, cluster={"worker_restarts": restarts}, monitor=QUIET)
    job["model"] = {"factory": "tests.byo_factories:mlp_lost_once_in_worker_0", "args": {"marker": marker}}
    summary = run_train(tmp_path, job, timeout_s=120)
    assert os.path.exists(marker)  # worker 0 did die
    assert summary["status"] == "ok" and summary["examples"] == 2 * 2400  # nothing lost, nothing twice
    assert [f["node"] for f in summary["failures"]] == ["worker-0"]
    assert summary["test_accuracy"] > 0.5
    [exit] = summary["launcher"]["exits"]  # how the process ended, as the launcher saw it
    assert exit["process"] == "worker-0" and exit["exit_code"] == 7 and "exited with code 7" in exit["how"]
    assert summary["launcher"]["restarts"] == {"worker": min(restarts, 1), "server": 0, "coordinator": 0}


def test_a_server_whose_process_exits_after_training_is_seen_at_once_and_the_failure_says_to_resume():
    """During the evaluation (or while the model is saved) a dead server leaves the trained
    parameters incomplete: seen from its pid at once (before, only after the heartbeat timeout,
    while the evaluation's and the model's pulls waited), and the job's error says how to get the
    model: --resume from the end of training's checkpoint."""
    sim = Sim()
    running = started_with_pids(sim)
    while (shard := one(sim.send(WORKERS[0], Op.NEXT_SHARD)).msg.meta["shard"]) is not None:
        sim.send(WORKERS[0], Op.SHARD_DONE, epoch=shard["epoch"], shard=shard["shard"], examples=shard["stop"] - shard["start"])
    for w in WORKERS:
        sim.send(w, Op.WORKER_DONE, stats={"examples": 10, "steps": 1})
    assert sim.state.phase == "evaluating"
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000090-0004", "step": 90, "write_s": 0.1, "final": True})
    running[200] = False  # a worker's exit is not looked at after training (it may have ended)
    running[101] = False
    sim.tick(1.0 + EXIT_CHECK_S)
    assert sim.state.phase == "failed" and sim.state.failed_node == "server-1"
    [failure] = sim.state.failures
    assert failure.detected_after_s < 1.5 and "exited" in failure.reason
    assert ("--resume continues from checkpoint ckpt-000000000090-0004, the end of training's: it trains nothing more, "
            "evaluates and writes model.pt") in sim.state.error


def test_a_server_lost_before_writing_its_part_abandons_the_pending_checkpoint_and_none_begins_until_it_serves():
    sim = Sim()
    sim.state = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0, checkpoint_url="memory://lost-server")
    running = started_with_pids(sim)  # (the step-0 checkpoint is asked for at once)
    pending = sim.state.checkpoints.pending
    assert pending is not None
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000000-0000", "step": 0, "write_s": 0.1, "final": False})
    report = {"name": pending.name, "file": "server-0.safetensors", "sha256": "0" * 64, "bytes": 1, "version": 0}
    sim.send(SERVERS[0], Op.REPORT, kind="checkpoint", data=report)
    running[101] = False  # server-1's process exits before it wrote its part
    sim.tick(1.0 + EXIT_CHECK_S)
    assert sim.state.checkpoints.pending is None and sim.state.checkpoints.abandoned == 1
    assert sim.state.failures[0].node == "server-1" and sim.state.server_slots
    sim.state.checkpoints.last_at = -1e9  # a periodic checkpoint is due (the workers trained on)
    sim.state.nodes[WORKERS[0]].progress = {"steps": 5}
    assert not [a for a in sim.tick(2.0) if getattr(a, "msg", None) is not None and a.msg.op == Op.CHECKPOINT]  # its rank cannot write
    sim.send("server-1-new", Op.REGISTER, role="server", rank=None, address="tcp://127.0.0.1:7999", host="test", pid=300)
    sim.now = 3.0
    sim.send("server-1-new", Op.HEARTBEAT, node="server-1")  # restored and serving
    assert not sim.state.server_slots
    assert [a for a in sim.tick(3.0) if getattr(a, "msg", None) is not None and a.msg.op == Op.CHECKPOINT]


def test_ranks_left_with_no_server_process_and_no_replacement_end_the_job_with_why_instead_of_waiting_for_ever():
    from downpour.coordinator import failures

    sim = Sim()
    training(sim)
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000010-0001", "step": 10, "write_s": 0.1, "final": False})
    for s in SERVERS:  # every server process gone; the launcher starts none (restarts used up, or none can start)
        failures.lose(sim.state, 1.0, sim.state.nodes[s], "killed", "dead")
    assert sim.state.phase == "training" and sorted(sim.state.server_slots) == [0, 1]
    cl = sim.state.cl
    limit = cl.server_replace_timeout_s + cl.startup_timeout_s
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    sim.now = 1.0 + limit - 0.5
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    sim.tick(sim.now)
    assert sim.state.phase == "training"  # a replacement may still come
    sim.now = 1.0 + limit + 0.5
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    sim.tick(sim.now)
    assert sim.state.phase == "failed"
    assert "no server process is left and no replacement registered" in sim.state.error
    assert "rank(s) [0, 1]" in sim.state.error and "--resume continues from checkpoint ckpt-000000000010-0001" in sim.state.error


def test_a_silent_server_waits_for_a_replacement_that_loads_the_latest_checkpoint():
    sim = Sim()
    training(sim)
    take(sim, WORKERS[0])
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000010-0001", "step": 10, "write_s": 0.1, "final": False})
    sim.now = 5.0
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    sim.send(SERVERS[0], Op.HEARTBEAT)
    sim.tick(6.5)  # server-1 silent since 0: declared dead, the job goes on
    assert sim.state.phase == "training"
    [failure] = sim.state.failures
    assert failure.node == "server-1" and failure.restored_from == "ckpt-000000000010-0001"
    # Alive after all (a pause, a link down): told to stop as one declared dead, so that it exits as a
    # failed process and its launcher starts the replacement its rank waits for.
    late = ok(one(sim.send(SERVERS[1], Op.HEARTBEAT)))
    assert late["dead"] is True and "declared dead" in late["stop"]
    got = sim.send("server-1-new", Op.REGISTER, role="server", rank=None, address="tcp://127.0.0.1:7999", host="test", pid=9)
    answer, membership_msg = replies(got, to="server-1-new")
    assert membership_msg.msg.op == Op.MEMBERSHIP  # the sync rounds' members, at once
    reply = ok(answer)
    assert reply["rank"] == 1 and reply["restore"]["name"] == "ckpt-000000000010-0001" and reply["restore"]["full"]
    beat = ok(one(sim.send(WORKERS[1], Op.HEARTBEAT), to=WORKERS[1]))
    assert {"rank": 1, "name": "server-1", "address": "tcp://127.0.0.1:7999", "pid": 9} in beat["servers"] and beat["servers_gen"] == 1
    # A graceful stop asked for now: the order to leave comes with where the servers are, or a worker
    # waiting on the dead process would wait out its request timeouts before it could leave.
    stopping = copy.deepcopy(sim)
    stopping.state.request_stop(6.6)
    told = ok(one(stopping.send(WORKERS[2], Op.HEARTBEAT), to=WORKERS[2]))
    assert told["leave"] and told["servers_gen"] == 1 and told["servers"] == beat["servers"]
    assert failure.recovered_after_s is None  # not before the replacement serves (its first heartbeat)
    sim.now = 7.0
    sim.send("server-1-new", Op.HEARTBEAT, node="server-1")
    assert failure.recovered_after_s == pytest.approx(0.5)
    # A server registering for a rank while no rank is free waits (a replacement may start before
    # the old process is declared dead) and takes the next rank that frees.
    assert sim.send("server-x", Op.REGISTER, role="server", rank=0, address="tcp://127.0.0.1:7998") == []
    # One without a rank is not taken for a replacement.
    assert error_code(one(sim.send("server-y", Op.REGISTER, role="server", address="tcp://127.0.0.1:7997"))) == "job_running"
    sim.now = 13.0
    sim.send("server-1-new", Op.HEARTBEAT, node="server-1")
    for w in WORKERS:
        sim.send(w, Op.HEARTBEAT)
    got = sim.tick(13.5)  # server-0 silent since 5.0: its rank goes to the waiting server at once
    assert ok(replies(got, to="server-x")[0])["rank"] == 0


def test_a_job_whose_workers_all_died_fails_once_none_joined_within_the_start_timeout():
    sim = Sim()
    training(sim)
    take(sim, WORKERS[0])
    sim.now = 3.0
    for name in ("server-0", "server-1"):
        sim.send(name, Op.HEARTBEAT)
    for t in (5.5, 5.6, 5.7):  # one node is declared dead per tick
        sim.tick(t)
    assert sim.state.phase == "training" and sim.state.workerless_since == 5.7
    for t in range(8, 70, 3):  # the servers keep beating; no worker comes
        sim.now = float(t)
        for name in ("server-0", "server-1"):
            sim.send(name, Op.HEARTBEAT)
        sim.tick(float(t))
    assert sim.state.phase == "failed" and "none joined" in sim.state.error


# -- the ledger ---------------------------------------------------------------------------------


def test_release_requeues_in_handed_order_with_skips_and_completes_a_shard_fully_pushed():
    ledger = ShardLedger(num_examples=40, shard_size=10, epochs=1, seed=0)
    a, b = ledger.next("w1"), ledger.next("w1")
    c = ledger.next("w2")
    assert ledger.release("w1", [a["epoch"], a["shard"], 10]) == [[0, b["shard"], 0]]  # a was all pushed: done
    assert (0, a["shard"]) in ledger.completed
    assert ledger.next("w2")["shard"] == b["shard"]
    # w2 also held b again: both go back, in the order w2 got them, c resuming after its 4 examples.
    assert ledger.release("w2", [c["epoch"], c["shard"], 4]) == [[0, c["shard"], 4], [0, b["shard"], 0]]
    assert ledger.next("w3")["skip"] == 4


def test_a_snapshot_after_a_release_keeps_what_others_completed():
    ledger = ShardLedger(num_examples=30, shard_size=10, epochs=1, seed=0)
    first, second = ledger.next("w1"), ledger.next("w1")
    ledger.done("w1", 0, first["shard"])
    ledger.release("w1", [0, second["shard"], 5])
    taken = ledger.next("w2")
    ledger.done("w2", 0, taken["shard"])
    state = ledger.state_at({"w1": [0, second["shard"], 5], "w2": [0, taken["shard"], 10]})
    assert sorted(s for _, s in state["completed"]) == sorted([first["shard"], taken["shard"]])


# -- ssp ----------------------------------------------------------------------------------------


def test_an_ssp_newcomer_starts_level_with_the_slowest_instead_of_holding_everyone_back():
    layout = make_layout([("w", (2,))], 1)
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(SGDConfig(lr=0.1), 0.1, n))
    store.initialized = True
    policy = SSPPolicy(store, lambda s: None, TrainingConfig(consistency="ssp", staleness_bound=1))
    policy.set_workers({"a", "b"})

    def push(who: str, clock: int) -> list:
        return policy.push(Push(who.encode(), Message(Op.PUSHPULL, clock, {}), [0], torch.zeros(2), 1.0, 0, clock=clock))

    for c in range(1, 11):
        push("a", c)
        push("b", c)
    policy.set_workers({"a", "b", "c"})
    assert len(push("a", 11)) == 1  # c counts as at clock 10, not 0
    assert len(push("c", 1)) == 1


def _ssp_policy(bound: int) -> SSPPolicy:
    layout = make_layout([("w", (2,))], 1)
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(SGDConfig(lr=0.1), 0.1, n))
    store.initialized = True
    return SSPPolicy(store, lambda s: None, TrainingConfig(consistency="ssp", staleness_bound=bound))


def _ssp_push(policy: SSPPolicy, who: str, clock: int) -> list:
    return policy.push(Push(who.encode(), Message(Op.PUSHPULL, clock, {}), [0], torch.zeros(2), 1.0, 0, clock=clock))


def test_a_replacement_ssp_server_counts_each_workers_first_push_as_its_first():
    """A server restored from a checkpoint mid-job hears the old workers at push 2,000 and a replaced
    one at push 300: counted as they come, the replaced one would hold the others for 1,700 pushes
    (the job stalled past every request's timeout)."""
    policy = _ssp_policy(1)
    policy.restored()
    policy.set_workers({"a", "b", "new"})
    for who, first in (("a", 2000), ("b", 1990), ("new", 300)):  # each at 1: one ahead of those not heard yet
        assert len(_ssp_push(policy, who, first)) == 1
    for step in range(1, 20):  # then in step: none is held
        for who, start in (("a", 2000), ("b", 1990), ("new", 300)):
            assert len(_ssp_push(policy, who, start + step)) >= 1
    assert policy.held == [] and policy.stats()["ssp_max_lead"] <= 1
    # A worker that left and comes back keeps its clock (its offset), never sent back behind the others.
    policy.set_workers({"a", "b"})
    policy.set_workers({"a", "b", "new"})
    assert len(_ssp_push(policy, "new", 320)) == 1
    # One this server never heard from (it waited for a shard while the server was replaced) comes back
    # at push 2,500: level with the others, not 2,480 pushes ahead of them.
    policy.set_workers({"a", "b", "new", "back"})
    assert len(_ssp_push(policy, "back", 2500)) == 1
    assert len(_ssp_push(policy, "a", 2020)) >= 1 and policy.held == []


def test_a_server_of_the_jobs_start_counts_the_workers_pushes_as_they_are():
    policy = _ssp_policy(1)
    policy.set_workers({"a", "b"})
    assert len(_ssp_push(policy, "a", 1)) == 1
    assert _ssp_push(policy, "a", 2) == []  # b at 0: a leads by 2
    assert len(_ssp_push(policy, "b", 1)) == 2


# -- end to end -----------------------------------------------------------------------------------


EPOCHS = 40  # long enough (about 15 s) for a replacement to start and join


def _killed_worker_run(tmp_path, tiny_data, consistency: str = "async", sig: int = signal.SIGKILL, epochs: int = EPOCHS,
                       checkpoint: dict | None = None, **cluster) -> tuple[dict, str]:
    job = tiny_job(tiny_data, training={"epochs": epochs, "consistency": consistency}, monitor=QUIET,
                   checkpoint=checkpoint or {"enabled": False}, cluster={"num_workers": 3, "heartbeat_timeout_s": 2.0, **cluster})
    job["data"]["shard_size"] = 200  # small shards: several are in flight when the worker dies
    proc, run_dir = start_job(tmp_path, job)
    try:
        status = wait_training(run_dir, steps=5)
        victim = next(n for n in status["nodes"] if n["name"] == "worker-1")
        os.kill(victim["pid"], sig)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f), err


def _every_shard_once(summary: dict, epochs: int = EPOCHS) -> None:
    shards = summary["data_shards"]
    assert shards["unfinished"] == 0 and shards["remaining"] == 0
    assert shards["completed_per_epoch"] == {str(e): shards["num_shards"] for e in range(epochs)}


@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_a_killed_worker_is_replaced_and_every_shard_is_trained_exactly_once(tmp_path, tiny_data, consistency):
    summary, err = _killed_worker_run(tmp_path, tiny_data, consistency)
    assert summary["status"] == "ok"
    [failure] = summary["failures"]
    assert failure["node"] == "worker-1" and failure["kind"] == "dead"
    # Its process exited: declared dead at once, not after cluster.heartbeat_timeout_s (2 s).
    assert "exited" in failure["reason"] and failure["detected_after_s"] < 2.0
    assert failure["replaced_by"] is not None and failure["replaced_by"].startswith("worker-1.")
    assert "starting worker-1.2 in its place" in err
    assert summary["workers"][failure["replaced_by"]]["steps"] > 0  # the replacement trained
    _every_shard_once(summary)
    assert summary["test_accuracy"] > 0.5


def test_a_worker_killed_while_checkpoints_are_cut_is_declared_dead_at_once_and_checkpoints_go_on(tmp_path, tiny_data):
    """An async checkpoint's cut holds every push past it until each worker reaches it or leaves the
    membership: a killed worker must leave it at once, not after the heartbeat timeout (60 s here,
    beyond the test's limit)."""
    summary, _ = _killed_worker_run(tmp_path, tiny_data, epochs=25, heartbeat_timeout_s=60.0, coordinator_timeout_s=60.0,
                                    checkpoint={"enabled": True, "every_s": 0.3, "keep": 2})
    assert summary["status"] == "ok"
    [failure] = summary["failures"]
    assert failure["node"] == "worker-1" and "exited" in failure["reason"] and failure["detected_after_s"] < 5.0
    _every_shard_once(summary, 25)
    assert summary["checkpoints"]["count"] >= 3 and summary["checkpoints"]["abandoned"] == 0


def test_without_restarts_the_other_workers_finish_a_killed_workers_data(tmp_path, tiny_data):
    summary, err = _killed_worker_run(tmp_path, tiny_data, epochs=15, worker_restarts=0)
    assert summary["status"] == "ok"
    [failure] = summary["failures"]
    assert failure["replaced_by"] is None and "no restarts left" in err
    _every_shard_once(summary, 15)


def test_a_worker_told_to_stop_leaves_cleanly_and_its_data_is_finished_by_the_others(tmp_path, tiny_data):
    summary, err = _killed_worker_run(tmp_path, tiny_data, sig=signal.SIGTERM, epochs=15)
    assert summary["status"] == "ok" and summary["failures"] == []
    assert "in its place" not in err  # a clean leave is not replaced
    assert summary["workers"]["worker-1"]["steps"] > 0  # the stats it left with
    _every_shard_once(summary, 15)


def test_a_rank_killed_twice_is_replaced_twice(tmp_path, tiny_data):
    # Both of its deaths leave the same last log line, but a kill from outside is no crash loop.
    job = tiny_job(tiny_data, training={"epochs": 4 * EPOCHS}, monitor=QUIET, checkpoint={"enabled": False},
                   cluster={"num_workers": 3, "heartbeat_timeout_s": 2.0})
    job["data"]["shard_size"] = 200
    proc, run_dir = start_job(tmp_path, job)
    try:
        killed = []
        for _ in range(2):  # worker-1, then its replacement worker-1.2, each once it trains
            deadline, victim = time.monotonic() + 90, None
            while victim is None and time.monotonic() < deadline:
                st = query_status(run_dir) or {"nodes": []}
                victim = next((n for n in st["nodes"] if n["name"].split(".")[0] == "worker-1" and n.get("state") == "alive"
                               and n["pid"] not in killed and (n["progress"].get("steps") or 0) > 0), None)
                time.sleep(0.1)
            assert victim is not None, f"worker-1 never trained (again) before the job ended; killed {killed}"
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(victim["pid"])
        _, err = proc.communicate(timeout=150)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "starting worker-1.2 in its place (restart 1 of 3)" in err
    assert "starting worker-1.3 in its place (restart 2 of 3)" in err
    assert "not replaced again" not in err
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "ok" and len(summary["failures"]) == 2
    _every_shard_once(summary, 4 * EPOCHS)


@pytest.mark.parametrize("restarts", [10, 1])
def test_workers_that_die_of_the_same_error_end_the_job_at_once_with_it(tmp_path, tiny_data, restarts):
    # A bug in user code kills every worker at its first step. Each rank is replaced once (its replacement
    # dies the same way: not replaced again, however many restarts are left) or until the restarts run
    # out; then no worker is left and the job fails with the error, long before the coordinator's
    # startup_timeout_s (set far beyond the test's wait) would have ended it.
    job = tiny_job(tiny_data, training={"loss": "tests.byo_factories:broken_loss"}, monitor=QUIET, checkpoint={"enabled": False},
                   cluster={"num_workers": 3, "worker_restarts": restarts, "startup_timeout_s": 600.0})
    proc, run_dir = start_job(tmp_path, job)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=150)
    finally:
        stop_job(proc)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 150
    assert "every worker process has died and none is left to start" in err, err[-3000:]
    assert "RuntimeError: a deliberately broken loss" in err
    # The coordinator, told, failed the job and wrote its summary (downpour status reads it).
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] != "ok" and "every worker process has died" in summary["error"]
    assert summary["failed_node"].startswith("worker-")
    started = err.count("in its place (restart")
    assert started == min(3, restarts)
    if restarts > 3:
        assert err.count("not replaced again") == 3



def _killed_server_run(tmp_path, tiny_data, consistency: str = "async", **cluster) -> tuple[dict, str, dict]:
    """SIGKILL server-1 once a checkpoint is committed; returns the summary, the launcher's
    stderr and the status seen just before the kill."""
    job = tiny_job(tiny_data, training={"epochs": EPOCHS, "consistency": consistency}, monitor=QUIET,
                   checkpoint={"enabled": True, "every_steps": 20, "every_s": None, "keep": 2},
                   cluster={"num_workers": 2, "heartbeat_timeout_s": 2.0, **cluster})
    proc, run_dir = start_job(tmp_path, job)
    try:
        deadline = time.monotonic() + 90
        status = wait_training(run_dir, steps=5)
        while not (status and (status.get("checkpoints") or {}).get("count")) and time.monotonic() < deadline:
            time.sleep(0.2)
            status = query_status(run_dir)
        victim = next(n for n in status["nodes"] if n["name"] == "server-1")
        os.kill(victim["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=150)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "ok"
    return summary, err, status


@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_a_killed_server_is_replaced_from_the_latest_checkpoint_and_training_goes_on(tmp_path, tiny_data, consistency):
    summary, err, _ = _killed_server_run(tmp_path, tiny_data, consistency)
    [failure] = summary["failures"]
    assert failure["node"] == "server-1" and failure["kind"] == "dead"
    assert failure["restored_from"] is not None and failure["replaced_by"].startswith("server-1")
    assert 0 < failure["recovered_after_s"] < 60
    assert "starting server-1.2 in its place" in err
    _every_shard_once(summary)  # the data ledger is not set back: what the server lost is reported, not retrained
    assert summary["test_accuracy"] > 0.5


@pytest.mark.slow
def test_with_default_checkpoint_settings_a_worker_then_a_server_killed_early_do_not_end_the_job(tmp_path, tiny_data):
    """A new user's first failure: the defaults (one checkpoint per minute) and a server killed in the
    job's first seconds. The checkpoint taken at step 0 is its restore point."""
    job = tiny_job(tiny_data, training={"epochs": EPOCHS}, monitor=QUIET, cluster={"num_workers": 3, "heartbeat_timeout_s": 2.0})
    job.pop("checkpoint", None)
    proc, run_dir = start_job(tmp_path, job)
    try:
        status = wait_training(run_dir, steps=5)
        pids = {n["name"]: n["pid"] for n in status["nodes"]}
        os.kill(pids["worker-1"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (status and status["checkpoints"]["count"]) and time.monotonic() < deadline:
            time.sleep(0.1)
            status = query_status(run_dir)
        os.kill(pids["server-0"], signal.SIGKILL)
        _, err = proc.communicate(timeout=150)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "ok"
    server = next(f for f in summary["failures"] if f["node"] == "server-0")
    assert server["restored_from"].startswith("ckpt-000000000000-")  # the step-0 checkpoint
    lost = server["rolled_back_versions"]  # (null: its last heartbeat came before the checkpoint's copy, so unknown)
    assert lost is None or (isinstance(lost, int) and lost >= 0), lost
    _every_shard_once(summary)
    assert summary["test_accuracy"] > 0.5


def test_an_evaluator_that_dies_is_replaced_by_the_next_worker_to_join_which_evaluates():
    sim = Sim()
    sim.train()
    evaluator = sim.state.evaluator
    assert evaluator == WORKERS[0]
    for t in (1.0, 3.0, 5.0):  # the servers heartbeat; the evaluator went silent
        sim.now = t
        for s in SERVERS:
            sim.send(s, Op.HEARTBEAT)
    sim.tick(5.5)
    assert sim.state.phase == "evaluating" and sim.state.nodes[evaluator].state == "dead"
    [failure] = sim.state.failures
    assert failure.node == evaluator and failure.recovered_after_s is None
    sim.now = 6.0
    joined = ok(one(sim.register("worker-0.2", "worker", 0), to="worker-0.2"))
    assert joined["node"] == "worker-0.2" and failure.replaced_by == "worker-0.2" and failure.recovered_after_s == 0.5
    assert ok(one(sim.send("worker-0.2", Op.NEXT_SHARD)))["shard"] is None  # training is over: nothing to train
    assert ok(one(sim.send("worker-0.2", Op.WORKER_DONE, stats={})))["evaluate"] is True
    # Only one evaluator: another joiner waits (in case this one dies too) ...
    assert sim.register("worker-1.2", "worker", 1) == []
    out = sim.send("worker-0.2", Op.REPORT, kind="eval", data={"test_accuracy": 0.9})
    assert sim.state.phase == "stopping"
    assert error_code(one(out, to="worker-1.2")) == "job_running"  # ... and is turned away once the job is over
    assert error_code(one(sim.register("worker-2.2", "worker", 2))) == "job_running"


def test_a_worker_joining_while_a_server_waits_for_its_replacement_is_admitted_once_it_registered():
    sim = Sim()
    training(sim)
    sim.state.checkpoints.committed.append({"name": "ckpt-1", "step": 1, "write_s": 0.1, "final": False})
    for t in (1.0, 3.0, 5.0):  # server-1 and worker-0 are silent
        sim.now = t
        for who in [SERVERS[0], *WORKERS[1:]]:
            sim.send(who, Op.HEARTBEAT)
    sim.tick(5.5)
    sim.tick(5.6)
    assert sim.state.nodes[WORKERS[0]].state == "dead" and sim.state.server_slots
    assert replies(sim.register("worker-0.2", "worker", 0), to="worker-0.2") == []  # no address for server-1 yet
    out = sim.send("server-1.2", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7001", host="t", pid=9)
    joined = ok(one(out, to="worker-0.2"))
    assert {s["name"]: s["address"] for s in joined["servers"]}["server-1"] == "tcp://127.0.0.1:7001"


def test_a_rank_without_a_replacement_moves_onto_the_survivor_with_the_fewest_bytes():
    job = JOB.model_copy(update={"cluster": JOB.cluster.model_copy(update={"server_replace_timeout_s": 10.0})})
    sim = Sim(job)
    training(sim)
    sim.state.checkpoints.committed.append({"name": "ckpt-1", "step": 1, "write_s": 0.1, "final": False})
    lose(sim, SERVERS[1], 5.5)
    assert 1 in sim.state.server_slots
    sim.now = 10.0
    assert "host_ranks" not in ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))  # still waiting for a replacement
    for t in (12.0, 14.0, 15.9):
        sim.now = t
        for who in [SERVERS[0], *WORKERS]:
            sim.send(who, Op.HEARTBEAT)
    sim.tick(16.0)
    assert sim.state.hosting == {1: SERVERS[0]}
    sim.now = 16.1
    assert ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))["host_ranks"] == [1]
    out = sim.send("server-1-hosted", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7101", host="test",
                   pid=123, hosted_by=SERVERS[0])
    [meta] = [r.msg.meta for r in replies(out, to="server-1-hosted") if r.msg.op == Op.OK]
    assert meta["node"] == "server-1" and meta["restore"]["name"] == "ckpt-1"
    [failure] = sim.state.failures
    assert failure.resharded_onto == SERVERS[0] and sim.state.hosting == {}
    assert "host_ranks" not in ok(one(sim.send(SERVERS[0], Op.HEARTBEAT)))


def test_a_killed_server_without_restarts_left_moves_onto_the_surviving_server(tmp_path, tiny_data):
    summary, err, status = _killed_server_run(tmp_path, tiny_data, server_restarts=0, server_replace_timeout_s=1.0)
    survivor = next(n for n in status["nodes"] if n["name"] == "server-0")
    [failure] = summary["failures"]
    assert failure["node"] == "server-1" and failure["resharded_onto"] == "server-0"
    assert failure["replaced_by"] == f"server-1 (pid {survivor['pid']})"  # the survivor's process serves it
    assert "no server restarts left" in err and failure["recovered_after_s"] is not None
    _every_shard_once(summary)
    assert summary["test_accuracy"] > 0.5


def test_rolled_back_versions_are_unknown_when_the_servers_last_heartbeat_is_older_than_the_checkpoint():
    from types import SimpleNamespace

    from downpour.coordinator.failures import rolled_back

    st = SimpleNamespace(checkpoints=SimpleNamespace(committed=[{"versions": {"1": 2417}}]))
    assert rolled_back(st, SimpleNamespace(rank=1, progress={"version": 2500})) == 83
    assert rolled_back(st, SimpleNamespace(rank=1, progress={"version": 2272})) is None  # not 0: updates were lost
    assert rolled_back(st, SimpleNamespace(rank=0, progress={"version": 2272})) is None


def test_a_worker_reconnects_to_a_replacement_server_at_the_same_address_as_to_one_at_a_new_one():
    # A fixed --port (or a DNS name) gives the replacement the old address: the new process is told
    # by its pid, so the requests waiting on the dead one end at once rather than at their timeout.
    from types import SimpleNamespace

    from downpour.worker.service import ServerMap

    reconnects = []
    servers = ServerMap("worker-0")
    servers.rpc = SimpleNamespace(reconnect=lambda name, address: reconnects.append((name, address)) or 2)
    servers.addresses = {"server-0": "tcp://10.0.0.1:7100", "server-1": "tcp://10.0.0.2:7100"}
    servers.pids = {"server-0": 11, "server-1": 12}

    def offer(gen, pid0, pid1, address1="tcp://10.0.0.2:7100"):
        servers.offer({"servers_gen": gen, "servers": [{"rank": 0, "name": "server-0", "address": "tcp://10.0.0.1:7100", "pid": pid0},
                                                       {"rank": 1, "name": "server-1", "address": address1, "pid": pid1}]})
        servers.apply()

    offer(1, 11, 12)
    assert reconnects == []  # the same processes
    offer(2, 11, 99)
    assert reconnects == [("server-1", "tcp://10.0.0.2:7100")] and servers.pids["server-1"] == 99
    offer(3, 11, 99, "tcp://10.0.0.3:7100")
    assert reconnects[-1] == ("server-1", "tcp://10.0.0.3:7100") and len(reconnects) == 2
