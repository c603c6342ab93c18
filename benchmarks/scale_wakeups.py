"""How much of a job's run-queue wait passes while another core is idle: scheduler events of the
reference job's threads, recorded with ``perf sched record`` during its steady state.

``benchmarks/scale_probe.py`` measures how long each thread waits in the run queue (``schedstat``);
this says when: for every wait of a job thread (from its wake-up, or from being preempted, to its
next switch onto a core) it adds up how long some other core ran its idle task meanwhile. A work-
conserving scheduler would leave no core idle while a thread waits; the scaling model's run queue
(``Topology(shared_cores=True)``) assumes one. Needs root and ``perf``; otherwise prints SKIPPED.

    .venv/bin/python benchmarks/scale_wakeups.py --topologies 1x1,1x2,2x2,1x3 --json wakeups.json

Each topology runs the reference job (ipc, async) with ``--steps`` steps in all, starts recording
``--after-s`` seconds after the launch and records ``--record-s`` seconds on every core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402

_EVENT = re.compile(r"\s*\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)")
_SWITCH = re.compile(r"prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)")
_WAKEUP = re.compile(r"pid=(\d+) ")


def parse_events(text: str) -> list[tuple[float, int, str, str]]:
    """(time s, cpu, event, fields) of ``perf script -F cpu,time,event,trace`` output, in time order."""
    out = []
    for line in text.splitlines():
        m = _EVENT.match(line)
        if m:
            out.append((float(m[2]), int(m[1]), m[3].rstrip(":"), m[4]))
    out.sort()
    return out


def waits_and_idle(events: list[tuple[float, int, str, str]], tids: set[int]) -> tuple[list, dict[int, list]]:
    """The waits of ``tids`` (tid, runnable since, on a core at, cpu) and every cpu's idle intervals."""
    waiting: dict[int, float] = {}
    idle: dict[int, list] = collections.defaultdict(list)
    waits = []
    end = events[-1][0] if events else 0.0
    for t, cpu, ev, fields in events:
        if ev.endswith(("sched_wakeup", "sched_wakeup_new")):
            m = _WAKEUP.search(fields)
            if m and int(m[1]) in tids:
                waiting.setdefault(int(m[1]), t)
        elif ev.endswith("sched_switch"):
            m = _SWITCH.search(fields)
            if not m:
                continue
            prev, state, nxt = int(m[1]), m[2], int(m[3])
            if prev == 0 and idle[cpu] and idle[cpu][-1][1] is None:
                idle[cpu][-1] = (idle[cpu][-1][0], t)
            if nxt == 0:
                idle[cpu].append((t, None))
            if prev in tids and state.startswith("R"):  # preempted: runnable, not on a core
                waiting[prev] = t
            if nxt in tids and nxt in waiting:
                waits.append((nxt, waiting.pop(nxt), t, cpu))
    return waits, {c: [(a, b if b is not None else end) for a, b in v] for c, v in idle.items()}


def idle_elsewhere(cpu: int, start: float, stop: float, idle: dict[int, list]) -> float:
    """Seconds of [start, stop] during which a core other than ``cpu`` was idle (the longest of them)."""
    best = 0.0
    for other, spans in idle.items():
        if other != cpu:
            best = max(best, sum(max(0.0, min(stop, b) - max(start, a)) for a, b in spans))
    return best


def summarize(waits: list, idle: dict[int, list], names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per kind of thread (role:main|zmq|other): waits, seconds waited, seconds of it with another core idle."""
    out: dict[str, dict[str, float]] = {}
    for tid, start, stop, cpu in waits:
        acc = out.setdefault(names[tid], {"waits": 0, "wait_s": 0.0, "other_idle_s": 0.0})
        acc["waits"] += 1
        acc["wait_s"] += stop - start
        acc["other_idle_s"] += idle_elsewhere(cpu, start, stop, idle)
    return out


def thread_names(launcher: Any) -> dict[int, str]:
    names = {}
    for p in launcher.procs:
        role = p.name.split("-")[0]
        try:
            tids = os.listdir(f"/proc/{p.popen.pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p.popen.pid}/task/{t}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            kind = "main" if int(t) == p.popen.pid else "zmq" if comm.startswith("ZMQbg") else "other"
            names[int(t)] = f"{role}:{kind}"
    return names


def record(servers: int, workers: int, steps: int, after_s: float, record_s: float, folder: str) -> dict[str, Any]:
    from benchmarks.scale_measure import MNIST_JOB, QUIET
    from downpour.config import load_job
    from downpour.launch import LocalLauncher

    job = load_job(MNIST_JOB, [f"cluster.num_servers={servers}", f"cluster.num_workers={workers}", *QUIET, "epochs=20",
                               f"steps={max(1, steps // workers)}"])  # epochs: data for every step (3 epochs are 5,625)
    data = os.path.join(folder, f"perf-{servers}x{workers}.data")
    got: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as run_dir:
        launcher = LocalLauncher(job, run_dir)

        def rec() -> None:
            time.sleep(after_s)
            got["names"] = thread_names(launcher)
            got["loadavg"] = open("/proc/loadavg").read().split()[:3]
            done = subprocess.run(["perf", "sched", "record", "-a", "-o", data, "--", "sleep", str(record_s)],
                                  capture_output=True, text=True, timeout=record_s + 60)
            got["perf"] = done.stderr.strip().splitlines()[-3:]  # says so if it lost events

        th = threading.Thread(target=rec, daemon=True)
        th.start()
        summary = launcher.run().summary
        th.join(timeout=record_s + 90)
    script = subprocess.run(["perf", "script", "-i", data, "-F", "cpu,time,event,trace"], capture_output=True, text=True,
                            timeout=300)
    text = script.stdout
    os.remove(data)
    events = parse_events(text)
    names = got.get("names", {})
    waits, idle = waits_and_idle(events, set(names))
    span = events[-1][0] - events[0][0] if events else 0.0
    ncpu = os.cpu_count() or 1
    return {
        "servers": servers,
        "workers": workers,
        "examples_per_s": summary.get("examples_per_s"),
        "loadavg": got.get("loadavg"),
        "span_s": span,
        "cores_idle": sum(b - a for v in idle.values() for a, b in v) / (span * ncpu) if span else None,
        "threads": summarize(waits, idle, names),
        "events": len(events),
        "perf": got.get("perf", []) + [line for line in script.stderr.splitlines() if "lost" in line.lower()],
    }


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['servers']}x{r['workers']}: {r['examples_per_s']:,.0f} examples/s (whole run), {r['span_s']:.2f} s recorded, "
             f"cores idle {100 * r['cores_idle']:.0f} %, load average {r['loadavg']}; {r['events']:,} scheduler events"]
    lines += [f"  perf: {line}" for line in r["perf"] if "lost" in line.lower()]
    total = collections.Counter()
    for k, a in sorted(r["threads"].items()):
        lines.append(f"    {k:18s} {a['waits']:6d} waits, {1e3 * a['wait_s']:7.1f} ms ({1e6 * a['wait_s'] / a['waits']:5.0f} µs each), "
                     f"another core idle {100 * a['other_idle_s'] / a['wait_s']:3.0f} % of it")
        if not k.startswith("coordinator"):
            total.update({"wait_s": a["wait_s"], "other_idle_s": a["other_idle_s"]})
    if total["wait_s"]:
        lines.append(f"  workers' and servers' threads: {1e3 * total['wait_s']:.1f} ms waiting, "
                     f"{100 * total['other_idle_s'] / total['wait_s']:.0f} % of it with another core idle")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", default="1x1,1x2,2x2,1x3", help="SxW,... (default 1x1,1x2,2x2,1x3)")
    ap.add_argument("--steps", type=int, default=12000, help="steps of each job, all workers (default 12000: 12 s or more here)")
    ap.add_argument("--after-s", type=float, default=7.0, help="seconds from the launch to the recording (default 7)")
    ap.add_argument("--record-s", type=float, default=2.0, help="seconds recorded (default 2)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("perf") is None:
        print("SKIPPED: needs root and perf (perf sched record)")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-wakeups-") as folder:
        for topo in args.topologies.split(","):
            s, w = (int(v) for v in topo.split("x"))
            r = record(s, w, args.steps, args.after_s, args.record_s, folder)
            results.append(r)
            print(report(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
