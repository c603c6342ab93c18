"""Scheduler test helpers: the CLI verbs as subprocesses, a `downpour scheduler` on a free port,
polling the job list against a deadline, reading a run's summary, and killing jobs left behind
(each job runs in its own session, so stopping the scheduler does not stop it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable

from tests.cluster import PY

FINISHED = ("done", "failed", "cancelled")


def kill_jobs(pids: Iterable[int]) -> None:
    """SIGKILL each job's process group (a job's session: all its processes); gone ones are skipped."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def summary(run_dir: str) -> dict:
    """The ``summary.json`` a run of ``downpour train`` wrote."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """``downpour ARGS`` in a subprocess, output captured as text."""
    return subprocess.run([PY, "-m", "downpour", *args], capture_output=True, text=True, timeout=timeout_s)


def start_scheduler(folder: str, policy: str = "fifo", start_timeout_s: float = 60.0) -> subprocess.Popen:
    """``downpour scheduler`` on ``folder`` (4 CPU slots, 8 GiB, a 0.2 s tick) on a free port of
    127.0.0.1; returns once it has written ``scheduler.url``. The caller kills it."""
    url = os.path.join(folder, "scheduler.url")
    if os.path.exists(url):  # left by a scheduler killed before: not this one's
        os.remove(url)
    proc = subprocess.Popen(
        [PY, "-m", "downpour", "scheduler", "--dir", folder, "--port", "0", "--cpus", "4", "--memory-mb", "8192",
         "--policy", policy, "--tick-s", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + start_timeout_s
    while not os.path.exists(url):
        if proc.poll() is not None:
            raise AssertionError(f"the scheduler exited: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"the scheduler did not start in {start_timeout_s} s")
        time.sleep(0.1)
    return proc


def list_jobs(folder: str) -> dict[int, dict]:
    """Every job, by ID, as ``downpour jobs --json`` shows it."""
    out = cli("jobs", "--json", "--dir", folder)
    assert out.returncode == 0, out.stderr
    return {j["id"]: j for j in json.loads(out.stdout)}


def wait_jobs(folder: str, done: Callable[[dict[int, dict]], bool], timeout_s: float) -> dict[int, dict]:
    """Poll :func:`list_jobs` until ``done(jobs)``; fails after ``timeout_s`` showing the last list."""
    deadline = time.monotonic() + timeout_s
    seen: dict[int, dict] = {}
    while time.monotonic() < deadline:
        seen = list_jobs(folder)
        if done(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"not done in {timeout_s} s: {seen}")


def all_finished(jobs: dict[int, dict]) -> bool:
    return all(j["phase"] in FINISHED for j in jobs.values())
