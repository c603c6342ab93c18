"""The CTR workload end to end: test AUC against the generator's optimum, and examples/s, beside a
single-process PyTorch baseline measured in the same run.

Generates Criteo-format data with ``downpour datagen criteo`` (once per row count and seed, kept
under ``--data``), then runs ``examples/ctr.yaml`` (Wide & Deep, dim-16 embeddings in sparse
tables on 2 servers, 3 async workers, Adagrad) through the local launcher, and prints the
summary's AUC beside the optimum, log loss, examples/s over the training loop and wall time,
plus where the workers' time went.

``--single`` (the default; ``--no-single`` skips it) also trains the same model in one process of
plain PyTorch on ``torch.set_num_threads(1)`` (``--single-threads`` for more): the job's Wide & Deep
dimensions, batch size, epochs and learning rates, with the sparse tables replaced by *hashed*
tables (``--buckets`` rows, IDs hashed by a multiplicative hash, so unlike Downpour's exact tables
two IDs may share a row): ``nn.Embedding`` for the deep part (one row per field) and
``nn.EmbeddingBag(mode="sum")`` for the wide part, both ``sparse=True``, trained by
``torch.optim.Adagrad`` with the tables' lr (sparse Adagrad), the dense layers by a second
``torch.optim.Adagrad`` with the dense lr. Rows start uniform in [-init_scale, init_scale] as
Downpour's do. The whole training split is converted to tensors before the clock starts; only the
batch loop (hashing included) is timed, as in ``end_to_end.py``. The runs alternate
(``--runs``), single first.

    .venv/bin/python benchmarks/ctr.py                       # 3M rows: about 15 minutes on 2 cores
    .venv/bin/python benchmarks/ctr.py --rows 900000         # about 3 minutes
    .venv/bin/python benchmarks/ctr.py --rows 300000         # a quick look (the gap is larger)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from downpour.api import resolve_job  # noqa: E402
from downpour.config import JobConfig, apply_overrides  # noqa: E402
from downpour.data.criteo import load_criteo_dataset  # noqa: E402
from downpour.data.criteo_gen import CriteoSpec, generate  # noqa: E402
from downpour.data.scoring import log_loss, roc_auc  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402
from downpour.models import deep_tower  # noqa: E402

HASH_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: Fibonacci hashing
warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch.optim.Adagrad on sparse grads, once per run
WARMUP_BATCHES = 20  # untimed steps of a throwaway model (allocator, sparse kernels) before the timed loop


# --------------------------------------------------------------------------- single process
class HashedWideDeep(nn.Module):
    """:class:`downpour.models.WideDeep` with hashed local tables in place of the sparse tables."""

    def __init__(
        self,
        buckets_log2: int,
        num_dense: int,
        num_fields: int,
        dim: int,
        hidden: list[int],
        dropout: float = 0.0,
        init_scale: float = 0.01,
        **_: Any,
    ) -> None:
        super().__init__()
        self.shift, self.mask = 64 - buckets_log2, (1 << buckets_log2) - 1
        self.embedding = nn.Embedding(1 << buckets_log2, dim, sparse=True)
        self.wide = nn.EmbeddingBag(1 << buckets_log2, 1, mode="sum", sparse=True)
        with torch.no_grad():
            self.embedding.weight.uniform_(-init_scale, init_scale)
            self.wide.weight.uniform_(-init_scale, init_scale)
        self.dense_wide = nn.Linear(num_dense, 1)
        self.deep = deep_tower(num_dense + num_fields * dim, hidden, dropout)  # the job's own tower

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = ((ids * HASH_MULT) >> self.shift) & self.mask  # int64 wraps; the mask drops the sign bits
        deep = self.deep(torch.cat([dense, self.embedding(rows).flatten(1)], dim=1))
        return (deep + self.wide(rows) + self.dense_wide(dense)).squeeze(-1)

    def optimizers(self, dense_lr: float, sparse_lr: float, eps: float, sparse_eps: float) -> list[torch.optim.Optimizer]:
        tables = [self.embedding.weight, self.wide.weight]
        dense = [p for p in self.parameters() if all(p is not t for t in tables)]
        return [torch.optim.Adagrad(tables, lr=sparse_lr, eps=sparse_eps), torch.optim.Adagrad(dense, lr=dense_lr, eps=eps)]


def _build(job: JobConfig, buckets_log2: int) -> tuple[HashedWideDeep, list[torch.optim.Optimizer]]:
    if job.model.name != "wide_deep":
        raise SystemExit(f"the single-process baseline builds Wide & Deep; the job's model is {job.model}")
    model = HashedWideDeep(buckets_log2, init_scale=job.sparse.init_scale, **job.model.args)
    if job.optimizer.name != "adagrad" or job.sparse.optimizer.name != "adagrad":
        raise SystemExit("the single-process baseline implements Adagrad for both the dense layers and the tables")
    return model, model.optimizers(job.optimizer.lr, job.sparse.optimizer.lr, job.optimizer.eps, job.sparse.optimizer.eps)


def run_single(job: JobConfig, buckets_log2: int, threads: int) -> dict[str, Any]:
    """One process of plain PyTorch on ``threads`` threads: examples/s of the batch loop, test AUC."""
    t = job.training
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = load_criteo_dataset(job.data.path, **job.data.args)
        n = len(data.train)
        (dense, ids), y = data.train.take(np.arange(n))
        bs = t.batch_size
        warm, warm_opts = _build(job, 16)
        for b in range(0, WARMUP_BATCHES * bs, bs):
            _step(warm, warm_opts, dense[b : b + bs], ids[b : b + bs], y[b : b + bs])
        del warm, warm_opts
        torch.manual_seed(t.seed)
        model, opts = _build(job, buckets_log2)
        gen = torch.Generator().manual_seed(t.seed)
        examples, train_s, cpu_s = 0, 0.0, 0.0
        for _ in range(t.epochs):
            perm = torch.randperm(n, generator=gen)
            xd, xi, ys = dense[perm], ids[perm], y[perm]
            t0, c0 = time.perf_counter(), time.process_time()
            for b in range(0, n, bs):
                _step(model, opts, xd[b : b + bs], xi[b : b + bs], ys[b : b + bs])
                examples += len(ys[b : b + bs])
            train_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
        model.eval()
        (tdense, tids), ty = data.test.take(np.arange(len(data.test)))
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(model(tdense[b : b + 8192], tids[b : b + 8192])) for b in range(0, len(ty), 8192)]).numpy()
    finally:
        torch.set_num_threads(old_threads)
    labels = ty.numpy()
    return {
        "threads": threads,
        "buckets": 1 << buckets_log2,
        "examples": examples,
        "train_s": train_s,
        "examples_per_s": examples / train_s,
        "cpu_us_per_example": 1e6 * cpu_s / examples,  # the timed loop's CPU (every thread)
        "test_auc": roc_auc(labels, p),
        "test_logloss": log_loss(labels, p),
    }


def _step(model: nn.Module, opts: list[torch.optim.Optimizer], dense: torch.Tensor, ids: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    for o in opts:
        o.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(dense, ids), y).backward()
    for o in opts:
        o.step()


# --------------------------------------------------------------------------- Downpour
def run_downpour(job: JobConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ctr-bench-") as run_dir:
        s = LocalLauncher(job, run_dir).run().summary
    workers = s["workers"].values()
    return {
        "test_auc": s["test_auc"],
        "optimum_auc": s["optimum_auc"],
        "auc_gap": s["optimum_auc"] - s["test_auc"],
        "test_logloss": s["test_logloss"],
        "optimum_logloss": s["optimum_logloss"],
        "examples": s["examples"],
        "train_s": s["train_s"],
        "wall_s": s["wall_s"],
        "examples_per_s": s["examples_per_s"],
        "worker_compute_s": sum(w["compute_s"] for w in workers),
        "worker_sparse_wait_s": sum(w["sparse"]["wait_s"] for w in workers),
        "worker_dense_wait_s": sum(w["wait_s"] for w in workers),
        "server_cpu_s": sum(v["cpu_s"] for v in s["servers"].values()),
        # Each process's CPU (every thread) over its whole life: start-up and evaluation included.
        "worker_cpu_s": sum(w["cpu_s"] for w in workers),
        "worker_cpu_us_per_example": 1e6 * sum(w["cpu_s"] for w in workers) / s["examples"],
        "server_cpu_us_per_example": 1e6 * sum(v["cpu_s"] for v in s["servers"].values()) / s["examples"],
        "sparse_requests": sum(w["sparse"]["requests"] for w in workers),
        "sparse_reads_ahead": sum(w["sparse"].get("reads_ahead", 0) for w in workers),
        "rows_per_server": {n: {t: v["rows"] for t, v in srv["sparse"]["tables"].items()} for n, srv in s["servers"].items()},
        "bytes_per_row": {n: {t: v["bytes_per_row"] for t, v in srv["sparse"]["tables"].items()} for n, srv in s["servers"].items()},
    }


def _mean(rs: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rs]
    return f"{statistics.fmean(vals):,.4f}" if key.startswith("test") else f"{statistics.fmean(vals):,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.path.join(_ROOT, "data"), help="folder for the generated data sets")
    ap.add_argument("--set", action="append", default=[], help="job overrides, as for downpour train")
    ap.add_argument("--runs", type=int, default=1, help="runs of each side, alternating (default 1)")
    ap.add_argument("--single", action=argparse.BooleanOptionalAction, default=True, help="also run the single-process baseline")
    ap.add_argument("--single-threads", default="1", help="comma-separated torch thread counts of the baseline (default 1)")
    ap.add_argument("--buckets-log2", type=int, default=22, help="rows of the baseline's hashed tables: 2**N (default 22)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    data = os.path.join(args.data, f"criteo-{args.rows}-{args.seed}")
    if not os.path.exists(os.path.join(data, "criteo.json")):
        t0 = time.perf_counter()
        generate(CriteoSpec(rows=args.rows, seed=args.seed), data, overwrite=True)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.0f}s under {data}", flush=True)
    import yaml

    raw = yaml.safe_load(open(os.path.join(_ROOT, "examples", "ctr.yaml")))
    raw = apply_overrides(raw, [f"data.path={data}", "checkpoint.enabled=false", *args.set])
    job = resolve_job(raw)
    threads = [int(t) for t in args.single_threads.split(",")] if args.single else []
    singles: dict[int, list[dict[str, Any]]] = {t: [] for t in threads}
    ours: list[dict[str, Any]] = []
    for i in range(args.runs):
        for t in threads:
            r = run_single(job, args.buckets_log2, t)
            singles[t].append(r)
            print(
                f"[run {i + 1}] single process, {t} thread(s): {r['examples_per_s']:,.0f} examples/s over {r['train_s']:.1f}s, "
                f"test AUC {r['test_auc']:.4f}, log loss {r['test_logloss']:.4f}, CPU {r['cpu_us_per_example']:.1f} µs/example",
                flush=True,
            )
        out = run_downpour(job)
        ours.append(out)
        print(
            f"[run {i + 1}] Downpour: {out['examples_per_s']:,.0f} examples/s over {out['train_s']:.1f}s (wall {out['wall_s']:.1f}s), "
            f"test AUC {out['test_auc']:.4f} (optimum {out['optimum_auc']:.4f}: gap {out['auc_gap']:.4f}), "
            f"log loss {out['test_logloss']:.4f}",
            flush=True,
        )
        print(
            f"    workers: compute (forward incl. sparse pulls, backward) {out['worker_compute_s']:.1f}s, of it waiting for "
            f"sparse rows {out['worker_sparse_wait_s']:.1f}s; dense push+pull wait {out['worker_dense_wait_s']:.1f}s; "
            f"servers' CPU {out['server_cpu_s']:.1f}s; rows per server {out['rows_per_server']}",
            flush=True,
        )
        print(
            f"    CPU per example (whole processes): workers {out['worker_cpu_us_per_example']:.1f} µs, servers "
            f"{out['server_cpu_us_per_example']:.1f} µs; {out['sparse_requests']:,} SPARSE requests, "
            f"{out['sparse_reads_ahead']:,} table reads served by rows pulled ahead",
            flush=True,
        )
    c = job.cluster
    print(f"\n{args.rows:,} rows, batch {job.training.batch_size}, {job.training.epochs} epoch(s); {args.runs} run(s), means:\n")
    print("| side | examples/s | ratio to single 1 thread | test AUC | test log loss |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.fmean(r["examples_per_s"] for r in singles[1]) if singles.get(1) else None
    rows = [(f"single process, {t} thread(s), 2^{args.buckets_log2} hashed rows", rs) for t, rs in singles.items()]
    rows.append((f"Downpour ({c.num_servers} servers, {c.num_workers} workers, {job.training.consistency})", ours))
    for name, rs in rows:
        eps = statistics.fmean(r["examples_per_s"] for r in rs)
        ratio = f"{eps / base:.2f}" if base else "n/a"
        print(f"| {name} | {eps:,.0f} | {ratio} | {_mean(rs, 'test_auc')} | {_mean(rs, 'test_logloss')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": args.rows, "single": singles, "downpour": ours}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
