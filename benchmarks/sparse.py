"""Pull and push throughput of one sparse table (issue 5's server-side core), in keys/s.

Three implementations side by side in one process, one batch size at a time:

* ``table``: :class:`downpour.sparse.SparseTable`, dim 16, Adagrad, pre-filled with
  ``--rows`` rows (10M by default) of random 64-bit IDs; each batch is ``n`` distinct IDs
  drawn from those.
* ``dict``: the plain Python way, ``{id: numpy row}`` plus ``{id: numpy accumulator}``,
  pull = a list comprehension and ``np.stack``, push = a per-key Adagrad step. Filled with
  ``--dict-rows`` rows (1M: its per-key cost barely depends on the size, and 10M Python
  objects take minutes to build).
* ``memcpy``: copying the same number of bytes (n rows of 16 float32) between two
  contiguous arrays: the physical limit of moving a pull's bytes.
* ``gather``: ``np.take`` of n random rows of the table's value pool (no index, no
  hashing): the limit of a pull's random memory accesses on this machine.

Memory: the table's bytes per live row (index, values, Adagrad state, bookkeeping), for the
target of 200 bytes per row.

    .venv/bin/python benchmarks/sparse.py                    # about 2 minutes on an idle 2-core machine
    .venv/bin/python benchmarks/sparse.py --rows 1000000     # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from downpour.sparse import Adagrad, SparseTable  # noqa: E402

DIM = 16
LR, EPS = np.float32(0.01), np.float32(1e-10)


def timed(fn, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dict-rows", type=int, default=1_000_000)
    ap.add_argument("--batches", default="4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    env = environment()
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    table = SparseTable(DIM, Adagrad(lr=0.01), capacity=args.rows)
    keys = np.unique(rng.integers(-(2**62), 2**62, int(args.rows * 1.001)))[: args.rows]
    rng.shuffle(keys)
    for part in np.array_split(keys, max(1, args.rows // 1_000_000)):
        table.pull(part)
    fill_s = time.perf_counter() - t0
    per_row = table.bytes_per_row()

    dkeys = keys[: args.dict_rows]
    values = {int(k): table.values[i].copy() for i, k in enumerate(dkeys)}
    sums = {int(k): np.zeros(DIM, np.float32) for k in dkeys}

    def dict_pull(batch: list[int]) -> np.ndarray:
        return np.stack([values[k] for k in batch])

    def dict_push(batch: list[int], grads: np.ndarray) -> None:
        for k, g in zip(batch, grads):
            s = sums[k]
            s += g * g
            values[k] -= LR * g / (np.sqrt(s) + EPS)

    rows = []
    for n in (int(b) for b in args.batches.split(",")):
        batch = rng.choice(keys, n, replace=False)
        dbatch = [int(k) for k in rng.choice(dkeys, n, replace=False)]
        grads = rng.standard_normal((n, DIM)).astype(np.float32)
        src, dst = np.ones((n, DIM), np.float32), np.empty((n, DIM), np.float32)
        t_pull = timed(partial(table.pull, batch), args.repeats)
        t_push = timed(partial(table.push, batch, grads), args.repeats)
        t_dpull = timed(partial(dict_pull, dbatch), max(2, args.repeats // 2))
        t_dpush = timed(partial(dict_push, dbatch, grads), max(2, args.repeats // 2))
        t_copy = timed(partial(np.copyto, dst, src), args.repeats)
        where = rng.integers(0, len(table), n)
        t_gather = timed(partial(np.take, table.values, where, 0, dst), args.repeats)
        rows.append((n, n / t_pull, n / t_push, n / t_dpull, n / t_dpush, n / t_copy, n / t_gather))

    print(f"{env['time']}, {env['cpus']} CPUs, numpy {np.__version__}; table of {len(table):,} rows (dim {DIM}, Adagrad) "
          f"filled in {fill_s:.0f}s, {per_row:.0f} bytes/row; dict of {len(values):,} rows\n")
    print("| unique keys per batch | table pull keys/s | table push keys/s | dict pull keys/s | dict push keys/s "
          "| memcpy rows/s | random gather rows/s | pull vs dict | push vs dict | pull vs gather |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, p, q, dp, dq, c, g in rows:
        print(f"| {n:,} | {p / 1e6:.2f}M | {q / 1e6:.2f}M | {dp / 1e6:.2f}M | {dq / 1e6:.3f}M | {c / 1e6:.0f}M | {g / 1e6:.1f}M "
              f"| {p / dp:.1f}× | {q / dq:.1f}× | {p / g:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
