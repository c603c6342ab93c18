"""About ten small real jobs through `downpour scheduler`, under two policies, beside the simulator.

    .venv/bin/python benchmarks/scheduler_real.py [--policies fifo las las:120] [--long-steps 10000] [--short-steps 300] [--json OUT]

Two long jobs are submitted first, then eight short ones, one every --gap-s seconds, to a scheduler
of 4 CPU slots (each job: 1 server + 1 worker, the reference MLP on Fashion-MNIST, async, capped at
--long-steps / --short-steps steps). For each policy the script starts a fresh `downpour scheduler`,
submits on that schedule through the HTTP API, waits for every job, and records each job's
completion time. Then it replays the same arrivals in the simulator (downpour/scheduler/sim.py),
with each job's running time measured in the first policy's run (no preemption there under fifo)
and the stop/resume costs measured too, and prints mean JCT per policy, real and simulated, so
the two orderings can be compared. A policy is a name, or ``las:T1,T2`` for least attained
service with thresholds T1, T2 task-seconds (plain ``las`` here: 30). Run it under the machine's
CPU lock; it starts real processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from downpour.errors import ConfigError
from downpour.scheduler.client import SchedulerClient
from downpour.scheduler.policies import make_policy
from downpour.scheduler.resources import Resources
from downpour.scheduler.sim import TraceJob, quantile, simulate

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "..", "examples", "mnist.yaml")
OPTIONS = {"las": ["thresholds=[30]"], "fifo": [], "priority": ["aging_per_s=0.01"], "drf": []}


def policy_options(spec: str) -> tuple[str, list[str]]:
    """``las:120`` -> ("las", ["thresholds=[120]"]); a plain name -> its OPTIONS."""
    name, _, thresholds = spec.partition(":")
    if thresholds:
        return name, [f"thresholds=[{thresholds}]"]
    return name, OPTIONS.get(name, [])


def start_scheduler(folder: str, spec: str) -> tuple[subprocess.Popen, SchedulerClient]:
    policy, options = policy_options(spec)
    args = [sys.executable, "-m", "downpour", "scheduler", "--dir", folder, "--port", "0", "--cpus", "4",
            "--memory-mb", "8192", "--policy", policy, "--tick-s", "0.25", "--min-run-s", "3"]
    for opt in options:
        args += ["--policy-option", opt]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, "scheduler.err"), "w"))
    deadline = time.monotonic() + 60
    url_file = os.path.join(folder, "scheduler.url")
    while not os.path.exists(url_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the scheduler did not start: see {folder}/scheduler.err")
        time.sleep(0.1)
    with open(url_file) as f:
        return proc, SchedulerClient(f.read().strip())


def run_policy(policy: str, plan: list[tuple[float, str, int]], folder: str) -> list[dict]:
    os.makedirs(folder)
    proc, client = start_scheduler(folder, policy)
    try:
        with open(JOB) as f:
            base = yaml.safe_load(f)
        base["cluster"].update(num_servers=1, num_workers=1)
        base["monitor"] = {"metrics": False, "dashboard": False, "tensorboard": False}
        t0 = time.monotonic()
        for delay, name, steps in plan:
            while time.monotonic() - t0 < delay:
                time.sleep(0.05)
            job = {**base, "name": name, "training": {**base["training"], "steps": steps, "epochs": 100}}
            client.submit(job_yaml=yaml.safe_dump(job), user=name, cwd=HERE)
        deadline = time.monotonic() + 900
        while True:
            jobs = client.jobs()
            if all(j["phase"] in ("done", "failed", "cancelled") for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise SystemExit(f"{policy}: jobs not done in 900 s")
            time.sleep(0.5)
    finally:
        _stop_jobs(client)  # jobs run in their own sessions: an interrupted run must not leave them behind
        proc.terminate()
        proc.wait(timeout=30)


def _stop_jobs(client: SchedulerClient, timeout_s: float = 120.0) -> None:
    """Cancel every job not yet ended and wait (up to ``timeout_s``) until they have."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = [j for j in client.jobs() if j["phase"] not in ("done", "failed", "cancelled")]
        if not live:
            return
        for j in live:
            if not j.get("cancel_requested"):
                try:
                    client.cancel(j["id"])
                except ConfigError:  # it ended meanwhile
                    pass
        time.sleep(0.5)
    print("some jobs did not stop: see the run folders", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", nargs="+", default=["fifo", "las"])
    p.add_argument("--long-steps", type=int, default=10000)
    p.add_argument("--short-steps", type=int, default=300)
    p.add_argument("--gap-s", type=float, default=2.0)
    p.add_argument("--json")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # so `timeout` runs the clean-up
    plan = [(0.0, "long0", args.long_steps), (0.5, "long1", args.long_steps)]
    plan += [(2.0 + k * args.gap_s, f"short{k}", args.short_steps) for k in range(8)]
    root = tempfile.mkdtemp(prefix="sched-real-")
    real = {pol: run_policy(pol, plan, os.path.join(root, pol.replace(":", "-").replace(",", "-"))) for pol in args.policies}
    first = real[args.policies[0]]
    t_sub = min(j["submitted_s"] for j in first)
    runs = {j["name"]: j["finished_s"] - j["first_started_s"] for j in first}
    # The simulator's preemption costs (a stopping job holds its slots; a resume starts processes
    # again) are set to 5 s each: the API does not record how long each stop took.
    trace = [TraceJob(j["id"], j["submitted_s"] - t_sub, runs[j["name"]], (Resources(cpus=1), Resources(cpus=1)), user=j["name"])
             for j in first]
    out = {"plan": plan, "real": real, "sim": {}}
    print("| policy | real mean JCT (s) | real p95 JCT (s) | real makespan (s) | preemptions | "
          "simulated mean JCT (s) | simulated makespan (s) |")
    print("|---|---|---|---|---|---|---|")
    for pol in args.policies:
        name, options = policy_options(pol)
        opts = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in options)}
        sim = simulate(trace, {"here": Resources(cpus=4)}, make_policy(name, **opts), stop_s=5.0, resume_s=5.0, tick_s=1.0,
                       min_run_s=3.0).report()
        jct = sorted(j["jct_s"] for j in real[pol])
        makespan = max(j["finished_s"] for j in real[pol]) - min(j["submitted_s"] for j in real[pol])
        out["sim"][pol] = sim
        print(f"| {pol} | {statistics.mean(jct):.1f} | {quantile(jct, 0.95):.1f} | {makespan:.1f} | "
              f"{sum(j['preemptions'] for j in real[pol])} | {sim['mean_jct_s']:.1f} | {sim['makespan_s']:.1f} |")
    for pol in args.policies:
        print(pol, "real first starts:", [j["name"] for j in sorted(real[pol], key=lambda j: j["first_started_s"])], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"(run folders under {root})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
