"""The floor under a job's CPU per example on a small machine: plain PyTorch trainers, with and without round trips.

Downpour's reference job runs three workers and two servers on this machine's two cores. Two things
cost CPU there that a single process does not pay, whatever the parameter server does:

* three trainers share two cores, so each runs forward+backward while the others evict its caches;
* each step waits for a reply from every server, so each step puts the worker to sleep and wakes
  it (and wakes each server) again.

This script measures both with no Downpour at all. ``TxE`` runs T independent processes, each the
single-process baseline of ``end_to_end.py`` (the reference MLP, SGD with momentum, batch 32, one
torch thread), and E echo processes: each step every trainer writes 64 bytes to every echo and
reads them back (raw ``write``/``read`` on a socket pair: only the kernel's wake-ups, no framing, no
data). They start together behind a barrier and train for the same time; each reports its CPU time
and the trainers their examples. CPU per example is every process's CPU over the trainers' examples,
and the ratio divides it by the same invocation's ``1x0`` figure.

    .venv/bin/python benchmarks/contention_floor.py          # 1x0,3x0,1x2,3x2, 4 rounds of 6 s
    .venv/bin/python benchmarks/contention_floor.py --configs 1x0,3x0,5x0 --rounds 3 --seconds 8

``3x2`` is the least a reference job that waits for its servers at every step can cost here (its
servers' update and the 400 kB each way not counted): a whole-job CPU target below it cannot be met
by any design of that shape on this machine. ``--policy`` is the job's ``cluster.cpu_policy``
(default ``batch``: every process under SCHED_BATCH, as the job's are).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, spread, write_runs  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.data.idx import load_idx_dataset  # noqa: E402
from downpour.models import mlp  # noqa: E402
from downpour.processes import apply_cpu_policy  # noqa: E402

MESSAGE = 64  # bytes: one socket write and one read each way, the least a blocking round trip can cost
PAYLOAD = b"x" * MESSAGE
JOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mnist.yaml")


def echo(policy: str, conns: list[Any], out: Any) -> None:
    """A stand-in server that does no work: each message from a trainer is sent straight back
    (raw ``read``/``write`` on the socket, so what is measured is the kernel's wake-ups, not Python's framing).
    Reports its CPU once every trainer has closed its end."""
    apply_cpu_policy(policy)
    cpu0 = time.process_time()
    live = list(conns)
    while live:
        for c in wait(live):
            msg = os.read(c.fileno(), MESSAGE)
            if msg:
                os.write(c.fileno(), msg)
            else:
                live.remove(c)
    out.put({"echo": True, "cpu_s": time.process_time() - cpu0})


def trainer(job_path: str, data_path: str | None, seconds: float, policy: str, rank: int,
            barrier: Any, out: Any, echoes: list[Any]) -> None:
    """One plain single-process trainer: warm up, wait for the others, train ``seconds``, report.
    With ``echoes`` each step also sends one small message to every echo process and waits for all
    the replies, as a worker sends a request to every server and waits for them."""
    torch.set_num_threads(1)
    apply_cpu_policy(policy)
    job = load_job(job_path)
    data = load_idx_dataset(data_path or job.data.path)
    n = len(data.train)
    x, y = data.train.take(np.arange(n))
    torch.manual_seed(rank)
    model = mlp(**job.model.args)
    opt = torch.optim.SGD(model.parameters(), lr=job.optimizer.lr, momentum=job.optimizer.momentum)
    bs = job.training.batch_size
    gen = torch.Generator().manual_seed(rank)
    perm = torch.randperm(n, generator=gen)
    xs, ys = x[perm], y[perm]
    model.train()
    fds = [c.fileno() for c in echoes]

    def step(b: int) -> None:
        opt.zero_grad()
        F.cross_entropy(model(xs[b : b + bs]), ys[b : b + bs]).backward()
        for fd in fds:
            os.write(fd, PAYLOAD)
        for fd in fds:
            os.read(fd, MESSAGE)
        opt.step()

    for b in range(0, 40 * bs, bs):  # warm-up: allocator and kernels, outside the timed window
        step(b)
    barrier.wait(timeout=120)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    examples, b = 0, 0
    while time.perf_counter() - wall0 < seconds:
        if b + bs > n:
            b = 0
        step(b)
        b += bs
        examples += bs
    for c in echoes:
        c.close()
    out.put({"rank": rank, "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
             "examples": examples})


def run_k(k: int, n_echo: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    pipes = [[ctx.Pipe() for _ in range(n_echo)] for _ in range(k)]  # [trainer][echo] -> (trainer end, echo end)
    echoes = [ctx.Process(target=echo, args=(args.policy, [pipes[r][e][1] for r in range(k)], out), daemon=True)
              for e in range(n_echo)]
    procs = [ctx.Process(target=trainer, args=(args.job, args.data, args.seconds, args.policy, r, barrier, out,
                                               [end for end, _ in pipes[r]]))
             for r in range(k)]
    for p in echoes + procs:
        p.start()
    for row in pipes:  # the children hold their ends now; an echo sees EOF once its trainers close theirs
        for a, b in row:
            a.close()
            b.close()
    try:
        got = [out.get(timeout=args.seconds + 180) for _ in range(k + n_echo)]
    finally:
        for p in procs + echoes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    results = [r for r in got if not r.get("echo")]
    echo_cpu = sum(r["cpu_s"] for r in got if r.get("echo"))  # includes the warm-up's few messages
    cpu = sum(r["cpu_s"] for r in results)
    examples = sum(r["examples"] for r in results)
    wall = max(r["wall_s"] for r in results)
    return {"k": k, "echo": n_echo, "cpu_us_per_example": 1e6 * (cpu + echo_cpu) / examples,
            "trainer_cpu_us_per_example": 1e6 * cpu / examples, "examples_per_s": examples / wall,
            "cores_busy": (cpu + echo_cpu) / wall, "per_process": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=JOB, help="the job whose model, optimizer and batch to use")
    ap.add_argument("--data", default=None, help="IDX folder (default: the job's)")
    ap.add_argument("--configs", default="1x0,3x0,1x2,3x2",
                    help="TRAINERSxECHOES,... run in this order each round; 1x0 is the baseline and must be there")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed training per run")
    ap.add_argument("--policy", choices=["batch", "normal"], default="batch")
    ap.add_argument("--json", default=None, help="write every run here")
    args = ap.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    except ValueError:
        raise SystemExit(f"--configs: expected TRAINERSxECHOES,..., got {args.configs!r}") from None
    if (1, 0) not in configs or any(k < 1 or e < 0 or len(c) != 2 for c in configs for k, e in [c[:2]]):
        raise SystemExit("--configs must include 1x0 (the ratios divide by it) and have trainers >= 1, echoes >= 0")
    runs: dict[str, list[dict[str, Any]]] = {f"{k}x{e}": [] for k, e in configs}
    for rnd in range(args.rounds):
        for k, e in configs:
            r = run_k(k, e, args)
            runs[f"{k}x{e}"].append(r)
            print(f"round {rnd + 1} {k} trainers, {e} echoes: {r['cpu_us_per_example']:.1f} µs CPU/example, "
                  f"{r['examples_per_s']:,.0f} examples/s, {r['cores_busy']:.2f} cores busy", flush=True)
    base = statistics.mean(r["cpu_us_per_example"] for r in runs["1x0"])
    print(f"\n{environment()}\npolicy {args.policy}, {args.seconds:.0f} s per run, {args.rounds} rounds\n")
    print("| trainers × echoes | CPU µs/example, all processes (mean, min–max) | ratio to K=1 | trainers only | "
          "examples/s (mean) | cores busy |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in runs:
        cpus = [r["cpu_us_per_example"] for r in runs[k]]
        print(f"| {k.replace('x', ' × ')} | {spread(cpus)} | "
              f"{statistics.mean(cpus) / base:.2f} | "
              f"{statistics.mean(r['trainer_cpu_us_per_example'] for r in runs[k]) / base:.2f} | "
              f"{statistics.mean(r['examples_per_s'] for r in runs[k]):,.0f} | "
              f"{statistics.mean(r['cores_busy'] for r in runs[k]):.2f} |")
    write_runs(args.json, args, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
