"""The scheduler-event arithmetic of benchmarks/scale_wakeups.py on made-up perf script lines: no perf, no timing."""

import pytest

from benchmarks.scale_wakeups import parse_events, summarize, waits_and_idle


def switch(cpu, t, prev, state, nxt):
    return (f" [{cpu:03d}] {t:.6f}: sched:sched_switch: prev_comm=p prev_pid={prev} prev_prio=120 "
            f"prev_state={state} ==> next_comm=n next_pid={nxt} next_prio=120")


# cpu 0 runs the worker (tid 10), the server (tid 20) is woken onto cpu 0 at 1.000 and waits there
# until 1.003 although cpu 1 is idle from 1.001; then the worker is preempted at 1.003 and waits to 1.004.
PERF = "\n".join([
    switch(1, 0.999, 30, "S", 0),
    " [000] 1.000000: sched:sched_wakeup: comm=python pid=20 prio=120 target_cpu=000",
    switch(1, 1.0005, 0, "R", 30),
    switch(1, 1.001, 30, "S", 0),
    switch(0, 1.003, 10, "R", 20),
    switch(0, 1.004, 20, "S", 10),
])


def test_waits_and_the_idle_time_of_the_other_core_during_them():
    events = parse_events(PERF)
    assert len(events) == 6 and events[0][1] == 1
    waits, idle = waits_and_idle(events, {10, 20})
    assert [(tid, round(a, 6), round(b, 6), cpu) for tid, a, b, cpu in waits] == [(20, 1.0, 1.003, 0), (10, 1.003, 1.004, 0)]
    assert idle[1][0] == pytest.approx((0.999, 1.0005))
    out = summarize(waits, idle, {10: "worker:main", 20: "server:main"})
    # The server waited 3 ms; cpu 1 was idle 0.5 ms of it before x ran, and 2 ms after.
    assert out["server:main"]["wait_s"] == pytest.approx(0.003)
    assert out["server:main"]["other_idle_s"] == pytest.approx(0.0025)
    assert out["worker:main"] == pytest.approx({"waits": 1, "wait_s": 0.001, "other_idle_s": 0.001})
