"""Where a step's wall time goes on one host: every thread of a job's processes, read from /proc.

The scaling check (``benchmarks/scale_measure.py``) measures each role's CPU per step; this adds,
for the same runs (its :func:`~benchmarks.scale_measure.measure` with a runner that samples
``/proc`` while the job runs), what the scheduler did with every thread of every process:

* ``run``: CPU time on a core (``/proc/PID/task/TID/schedstat``, field 1, ns);
* ``wait``: time runnable but waiting for a core, the run queue (field 2, ns);
* ``slices``: how many times it was put on a core (field 3);
* ``vcs`` / ``ivcs``: voluntary and involuntary context switches (``/proc/PID/task/TID/status``);
* ``utime`` / ``stime``: user and system CPU (``/proc/PID/task/TID/stat``, clock ticks).

Threads are grouped by process role (coordinator, server, worker) and kind: ``main`` (the thread
whose id is the process's), ``zmq`` (ZeroMQ's I/O and reaper threads, ``ZMQbg/*``), ``other``
(Python threads: heartbeats, the coordinator client). ``/proc/stat`` gives the cores' busy time
of the whole machine in the same window (other users' work included) and ``/proc/loadavg`` the load
when the run starts.

The window is the long run's steady state: the samples (every ``period_s``) between which the
servers' main threads switch voluntarily at more than half their peak rate (they do so about once
per request), less the first and last ``trim`` of it. Per-step figures divide the window's deltas
by its steps, the window's length times the steps/s the check measured for the extra steps.

    .venv/bin/python benchmarks/scale_probe.py --topologies 1x1,2x1,1x2,2x2,1x3 --json probe.json

This module only reads ``/proc``; nothing in the job changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402

ROLES = ("coordinator", "launcher", "server", "worker")  # the launcher: the process that runs the job (and this sampler)
FIELDS = ("run", "wait", "slices", "vcs", "ivcs", "utime", "stime")
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def read_task(pid: int, tid: int) -> tuple[str, dict[str, float]] | None:
    """(comm, counters) of one thread, or None once it is gone."""
    base = f"/proc/{pid}/task/{tid}"
    stat, sched, status = _read(f"{base}/stat"), _read(f"{base}/schedstat"), _read(f"{base}/status")
    if stat is None or sched is None or status is None:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2 :].split()  # field 3 onwards
    run, wait, slices = (int(v) for v in sched.split()[:3])
    out = {"run": run / 1e9, "wait": wait / 1e9, "slices": slices,
           "utime": int(rest[11]) * TICK_S, "stime": int(rest[12]) * TICK_S}
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            out["vcs"] = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            out["ivcs"] = int(line.split()[1])
    return comm, out


def thread_kind(pid: int, tid: int, comm: str) -> str:
    if tid == pid:
        return "main"
    return "zmq" if comm.startswith("ZMQbg") else "other"


def cores_busy_s() -> tuple[float, float]:
    """(busy, all) seconds of every core of the machine so far (/proc/stat's first line)."""
    v = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    idle = v[3] + v[4]  # idle, iowait
    return (sum(v[:8]) - idle) * TICK_S, sum(v[:8]) * TICK_S


class Sampler:
    """Samples every thread of a job's processes every ``period_s`` in a thread of this process.
    ``procs()``: the processes now, as (name, pid) pairs; the name's part before the first ``-`` is
    the role (``server-0``, ``worker-1.2``, ``coordinator``)."""

    def __init__(self, procs: Callable[[], list[tuple[str, int]]], period_s: float = 0.1) -> None:
        self.procs, self.period_s = procs, period_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> dict[str, Any]:
        tasks = {}
        me = os.getpid()  # the launcher's own process (its watch loop, this sampler)
        for tid in (int(t) for t in os.listdir(f"/proc/{me}/task")):
            got = read_task(me, tid)
            if got is not None:
                tasks[f"launcher/{tid}"] = {"role": "launcher", "proc": "launcher", "kind": thread_kind(me, tid, got[0]), **got[1]}
        for name, pid in self.procs():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            role = name.split("-")[0]
            for tid in tids:
                got = read_task(pid, tid)
                if got is not None:
                    comm, counters = got
                    tasks[f"{name}/{tid}"] = {"role": role, "proc": name, "kind": thread_kind(pid, tid, comm), **counters}
        busy, total = cores_busy_s()
        return {"t": time.monotonic(), "tasks": tasks, "cores_busy_s": busy, "cores_all_s": total}

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(self.sample())


def steady_window(samples: list[dict[str, Any]], trim: float = 0.15) -> tuple[dict, dict] | None:
    """The first and last sample of the steady state (see the module's docstring)."""
    def server_vcs(s: dict) -> float:
        return sum(t["vcs"] for t in s["tasks"].values() if t["role"] == "server" and t["kind"] == "main")

    rates = [(server_vcs(b) - server_vcs(a)) / (b["t"] - a["t"]) for a, b in zip(samples, samples[1:])]
    if not rates:
        return None
    peak = max(rates)
    busy = [i for i, r in enumerate(rates) if r > peak / 2]
    first, last = busy[0], busy[-1] + 1  # sample indices bounding the busy intervals
    n = last - first
    cut = int(n * trim)
    first, last = first + cut, last - cut
    if last - first < 2:
        return None
    return samples[first], samples[last]


def window_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per role and kind (and per process's main thread): each counter's growth between samples a and b."""
    groups: dict[str, dict[str, float]] = {}
    for key, tb in b["tasks"].items():
        ta = a["tasks"].get(key)
        if ta is None:
            continue  # a thread that started in the window: not in the steady state's count
        for g in {f"{tb['role']}.{tb['kind']}", f"{tb['proc']}.{tb['kind']}"}:
            acc = groups.setdefault(g, {f: 0.0 for f in FIELDS} | {"threads": 0})
            for f in FIELDS:
                acc[f] += tb[f] - ta[f]
            acc["threads"] += 1
    return {
        "window_s": b["t"] - a["t"],
        "groups": groups,
        "cores_busy_s": b["cores_busy_s"] - a["cores_busy_s"],
        "cores_all_s": b["cores_all_s"] - a["cores_all_s"],
    }


def role_cpu_s(probe: dict[str, Any], role: str) -> float:
    """Seconds on a core of every thread of ``role``'s processes in the window (its ``role.kind``
    groups; the per-process groups hold the same threads again)."""
    return sum(a["run"] for g, a in probe["groups"].items() if g.split(".")[0] == role)


def load_of(probe: dict[str, Any] | None) -> dict[str, float]:
    """The cores' worth of CPU in a window (see :func:`window_deltas`) that is not the workers' and
    servers': ``background``, the coordinator's and the launcher's threads (this sampler included);
    ``outside``, every other process of the machine (the cores' busy time less every thread of the
    job, never below 0). Empty without a window."""
    if not probe:
        return {}
    span = probe["window_s"]
    role_run = {r: role_cpu_s(probe, r) for r in ROLES}
    ours = sum(role_run.values())
    return {
        "background": (role_run["coordinator"] + role_run["launcher"]) / span,
        "outside": max(0.0, probe["cores_busy_s"] - ours) / span,
        "job": (role_run["server"] + role_run["worker"]) / span,
    }


def probed(out: dict[str, Any], samples: list[dict[str, Any]], load: list[float], trim: float) -> dict[str, Any]:
    """A runner's result ``out`` (:func:`~benchmarks.scale_measure.totals` of a job) with the load
    average at its start and the sampler's steady-state window (``probe``; None when it found none)."""
    window = steady_window(samples, trim)
    return {**out, "loadavg": load, "probe": window_deltas(*window) if window else None}


def probe_runner(period_s: float, trim: float):
    """A runner for :func:`~benchmarks.scale_measure.measure` that samples /proc while the job runs."""

    from benchmarks.scale_measure import totals  # (scale_measure imports this module)

    def run(path: str, overrides: list[str]) -> dict[str, Any]:
        job = load_job(path, overrides)
        load = list(os.getloadavg())
        with tempfile.TemporaryDirectory(prefix="scale-") as run_dir:
            launcher = LocalLauncher(job, run_dir)
            with Sampler(lambda: [(p.name, p.popen.pid) for p in list(launcher.procs)], period_s) as sampler:
                s = launcher.run().summary
        if s.get("status") != "ok":
            raise RuntimeError(f"{path} {overrides}: {s.get('status')}: {s.get('error')}")
        out = totals(s)
        out["worker_times"] = {k: sum(w.get(k, 0.0) for w in s["workers"].values()) for k in ("compute_s", "push_s", "wait_s", "train_s")}
        return probed(out, sampler.samples, load, trim)

    return run


def per_step(m: dict[str, Any]) -> dict[str, Any]:
    """The long run's window, per step (µs) and as shares of the window, from :func:`measure`'s result."""
    probe = m["long"]["probe"]
    steps_per_s = m["examples_per_s"] / m["batch"]
    steps = probe["window_s"] * steps_per_s
    groups = {}
    for g, acc in probe["groups"].items():
        groups[g] = {f: acc[f] / steps * (1e6 if f in ("run", "wait", "utime", "stime") else 1) for f in FIELDS}
        groups[g]["threads"] = acc["threads"]
    ours = sum(acc["run"] for g, acc in probe["groups"].items() if g.split(".")[0] in ROLES)
    return {
        "steps_per_s": steps_per_s,
        "window_s": probe["window_s"],
        "step_wall_us_per_worker": 1e6 * m["workers"] / steps_per_s,
        "groups": groups,
        "cores_busy": probe["cores_busy_s"] / probe["cores_all_s"],  # the whole machine, other users included
        "ours_busy": ours / probe["window_s"] / (probe["cores_all_s"] / probe["window_s"]),  # our threads' run time
    }


def report(m: dict[str, Any]) -> str:
    p = per_step(m)
    s, w = m["servers"], m["workers"]
    lines = [
        f"{s}x{w}: {m['examples_per_s']:,.0f} examples/s, {p['steps_per_s']:,.0f} steps/s, a worker's step "
        f"{p['step_wall_us_per_worker']:.0f} µs wall; window {p['window_s']:.2f} s; cores busy {100 * p['cores_busy']:.0f} % "
        f"(our threads {100 * p['ours_busy']:.0f} %); load at start {m['long']['loadavg']}",
        "  per step (µs, all processes of the role): group: run (user+sys ticks) / run-queue wait / slices / vcs / ivcs",
    ]
    for g in sorted(k for k in p["groups"] if k.split(".")[0] in ROLES):
        a = p["groups"][g]
        lines.append(
            f"    {g:12s} run {a['run']:7.1f} (u {a['utime']:6.1f} s {a['stime']:6.1f})  wait {a['wait']:7.1f}  "
            f"slices {a['slices']:5.2f}  vcs {a['vcs']:5.2f}  ivcs {a['ivcs']:5.2f}  [{a['threads']} threads]"
        )
    wt = m["long"]["worker_times"]
    lines.append(
        "  worker wall split (whole long run, per step, µs): compute {:.0f}, push {:.0f}, wait for reply {:.0f}".format(
            *(1e6 * wt[k] / m["long"]["steps"] for k in ("compute_s", "push_s", "wait_s"))
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", default="1x1,2x1,1x2,2x2,1x3", help="SxW,... (default 1x1,2x1,1x2,2x2,1x3)")
    ap.add_argument("--steps-short", type=int, default=400)
    ap.add_argument("--steps-long", type=int, default=4000)
    ap.add_argument("--period", type=float, default=0.1, help="seconds between /proc samples (default 0.1)")
    ap.add_argument("--trim", type=float, default=0.15, help="share of the steady state cut at each end (default 0.15)")
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args(argv)
    from benchmarks.scale_measure import MNIST_JOB, measure

    runner = probe_runner(args.period, args.trim)
    results = []
    for topo in args.topologies.split(","):
        s, w = (int(v) for v in topo.split("x"))
        m = measure(MNIST_JOB, s, w, args.steps_short, args.steps_long, runner=runner)
        results.append(m)
        print(report(m), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "runs": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
