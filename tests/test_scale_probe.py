"""The /proc sampler of the scaling check (benchmarks/scale_probe.py): its arithmetic on made-up samples,
and one read of this process's own threads. No timing here."""

import os
import subprocess
import sys
import time

import pytest

from benchmarks.scale_probe import FIELDS, Sampler, load_of, read_task, steady_window, thread_kind, window_deltas


def task(role, proc, kind, run, wait=0.0, vcs=0):
    return {"role": role, "proc": proc, "kind": kind, "run": run, "wait": wait, "slices": 0, "vcs": vcs, "ivcs": 0,
            "utime": run, "stime": 0.0}


def sample(t, server_vcs, server_run, worker_run, busy):
    return {
        "t": t,
        "tasks": {
            "server-0/10": task("server", "server-0", "main", server_run, 0.1 * server_run, server_vcs),
            "worker-0/20": task("worker", "worker-0", "main", worker_run, 0.2 * worker_run),
            "coordinator/5": task("coordinator", "coordinator", "main", 0.01 * t),
            "launcher/1": task("launcher", "launcher", "other", 0.02 * t),
        },
        "cores_busy_s": busy,
        "cores_all_s": 2 * t,
    }


def test_the_window_is_the_busy_stretch_less_its_ends_and_deltas_add_up_per_role_and_process():
    # Start-up (t 0..1, few switches), training (1..11, 1000 switches/s), the end (11..12).
    samples, vcs = [], 0
    for i in range(13):
        vcs += 1000 if 1 <= i <= 11 and i > 1 else 5
        samples.append(sample(float(i), vcs, 0.4 * i, 0.9 * i, 1.5 * i))
    a, b = steady_window(samples, trim=0.2)
    assert (a["t"], b["t"]) == (3.0, 9.0)
    d = window_deltas(a, b)
    assert d["window_s"] == 6.0
    assert d["groups"]["server.main"]["run"] == pytest.approx(0.4 * 6)
    assert d["groups"]["server-0.main"]["wait"] == pytest.approx(0.04 * 6)
    assert d["groups"]["coordinator.main"]["threads"] == 1  # role and process share a name: counted once
    assert set(FIELDS) <= set(d["groups"]["worker.main"])
    load = load_of(d)
    assert load["job"] == pytest.approx(1.3)
    assert load["background"] == pytest.approx(0.03)
    # The machine was busy 1.5 cores; the job's threads, the coordinator's and the launcher's 1.33: the rest is others'.
    assert load["outside"] == pytest.approx(1.5 - 1.33)
    assert load_of(None) == {}


def test_no_window_without_a_steady_stretch():
    assert steady_window([sample(0.0, 0, 0, 0, 0)]) is None


def test_threads_are_told_apart_by_their_names():
    assert thread_kind(7, 7, "python") == "main"
    assert thread_kind(7, 8, "ZMQbg/IO/0") == "zmq"
    assert thread_kind(7, 9, "python") == "other"


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"), reason="no schedstat")
def test_read_task_reads_this_process_and_none_for_a_thread_that_is_not_there():
    comm, counters = read_task(os.getpid(), os.getpid())
    assert comm
    assert set(FIELDS) <= set(counters) and counters["run"] > 0
    assert read_task(os.getpid(), 2**22 + 1) is None  # above pid_max: no such thread


@pytest.fixture
def busy_child():
    """A child process that spins (CPU to see), killed after the test."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield p
    p.kill()
    p.wait(timeout=10)


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat"), reason="no schedstat")
def test_the_sampler_reads_the_processes_it_is_given_by_name_and_pid_and_skips_one_that_is_gone(busy_child):
    # (name, pid) pairs, as a launcher's processes or ones started in network namespaces give them.
    started = [("server-0", busy_child.pid), ("worker-0", 2**22 + 1)]  # the second: no such process
    with Sampler(lambda: list(started), period_s=0.05) as sampler:
        deadline = time.monotonic() + 30
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(sampler.samples) >= 3
    first, last = sampler.samples[0]["tasks"], sampler.samples[-1]["tasks"]
    key = f"server-0/{busy_child.pid}"
    assert first[key]["role"] == "server" and first[key]["kind"] == "main"
    assert last[key]["run"] > first[key]["run"]  # it spun between the samples
    assert not any(t["role"] == "worker" for t in last.values())
    assert any(t["role"] == "launcher" for t in last.values())  # this process, which runs the sampler
