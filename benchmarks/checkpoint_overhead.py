"""What checkpoints cost: examples/s of the reference job with checkpoints every 10 s (and every
1 s, a stress case) against none, in one run; plus how long a dead node takes to be detected.

* ``none``: ``checkpoint.enabled=false``.
* ``every-10s``: ``checkpoint.every_s=10`` (and the one at the end, after training).
* ``every-1s``: ``checkpoint.every_s=1``.

Runs alternate so each configuration sees the same machine load; the training rate covers the
training loop only (the end-of-training checkpoint comes after it). Target (issue 3, from
CheckFreq): every-10s at most 3.5 % slower than none.

Detection: ``--detect`` also runs the job and freezes worker-1 (then, in a second run, server-0)
with SIGSTOP once training runs: the process stays up but goes silent, as a hung or cut-off
machine does, so only the coordinator's heartbeat watch can notice it. It reports the
coordinator's ``detected_after_s`` (the job then ends with a clear error: automatic recovery is
not built yet). A process that exits is noticed at once by ``downpour train`` (it polls its
children every 50 ms), before any heartbeat is missed.

    .venv/bin/python benchmarks/checkpoint_overhead.py --runs 3 --epochs 3 --detect
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
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import yaml  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from benchmarks.end_to_end import DEFAULT_JOB, run_distributed  # noqa: E402
from downpour.config import job_to_dict, load_job  # noqa: E402

CONFIGS = {"none": ["checkpoint.enabled=false"], "every-10s": ["checkpoint.every_s=10"], "every-1s": ["checkpoint.every_s=1"]}


def detect(job_path: str, common: list[str], victim: str, root: str) -> dict[str, Any]:
    """Start the job, freeze ``victim`` once it trains, return the failure the coordinator recorded."""
    # With the default (recover) a frozen worker is replaced and the job goes on (benchmarks/recovery.py
    # measures that); here the first failure must end the job, as this measurement describes.
    job = load_job(job_path, common + ["epochs=20", "cluster.on_worker_failure=fail"])
    path = os.path.join(root, f"detect-{victim}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job_to_dict(job), f)
    run_dir = os.path.join(root, f"detect-{victim}")
    proc = subprocess.Popen([sys.executable, "-m", "downpour", "train", path, "--run-dir", run_dir, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status_path = os.path.join(run_dir, "dashboard.url")
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                import urllib.request

                url = open(status_path).read().strip() + "api/status"
                st = json.loads(urllib.request.urlopen(url, timeout=2).read())
                if st["phase"] == "training" and st["steps"] > 100:
                    pid = {n["name"]: n["pid"] for n in st["nodes"]}[victim]
            except (OSError, ValueError, KeyError):
                pass
        if pid is None:
            return {"error": "the job never trained"}
        killed = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        proc.wait(timeout=120)
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        failure = next(f for f in summary["failures"] if f["node"] == victim)
        return {"victim": victim, "detected_after_s": failure["detected_after_s"], "kind": failure["kind"],
                "job_ended_after_s": time.monotonic() - killed}
    finally:
        if proc.poll() is None:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--detect", action="store_true", help="also measure detection of a killed worker and server")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    common = [f"epochs={args.epochs}"]
    env = environment()
    root = tempfile.mkdtemp(prefix="downpour-ckpt-")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for i in range(args.runs):
        for name in configs:
            r = run_distributed(args.job, common + CONFIGS[name], os.path.join(root, f"{name}-{i + 1}"))
            summary = json.load(open(os.path.join(r["run_dir"], "summary.json")))
            r["checkpoints"] = summary.get("checkpoints")
            runs[name].append(r)
            c = r["checkpoints"] or {}
            print(f"[{i + 1}/{args.runs}] {name}: {r['examples_per_s']:,.0f} examples/s, {c.get('count', 0)} checkpoints "
                  f"(mean write {c.get('mean_write_s') or 0:.3f}s), test accuracy {r['test_accuracy']:.4f}", file=sys.stderr, flush=True)
    detections = [detect(args.job, [], v, root) for v in ("worker-1", "server-0")] if args.detect else []
    base = statistics.fmean(r["examples_per_s"] for r in runs["none"]) if "none" in runs else None
    print()
    print(f"{args.epochs} epoch(s), {args.runs} run(s) each, interleaved")
    print()
    print("| checkpoints | examples/s (mean [min–max]) | vs none | checkpoints per run | mean write s | test accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        rate = [r["examples_per_s"] for r in rs]
        m = statistics.fmean(rate)
        count = statistics.fmean((r["checkpoints"] or {}).get("count", 0) for r in rs)
        writes = [(r["checkpoints"] or {}).get("mean_write_s") for r in rs]
        writes = [w for w in writes if w is not None]
        acc = statistics.fmean(r["test_accuracy"] for r in rs)
        print(f"| {name} | {m:,.0f} [{min(rate):,.0f}–{max(rate):,.0f}] | {m / base:.3f} | {count:.1f} | "
              f"{statistics.fmean(writes) if writes else 0:.3f} | {acc:.4f} |")
    for d in detections:
        print(f"\nfroze {d.get('victim')}: detected after {d.get('detected_after_s')} s ({d.get('kind')}); "
              f"the job ended {d.get('job_ended_after_s', 0):.1f} s after it froze (cluster.on_worker_failure=fail; "
              f"recovery: benchmarks/recovery.py)")
    print(f"\n{env['cpus']} CPUs, load at start {env['loadavg_at_start']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "checkpoint_overhead", "environment": env, "runs": runs, "detections": detections}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
