"""Pull and push throughput of one sparse table (the servers' core of CTR training), in keys/s.

Implementations side by side in one process, one batch size at a time:

* ``native`` and ``numpy``: :class:`downpour.sparse.SparseTable`, dim 16, Adagrad, pre-filled
  with ``--rows`` rows (10M by default) of random 64-bit IDs, timed with its compiled kernels
  (``_native.c``, one call per batch) and then, on the same table, with its numpy path
  (``table.native = False``). Each batch is ``n`` distinct IDs drawn from the table's.
* ``dict``: the plain Python way, ``{id: numpy row}`` plus ``{id: numpy accumulator}``,
  pull = a list comprehension and ``np.stack``, push = a per-key Adagrad step. Holds as many
  rows as the table (``--dict-rows``, default ``--rows``): its per-key cost grows with its size
  (on this machine a 5M-row dict pulled 30 % slower than a 1M-row one), so a smaller dict would
  flatter it. 10M rows take about 15 s and some 5 GB to build.
* ``memcpy``: copying the same number of bytes (n rows of 16 float32) between two
  contiguous arrays: the physical limit of moving a pull's bytes.
* ``gather``: ``np.take`` of n random rows of the table's value pool (no index, no
  hashing): the limit of a pull's random memory accesses on this machine.

Every timed call gets a batch of its own (drawn afresh), so a batch's rows are not still in
the cache from the call before. The native columns come twice: keys per second of wall time and
of this process's CPU time (on a busy machine the steadier figure). Memory: the table's bytes per live row (index, values, Adagrad
state, bookkeeping), for the target of 200 bytes per row.

    .venv/bin/python benchmarks/sparse.py                    # about 3 minutes on an idle 2-core machine
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


CPU_S: dict[str, float] = {}  # name -> median CPU seconds per call, beside timed()'s wall seconds


def timed(fn, batches: list[tuple], name: str = "") -> float:
    """Median wall seconds of ``fn(*batch)`` over all batches but the first (a warm-up call); the
    median CPU seconds of this process (``time.process_time``) go to ``CPU_S[name]`` if named. On a busy
    machine CPU time is the steadier figure: it leaves out the time other processes held the core."""
    fn(*batches[0])
    wall, cpu = [], []
    for batch in batches[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*batch)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if name:
        CPU_S[name] = float(np.median(cpu))
    return float(np.median(wall))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dict-rows", type=int, default=None, help="rows of the dict baseline (default: --rows)")
    ap.add_argument("--batches", default="4096,16384,65536")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    env = environment()
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    table = SparseTable(DIM, Adagrad(lr=0.01), capacity=args.rows)
    if not table.native:
        print("the compiled kernels are not built (pip install -e .): the native columns would repeat numpy's", file=sys.stderr)
        return 1
    keys = np.unique(rng.integers(-(2**62), 2**62, int(args.rows * 1.001)))[: args.rows]
    rng.shuffle(keys)
    for part in np.array_split(keys, max(1, args.rows // 1_000_000)):
        table.pull(part)
    fill_s = time.perf_counter() - t0
    per_row = table.bytes_per_row()

    def on(path_native: bool, op):
        def call(*a):
            table.native = path_native
            return op(*a)

        return call

    # The table first, for every batch size; the dict is built only afterwards, so that building
    # its ~5 GB of small objects does not disturb the table's timings.
    sizes = [int(b) for b in args.batches.split(",")]
    rows: dict[int, dict[str, float]] = {}
    n_rows = len(table)
    for n in sizes:
        grads = rng.standard_normal((n, DIM)).astype(np.float32)
        calls = args.repeats + 1  # each timed call gets its own batch of distinct IDs; the first warms up
        pulls = [[(rng.choice(keys, n, replace=False),) for _ in range(calls)] for _path in range(2)]
        pushes = [[(rng.choice(keys, n, replace=False), grads) for _ in range(calls)] for _path in range(2)]
        src, dst = np.ones((n, DIM), np.float32), np.empty((n, DIM), np.float32)
        random_rows = [(rng.integers(0, n_rows, n),) for _ in range(calls)]
        r = {
            "native pull": timed(on(True, table.pull), pulls[0], "pull"),
            "native push": timed(on(True, table.push), pushes[0], "push"),
            "numpy pull": timed(on(False, table.pull), pulls[1]),
            "numpy push": timed(on(False, table.push), pushes[1]),
            "memcpy": timed(np.copyto, [(dst, src)] * calls),
            "gather": timed(partial(np.take, table.values, axis=0, out=dst), random_rows),
        }
        r |= {f"native {k} cpu": v for k, v in CPU_S.items()}
        rows[n] = {k: n / v for k, v in r.items()}
    table.native = True

    dkeys = keys[: args.dict_rows or args.rows]
    values = {int(k): table.values[i].copy() for i, k in enumerate(dkeys)}
    sums = {int(k): np.zeros(DIM, np.float32) for k in dkeys}

    def dict_pull(batch: list[int]) -> np.ndarray:
        return np.stack([values[k] for k in batch])

    def dict_push(batch: list[int], grads: np.ndarray) -> None:
        for k, g in zip(batch, grads):
            s = sums[k]
            s += g * g
            values[k] -= LR * g / (np.sqrt(s) + EPS)

    for n in sizes:
        grads = rng.standard_normal((n, DIM)).astype(np.float32)
        dbatches = [[int(k) for k in rng.choice(dkeys, n, replace=False)] for _ in range(max(2, args.repeats // 2) + 1)]
        rows[n]["dict pull"] = n / timed(dict_pull, [(b,) for b in dbatches])
        rows[n]["dict push"] = n / timed(dict_push, [(b, grads) for b in dbatches])
    table.native = True

    print(
        f"{env['time']}, {env['cpus']} CPUs, load average at start {env['loadavg_at_start'][0]:.2f}, "
        f"at end {os.getloadavg()[0]:.2f}, numpy {np.__version__}; "
        f"table of {len(table):,} rows (dim {DIM}, Adagrad) filled in {fill_s:.0f}s, {per_row:.0f} bytes/row; "
        f"dict of {len(values):,} rows\n"
    )
    print(
        "| unique keys per batch | native pull | native push | native pull, CPU time | native push, CPU time "
        "| numpy pull | numpy push | dict pull | dict push "
        "| native vs dict, pull | native vs dict, push | memcpy rows/s | random gather rows/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, k in rows.items():
        print(
            f"| {n:,} | {k['native pull'] / 1e6:.2f}M | {k['native push'] / 1e6:.2f}M "
            f"| {k['native pull cpu'] / 1e6:.2f}M | {k['native push cpu'] / 1e6:.2f}M | {k['numpy pull'] / 1e6:.2f}M "
            f"| {k['numpy push'] / 1e6:.2f}M | {k['dict pull'] / 1e6:.2f}M | {k['dict push'] / 1e6:.3f}M "
            f"| {k['native pull'] / k['dict pull']:.0f}× | {k['native push'] / k['dict push']:.0f}× "
            f"| {k['memcpy'] / 1e6:.0f}M | {k['gather'] / 1e6:.1f}M |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
