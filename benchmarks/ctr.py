"""The CTR workload end to end: test AUC against the generator's optimum, and examples/s.

Generates Criteo-format data with ``downpour datagen criteo`` (once per row count and seed, kept
under ``--data``), then runs ``examples/ctr.yaml`` (Wide & Deep, dim-16 embeddings in sparse
tables on 2 servers, 3 async workers, Adagrad) through the local launcher, and prints the
summary's AUC beside the optimum, log loss, examples/s over the training loop and wall time,
plus where the workers' time went.

    .venv/bin/python benchmarks/ctr.py                       # 3M rows: about 10 minutes on 2 cores
    .venv/bin/python benchmarks/ctr.py --rows 300000         # a quick look (the gap is larger)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.api import resolve_job  # noqa: E402
from downpour.config import apply_overrides  # noqa: E402
from downpour.data.criteo_gen import CriteoSpec, generate  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.path.join(_ROOT, "data"), help="folder for the generated data sets")
    ap.add_argument("--set", action="append", default=[], help="job overrides, as for downpour train")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    data = os.path.join(args.data, f"criteo-{args.rows}-{args.seed}")
    if not os.path.exists(os.path.join(data, "criteo.json")):
        t0 = time.perf_counter()
        generate(CriteoSpec(rows=args.rows, seed=args.seed), data)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.0f}s under {data}", flush=True)
    import yaml

    raw = yaml.safe_load(open(os.path.join(_ROOT, "examples", "ctr.yaml")))
    raw = apply_overrides(raw, [f"data.path={data}", "checkpoint.enabled=false", *args.set])
    job = resolve_job(raw)
    with tempfile.TemporaryDirectory(prefix="ctr-bench-") as run_dir:
        s = LocalLauncher(job, run_dir).run().summary
    workers = s["workers"].values()
    out = {
        "environment": environment(),
        "rows": args.rows,
        "test_auc": s["test_auc"], "optimum_auc": s["optimum_auc"], "auc_gap": s["optimum_auc"] - s["test_auc"],
        "test_logloss": s["test_logloss"], "optimum_logloss": s["optimum_logloss"],
        "examples": s["examples"], "train_s": s["train_s"], "wall_s": s["wall_s"], "examples_per_s": s["examples_per_s"],
        "worker_compute_s": sum(w["compute_s"] for w in workers), "worker_sparse_wait_s": sum(w["sparse"]["wait_s"] for w in workers),
        "worker_dense_wait_s": sum(w["wait_s"] for w in workers),
        "server_cpu_s": sum(v["cpu_s"] for v in s["servers"].values()),
        "rows_per_server": {n: {t: v["rows"] for t, v in srv["sparse"]["tables"].items()} for n, srv in s["servers"].items()},
        "bytes_per_row": {n: {t: v["bytes_per_row"] for t, v in srv["sparse"]["tables"].items()} for n, srv in s["servers"].items()},
    }
    print(f"test AUC {out['test_auc']:.4f}, optimum {out['optimum_auc']:.4f}: gap {out['auc_gap']:.4f} (target <= 0.01); "
          f"log loss {out['test_logloss']:.4f} (optimum {out['optimum_logloss']:.4f})")
    print(f"{out['examples']:,} examples in {out['train_s']:.1f}s of training: {out['examples_per_s']:,.0f} examples/s; "
          f"wall {out['wall_s']:.1f}s")
    print(f"workers: compute (forward incl. sparse pulls, backward) {out['worker_compute_s']:.1f}s, of it waiting for "
          f"sparse rows {out['worker_sparse_wait_s']:.1f}s; dense push+pull wait {out['worker_dense_wait_s']:.1f}s; "
          f"servers' CPU {out['server_cpu_s']:.1f}s")
    print(f"rows per server: {out['rows_per_server']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
