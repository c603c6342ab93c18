"""What monitoring costs: examples/s of the reference job with monitoring on against off, in one run.

* ``off``: ``monitor.metrics=false``, ``monitor.dashboard=false``, ``monitor.tensorboard=false``:
  no HTTP endpoint on any node, no histogram observations, no TensorBoard file.
* ``on``: the defaults (every node serves /metrics, the coordinator serves the dashboard and
  writes TensorBoard scalars), plus a scraper thread standing in for Prometheus *and* an open
  dashboard: every ``--scrape-interval-s`` (default 1 s, 15x Prometheus' default rate) it reads
  every node's /metrics and the coordinator's /api/status and /api/history.

Runs alternate (off, on, off, on, ...) so both see the same machine load. The table gives the
mean examples/s of each, the ratio of the means, and the median of the per-pair ratios
(on_i / off_i), which is steadier on a noisy host. Target: on >= 0.98 x off.

    .venv/bin/python benchmarks/metrics_overhead.py --runs 5
    .venv/bin/python benchmarks/metrics_overhead.py --runs 2 --steps 300      # quick check only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import urllib.request
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from benchmarks.end_to_end import DEFAULT_JOB, run_distributed  # noqa: E402

CONFIGS = {"off": ["monitor.metrics=false", "monitor.dashboard=false", "monitor.tensorboard=false"], "on": []}


class Scraper(threading.Thread):
    """Scrapes a run's nodes (from its prometheus_targets.json) and its dashboard JSON until stopped."""

    def __init__(self, run_dir: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.interval_s = run_dir, interval_s
        self.halt = threading.Event()
        self.scrapes = self.bytes = self.errors = 0

    def _get(self, url: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                self.bytes += len(r.read())
                self.scrapes += 1
        except OSError:
            self.errors += 1  # a node that just finished; not a failure of the benchmark

    def run(self) -> None:
        targets_path = os.path.join(self.run_dir, "prometheus_targets.json")
        url_path = os.path.join(self.run_dir, "dashboard.url")
        while not self.halt.wait(self.interval_s):
            try:
                with open(targets_path) as f:
                    targets = [t["targets"][0] for t in json.load(f)]
                with open(url_path) as f:
                    dashboard = f.read().strip()
            except (OSError, ValueError):
                continue
            for address in targets:
                self._get(f"http://{address}/metrics")
            self._get(dashboard + "api/status")
            self._get(dashboard + "api/history")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--runs", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="quick checks only: cap each worker at STEPS steps")
    ap.add_argument("--scrape-interval-s", type=float, default=1.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    common = [f"steps={args.steps}"] if args.steps else []
    env = environment()
    root = tempfile.mkdtemp(prefix="downpour-metrics-")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    try:
        for i in range(args.runs):
            for name, overrides in CONFIGS.items():
                run_dir = os.path.join(root, f"{name}-{i + 1}")
                scraper = Scraper(run_dir, args.scrape_interval_s) if name == "on" else None
                if scraper:
                    scraper.start()
                try:
                    r = run_distributed(args.job, common + overrides, run_dir)
                finally:
                    if scraper:
                        scraper.halt.set()
                        scraper.join(timeout=5)
                if scraper:
                    r["scrapes"], r["scrape_errors"], r["scraped_bytes"] = scraper.scrapes, scraper.errors, scraper.bytes
                runs[name].append(r)
                extra = f", {scraper.scrapes} scrapes" if scraper else ""
                print(f"[{i + 1}/{args.runs}] {name}: {r['examples_per_s']:,.0f} examples/s, test accuracy "
                      f"{r['test_accuracy']:.4f}{extra}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rate = {name: [r["examples_per_s"] for r in rs] for name, rs in runs.items()}
    pairs = [on / off for on, off in zip(rate["on"], rate["off"])]
    mean = {name: statistics.fmean(v) for name, v in rate.items()}
    print()
    print("| monitoring | examples/s (mean [min–max]) | test accuracy (mean) |")
    print("|---|---:|---:|")
    for name, rs in runs.items():
        acc = statistics.fmean(r["test_accuracy"] for r in rs)
        print(f"| {name} | {mean[name]:,.0f} [{min(rate[name]):,.0f}–{max(rate[name]):,.0f}] | {acc:.4f} |")
    print()
    print(f"on/off: ratio of means {mean['on'] / mean['off']:.3f}; median of {len(pairs)} paired ratios "
          f"{statistics.median(pairs):.3f} (pairs: {', '.join(f'{p:.3f}' for p in pairs)})")
    print(f"scrapes per 'on' run: {[r['scrapes'] for r in runs['on']]} every {args.scrape_interval_s:g}s; "
          f"{env['cpus']} CPUs, load at start {env['loadavg_at_start']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "metrics_overhead", "environment": env, "runs": runs, "paired_ratios": pairs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
