"""What checkpoints cost: examples/s and CPU seconds per example of the reference job with
checkpoints every 10 s (and every 1 s, a stress case) against none, in one run; plus how long a
frozen node takes to be detected.

* ``none``: ``checkpoint.enabled=false``.
* ``every-10s``: ``checkpoint.every_s=10`` (and the one at the end, after training).
* ``every-1s``: ``checkpoint.every_s=1``.

Runs alternate so each configuration sees the same machine load; the training rate covers the
training loop only (the end-of-training checkpoint comes after it). Target (from
CheckFreq): every-10s at most 3.5 % slower than none.

Examples/s on a shared machine varies from run to run by more than that target, so each run also
counts CPU seconds (user + sys), which other load disturbs far less:

* job CPU: every process of the job (coordinator, servers, workers, replacements) from start to
  exit, per 1,000 training examples. :class:`LocalLauncher` runs in this process and waits for
  each child it started, so ``getrusage(RUSAGE_CHILDREN)`` before and after the run holds exactly
  them. It includes start-up, data loading, evaluation and the final checkpoint, a fixed cost that
  dilutes the ratio.
* training CPU: the same processes over the training loop only (first INIT to last worker done,
  the coordinator's ``train_s``), read from ``/proc/PID/stat`` at each status poll (every 0.25 s)
  and interpolated at the loop's start and end.

Each run of a configuration is paired with the ``none`` run next to it; the report gives the
pairs' ratios (configuration / none) of examples/s and of both CPU figures, their median and
range.

Detection: ``--detect`` also runs the job and freezes worker-1 (then, in a second run, server-0)
with SIGSTOP once training runs: the process stays up but goes silent, as a hung or cut-off
machine does, so only the coordinator's heartbeat watch can notice it. It reports the
coordinator's ``detected_after_s``. By default a lost worker or server is replaced and the job goes
on (``benchmarks/recovery.py`` measures that); these runs set ``cluster.on_worker_failure=fail``
and ``cluster.on_server_failure=fail`` so that the detection ends the job (the coordinator's
status and summary name the node; ``downpour train`` may name a worker the coordinator stopped
instead, as it exits first). A process that exits is noticed at once by ``downpour train`` (it polls its children
every 50 ms), before any heartbeat is missed.

    .venv/bin/python benchmarks/checkpoint_overhead.py --runs 6 --epochs 6 --configs none,every-10s
    .venv/bin/python benchmarks/checkpoint_overhead.py --runs 3 --epochs 3 --detect
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import yaml  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from benchmarks.end_to_end import DEFAULT_JOB  # noqa: E402
from downpour.config import job_to_dict, load_job  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402

CONFIGS = {"none": ["checkpoint.enabled=false"], "every-10s": ["checkpoint.every_s=10"], "every-1s": ["checkpoint.every_s=1"]}
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """User + sys CPU seconds of a live process (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime: fields 14 and 15 of stat(5)


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def at(samples: list[tuple[float, float]], t: float) -> float | None:
    """The CPU total at time ``t``, interpolated between the samples around it."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c0
    return None


def run_job(job_path: str, overrides: list[str], run_dir: str) -> dict[str, Any]:
    """One run of the job (as ``downpour train`` runs it), with its wall-clock rate and CPU cost."""
    job = load_job(job_path, overrides)
    launcher = LocalLauncher(job, run_dir)
    samples: list[tuple[float, float]] = []  # (monotonic time, CPU seconds of all the job's processes so far)
    last: dict[int, float] = {}  # pid -> CPU seconds at its last reading (kept once it exits)
    starts: list[float] = []  # estimates of when the training loop began, in this process's clock

    def on_status(st: dict[str, Any]) -> None:
        now = time.monotonic()
        for p in launcher.procs:
            c = proc_cpu_s(p.popen.pid)
            if c is not None:
                last[p.popen.pid] = c
        samples.append((now, sum(last.values())))
        if st.get("phase") == "training" and st.get("train_s"):
            # The answer reached us some ms after the coordinator wrote train_s; the earliest
            # estimate has the least of that delay in it.
            starts.append(now - st["train_s"])

    cpu0, self0, t0 = children_cpu_s(), self_cpu_s(), time.perf_counter()
    result = launcher.run(on_status)
    job_cpu, launcher_cpu, wall = children_cpu_s() - cpu0, self_cpu_s() - self0, time.perf_counter() - t0
    s = result.summary
    examples = s["examples"]
    train_cpu = None
    if starts:
        begin = min(starts)
        c0, c1 = at(samples, begin), at(samples, begin + s["train_s"])
        train_cpu = c1 - c0 if c0 is not None and c1 is not None else None
    return {
        "examples": examples,
        "train_s": s["train_s"],
        "examples_per_s": s["examples_per_s"],
        "wall_s": s["wall_s"],
        "launcher_wall_s": wall,
        "test_accuracy": s["test_accuracy"],
        "checkpoints": s.get("checkpoints"),
        # All of the job's processes, whole lives (waited for by the launcher, so counted here).
        "job_cpu_s": job_cpu,
        "job_cpu_per_1k": 1000 * job_cpu / examples,
        # A check on the above: what /proc showed at the last status poll, a little before the end.
        "proc_cpu_s_at_last_poll": samples[-1][1] if samples else None,
        "train_cpu_s": train_cpu,
        "train_cpu_per_1k": 1000 * train_cpu / examples if train_cpu is not None else None,
        "launcher_cpu_s": launcher_cpu,  # this process: the launcher's watch loop and the /proc reads above
        "overrides": overrides,
        "run_dir": run_dir,
    }


def paired(runs: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    """Ratios name / none of ``key``, run by run (each pair ran back to back)."""
    return [r[key] / b[key] for r, b in zip(runs[name], runs["none"]) if r.get(key) and b.get(key)]


def spread(values: list[float], spec: str = ".3f") -> str:
    if not values:
        return "n/a"
    return f"{format(statistics.mean(values), spec)} [{format(min(values), spec)}–{format(max(values), spec)}]"


def detect(job_path: str, common: list[str], victim: str, root: str) -> dict[str, Any]:
    """Start the job, freeze ``victim`` once it trains, return the failure the coordinator recorded."""
    # With the defaults (recover) a frozen worker or server is replaced and the job goes on
    # (benchmarks/recovery.py measures that); here the first failure must end the job, so that the
    # time to detect it is all that is measured.
    job = load_job(job_path, common + ["epochs=20", "cluster.on_worker_failure=fail", "cluster.on_server_failure=fail"])
    path = os.path.join(root, f"detect-{victim}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job_to_dict(job), f)
    run_dir = os.path.join(root, f"detect-{victim}")
    err_path = os.path.join(root, f"detect-{victim}.err")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "downpour", "train", path, "--run-dir", run_dir, "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=err)
    status_path = os.path.join(run_dir, "dashboard.url")

    def status() -> dict[str, Any] | None:
        try:
            url = open(status_path).read().strip() + "api/status"
            return json.loads(urllib.request.urlopen(url, timeout=2).read())
        except (OSError, ValueError):
            return None

    try:
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.5)
            st = status()
            if st and st["phase"] == "training" and st["steps"] > 100:
                pid = {n["name"]: n["pid"] for n in st["nodes"]}.get(victim)
        if pid is None:
            return {"victim": victim, "error": "the job never trained"}
        killed = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        # The failure is read from the coordinator's status while it runs: once it declares the node
        # dead it stops the job, and the launcher may stop the coordinator (on the first other node
        # that exits with an error) before it has written summary.json.
        failure = None
        while failure is None and proc.poll() is None and time.monotonic() < killed + 60:
            st = status()
            failure = next((f for f in (st or {}).get("failures", []) if f["node"] == victim), None)
            time.sleep(0.1)
        proc.wait(timeout=120)
        ended = time.monotonic() - killed
        if failure is None:
            try:
                summary = json.load(open(os.path.join(run_dir, "summary.json")))
                failure = next(f for f in summary["failures"] if f["node"] == victim)
            except (OSError, ValueError, StopIteration):
                return {"victim": victim, "error": f"no failure of {victim} recorded", "exit_code": proc.returncode}
        said = [ln for ln in open(err_path, errors="replace").read().splitlines() if "job failed" in ln]
        return {"victim": victim, "detected_after_s": failure["detected_after_s"], "kind": failure["kind"],
                "job_ended_after_s": ended, "exit_code": proc.returncode, "launcher_said": said[0] if said else None}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--detect", action="store_true", help="also measure detection of a frozen worker and server (each run ends the job)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    common = [f"epochs={args.epochs}"]
    env = environment()
    root = tempfile.mkdtemp(prefix="downpour-ckpt-")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for i in range(args.runs):
        for name in configs:
            r = run_job(args.job, common + CONFIGS[name], os.path.join(root, f"{name}-{i + 1}"))
            runs[name].append(r)
            c = r["checkpoints"] or {}
            train = f"{r['train_cpu_per_1k']:.3f}" if r["train_cpu_per_1k"] is not None else "n/a"
            print(f"[{i + 1}/{args.runs}] {name}: {r['examples_per_s']:,.0f} examples/s, CPU s per 1,000 examples "
                  f"{r['job_cpu_per_1k']:.3f} (job), {train} (training loop), {c.get('count', 0)} checkpoints "
                  f"(mean write {c.get('mean_write_s') or 0:.3f}s), test accuracy {r['test_accuracy']:.4f}", file=sys.stderr, flush=True)
    detections = [detect(args.job, [], v, root) for v in ("worker-1", "server-0")] if args.detect else []
    runs = {name: rs for name, rs in runs.items() if rs}  # --runs 0: detection only
    base = statistics.fmean(r["examples_per_s"] for r in runs["none"]) if "none" in runs else None
    if runs:
        print()
        print(f"{args.epochs} epoch(s), {args.runs} run(s) each, interleaved")
        print()
        print("| checkpoints | examples/s | vs none | CPU s / 1,000 examples, job | CPU s / 1,000 examples, training loop "
              "| checkpoints per run (during training) | mean write s | test accuracy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        rate = [r["examples_per_s"] for r in rs]
        m = statistics.fmean(rate)
        # The last checkpoint of a run with checkpoints is the one after training.
        count = statistics.fmean((r["checkpoints"] or {}).get("count", 0) for r in rs)
        during = statistics.fmean(max(0, (r["checkpoints"] or {}).get("count", 0) - 1) for r in rs)
        writes = [(r["checkpoints"] or {}).get("mean_write_s") for r in rs]
        writes = [w for w in writes if w is not None]
        acc = statistics.fmean(r["test_accuracy"] for r in rs)
        job_cpu = [r["job_cpu_per_1k"] for r in rs]
        train_cpu = [r["train_cpu_per_1k"] for r in rs if r["train_cpu_per_1k"] is not None]
        vs = f"{m / base:.3f}" if base else "n/a"
        print(f"| {name} | {spread(rate, ',.0f')} | {vs} | {spread(job_cpu)} | {spread(train_cpu)} | "
              f"{count:.1f} ({during:.1f}) | {statistics.fmean(writes) if writes else 0:.3f} | {acc:.4f} |")
    # Pairs: each run against the none run next to it, so both saw about the same load. Wall-clock
    # ratio < 1 is slower; CPU ratio > 1 is more CPU per example.
    pairs = {name: {"examples_per_s": paired(runs, name, "examples_per_s"), "job_cpu_per_1k": paired(runs, name, "job_cpu_per_1k"),
                    "train_cpu_per_1k": paired(runs, name, "train_cpu_per_1k")} for name in runs if name != "none" and "none" in runs}
    for name, p in pairs.items():
        print(f"\n{name} / none, pair by pair (examples/s: below 1 is slower; CPU per example: above 1 costs more)\n")
        print("| pair | " + " | ".join(str(i + 1) for i in range(len(p["examples_per_s"]))) + " | median | min–max |")
        print("|---|" + "---:|" * (len(p["examples_per_s"]) + 2))
        for key, label in (("examples_per_s", "examples/s"), ("job_cpu_per_1k", "CPU per example, job"),
                           ("train_cpu_per_1k", "CPU per example, training loop")):
            v = p[key]
            print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in v)
                  + (f" | **{statistics.median(v):.3f}** | {min(v):.3f}–{max(v):.3f} |" if v else " | n/a | n/a |"))
    # RUSAGE_CHILDREN must hold at least what /proc showed of the same processes at the last poll.
    gaps = [r["job_cpu_s"] - r["proc_cpu_s_at_last_poll"] for rs in runs.values() for r in rs if r["proc_cpu_s_at_last_poll"] is not None]
    if gaps:
        print(f"\njob CPU (RUSAGE_CHILDREN) minus /proc at the last status poll: {min(gaps):+.2f} to {max(gaps):+.2f} s "
              f"(must not be negative); launcher (this process) "
              f"{statistics.fmean(r['launcher_cpu_s'] for rs in runs.values() for r in rs):.2f} CPU s per run, not counted")
    for d in detections:
        if "error" in d:
            print(f"\nfroze {d['victim']}: {d['error']}")
            continue
        print(f"\nfroze {d['victim']}: detected after {d['detected_after_s']} s ({d['kind']}); the job ended "
              f"{d['job_ended_after_s']:.1f} s after it froze, exit code {d['exit_code']} (on_worker_failure and "
              f"on_server_failure=fail; recovery: benchmarks/recovery.py); downpour train said: {d['launcher_said']}")
    print(f"\n{env['cpus']} CPUs, load at start {env['loadavg_at_start']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "checkpoint_overhead", "environment": env, "runs": runs, "pairs": pairs,
                       "detections": detections}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
