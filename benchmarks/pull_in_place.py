"""A worker's push+pull of the reference model through shared memory: reply values copied out of
the request's slot, against written by the server straight into the worker's parameters.

Two real :class:`ParameterServer` processes (the reference job's layout: the MLP of
examples/mnist.yaml, 101,770 float32 over 2 servers) listen on ipc sockets in one folder, with
shared memory on, as ``downpour train`` runs them. In this process two :class:`KVClient` s each
do ``kv.wait(kv.push_pull(grad, out))`` against them:

* **copy**: ``out`` is a plain tensor: the servers write the reply's values into the request's
  slot and the client copies them into ``out`` (what a worker with ``overlap: true`` does);
* **in place**: ``out`` is ``kv.share_values()``: each request names the range of it its server's
  keys hold (``meta.into``) and the server writes the values there; nothing is copied.

The sides alternate in timed blocks (``--trials``) against the same servers; the table gives the
median block's round trips per second, the client thread's CPU per round trip, and their ratios.
In process, the caches are warm: in a job the copy costs more (RESULTS §30 measured it there).

    .venv/bin/python benchmarks/pull_in_place.py                  # 7 trials of ~0.5 s per side
    .venv/bin/python benchmarks/pull_in_place.py --trials 11 --json pull_in_place.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from benchmarks.transport import LR, REQUEST_TIMEOUT_S, Children  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.coordinator.service import plan_layout  # noqa: E402
from downpour.layout import Layout  # noqa: E402
from downpour.protocol.rpc import RpcClient  # noqa: E402
from downpour.server.service import ParameterServer  # noqa: E402
from downpour.transport import Listener, Poller, new_context  # noqa: E402
from downpour.worker.client import KVClient  # noqa: E402

JOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mnist.yaml")
GRAD_VALUE = 1e-3


def _job():
    return load_job(JOB, [f"optimizer.lr={LR}", "optimizer.momentum=0.0", "monitor.metrics=false"])


def server_main(rank: int, folder: str, addr_q: Any, stop: Any) -> None:
    """One ParameterServer of the reference layout on an ipc socket in ``folder`` (shared memory on)."""
    ctx = listener = None
    try:
        torch.set_num_threads(1)
        ctx = new_context()
        job = _job()
        listener = Listener(ctx, f"ipc://{folder}/server-{rank}.sock", job.cluster.max_message_bytes)
        server = ParameterServer(ctx, job, plan_layout(job), rank, listener, f"bench-server-{rank}")
        server.store.initialized = True  # values start at zero: no INIT round trip needed
        poller = Poller()
        poller.register(listener)
        addr_q.put(("server", rank, listener.address))
        while not stop.is_set():  # ParameterServer.serve's loop, without the coordinator
            if poller.poll(0.05):
                while listener.ready():
                    server.handle(*listener.recv())
    except KeyboardInterrupt:
        pass
    finally:
        if listener is not None:
            listener.close()
        if ctx is not None:
            ctx.destroy(linger=0)


class Side:
    def __init__(self, ctx: Any, name: str, layout: Layout, addresses: dict[int, str], in_place: bool) -> None:
        self.rpc = RpcClient(ctx, name, request_timeout_s=REQUEST_TIMEOUT_S)
        self.kv = KVClient(self.rpc, layout, {r: f"server-{r}" for r in addresses})
        for r, address in addresses.items():
            self.rpc.connect(f"server-{r}", address)
            if not self.kv.set_address(f"server-{r}", address):
                raise RuntimeError(f"no shared memory with server-{r} at {address}")
        shared = self.kv.share_values() if in_place else None
        if in_place and shared is None:
            raise RuntimeError("KVClient.share_values gave nothing: the servers do not share one socket folder")
        self.out = shared if shared is not None else torch.zeros(layout.numel)
        self.grad = torch.full((layout.numel,), GRAD_VALUE)
        self.trial_s: list[float] = []
        self.trial_cpu_s: list[float] = []

    def round_trip(self) -> None:
        self.kv.wait(self.kv.push_pull(self.grad, self.out), timeout_s=REQUEST_TIMEOUT_S)

    def block(self, n: int) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            self.round_trip()
        self.trial_s.append(time.perf_counter() - t0)
        self.trial_cpu_s.append(time.thread_time() - c0)

    def summary(self, n: int) -> dict[str, Any]:
        return {"round_trips_per_s": statistics.median(n / s for s in self.trial_s),
                "client_cpu_us": statistics.median(1e6 * c / n for c in self.trial_cpu_s),
                "trial_client_cpu_us": [1e6 * c / n for c in self.trial_cpu_s]}

    def close(self) -> None:
        self.kv.close()
        self.rpc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=7, help="timed blocks per side, alternating (default 7)")
    ap.add_argument("--block-s", type=float, default=0.5, help="about this long per block (default 0.5)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    job = _job()
    layout = plan_layout(job)
    folder = tempfile.mkdtemp(prefix="dp-pip-")  # short: ipc paths are limited
    children = Children(mp.get_context("spawn"))
    ctx = new_context()
    sides: dict[str, Side] = {}
    try:
        for r in range(layout.num_servers):
            children.start(f"server-{r}", server_main, r, folder)
        addresses = {r: a for (_, r), a in children.addresses(layout.num_servers).items()}
        sides = {"copy": Side(ctx, "bench-copy", layout, addresses, False),
                 "in place": Side(ctx, "bench-in-place", layout, addresses, True)}
        for side in sides.values():  # warm up, and check that bytes really moved
            for _ in range(50):
                side.round_trip()
            if not bool((side.out < 0).all()):
                raise RuntimeError("push_pull returned values that were not updated")
        t0 = time.perf_counter()
        for _ in range(200):
            sides["copy"].round_trip()
        n = max(50, int(args.block_s * 200 / (time.perf_counter() - t0)))
        for _ in range(args.trials):
            for side in sides.values():
                side.block(n)
        result = {name: side.summary(n) for name, side in sides.items()}
        copy, in_place = result["copy"], result["in place"]
        print(f"reference model over {layout.num_servers} servers ({layout.numel:,} float32), ipc + shared memory, "
              f"{args.trials} blocks of {n} round trips per side\n")
        print("| side | round trips/s | client CPU per round trip |")
        print("|---|---:|---:|")
        for name, r in result.items():
            print(f"| {name} | {r['round_trips_per_s']:,.0f} | {r['client_cpu_us']:.0f} µs |")
        print(f"\nin place / copy: {in_place['round_trips_per_s'] / copy['round_trips_per_s']:.2f}x round trips/s, "
              f"{in_place['client_cpu_us'] / copy['client_cpu_us']:.2f}x client CPU "
              f"({copy['client_cpu_us'] - in_place['client_cpu_us']:+.0f} µs saved per round trip)")
        env = environment()
        print(f"\n{env.get('cpus', '?')} CPUs ({env.get('cpu_model', '?')}), torch {torch.__version__}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"layout_numel": layout.numel, "block": n, "sides": result, "environment": env}, f, indent=1)
        return 0
    finally:
        for side in sides.values():
            side.close()
        ctx.destroy(linger=0)
        children.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
