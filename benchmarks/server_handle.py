"""CPU per request of one server's request path, in process: ``ParameterServer.handle`` fed PUSHPULL
requests of the reference job (examples/mnist.yaml, server 0 of 2: 50,885 float32 values through a
shared-memory slot, as a local job sends them), its socket's send replaced by a no-op.

What it measures is the server's own work per request (decode, validation including the NaN/Inf
check, the SGD step, the reply's header and the values copied back into the slot), without ZeroMQ's
wake-ups and without the other processes of a job sharing the caches; a real job's request costs
several times more (benchmarks/RESULTS.md §18, "Hot path, first pass"). Each request's gradient is
written into the slot before it (outside the timing): the reply overwrites the slot with values.

    .venv/bin/python benchmarks/server_handle.py                 # µs of thread CPU per request
    .venv/bin/python benchmarks/server_handle.py --profile       # and where it goes (cProfile)
    .venv/bin/python benchmarks/server_handle.py --workers 3 --scaling auto   # 3 workers' pushes in turn
    .venv/bin/python benchmarks/server_handle.py --workers 3 --consistency sync   # rounds of 3 workers

With one worker (the default) ``scaling: auto``'s look-ahead momentum answers with the stored values
(no other worker's momentum is pending); ``--workers 3`` sends the pushes of 3 workers in turn, each
through its own slot, so every reply carries look-ahead values, as in a job of 3 workers. With
``--consistency sync`` each worker's push is for the current round, and the last of a round completes
it (the mean, the step and every worker's reply): the figure is per request, rounds included.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import zmq  # noqa: E402

from downpour.config import load_job  # noqa: E402
from downpour.coordinator.service import plan_layout  # noqa: E402
from downpour.protocol import Message, Op, encode  # noqa: E402
from downpour.server.service import ParameterServer  # noqa: E402
from downpour.transport import Listener, Slot  # noqa: E402

PEER = b"worker-0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4000, help="timed requests (default 4000, after 200 untimed)")
    ap.add_argument("--profile", action="store_true", help="also profile as many requests with cProfile")
    ap.add_argument("--scaling", choices=["auto", "none"], default=None, help="optimizer.scaling (default: the job's)")
    ap.add_argument("--workers", type=int, default=1, help="workers whose pushes come in turn (default 1)")
    ap.add_argument("--consistency", choices=["async", "sync"], default=None, help="training.consistency (default: the job's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sets = ([f"optimizer.scaling={args.scaling}"] if args.scaling else []) + (
        [f"training.consistency={args.consistency}"] if args.consistency else [])
    job = load_job(os.path.join(_ROOT, "examples", "mnist.yaml"), sets or None)
    sync = job.training.consistency == "sync"
    layout = plan_layout(job)
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="handle-") as folder:
        listener = Listener(ctx, f"ipc://{folder}/s0.sock", job.cluster.max_message_bytes)
        server = ParameterServer(ctx, job, layout, 0, listener, "server-0")
        listener.send = lambda peer, frames, track=False: []  # type: ignore[method-assign]
        keys = [s.key for s in layout.server_slices(0)]
        numel = layout.server_numel(0)
        peers = [b"worker-%d" % w for w in range(args.workers)]
        slots = [Slot(folder, f"worker-{w}-s0", numel * 4) for w in range(args.workers)]
        views = [torch.frombuffer(slot.buffer, dtype=torch.float32) for slot in slots]
        views[0].copy_(torch.randn(numel) * 0.05)
        server.handle(PEER, encode(Message(Op.INIT, 1, {"keys": keys, "shm": [slots[0].name, numel]})))
        grad = torch.randn(numel) * 1e-3
        if sync:  # the membership a round waits for
            server.set_workers([p.decode() for p in peers])

        def request(i: int) -> list:
            w, k = i % args.workers, i // args.workers  # the worker's own push count: its clock and seq
            version = k if sync else max(0, i - 2)  # sync: the round; async: a push two versions stale
            meta = {"keys": keys, "shm": [slots[w].name, numel], "version": version, "weight": 32.0,
                    "clock": k + 1, "seq": k + 1}
            return encode(Message(Op.PUSHPULL, 10 + i, meta))

        n = 200 + args.requests
        frames = [request(i) for i in range(n)]
        cpu = 0.0
        for i, f in enumerate(frames):
            values = views[i % args.workers]
            values.copy_(grad)
            t0 = time.thread_time()
            server.handle(peers[i % args.workers], f)
            if i >= 200:
                cpu += time.thread_time() - t0
        if server.rejected:
            raise SystemExit(f"requests refused: {dict(server.rejected)}")
        print(f"ParameterServer.handle, PUSHPULL of {numel:,} float32 through shared memory, scaling "
              f"{job.optimizer.scaling}, {job.training.consistency}, {args.workers} worker(s): "
              f"{1e6 * cpu / args.requests:.1f} µs of CPU per request "
              f"({args.requests} requests)")
        if args.profile:
            more = [request(i) for i in range(n, n + args.requests)]
            prof = cProfile.Profile()
            prof.enable()
            for i, f in enumerate(more, n):
                views[i % args.workers].copy_(grad)
                server.handle(peers[i % args.workers], f)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        for slot in slots:
            slot.close()
        listener.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
