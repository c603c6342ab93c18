"""The scheduling policies on a heavy-tailed synthetic trace, on a simulated clock.

    .venv/bin/python benchmarks/scheduler_sim.py [--trace synthetic|philly] [--jobs 400] [--seeds 0 1 2]
        [--loads 1.5 2 3] [--json OUT]

Runs the scheduler's own policy code (downpour/scheduler/decide.py) through
downpour/scheduler/sim.py on a cluster of 8 nodes x 8 CPU slots, for each offered load and seed,
and prints per policy: mean and p95 job completion time (JCT), makespan, CPU-slot utilization,
Jain's fairness index over users' progress (run time alone / JCT, averaged per user) and
preemptions; then the mean JCT of each policy relative to least-attained-service. The trace is
drawn, not downloaded (sim.synthetic_trace: shape after Philly, Jeon et al. ATC 2019, and the
Tiresias trace, Gu et al. NSDI 2019); ``--trace philly`` draws run times from the Philly trace's
published per-width distribution instead (sim.philly_trace). Deterministic: the same arguments give
the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from downpour.scheduler.policies import make_policy
from downpour.scheduler.resources import Resources
from downpour.scheduler.sim import philly_trace, simulate, synthetic_trace

POLICIES = [  # label, registry name, options
    ("fifo", "fifo", {}),
    ("fifo+backfill", "fifo", {"backfill": True}),
    ("priority+aging", "priority", {"aging_per_s": 1 / 3600}),
    ("drf", "drf", {}),
    ("las", "las", {"thresholds": [600.0, 6000.0]}),
]
TRACES = {"synthetic": synthetic_trace, "philly": philly_trace}
NODES = {f"n{i}": Resources(cpus=8, memory_mb=64 * 1024) for i in range(8)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", choices=sorted(TRACES), default="synthetic")
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loads", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    rows = []
    for load in args.loads:
        for seed in args.seeds:
            trace = TRACES[args.trace](args.jobs, seed=seed, load=load, cluster_cpus=64)
            for label, name, opts in POLICIES:
                t0 = time.perf_counter()
                rep = simulate(trace, NODES, make_policy(name, **opts), stop_s=30.0, resume_s=30.0, tick_s=60.0).report()
                rows.append({"load": load, "seed": seed, "policy": label, **rep, "sim_s": time.perf_counter() - t0})
    print("| load | policy | mean JCT (s) | p95 JCT (s) | makespan (s) | utilization | Jain | preemptions | mean JCT / LAS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for load in args.loads:
        las = statistics.mean(r["mean_jct_s"] for r in rows if r["load"] == load and r["policy"] == "las")
        for label, _, _ in POLICIES:
            sel = [r for r in rows if r["load"] == load and r["policy"] == label]
            m = {k: statistics.mean(r[k] for r in sel) for k in ("mean_jct_s", "p95_jct_s", "makespan_s", "utilization",
                                                                  "jain_fairness", "preemptions")}
            print(f"| {load:g} | {label} | {m['mean_jct_s']:.0f} | {m['p95_jct_s']:.0f} | {m['makespan_s']:.0f} | "
                  f"{m['utilization']:.3f} | {m['jain_fairness']:.3f} | {m['preemptions']:.0f} | {m['mean_jct_s'] / las:.2f} |")
    print(f"({args.trace} trace; means over seeds {args.seeds}; {args.jobs} jobs per trace; 8 nodes x 8 CPU slots)",
          file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
