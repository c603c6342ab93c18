"""The reference job's rate and CPU per example, its processes free on every core, pinned to one
core, or under the default CPU policy instead of SCHED_BATCH.

Each run is a whole ``downpour train`` of the job (``--epochs`` epochs, default 4, so the steady state
is a few seconds long); the machine's busy time (``/proc/stat``) is sampled every 0.2 s while it runs,
and the window from 45 % to 80 % of the samples (past start-up, before the evaluation) gives the
cores busy. CPU per example is cores busy / the job's examples/s: the whole machine's, so run it on a
quiet one. Configurations, run in this order each round:

* ``free``: as ``downpour train`` runs it (every process free to run on every core, SCHED_BATCH);
* ``cpuN``: the job started under ``taskset -c N`` (every process on core N; children inherit it);
* ``normal``: ``cluster.cpu_policy=normal`` (the default Linux policy, wake-up preemption on).

    .venv/bin/python benchmarks/core_placement.py --configs free,cpu0,cpu1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, machine_busy_s, spread, write_runs  # noqa: E402

JOB = "examples/mnist.yaml"


def run_one(config: str, epochs: int, run_dir: str) -> dict:
    prefix, extra = [], []
    if config.startswith("cpu"):
        prefix = ["taskset", "-c", config[3:]]
    elif config == "normal":
        extra = ["--set", "cluster.cpu_policy=normal"]
    elif config != "free":
        raise SystemExit(f"unknown configuration {config!r}: free, cpuN or normal")
    cmd = [*prefix, sys.executable, "-m", "downpour", "train", JOB, "--quiet", "--run-dir", run_dir,
           "--set", f"epochs={epochs}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []
    try:
        while proc.poll() is None:
            samples.append((time.monotonic(), machine_busy_s()))
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise SystemExit(f"{config}: the job failed ({proc.returncode}):\n{err[-2000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    k = len(samples)
    (t0, b0), (t1, b1) = samples[int(k * 0.45)], samples[int(k * 0.8)]
    cores = (b1 - b0) / (t1 - t0)
    rate = summary["examples_per_s"]
    return {"config": config, "examples_per_s": rate, "cores_busy": cores, "cpu_us_per_example": 1e6 * cores / rate,
            "test_accuracy": summary["test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="free,cpu0,cpu1", help="free, cpuN (taskset -c N), normal; comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--json", default=None, help="write every run here")
    args = ap.parse_args(argv)
    if machine_busy_s() is None:
        raise SystemExit("this benchmark reads /proc/stat (Linux only)")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    tmp = tempfile.mkdtemp(prefix="core-placement-")
    try:
        for rnd in range(args.rounds):
            for c in configs:
                r = run_one(c, args.epochs, os.path.join(tmp, f"{c}-{rnd}"))
                runs[c].append(r)
                print(f"round {rnd + 1} {c}: {r['examples_per_s']:,.0f} examples/s, {r['cores_busy']:.2f} cores busy, "
                      f"{r['cpu_us_per_example']:.1f} µs CPU/example, test accuracy {r['test_accuracy']:.4f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{environment()}\n")
    print("| configuration | examples/s (mean, min–max) | cores busy | CPU µs/example (mean, min–max) |")
    print("|---|---:|---:|---:|")
    for c, rs in runs.items():
        print(f"| {c} | {spread([r['examples_per_s'] for r in rs], ',.0f')} | {statistics.mean(r['cores_busy'] for r in rs):.2f} | "
              f"{spread([r['cpu_us_per_example'] for r in rs])} |")
    write_runs(args.json, args, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
