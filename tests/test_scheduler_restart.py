"""`downpour scheduler` with real jobs: killed and restarted, it loses no job and adopts the running one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.cluster import PY, QUIET, wait_training
from tests.conftest import tiny_job


def _kill_jobs(pids) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)  # each job runs in its own session: its group is its processes
        except (ProcessLookupError, PermissionError):
            pass


def _summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _cli(*args, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "downpour", *args], capture_output=True, text=True, timeout=timeout_s)


def _start_scheduler(folder: str) -> subprocess.Popen:
    if os.path.exists(os.path.join(folder, "scheduler.url")):
        os.remove(os.path.join(folder, "scheduler.url"))
    proc = subprocess.Popen([PY, "-m", "downpour", "scheduler", "--dir", folder, "--port", "0", "--cpus", "4",
                             "--memory-mb", "8192", "--policy", "fifo", "--tick-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(folder, "scheduler.url")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "slow start"
        time.sleep(0.1)
    return proc


def _jobs(folder: str) -> dict[int, dict]:
    out = _cli("jobs", "--json", "--dir", folder)
    assert out.returncode == 0, out.stderr
    return {j["id"]: j for j in json.loads(out.stdout)}


def _wait_jobs(folder: str, done, timeout_s: float) -> dict[int, dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = _jobs(folder)
        if done(jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"not done in {timeout_s} s: {jobs}")


@pytest.mark.slow
def test_a_killed_and_restarted_scheduler_loses_no_job_and_adopts_the_running_one(tmp_path, tiny_data):
    folder = str(tmp_path / "sched")
    long, short = tmp_path / "long.yaml", tmp_path / "short.yaml"
    long.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"epochs": 2000}, monitor=QUIET)))  # until cancelled
    short.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"epochs": 2}, monitor=QUIET)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_job(tiny_data, training={"batch_size": -1})))
    sched = _start_scheduler(folder)
    pids: list[int] = []  # killed at the end if the test fails
    try:
        for k, path in enumerate((long, short, short)):
            out = _cli("submit", str(path), "--dir", folder, "--user", f"u{k}")
            assert out.returncode == 0 and f"job {k + 1} " in out.stdout, out.stderr
        jobs = _wait_jobs(folder, lambda js: js[1]["phase"] == "running" and js[1]["pid"], 60)
        pid = jobs[1]["pid"]
        pids.append(pid)
        wait_training(jobs[1]["run_dir"], steps=5)
        sched.kill()  # SIGKILL: no chance to clean up
        sched.wait(timeout=10)
        os.kill(pid, 0)  # the job lives on without its scheduler
        sched = _start_scheduler(folder)
        jobs = _jobs(folder)
        assert sorted(jobs) == [1, 2, 3] and jobs[1]["phase"] == "running" and jobs[1]["pid"] == pid, jobs
        assert jobs[2]["phase"] == jobs[3]["phase"] == "queued"
        # Bad requests change nothing.
        refused = _cli("submit", str(bad), "--dir", folder)
        assert refused.returncode == 2 and "training.batch_size" in refused.stderr
        big = _cli("submit", str(short), "--dir", folder, "--set", "cluster.num_workers=9")
        assert big.returncode == 2 and "too little cpus" in big.stderr
        unknown = _cli("cancel", "99", "--dir", folder)
        assert unknown.returncode == 2 and "no job 99" in unknown.stderr
        cancel = _cli("cancel", "1", "--dir", folder)  # the adopted job: it checkpoints and stops
        assert cancel.returncode == 0 and "stopping" in cancel.stdout, cancel.stderr
        deadline = time.monotonic() + 300
        while True:  # every job to its end
            jobs = _jobs(folder)
            if all(j["phase"] in ("done", "failed", "cancelled") for j in jobs.values()):
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(0.5)
        assert [jobs[k]["phase"] for k in (1, 2, 3)] == ["cancelled", "done", "done"], jobs
        assert jobs[1]["first_started_s"] < jobs[2]["first_started_s"] < jobs[3]["first_started_s"]
        assert all(jobs[k]["restarts"] == 0 for k in (1, 2, 3))
        assert _summary(jobs[1]["run_dir"])["status"] == "stopped"  # a final checkpoint, not a kill
        logs = _cli("logs", "2", "--dir", folder)
        assert logs.returncode == 0 and "test accuracy" in logs.stdout
        table = _cli("jobs", "--dir", folder)  # the table (narrow without a terminal: columns are cut)
        assert table.returncode == 0 and "downpour jobs" in table.stdout
    finally:
        sched.kill()
        sched.communicate()
        from downpour.scheduler.store import JobStore

        store = JobStore(os.path.join(folder, "scheduler.db"))
        _kill_jobs(pids + [j.pid for j in store.load() if j.pid])
        store.close()
