"""An early failure with the default settings, as a new user meets it.

``downpour train examples/mnist.yaml --set epochs=8`` (nothing else set: 2 servers, 3 workers, no
replicas, a checkpoint at step 0 then every 60 s), worker-1 SIGKILLed 2 s after the first worker
step and server-1 4 s after that; against undisturbed runs of the same command. The job must finish
within 1 point of test accuracy of the undisturbed runs. Runs alternate (undisturbed, killed, ...)
so that a change in the machine's load falls on both alike. From each run's summary.json: status,
test accuracy, and for each failure its detection, what the server's replacement loaded and the
versions it rolled back.

    flock /work/.cpu.lock .venv/bin/python benchmarks/new_user.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from benchmarks.common import environment  # noqa: E402
from tests.cluster import query_status  # noqa: E402

JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
RUN_LIMIT_S = 900.0  # one run of 8 epochs takes about a minute on the 2-core VM; a hung one is stopped


def _pid(st: dict[str, Any], name: str) -> int | None:
    return next((n["pid"] for n in st.get("nodes", []) if n["name"] == name and n["state"] == "alive"), None)


def run(run_dir: str, epochs: int, kill: bool, worker_after_s: float, server_after_s: float) -> dict[str, Any]:
    """One `downpour train` to its end; with ``kill``, worker-1 SIGKILLed ``worker_after_s`` after the
    first worker step, server-1 ``server_after_s`` after that."""
    cmd = [sys.executable, "-m", "downpour", "train", JOB, "--set", f"epochs={epochs}", "--run-dir", run_dir, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=_ROOT)
    killed: list[str] = []
    deadline = time.monotonic() + RUN_LIMIT_S
    try:
        plan = [("worker-1", worker_after_s), ("server-1", server_after_s)] if kill else []
        started = None
        while plan and proc.poll() is None and time.monotonic() < deadline:
            st = query_status(run_dir) or {}
            if started is None and st.get("phase") == "training" and st.get("steps", 0) > 0:
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= plan[0][1]:
                pid = _pid(st, plan[0][0])
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(plan[0][0])
                    started, plan = time.monotonic(), plan[1:]
            time.sleep(0.1)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
    except OSError:
        return {"kill": kill, "killed": killed, "status": f"no summary (exit {proc.returncode}): {err[-500:]}",
                "test_accuracy": None, "failures": []}
    return {"kill": kill, "killed": killed, "status": s.get("status"), "error": s.get("error"),
            "test_accuracy": s.get("test_accuracy"), "train_s": s.get("train_s"),
            "failures": [{k: f.get(k) for k in ("node", "kind", "detected_after_s", "recovered_after_s", "restored_from",
                                                 "rolled_back_versions", "replaced_by")} for f in s.get("failures", [])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="pairs of runs (undisturbed, killed)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--worker-after", type=float, default=2.0)
    ap.add_argument("--server-after", type=float, default=4.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    env = environment()
    tmp = tempfile.mkdtemp(prefix="downpour-bench-new-user-")
    rows = []
    try:
        for i in range(args.runs):
            for kill in (False, True):
                row = {"pair": i, **run(os.path.join(tmp, f"{i}-{int(kill)}"), args.epochs, kill, args.worker_after,
                                        args.server_after)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{env['time']}, {env['cpus']} CPUs ({env['cpu_model']}), torch {env['torch']}, "
          f"`downpour train examples/mnist.yaml --set epochs={args.epochs}`\n")
    print("| pair | undisturbed | killed | difference (points) | killed run: status "
          "| failures (detected after s; restored from; versions rolled back) |")
    print("|---|---|---|---|---|---|")
    diffs = []
    for i in range(args.runs):
        calm, hit = (next(r for r in rows if r["pair"] == i and r["kill"] is k) for k in (False, True))
        ok = calm["test_accuracy"] is not None and hit["test_accuracy"] is not None
        if ok:
            diffs.append(100 * (hit["test_accuracy"] - calm["test_accuracy"]))
        fails = "; ".join(f"{f['node']}: {f['detected_after_s']}; {f['restored_from'] or '-'}; {f['rolled_back_versions']}"
                          for f in hit["failures"])
        print(f"| {i} | {calm['test_accuracy']} | {hit['test_accuracy']} | {f'{diffs[-1]:+.2f}' if ok else '-'} "
              f"| {hit['status']} | {fails} |")
    if diffs:
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(f"\ndifference {statistics.mean(diffs):+.2f} ± {sd:.2f} points (mean ± sd) over {len(diffs)} pairs; "
              f"worst {min(diffs):+.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
