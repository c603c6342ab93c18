"""A graceful stop: the first SIGTERM or Ctrl-C commits a final checkpoint, then every process stops;
`--resume` continues from it and loses nothing (the second signal stops at once:
tests/test_end_to_end.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
import yaml

from downpour.api import check_run_dir, resolve_job
from downpour.coordinator.checkpointing import MAX_WIDENING, sync_margin, widening
from downpour.coordinator.state import CommitCheckpoint, CoordinatorState, Finish, Reply, SaveModel
from downpour.launch import LocalLauncher
from downpour.protocol import Op
from tests.cluster import PY, alive, start_job, wait_training
from tests.conftest import tiny_job
from tests.test_coordinator_state import JOB, LAYOUT, NUM_TRAIN, SERVERS, WORKERS, Sim, ident, one, replies


class CheckpointSim(Sim):
    """The state machine with checkpoints on (nothing is written: the service would do that)."""

    def __init__(self, job=JOB) -> None:
        super().__init__(job)
        self.state = CoordinatorState(job, LAYOUT, NUM_TRAIN, self.now, checkpoint_url="memory://graceful")

    def heartbeat(self, who: str, **progress) -> dict:
        return one(self.send(who, Op.HEARTBEAT, progress=progress)).msg.meta


def test_a_graceful_stop_has_the_workers_leave_then_commits_a_final_checkpoint_then_stops():
    sim = CheckpointSim()
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    held = {w: one(sim.send(w, Op.NEXT_SHARD)).msg.meta["shard"] for w in WORKERS[:2]}
    assert "leave" not in sim.heartbeat(WORKERS[0], steps=3)

    assert sim.state.request_stop(1.0) == []
    assert sim.state.request_stop(1.1) == []  # asked twice: once
    for w in WORKERS:  # every training worker is told to leave, in its heartbeat answer (async: at once)
        order = sim.heartbeat(w, steps=3)
        assert order["leave"] and order["leave_at"] is None
    assert sim.tick(1.2) == []  # workers still train: no checkpoint yet
    # Each worker leaves with its exact position; its shard goes back to the queue.
    sim.send(WORKERS[0], Op.LEAVE, position=[held[WORKERS[0]]["epoch"], held[WORKERS[0]]["shard"], 3], stats={"steps": 3})
    sim.send(WORKERS[1], Op.LEAVE, position=None, stats={"steps": 0})
    assert sim.tick(1.3) == []
    sim.send(WORKERS[2], Op.LEAVE, position=None, stats={"steps": 0})

    asked = sim.tick(1.4)  # nobody trains: the final checkpoint
    assert sorted(a.to for a in asked if isinstance(a, Reply) and a.msg.op == Op.CHECKPOINT) == sorted(ident(s) for s in SERVERS)
    name = asked[0].msg.meta["name"]
    assert asked[0].msg.meta["at_version"] is None
    assert sim.tick(1.5) == []  # waiting for the servers' files
    commits = []
    for s in SERVERS:
        report = {"name": name, "file": f"{s}.safetensors", "sha256": "0" * 64, "bytes": 1, "version": 7,
                  "positions": {WORKERS[0]: [held[WORKERS[0]]["epoch"], held[WORKERS[0]]["shard"], 3]}}
        commits += [a for a in sim.send(s, Op.REPORT, kind="checkpoint", data=report) if isinstance(a, CommitCheckpoint)]
    assert len(commits) == 1 and commits[0].final
    # The shard worker-0 was in resumes after its 3 examples; nothing was completed.
    queue = commits[0].job_state["ledger"]["queue"]
    assert [held[WORKERS[0]]["epoch"], held[WORKERS[0]]["shard"], 3] in queue
    assert [held[WORKERS[1]]["epoch"], held[WORKERS[1]]["shard"], 0] in queue
    sim.state.checkpoint_committed(1.6, True)

    saved = sim.tick(1.7)
    assert [type(a) for a in saved] == [SaveModel] and sim.state.phase == "stopping"
    for s in SERVERS:  # servers stop once the model is saved (their next heartbeat)
        assert sim.heartbeat(s).get("stop")
    out = []
    for s in SERVERS:
        out += sim.send(s, Op.REPORT, kind="server", data={"pushes": 1})
    finish = [a for a in out if isinstance(a, Finish)]
    assert len(finish) == 1 and finish[0].code == 0
    summary = finish[0].summary
    assert summary["status"] == "stopped" and summary["error"] is None
    assert summary["checkpoints"]["last"] == name


def test_a_sync_job_stops_every_worker_after_the_same_round():
    job = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "sync"})})
    sim = CheckpointSim(job)
    sim.start()
    sim.heartbeat(SERVERS[0], version=40)
    sim.state.request_stop(1.0)
    orders = [sim.heartbeat(w) for w in WORKERS]
    assert len({o["leave_at"] for o in orders}) == 1 and orders[0]["leave_at"] > 40


def test_a_sync_checkpoint_asked_again_starts_from_the_passing_server_s_version_and_stays_near_it():
    """A server already past the version asked for says where it is; the next ask goes a bounded
    margin past that. Before, it went to the heartbeat's (stale) version plus a margin doubled per
    retry: under load, version 20 and then 1,154, past a short job's end."""
    job = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": "sync"})})
    sim = CheckpointSim(job)
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    sim.heartbeat(SERVERS[0], version=0)
    sim.state.version_rate = 100.0  # rounds per second, as heartbeats measured it
    margin = sync_margin(100.0, job.cluster.heartbeat_interval_s)
    asks = []
    name, at, passed, t = None, None, 0, 0.1
    for retry in range(6):  # the first ask, then five more
        out = sim.tick(t) if at is None else sim.send(SERVERS[1], Op.REPORT, kind="checkpoint",
                                                       data={"name": name, "missed": True, "version": passed})
        [ask] = [a for a in out if isinstance(a, Reply) and a.msg.op == Op.CHECKPOINT and a.to == ident(SERVERS[0])]
        name, at = ask.msg.meta["name"], ask.msg.meta["at_version"]
        asks.append(at)
        assert passed < at <= passed + widening(retry) * margin
        passed = at + 3  # the server got there before the ask did
    assert asks[0] == margin and max(b - a for a, b in zip(asks, asks[1:])) <= 3 + MAX_WIDENING * margin
    out = sim.send(SERVERS[1], Op.REPORT, kind="checkpoint", data={"name": name, "missed": True, "version": passed})
    assert sim.state.checkpoints.pending is None and sim.state.checkpoints.abandoned == 1  # passed after five retries: given up


@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_in_a_sync_stop_the_servers_hear_that_a_worker_leaving_ends_the_rounds(consistency):
    """A worker may hear of the stop after the round every worker leaves after; the others, gone
    there, must not leave it training alone in rounds an uninterrupted run never had: the servers
    learn with the smaller membership (and in heartbeat answers) that the rounds end (``stopping``:
    SyncPolicy.freeze). Before the stop, and in async jobs, nothing changes."""
    job = JOB.model_copy(update={"training": JOB.training.model_copy(update={"consistency": consistency})})
    sim = CheckpointSim(job)
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    assert "stopping" not in sim.heartbeat(SERVERS[0])
    sim.heartbeat(SERVERS[0], version=40)
    sim.state.request_stop(1.0)
    out = sim.send(WORKERS[0], Op.LEAVE, position=None, stats={})
    told = [r.msg.meta for r in replies(out) if r.msg.op == Op.MEMBERSHIP]
    assert len(told) == len(SERVERS) and all(m["workers"] == WORKERS[1:] for m in told)
    assert all(m.get("stopping", False) is (consistency == "sync") for m in told)
    assert sim.heartbeat(SERVERS[1]).get("stopping", False) is (consistency == "sync")


def test_a_job_whose_every_worker_left_cleanly_stops_gracefully_once_none_joined_in_time():
    """Workers sent SIGTERM one by one (preempted machines) leave cleanly; the job ended failed after
    cluster.startup_timeout_s of nothing. It now stops then as a graceful stop does: a final
    checkpoint, status stopped, and --resume goes on. A worker that died instead still fails it."""
    job = JOB.model_copy(update={"cluster": JOB.cluster.model_copy(update={"startup_timeout_s": 3.0})})
    sim = CheckpointSim(job)
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    for w in WORKERS:
        sim.send(w, Op.LEAVE, position=None, stats={"steps": 0})
    assert sim.state.workerless_left and sim.state.stop_requested is None
    sim.tick(1.0)  # (the step-0 checkpoint is asked for)
    assert sim.state.stop_requested is None  # a joiner may still come
    sim.now = 3.0
    for server in SERVERS:
        sim.heartbeat(server)
    asked = sim.tick(3.1)
    assert sim.state.stop_requested is not None
    asked += sim.tick(3.2)  # (the stop's next step: nobody trains)
    final = [a for a in asked if isinstance(a, Reply) and a.msg.op == Op.CHECKPOINT]
    assert final and sim.state.checkpoints.pending.final  # the final checkpoint, in place of the pending periodic one
    assert sim.state.phase == "training" and sim.state.error is None


def test_a_stop_before_training_began_ends_the_job_at_once():
    sim = CheckpointSim()
    sim.register(SERVERS[0], "server", 0)
    sim.state.request_stop(1.0)
    assert sim.state.phase == "failed" and "before training began" in sim.state.error  # (every node is told to stop)
    summary = sim.state.summary(1.5)  # asked for: not a failure
    assert summary["status"] == "stopped" and summary["error"] is None and "before training began" in summary["stopped"]


def test_a_server_lost_during_a_graceful_stop_ends_the_job_stopped_with_the_last_committed_checkpoint():
    """No replacement is started while the job stops, so the final checkpoint could never be
    written: the job ends at once, stopped, and says where --resume continues from (before, the
    coordinator waited for a replacement that never came, and the job hung)."""
    from downpour.coordinator import failures

    sim = CheckpointSim()
    sim.start()
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000040-0002", "step": 40, "write_s": 0.1, "final": False, "versions": {}})
    sim.state.request_stop(1.0)
    failures.lose(sim.state, 1.2, sim.state.nodes["server-1"], "its process exited", "dead")
    assert sim.state.phase == "failed"  # every node is told to stop
    summary = sim.state.summary(1.5)
    assert summary["status"] == "stopped" and summary["error"] is None, summary
    assert "server-1 was lost during the graceful stop" in summary["stopped"]
    assert "--resume continues from checkpoint ckpt-000000000040-0002 (step 40)" in summary["stopped"]
    assert [f["node"] for f in summary["failures"]] == ["server-1"]

    final = CheckpointSim()  # the final checkpoint committed first: the resume continues from it
    final.start()
    final.state.checkpoints.committed.append({"name": "ckpt-000000000050-0003", "step": 50, "write_s": 0.1, "final": True, "versions": {}})
    final.state.request_stop(1.0)
    failures.lose(final.state, 1.2, final.state.nodes["server-0"], "killed", "dead")
    assert "the final checkpoint ckpt-000000000050-0003 was committed before it" in final.state.summary(1.5)["stopped"]

    running = CheckpointSim()  # not stopping: a replacement is awaited, as ever
    running.start()
    running.state.checkpoints.committed.append({"name": "ckpt-000000000040-0002", "step": 40, "write_s": 0.1, "final": False,
                                                "versions": {}})
    failures.lose(running.state, 1.2, running.state.nodes["server-1"], "killed", "dead")
    assert running.state.phase == "training" and running.state.server_slots


def test_a_rank_lost_before_the_stop_with_no_replacement_ends_the_stop_instead_of_waiting_for_ever():
    """The stopping launcher starts no replacement: once none came within server_replace_timeout_s
    of the stop, the final checkpoint can never be written, so the job ends stopped."""
    from downpour.coordinator import failures

    sim = CheckpointSim()
    sim.start()
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000040-0002", "step": 40, "write_s": 0.1, "final": False,
                                            "versions": {}})
    failures.lose(sim.state, 1.0, sim.state.nodes["server-1"], "killed", "dead")
    assert sim.state.phase == "training" and sim.state.server_slots  # waiting for its replacement
    sim.state.request_stop(2.0)
    for w in WORKERS:
        sim.send(w, Op.LEAVE, position=None, stats={"steps": 0})
    wait = sim.state.cl.server_replace_timeout_s
    sim.now = 2.0 + wait - 1.0
    for n in (*WORKERS, SERVERS[0]):
        sim.heartbeat(n)
    sim.tick(sim.now)
    assert sim.state.phase == "training"  # a replacement started before the stop may still register
    sim.now = 2.0 + wait + 1.0
    sim.heartbeat(SERVERS[0])
    sim.tick(sim.now)
    summary = sim.state.summary(sim.now)
    assert summary["status"] == "stopped" and "no replacement came" in summary["stopped"], summary
    assert "--resume continues from checkpoint ckpt-000000000040-0002" in summary["stopped"]


def test_an_evaluator_lost_after_a_stop_that_came_too_late_to_stop_training_still_fails_the_job_in_time():
    """A stop asked for while the last shard ends: training completes and the job evaluates; its
    evaluator dies, and no worker will join (the launcher stops): the job fails after
    cluster.startup_timeout_s, as without the stop, not never."""
    from downpour.coordinator import failures

    sim = CheckpointSim()
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    sim.state.request_stop(1.0)
    while (shard := one(sim.send(WORKERS[0], Op.NEXT_SHARD)).msg.meta["shard"]) is not None:
        sim.send(WORKERS[0], Op.SHARD_DONE, epoch=shard["epoch"], shard=shard["shard"], examples=shard["stop"] - shard["start"])
    for w in WORKERS:
        sim.send(w, Op.WORKER_DONE, stats={"examples": 1, "steps": 1})
    if sim.state.phase != "evaluating":
        pytest.skip(f"the stop ended training first here ({sim.state.phase})")
    failures.lose(sim.state, 2.0, sim.state.nodes[sim.state.evaluator], "killed", "dead")
    sim.now = 2.0 + sim.state.cl.startup_timeout_s + 1.0
    for s in SERVERS:
        sim.heartbeat(s)
    sim.tick(sim.now)
    assert sim.state.phase == "failed" and "every worker was lost" in sim.state.error


def test_a_graceful_stop_s_final_checkpoint_that_never_completes_is_abandoned_and_the_stop_ends_without_it():
    sim = CheckpointSim()
    sim.start()
    sim.state.request_stop(1.0)
    for w in WORKERS:
        sim.send(w, Op.LEAVE, position=None, stats={"steps": 0})
    sim.tick(1.1)  # nobody trains: the final checkpoint is asked of the servers, which never answer
    assert sim.state.checkpoints.pending is not None and sim.state.checkpoints.pending.final
    for s in SERVERS:  # alive, heartbeating, but the write hangs (storage that does not answer)
        sim.heartbeat(s)
    assert sim.tick(5.0) == [] and sim.state.checkpoints.pending is not None
    timeout = sim.state.job.checkpoint.timeout_s
    for s in SERVERS:
        sim.heartbeat(s)
    sim.now = 1.1 + timeout + 0.5
    for s in SERVERS:
        sim.heartbeat(s)
    saved = sim.tick(sim.now)
    assert sim.state.checkpoints.pending is None and sim.state.checkpoints.abandoned == 1
    assert any(isinstance(a, SaveModel) for a in saved) and sim.state.phase == "stopping"
    assert sim.tick(sim.now + 0.1) == [] and sim.state.phase == "stopping"  # workers all gone: as a stop has them
    ck = sim.state.summary(sim.now)["checkpoints"]
    assert ck["final_abandoned"].startswith("ckpt-000000000000-0001: not complete after") and ck["count"] == 0


def test_the_console_warns_when_no_checkpoint_or_only_the_final_one_was_not_written(capsys, tmp_path):
    from downpour.cli.main import _warn_checkpoints

    url = "s3://ckpts/run"
    _warn_checkpoints({"checkpoints": {"enabled": True, "url": url, "count": 3, "last": "ckpt-000000000307-0003",
                                       "last_step": 307, "abandoned": 2,
                                       "final_abandoned": "ckpt-000000001407-0008: server-0: EndpointConnectionError"}}, str(tmp_path))
    err = capsys.readouterr().err
    assert "WARNING: the final checkpoint was not written (ckpt-000000001407-0008: server-0: EndpointConnectionError)" in err
    assert "continues from ckpt-000000000307-0003 (step 307)" in err
    _warn_checkpoints({"checkpoints": {"enabled": True, "url": url, "count": 0, "abandoned": 2}}, str(tmp_path))
    assert "no checkpoint was committed (2 abandoned" in capsys.readouterr().err
    _warn_checkpoints({"checkpoints": {"enabled": True, "url": url, "count": 3, "abandoned": 1}}, str(tmp_path))  # a periodic one
    assert capsys.readouterr().err == ""


def test_a_stop_after_training_ended_lets_the_job_finish_normally():
    sim = CheckpointSim()
    sim.train()
    assert sim.state.request_stop(1.0) == [] and sim.state.stop_requested is None


def test_servers_hear_that_the_job_is_ending_from_a_graceful_stop_or_its_evaluation_on():
    """A server sent SIGTERM serves on while the job ends (its final checkpoint needs it), else stops."""
    sim = CheckpointSim()
    sim.start()
    assert "ending" not in sim.heartbeat(SERVERS[0])
    sim.state.request_stop(1.0)
    assert sim.heartbeat(SERVERS[0])["ending"] is True
    done = CheckpointSim()
    done.train()  # evaluating: the job ends by itself
    assert done.heartbeat(SERVERS[1])["ending"] is True


def test_workers_that_left_are_not_asked_to_leave_again_and_others_keep_heartbeating():
    sim = CheckpointSim()
    sim.start()
    sim.state.request_stop(1.0)
    sim.send(WORKERS[0], Op.LEAVE, position=None, stats={})
    assert "leave" not in sim.heartbeat(SERVERS[0])
    assert sim.heartbeat(WORKERS[1])["leave"]


# -- end to end -----------------------------------------------------------------------------------


def _committed(run_dir) -> list[str]:
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(n for n in os.listdir(folder) if os.path.exists(os.path.join(folder, n, "manifest.json")))


def _stop_gracefully(tmp_path, job: dict, steps: int = 20) -> tuple[str, dict, str]:
    """Start `downpour train`, SIGTERM it once every worker trained ``steps`` steps; returns the run
    folder, its summary and the launcher's stderr. Every process of the job must be gone."""
    proc, run_dir = start_job(tmp_path, job)
    try:
        pids = [n["pid"] for n in wait_training(run_dir, steps=steps)["nodes"]]
        proc.send_signal(15)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopping gracefully" in err and "--resume" in out, (out, err)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    return run_dir, summary, err


def _resume(tmp_path, job: dict, source: str) -> tuple[dict, str]:
    path = tmp_path / "resumed.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "resumed"
    done = subprocess.run([PY, "-m", "downpour", "train", str(path), "--run-dir", str(run_dir), "--quiet", "--resume", source],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text()), str(run_dir)


@pytest.mark.slow
def test_a_gracefully_stopped_async_job_resumes_and_trains_every_shard_exactly_once(tmp_path, tiny_data):
    # Checkpoints far apart: what the resume continues from is the stop's own final checkpoint.
    job = tiny_job(tiny_data, training={"epochs": 30}, checkpoint={"every_s": 3600})
    (tmp_path / "a").mkdir()
    stopped, summary, _ = _stop_gracefully(tmp_path / "a", job)
    assert summary["status"] == "stopped" and summary["data_shards"]["unfinished"] > 0
    left = summary["data_shards"]["remaining"]  # every shard of the job not completed: what the resume completes
    assert left == 30 * 6 - sum(summary["data_shards"]["completed_per_epoch"].values()) and left >= summary["data_shards"]["unfinished"]
    last = _committed(stopped)[-1]
    manifest = json.loads(open(os.path.join(stopped, "checkpoints", last, "manifest.json")).read())
    assert manifest["job"]["final"] is True and summary["checkpoints"]["last"] == last
    assert os.path.exists(os.path.join(stopped, "model.pt"))
    resumed, _ = _resume(tmp_path, job, stopped)
    assert resumed["resumed_from"].endswith(last)
    # Every shard of every epoch trained to completion exactly once over the two runs, and every example.
    assert resumed["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(30)}
    assert resumed["data_shards"]["unfinished"] == 0
    assert summary["examples"] + resumed["examples"] == 30 * 2400
    assert summary["job_examples"] == summary["examples"] and resumed["job_examples"] == 30 * 2400  # the job's total


@pytest.mark.slow
def test_a_gracefully_stopped_sync_job_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path, tiny_data):
    """Sync training is deterministic (no dropout): every worker leaves after the same round, so
    the stopped-and-resumed job lands on the uninterrupted run's parameters."""
    # Long enough that the stop lands mid-job on a fast machine too: the round workers leave after
    # is placed about (2 heartbeats + 0.25 s) of training ahead.
    epochs = 40
    job = tiny_job(tiny_data, training={"consistency": "sync", "epochs": epochs}, checkpoint={"every_s": 3600},
                   cluster={"heartbeat_interval_s": 0.1})
    whole = LocalLauncher(resolve_job(job), str(tmp_path / "whole")).run()
    (tmp_path / "a").mkdir()
    stopped, summary, _ = _stop_gracefully(tmp_path / "a", job)
    assert summary["status"] == "stopped"
    resumed, resumed_dir = _resume(tmp_path, job, stopped)
    want = torch.load(os.path.join(whole.run_dir, "model.pt"), weights_only=True)
    got = torch.load(os.path.join(resumed_dir, "model.pt"), weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
    assert resumed["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(epochs)}


@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job_at_once_stops_it_gracefully_and_it_resumes_exactly(tmp_path, tiny_data):
    """As a service manager stopping the job's control group, or `pkill -f` on its run folder, does:
    the launcher, the coordinator, the servers and the workers each get one SIGTERM. Before, the
    servers died of it (no final checkpoint), the coordinator took the launcher's SIGTERM as a
    second one and stopped at once (130), the launcher restarted it into the stop and then killed
    it: no summary, and the job failed."""
    job = tiny_job(tiny_data, training={"epochs": 30}, checkpoint={"every_s": 3600})
    (tmp_path / "a").mkdir()
    proc, run_dir = start_job(tmp_path / "a", job)
    try:
        status = wait_training(run_dir, steps=20)
        pids = [proc.pid, status["coordinator"]["pid"], *(n["pid"] for n in status["nodes"])]
        for pid in pids:
            os.kill(pid, 15)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "--resume" in out, err[-3000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "stopped" and summary["failures"] == [] and summary["data_shards"]["unfinished"] > 0
    last = _committed(run_dir)[-1]
    assert json.loads(open(os.path.join(run_dir, "checkpoints", last, "manifest.json")).read())["job"]["final"] is True
    logs = {n: open(os.path.join(run_dir, "logs", f"{n}.log")).read() for n in ("coordinator", "server-0", "server-1")}
    assert "served on until the job's end" in logs["server-0"] and "served on until the job's end" in logs["server-1"]
    assert not os.path.exists(os.path.join(run_dir, "logs", "coordinator.2.log"))
    resumed, _ = _resume(tmp_path, job, run_dir)
    assert resumed["resumed_from"].endswith(last) and resumed["data_shards"]["unfinished"] == 0
    assert resumed["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(30)}
    assert summary["examples"] + resumed["examples"] == 30 * 2400


@pytest.mark.slow
def test_a_server_sent_sigterm_alone_stops_and_its_rank_is_replaced_while_the_job_goes_on(tmp_path, tiny_data):
    # (Every worker's steps take 4 times their compute: on a fast machine the job otherwise trained to
    # its end before the SIGTERM landed, and the server then stopped with it.)
    job = tiny_job(tiny_data, training={"epochs": 30, "slowdown": {"rank": None, "factor": 4.0}})
    proc, run_dir = start_job(tmp_path, job)
    try:
        status = wait_training(run_dir, steps=20)
        server = next(n for n in status["nodes"] if n["name"] == "server-1")
        os.kill(server["pid"], 15)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "ok" and summary["examples"] == 30 * 2400
    [failure] = summary["failures"]
    assert failure["node"] == "server-1" and failure["replaced_by"]
    assert "SIGTERM, and the job is not ending" in open(os.path.join(run_dir, "logs", "server-1.log")).read()


@pytest.mark.slow
def test_a_server_killed_during_a_graceful_stop_ends_it_stopped_and_the_resume_trains_every_example_once(tmp_path, tiny_data):
    """Ctrl-C, then a server dies before the final checkpoint is written. Before, the coordinator
    waited for a replacement the stopping launcher never started, and the job hung until a second
    Ctrl-C. Now it ends at once, stopped, and --resume continues from the last committed checkpoint."""
    job = tiny_job(tiny_data, training={"epochs": 30}, checkpoint={"every_steps": 40, "every_s": None})
    (tmp_path / "a").mkdir()
    proc, run_dir = start_job(tmp_path / "a", job)
    try:
        status = wait_training(run_dir, steps=60)
        pids = [n["pid"] for n in status["nodes"]]
        server = next(n["pid"] for n in status["nodes"] if n["name"] == "server-1")
        proc.send_signal(2)
        os.kill(server, 9)
        started = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and time.monotonic() - started < 60, err[-3000:]
    assert "server-1 was lost during the graceful stop" in out and "--resume" in out, (out, err[-3000:])
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "stopped" and summary["failures"][-1]["node"] == "server-1", summary["stopped"]
    resumed, _ = _resume(tmp_path, job, run_dir)
    assert resumed["resumed_from"].endswith(summary["checkpoints"]["last"])
    assert resumed["data_shards"]["unfinished"] == 0
    assert resumed["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(30)}
    assert resumed["job_examples"] == 30 * 2400


@pytest.mark.slow
def test_ctrl_c_just_after_a_server_died_stops_the_job_promptly_and_the_resume_trains_every_example_once(tmp_path, tiny_data):
    """The stop lands while the server's replacement starts (or before its loss is seen). Before,
    the workers never heard where the replacement listens once told to leave, and waited out five
    30 s pull timeouts each on the dead process: a three-minute "graceful" stop, with three false
    worker failures."""
    job = tiny_job(tiny_data, training={"epochs": 30}, checkpoint={"every_steps": 40, "every_s": None})
    (tmp_path / "a").mkdir()
    proc, run_dir = start_job(tmp_path / "a", job)
    try:
        status = wait_training(run_dir, steps=60)
        os.kill(next(n["pid"] for n in status["nodes"] if n["name"] == "server-0"), 9)
        time.sleep(0.5)
        proc.send_signal(2)
        started = time.monotonic()
        out, err = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0 and time.monotonic() - started < 60, err[-3000:]
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "stopped", summary.get("error")
    assert [f["node"] for f in summary["failures"]] == ["server-0"], summary["failures"]  # no worker failed
    resumed, _ = _resume(tmp_path, job, run_dir)
    assert resumed["data_shards"]["unfinished"] == 0
    assert resumed["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(30)}


def test_ctrl_c_as_the_job_starts_stops_it_once_with_no_coordinator_restart_and_no_resume_promised(tmp_path, tiny_data):
    """The launcher passes a stop on as SIGTERM as soon as the coordinator's address is written:
    the coordinator takes it from then on (a coordinator killed by it would be restarted into the
    same SIGTERM, over and over). Stopped before training began, the job ends at once, and its
    folder, which holds no checkpoint, is not offered a --resume."""
    proc, run_dir = start_job(tmp_path, tiny_job(tiny_data, training={"epochs": 50}))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(run_dir, "coordinator.addr")) and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(2)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "coordinator.2" not in err and "coordinator restart" not in err, err[-3000:]
    assert "resume with --resume" not in err
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["status"] == "stopped" and proc.returncode == 0, err[-3000:]  # as asked: no failure
    if summary.get("stopped"):  # (the stop can come after training began: then it is a normal graceful stop)
        assert "before training began" in summary["stopped"] and "stopped before training began" in out, out
        from downpour.config import load_job
        from downpour.errors import ConfigError

        with pytest.raises(ConfigError, match="left no checkpoint to continue from: remove the folder"):
            check_run_dir(load_job(str(tmp_path / "job.yaml")), run_dir)
