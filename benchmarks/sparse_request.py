"""CPU per SPARSE request of one server, in process: ``SparseShard.handle`` fed the requests a CTR
worker sends (examples/ctr.yaml's tables: ``embedding`` of 16 floats and ``wide`` of 1, Adagrad;
server 0 of 2), each pushing the gradients of the IDs it pulled the step before and pulling a new
batch's unique IDs.

A batch draws ``--ids`` IDs, of which ``--new`` (a fraction) were never seen and the rest are drawn
from those seen so far, as in the CTR job's first epoch over 900k rows (about 15 % of a batch's
IDs on a server are new there, so each request also admits rows and the tables grow). Only the
``handle`` call is timed (thread CPU); making the batches is not.

    .venv/bin/python benchmarks/sparse_request.py                  # ms of CPU per request
    .venv/bin/python benchmarks/sparse_request.py --new 1.0        # every ID new: admission and growth
    .venv/bin/python benchmarks/sparse_request.py --profile        # and where it goes (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from downpour.config import SparseConfig  # noqa: E402
from downpour.layout import Layout  # noqa: E402
from downpour.layout.spec import TableSpec  # noqa: E402
from downpour.protocol import Message, Op  # noqa: E402
from downpour.server.sparse import SparseShard  # noqa: E402
from downpour.sparse.index import KERNEL  # noqa: E402

TABLES = (("embedding", 16), ("wide", 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--ids", type=int, default=8300, help="IDs drawn per batch, all servers (default 8300)")
    ap.add_argument("--new", type=float, default=0.15, help="fraction of a batch's IDs never seen before (default 0.15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    layout = Layout(params=(), slices=(), num_servers=2, dtype="f32", tables=tuple(TableSpec(n, d) for n, d in TABLES))
    shard = SparseShard(layout, 0, SparseConfig.model_validate({"optimizer": {"name": "adagrad", "lr": 0.05}}), 0, 1 << 24)
    rng = np.random.default_rng(args.seed)
    seen = np.zeros(0, np.int64)
    prev = np.zeros(0, np.int64)
    spent, keys = 0.0, 0
    prof = cProfile.Profile() if args.profile else None
    for _ in range(args.requests):
        n_new = int(args.ids * args.new)
        fresh = rng.integers(0, 1 << 40, n_new)
        old = seen[rng.integers(0, len(seen), args.ids - n_new)] if len(seen) else rng.integers(0, 1 << 40, args.ids - n_new)
        ids = np.unique(np.concatenate([fresh, old]))
        ids = ids[layout.sparse_servers(ids) == 0]
        seen = np.concatenate([seen, fresh])
        spec, tensors = [], []
        for name, dim in TABLES:
            grads = (rng.standard_normal((len(prev), dim)) * 0.01).astype(np.float32)
            spec.append([name, len(prev), len(ids)])
            tensors += [torch.from_numpy(prev), torch.from_numpy(grads), torch.from_numpy(ids)]
        msg = Message(Op.SPARSE, 1, {"tables": spec}, tensors)
        if prof is not None:
            prof.enable()
        c0 = time.thread_time()
        shard.handle(msg)
        spent += time.thread_time() - c0
        if prof is not None:
            prof.disable()
        keys += len(prev) + len(ids)
        prev = ids
    rows = len(shard.tables["embedding"])
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, kernel {KERNEL}: {args.requests} requests, {keys / args.requests:,.0f} IDs "
          f"pushed+pulled per request, {rows:,} rows per table at the end")
    print(f"CPU per request: {spent * 1e3 / args.requests:.3f} ms ({spent * 1e9 / keys:.0f} ns per ID)")
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
