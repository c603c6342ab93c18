"""`downpour scheduler` with real jobs: killed and restarted, it loses no job and adopts the running one."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.cluster import QUIET, wait_training
from tests.conftest import tiny_job
from tests.scheduler_helpers import all_finished, cli, kill_jobs, list_jobs, start_scheduler, summary, wait_jobs


@pytest.mark.slow
def test_a_killed_and_restarted_scheduler_loses_no_job_and_adopts_the_running_one(tmp_path, tiny_data):
    folder = str(tmp_path / "sched")
    long, short = tmp_path / "long.yaml", tmp_path / "short.yaml"
    long.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"epochs": 2000}, monitor=QUIET)))  # until cancelled
    short.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"epochs": 2}, monitor=QUIET)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"batch_size": -1})))
    sched = start_scheduler(folder)
    pids: list[int] = []  # killed at the end if the test fails
    try:
        for k, path in enumerate((long, short, short)):
            out = cli("submit", str(path), "--dir", folder, "--user", f"u{k}")
            assert out.returncode == 0 and f"job {k + 1} " in out.stdout, out.stderr
        jobs = wait_jobs(folder, lambda js: js[1]["phase"] == "running" and js[1]["pid"], 60)
        pid = jobs[1]["pid"]
        pids.append(pid)
        wait_training(jobs[1]["run_dir"], steps=5)
        sched.kill()  # SIGKILL: no chance to clean up
        sched.wait(timeout=10)
        os.kill(pid, 0)  # the job lives on without its scheduler
        sched = start_scheduler(folder)
        jobs = list_jobs(folder)
        assert sorted(jobs) == [1, 2, 3] and jobs[1]["phase"] == "running" and jobs[1]["pid"] == pid, jobs
        assert jobs[2]["phase"] == jobs[3]["phase"] == "queued"
        # Bad requests change nothing.
        refused = cli("submit", str(bad), "--dir", folder)
        assert refused.returncode == 2 and "training.batch_size" in refused.stderr
        big = cli("submit", str(short), "--dir", folder, "--set", "cluster.num_workers=9")
        assert big.returncode == 2 and "too little cpus" in big.stderr
        unknown = cli("cancel", "99", "--dir", folder)
        assert unknown.returncode == 2 and "no job 99" in unknown.stderr
        cancel = cli("cancel", "1", "--dir", folder)  # the adopted job: it checkpoints and stops
        assert cancel.returncode == 0 and "stopping" in cancel.stdout, cancel.stderr
        jobs = wait_jobs(folder, all_finished, 300)  # every job to its end
        assert [jobs[k]["phase"] for k in (1, 2, 3)] == ["cancelled", "done", "done"], jobs
        assert jobs[1]["first_started_s"] < jobs[2]["first_started_s"] < jobs[3]["first_started_s"]
        assert all(jobs[k]["restarts"] == 0 for k in (1, 2, 3))
        assert summary(jobs[1]["run_dir"])["status"] == "stopped"  # a final checkpoint, not a kill
        logs = cli("logs", "2", "--dir", folder)
        assert logs.returncode == 0 and "test accuracy" in logs.stdout
        table = cli("jobs", "--dir", folder)  # the table (narrow without a terminal: columns are cut)
        assert table.returncode == 0 and "downpour jobs" in table.stdout
    finally:
        sched.kill()
        sched.communicate()
        from downpour.scheduler.store import JobStore

        store = JobStore(os.path.join(folder, "scheduler.db"))
        kill_jobs(pids + [j.pid for j in store.load() if j.pid])
        store.close()
