"""Replicated servers in real jobs (`downpour train` on 127.0.0.1): primaries SIGKILLed again and
again (a promoted one among them, once its backup was rebuilt) lose no acknowledged update, train
every data shard once per epoch, and a sync job's final parameters equal an undisturbed run's."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from tests.cluster import QUIET, query_status, start_job, stop_job, wait_training
from tests.conftest import tiny_job
from tests.test_recovery import _every_shard_once

pytestmark = pytest.mark.slow


def _primary(status: dict, rank: int) -> dict:
    return next(n for n in status["nodes"] if n["role"] == "server" and n["rank"] == rank and n["state"] == "alive")


def _kill_primaries(run_dir, rank: int, times: int, killed: list) -> None:
    """SIGKILL ``rank``'s primary ``times`` times, each once it has a caught-up backup (so the
    later victims are promoted primaries), waiting for each failure to be seen; pids go to ``killed``."""
    for _ in range(times):
        victim = _primary(wait_replicated(run_dir, rank), rank)
        assert victim["pid"] not in killed
        os.kill(victim["pid"], signal.SIGKILL)
        killed.append(victim["pid"])
        wait_failures(run_dir, len(killed))


def _live_server(run_dir: str, timeout_s: float = 60.0) -> dict:
    """A server the coordinator sees alive (its STATUS asked again while a loaded machine keeps it
    from answering within the query's 2 s, as after a failover on CI)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = query_status(run_dir)
        live = [n for n in (st or {}).get("nodes", []) if n["role"] == "server" and n["state"] == "alive"]
        if live:
            return live[0]
        time.sleep(0.1)
    raise AssertionError("the coordinator never showed a live server")


def wait_failures(run_dir: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until the coordinator recorded ``count`` failures."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = query_status(run_dir)
        if st and len(st.get("failures", [])) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the coordinator never saw failure {count}")


def wait_replicated(run_dir: str, rank: int, timeout_s: float = 60.0) -> dict:
    """Wait until ``rank``'s current primary reports a caught-up backup, and the process keeping
    that backup reports it ready behind that primary (what the coordinator promotes from)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = query_status(run_dir)
        failures = (st or {}).get("failures", [])
        # Every failover over: the promoted primary serves (it answered a worker), and was heard since.
        if st and st["phase"] == "training" and not any(f.get("recovered_after_s") is None or
                                                        (f.get("promoted_to") and f.get("failover_s") is None) for f in failures):
            try:
                primary = _primary(st, rank)
            except StopIteration:
                primary = None
            caught = (primary or {}).get("progress", {}).get("replication", {}).get("backups") or []
            keepers = [n for n in st["nodes"] if f"{n['name']}/{n['pid']}" in caught and n["state"] == "alive"]
            if primary and keepers and any((n["progress"].get("backups") or {}).get(str(rank), [False])[0] and
                                           n["progress"]["backups"][str(rank)][2] == primary["address"] for n in keepers):
                return st
        time.sleep(0.2)
    raise AssertionError(f"server rank {rank} never had a caught-up backup (status: {st and st.get('failures')})")


def _summary(proc, run_dir: str) -> dict:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _no_update_lost(summary: dict, ranks: int) -> None:
    """Every push a worker was answered is in each rank's final state exactly once: the pushes each
    rank's server applied (counted through every state transfer and promotion; a replayed push is
    not applied again) equal the pushes the workers made, none of which was dropped."""
    workers = summary["workers"].values()
    assert all(w["dropped_pushes"] == 0 for w in workers)
    acknowledged = sum(w["pushes"] for w in workers)
    for rank in range(ranks):
        assert summary["servers"][f"server-{rank}"]["pushes"] == acknowledged, rank


def test_primaries_killed_again_and_again_lose_no_update(tmp_path, tiny_data):
    """Rank 1's primary is killed three times: the original, then the backup promoted in its place
    (after its own backup was rebuilt), then the next one. Four server processes, one backup each."""
    job = tiny_job(tiny_data, training={"epochs": 40}, monitor=QUIET,
                   cluster={"num_servers": 4, "num_workers": 2, "replicas": 1, "replication": "sync",
                            "heartbeat_timeout_s": 1.5})
    proc, run_dir = start_job(tmp_path, job)
    killed = []
    try:
        wait_training(run_dir, steps=3)
        _kill_primaries(run_dir, 1, 3, killed)
        summary = _summary(proc, run_dir)
    finally:
        stop_job(proc)
    assert summary["status"] == "ok"
    failovers = [f for f in summary["failures"] if f.get("promoted_to")]
    assert len(failovers) >= 3 and all(f["rolled_back_versions"] == 0 and f["restored_from"] is None for f in failovers)
    rank1 = [f for f in failovers if f["node"] == "server-1"]
    assert len(rank1) == 3 and all(f["recovered_after_s"] is not None and f["failover_s"] is not None for f in rank1), rank1
    assert all(f["rereplicated_after_s"] is not None for f in rank1[:2])  # (waited for before the next kill)
    # Each victim's process kept another rank's backup too: reported lost; one process is left at
    # the end, so every rank is short of its backup (and says so).
    assert any(f.get("backups_lost") for f in failovers)
    assert summary["replication"]["replicas"] == 1 and summary["replication"]["short"] == [0, 1, 2, 3]
    _no_update_lost(summary, 4)
    _every_shard_once(summary, 40)
    assert summary["test_accuracy"] > 0.5


def test_when_the_last_server_process_dies_a_replacement_loads_the_latest_checkpoint_and_the_job_goes_on(tmp_path, tiny_data):
    """With backups, a dead server's ranks fail over to another process and the launcher starts no
    replacement; once the last server process dies, no backup is left anywhere. Before, the job then
    waited for ever; now the launcher starts a replacement, which loads the latest checkpoint."""
    # (Slowed workers: on a loaded machine the job otherwise reached its end before the second kill.)
    job = tiny_job(tiny_data, training={"epochs": 30, "slowdown": {"rank": None, "factor": 4.0}}, monitor=QUIET,
                   checkpoint={"every_steps": 40, "every_s": None},
                   cluster={"num_servers": 2, "num_workers": 2, "replicas": 1, "heartbeat_timeout_s": 1.5,
                            "server_replace_timeout_s": 2.0})
    proc, run_dir = start_job(tmp_path, job)
    killed: list = []
    try:
        wait_training(run_dir, steps=3)
        _kill_primaries(run_dir, 1, 1, killed)  # rank 1 fails over into server-0's process
        last = _live_server(run_dir)
        os.kill(last["pid"], signal.SIGKILL)
        summary = _summary(proc, run_dir)
    finally:
        stop_job(proc)
    assert summary["status"] == "ok", summary.get("error")
    restored = [f for f in summary["failures"] if f.get("restored_from")]
    assert restored and all(f["recovered_after_s"] is not None for f in restored), summary["failures"]
    _every_shard_once(summary, 30)
    assert summary["test_accuracy"] > 0.5


def test_the_ctr_job_loses_no_update_of_its_tables_when_primaries_are_killed(tmp_path):
    """The CTR job (sparse tables with Adagrad rows, pulled a batch ahead): rank 1's primary killed
    twice, the second time the promoted one. Every row update a worker pushed is applied once, as
    is every dense push (a row request the old primary died with may reach the new one after the
    next: it is applied all the same)."""
    from tests.test_sparse_job import _ctr_job

    job = _ctr_job(epochs=25)
    job["cluster"].update(num_servers=3, replicas=1, replication="sync", heartbeat_timeout_s=1.5)
    job["monitor"] = QUIET
    proc, run_dir = start_job(tmp_path, job)
    killed = []
    try:
        wait_training(run_dir, steps=3)
        _kill_primaries(run_dir, 1, 2, killed)
        summary = _summary(proc, run_dir)
    finally:
        stop_job(proc)
    assert summary["status"] == "ok"
    assert len([f for f in summary["failures"] if f.get("promoted_to") and f["node"] == "server-1"]) == 2
    _no_update_lost(summary, 3)
    pushed = sum(w["sparse"]["ids_pushed"] for w in summary["workers"].values())
    applied = sum(v["sparse"]["keys_pushed"] for v in summary["servers"].values())
    assert applied == pushed > 0
    assert all(w["sparse"]["reads_ahead"] > 0 for w in summary["workers"].values())
    _every_shard_once(summary, 25)
    assert summary["test_auc"] > 0.7


def _final(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)


def test_in_sync_mode_a_primary_killed_mid_job_changes_no_parameter(tmp_path, tiny_data):
    """``replication: sync`` and sync training: the promoted backup holds every push answered, the
    workers replay the rest, each applied once; the parameters end as an undisturbed run's."""
    def job(folder):
        # Long enough that a backup catches up and the kill lands mid-job on a quiet machine too.
        return tiny_job(tiny_data, training={"epochs": 40, "consistency": "sync"}, monitor=QUIET,
                        cluster={"num_servers": 3, "num_workers": 1, "replicas": 1, "replication": "sync",
                                 "heartbeat_timeout_s": 1.5})

    (tmp_path / "calm").mkdir()
    proc, calm_dir = start_job(tmp_path / "calm", job(tmp_path / "calm"))
    try:
        calm = _summary(proc, calm_dir)
    finally:
        stop_job(proc)
    (tmp_path / "killed").mkdir()
    proc, run_dir = start_job(tmp_path / "killed", job(tmp_path / "killed"))
    try:
        wait_training(run_dir, steps=3)
        st = wait_replicated(run_dir, 0)
        os.kill(_primary(st, 0)["pid"], signal.SIGKILL)
        summary = _summary(proc, run_dir)
    finally:
        stop_job(proc)
    [failure] = summary["failures"]
    assert failure["promoted_to"] is not None and failure["rolled_back_versions"] == 0
    _no_update_lost(summary, 3)
    assert calm["failures"] == [] and _no_update_lost(calm, 3) is None
    caught_up = calm["replication"]["caught_up"]  # every rank's backup, as its primary last reported (at the end too)
    assert sorted(caught_up) == sorted(calm["replication"]["planned"]) and all(n >= 1 for n in caught_up.values()), caught_up
    want, got = _final(calm_dir), _final(run_dir)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
