"""The scheduler with real jobs: a preempted job resumes from its checkpoint and loses nothing."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml

from downpour.api import resolve_job
from downpour.launch import LocalLauncher
from downpour.scheduler import Phase, Resources
from downpour.scheduler.service import Scheduler, SchedulerSettings
from tests.cluster import QUIET, wait_training
from tests.conftest import tiny_job
from tests.scheduler_helpers import kill_jobs, summary


def _drive(s: Scheduler, done, timeout_s: float) -> None:
    """Tick the scheduler until ``done()`` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s.step()
        if done():
            return
        time.sleep(0.2)
    raise AssertionError(f"not done in {timeout_s} s: {[(j.id, j.phase.value, j.message) for j in s.jobs.values()]}")


def _preempted(tmp_path, tiny_data, job: dict) -> tuple:
    """Run ``job`` under the scheduler, preempt it for a more important job once it trains, let
    both finish; returns (the job, its first summary, its final summary)."""
    s = Scheduler(SchedulerSettings(root=str(tmp_path / "sched"), nodes={"here": Resources(cpus=4, memory_mb=8192)},
                                    policy="priority", policy_options={"aging_per_s": 0.0}, tick_s=0.2))
    try:
        a = s.submit(yaml.safe_dump(job))
        _drive(s, lambda: a.phase is Phase.RUNNING, 30)
        wait_training(a.run_dir, steps=20)
        urgent = s.submit(yaml.safe_dump(tiny_job(tiny_data, training={"epochs": 1}, monitor=QUIET)), priority=5)
        _drive(s, lambda: a.phase is not Phase.RUNNING, 10)
        assert a.phase is Phase.STOPPING and a.preemptions == 1
        _drive(s, lambda: urgent.phase is Phase.RUNNING, 120)
        first = summary(os.path.join(s.settings.root, "jobs", str(a.id), "run-0"))
        _drive(s, lambda: a.phase.finished and urgent.phase.finished, 300)
        assert (a.phase, urgent.phase) == (Phase.DONE, Phase.DONE), a.message
        assert a.attempt == 1 and a.extra["resumed_from"].endswith("run-0")
        return a, first, summary(a.run_dir)
    finally:
        kill_jobs(j.pid for j in s.jobs.values() if j.pid)
        s.store.close()


@pytest.mark.slow
def test_a_preempted_sync_job_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path, tiny_data):
    epochs = 40  # long enough that the preemption lands mid-job on a fast machine too
    job = tiny_job(tiny_data, training={"consistency": "sync", "epochs": epochs}, checkpoint={"every_s": 3600}, monitor=QUIET,
                   cluster={"heartbeat_interval_s": 0.1})
    whole = LocalLauncher(resolve_job(job), str(tmp_path / "whole")).run()
    a, first, last = _preempted(tmp_path, tiny_data, job)
    assert first["status"] == "stopped"
    want = torch.load(os.path.join(whole.run_dir, "model.pt"), weights_only=True)
    got = torch.load(os.path.join(a.run_dir, "model.pt"), weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
    assert last["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(epochs)}


@pytest.mark.slow
def test_a_preempted_async_job_trains_every_shard_exactly_once_per_epoch(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"epochs": 30}, checkpoint={"every_s": 3600}, monitor=QUIET)
    a, first, last = _preempted(tmp_path, tiny_data, job)
    assert first["status"] == "stopped" and first["data_shards"]["unfinished"] > 0
    assert last["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(30)}
    assert last["data_shards"]["unfinished"] == 0
    assert first["examples"] + last["examples"] == 30 * 2400

