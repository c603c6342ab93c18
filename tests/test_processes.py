"""The CPU policy of a job's processes (downpour/processes.py), checked in a child process so that
this one keeps its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from downpour.config import parse_job
from downpour.errors import ConfigError
from downpour.processes import REPEAT_S, TermSignal, apply_cpu_policy

CHILD = r"""
import os, sys, threading, time
from downpour.processes import apply_cpu_policy
stop = threading.Event()
before = threading.Thread(target=stop.wait)  # a thread that exists when the policy is set
before.start()
print(apply_cpu_policy(sys.argv[1]))
after = threading.Thread(target=stop.wait)  # one started afterwards inherits it
after.start()
print(sorted({os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}))
stop.set()
"""


@pytest.mark.slow  # (a child process)
@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("policy,expected", [("batch", "SCHED_BATCH"), ("normal", "SCHED_OTHER")])
def test_every_thread_of_the_process_takes_the_policy(policy, expected):
    out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split("\n")
    assert out[0] == "True" and out[1] == str([getattr(os, expected)])


def test_a_policy_that_is_not_known_is_refused_by_the_config_and_the_call():
    assert parse_job({"model": {"name": "mlp"}}).cluster.cpu_policy == "batch"
    with pytest.raises(ConfigError, match="cpu_policy"):
        parse_job({"model": {"name": "mlp"}, "cluster": {"cpu_policy": "realtime"}})
    with pytest.raises(ValueError, match="batch or normal"):
        apply_cpu_policy("realtime")


def test_a_sigterm_repeated_within_a_second_is_the_same_stop_and_a_later_one_is_the_second(monkeypatch):
    """A service manager and the launcher both passing one stop on must not make it a stop at once."""
    calls = []
    term = TermSignal(lambda: calls.append("first"), again=lambda: calls.append("again"))
    clock = [100.0]
    monkeypatch.setattr("downpour.processes.time.monotonic", lambda: clock[0])
    term._handle(15, None)
    clock[0] += REPEAT_S / 2
    term._handle(15, None)  # the same stop by a second route
    assert calls == ["first"] and term.at == 100.0
    clock[0] += REPEAT_S
    term._handle(15, None)
    assert calls == ["first", "again"]
    with pytest.raises(KeyboardInterrupt):  # by default the second one stops at once
        bare = TermSignal(lambda: None)
        bare._handle(15, None)
        clock[0] += REPEAT_S
        bare._handle(15, None)
