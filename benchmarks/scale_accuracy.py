"""Accuracy as the cluster grows: `optimizer.scaling: auto` against `none`, beside single-process PyTorch.

For each consistency mode, worker count, scaling and seed, the reference job (Fashion-MNIST MLP,
SGD lr 0.01 momentum 0.9, batch 32, 1 epoch: ``examples/mnist.yaml``) runs through the local
launcher at equal examples; single-process PyTorch runs the same model, optimizer and data in
the same invocation, once per seed. With ``--job ctr`` the CTR job (``examples/ctr.yaml``,
Wide & Deep, Adagrad, on generated Criteo-format data) runs instead and AUC is compared across
worker counts. Servers per worker count follow a fixed grid (1×1, 2×3, 2×6, 4×8, 4×16).

Every run is appended to ``--out`` (JSON lines) as it finishes, so an interrupted grid keeps what
it measured; ``--report`` prints the table of a results file without running anything.

    .venv/bin/python benchmarks/scale_accuracy.py --workers 8 --modes async --seeds 0            # one cheap cell
    .venv/bin/python benchmarks/scale_accuracy.py --workers 1,3,6,8,16 --modes async,sync,ssp --seeds 0,1,2
    .venv/bin/python benchmarks/scale_accuracy.py --job ctr --rows 300000 --workers 3,8 --modes async --seeds 0
    .venv/bin/python benchmarks/scale_accuracy.py --report results.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from benchmarks.end_to_end import run_single  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402

SERVERS = {1: 1, 2: 1, 3: 2, 4: 2, 6: 2, 8: 4, 12: 4, 16: 4}  # workers -> servers
QUIET = ["checkpoint.enabled=false", "monitor.tensorboard=false", "monitor.dashboard=false", "monitor.metrics=false"]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_downpour(job_file: str, overrides: list[str]) -> dict[str, Any]:
    job = load_job(job_file, [*QUIET, *overrides])
    with tempfile.TemporaryDirectory(prefix="scale-accuracy-") as run_dir:
        s = LocalLauncher(job, run_dir).run().summary
    eff = (s.get("optimizer") or {}).get("effective") or {}
    return {"status": s["status"], "test_accuracy": s.get("test_accuracy"), "test_auc": s.get("test_auc"),
            "test_logloss": s.get("test_logloss"), "examples": s["examples"], "examples_per_s": s["examples_per_s"],
            "train_s": s["train_s"], "staleness_mean": s["staleness"]["mean"], "effective_final": eff.get("final"),
            "plan": eff.get("plan")}


def ctr_data(rows: int, seed: int, folder: str) -> str:
    from downpour.data.criteo_gen import CriteoSpec, generate

    path = os.path.join(folder, f"criteo-{rows}-{seed}")
    if not os.path.exists(os.path.join(path, "criteo.json")):
        t0 = time.perf_counter()
        generate(CriteoSpec(rows=rows, seed=seed), path, overwrite=True)
        log(f"generated {rows:,} rows in {time.perf_counter() - t0:.0f}s under {path}")
    return path


def run_grid(args: argparse.Namespace) -> None:
    job_file = os.path.join(_ROOT, "examples", "mnist.yaml" if args.job == "mnist" else "ctr.yaml")
    base = [f"data.path={ctr_data(args.rows, 0, args.data)}"] if args.job == "ctr" else []
    base += args.set
    with open(args.out, "a") as out:
        def record(row: dict[str, Any]) -> None:
            out.write(json.dumps({"job": args.job, **row}) + "\n")
            out.flush()

        out.write(json.dumps({"environment": environment()}) + "\n")
        for seed in ints(args.seeds):
            if args.single and args.job == "mnist":
                t0 = time.perf_counter()
                r = run_single(load_job(job_file, [*base, f"training.seed={seed}"]), 1, None)
                record({"config": "single", "seed": seed, "test_accuracy": r["test_accuracy"],
                        "examples_per_s": r["examples_per_s"], "examples": r["examples"]})
                log(f"single seed {seed}: accuracy {r['test_accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)")
            for mode in args.modes.split(","):
                for workers in ints(args.workers):
                    for scaling in args.scaling.split(","):
                        t0 = time.perf_counter()
                        overrides = [*base, f"training.consistency={mode}", f"training.seed={seed}",
                                     f"cluster.num_workers={workers}", f"cluster.num_servers={SERVERS.get(workers, 4)}",
                                     f"optimizer.scaling={scaling}"]
                        r = run_downpour(job_file, overrides)
                        record({"config": "downpour", "mode": mode, "workers": workers, "scaling": scaling, "seed": seed, **r})
                        metric = "test_auc" if args.job == "ctr" else "test_accuracy"
                        log(f"{mode} {workers}w {scaling} seed {seed}: {metric} {r[metric]:.4f}, "
                            f"{r['examples_per_s']:.0f} examples/s, staleness {r['staleness_mean']:.2f}, "
                            f"final {r['effective_final']} ({time.perf_counter() - t0:.0f}s)")


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"


def report(*paths: str) -> str:
    """The table of one or more results files: per cell the mean ± sd over seeds, the gap of the
    mean to single-process PyTorch's mean, and the gap's range over the seeds that have both."""
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    rows = [r for r in rows if "config" in r]
    metric = "test_auc" if any(r.get("job") == "ctr" for r in rows) else "test_accuracy"
    single = {r["seed"]: r[metric] for r in rows if r["config"] == "single"}
    ref = statistics.mean(single.values()) if single else None
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["config"] == "downpour":
            cells.setdefault((r["mode"], r["workers"], r["scaling"]), []).append(r)
    lines = []
    if single:
        lines.append(f"single-process PyTorch: {metric} {_mean_sd(list(single.values()))} (seeds "
                     f"{', '.join(f'{k}: {v:.4f}' for k, v in sorted(single.items()))})\n")
    lines += [f"| mode | workers | scaling | seeds | {metric} (mean ± sd) | vs single (mean) | vs single, per seed | "
              "per seed | examples/s | staleness |",
              "|---|---:|---|---:|---:|---:|---|---|---:|---:|"]
    for (mode, workers, scaling), rs in sorted(cells.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        vals = [r[metric] for r in rs if r.get(metric) is not None]
        gap = f"{statistics.mean(vals) - ref:+.4f}" if ref is not None and vals else "n/a"
        paired = [r[metric] - single[r["seed"]] for r in rs if r.get(metric) is not None and r["seed"] in single]
        spread = f"{min(paired):+.4f} … {max(paired):+.4f}" if paired else "n/a"
        eps = statistics.mean(r["examples_per_s"] for r in rs)
        stale = statistics.mean(r["staleness_mean"] for r in rs)
        lines.append(f"| {mode} | {workers} | {scaling} | {len(rs)} | {_mean_sd(vals)} | {gap} | {spread} | "
                     f"{', '.join(f'{v:.4f}' for v in vals)} | {eps:,.0f} | {stale:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=["mnist", "ctr"], default="mnist")
    ap.add_argument("--workers", default="1,3,6,8,16", help="worker counts, comma-separated")
    ap.add_argument("--modes", default="async,sync,ssp", help="consistency modes, comma-separated")
    ap.add_argument("--scaling", default="auto,none", help="optimizer.scaling values, comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="training.seed values, comma-separated")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip the single-process runs")
    ap.add_argument("--rows", type=int, default=300_000, help="CTR: generated rows")
    ap.add_argument("--data", default=os.path.join(_ROOT, "data"), help="CTR: folder for generated data")
    ap.add_argument("--set", action="append", default=[], help="job overrides for every Downpour run")
    ap.add_argument("--out", default="scale_accuracy.jsonl", help="results, appended as JSON lines")
    ap.add_argument("--report", metavar="FILE", nargs="+", help="print the table of results files and exit")
    args = ap.parse_args()
    if args.report:
        print(report(*args.report))
        return 0
    run_grid(args)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
