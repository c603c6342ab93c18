"""Push+pull round trips through Downpour against raw pyzmq moving the same bytes.

For each payload size P (float32 parameters, P bytes each way):

* **Downpour**: parameter-server process(es) (a real :class:`ParameterServer`
  behind a :class:`Listener`, no coordinator) and a :class:`KVClient` in this
  process doing ``kv.wait(kv.push_pull(grad, out))``: P bytes of gradient go
  out, the server validates them, applies one SGD step (no momentum, tiny lr)
  and answers with P bytes of fresh values, which the client copies into ``out``.
* **raw**: ROUTER echo process(es) and a DEALER per echo process here sending
  one small header frame plus one frame of P bytes and waiting for the echo
  (the same bytes back). Same socket options as Downpour's (high-water marks,
  zero-copy threshold), so the difference is Downpour's own work: encoding,
  validation, the update, the copy of the values, the request bookkeeping.

Both sides run in the same invocation, in alternating timed blocks (``--trials``),
with their server processes up at the same time; the table reports the median
block of each side and their ratio. Besides ``--sizes`` one row is always the
reference model (the MLP of examples/mnist.yaml: 101,770 float32 = 407 KB)
over 2 servers, split as the job's layout splits it: what one training step moves.
Sizes use binary units: 1MB = 1 MiB = 2^20 bytes (Downpour lends frames of at
least 1 MiB to ZeroMQ without copying and copies smaller ones).

With ``--curve`` a third side runs Downpour with CURVE keys (the tcp default) against
the same server code without them. Each timed block also reads the machine's busy CPU
time from /proc/stat, so the CURVE table gives the CPU cost of a round trip with and
without encryption and the ceiling it sets: CURVE's rate if every core were busy.

This is a benchmark, not a test: on a small, shared machine the absolute numbers
are noisy; compare the ratios measured in one run.

    .venv/bin/python benchmarks/transport.py                       # 1MB,16MB,100MB + reference
    .venv/bin/python benchmarks/transport.py --sizes 1MB --repeats 50 --json out.json
    .venv/bin/python benchmarks/transport.py --curve --trials 5         # + CURVE against plain
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402

from benchmarks.common import environment, machine_busy_s  # noqa: E402
from downpour.config import ClusterConfig, parse_job  # noqa: E402
from downpour.layout import Layout  # noqa: E402
from downpour.layout.partition import make_layout  # noqa: E402
from downpour.models import mlp, param_shapes  # noqa: E402
from downpour.protocol.rpc import RpcClient  # noqa: E402
from downpour.server.service import ParameterServer  # noqa: E402
from downpour.transport import Listener, Poller, Security, create_job_keys, new_context  # noqa: E402
from downpour.transport.zmq_transport import ZERO_COPY_MIN_BYTES  # noqa: E402
from downpour.worker.client import KVClient  # noqa: E402

DEFAULT_SIZES = "1MB,16MB,100MB"
LR = 1e-6  # tiny: the values barely move, however many round trips
GRAD_VALUE = 1e-3  # small, finite: passes the server's NaN/Inf check
HEADER = b"\x00" * 48  # raw side's small header frame (Downpour's msgpack header is ~40-60 bytes)
HWM = 10_000
START_TIMEOUT_S = 120.0  # a spawned child imports torch: slow on a busy machine
REQUEST_TIMEOUT_S = 120.0
_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30, "gib": 1 << 30}


# --------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    """'1MB' -> 1048576 (binary units: KB = KiB = 1024 B), rounded down to whole float32s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 407080, 512KB, 1MB, 1.5GB (binary units)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()]) // 4 * 4
    if n < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is smaller than one float32")
    return n


def human(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def bench_job(num_servers: int):
    return parse_job(
        {
            "name": "transport-bench",
            "model": {"name": "mlp"},
            "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.0},
            "training": {"consistency": "async"},
            "cluster": {"num_servers": num_servers, "num_workers": 1},
        },
        source="benchmarks/transport.py",
    )


# --------------------------------------------------------------------------- child processes
def downpour_server_main(rank: int, named_shapes: list, num_servers: int, keys: str | None, addr_q: Any, stop: Any) -> None:
    """A ParameterServer for ``rank`` of the layout, serving until ``stop`` is set (or terminated);
    with ``keys`` (a job key folder) its listener is a CURVE server."""
    ctx = listener = security = None
    try:
        torch.set_num_threads(1)  # as the launcher runs servers (OMP_NUM_THREADS=1)
        ctx = new_context()
        job = bench_job(num_servers)
        layout = make_layout([(n, tuple(s)) for n, s in named_shapes], num_servers, max_slice_bytes=ClusterConfig().max_slice_bytes)
        security = Security.load(keys, "server") if keys else None
        listener = Listener(ctx, "tcp://127.0.0.1:*", job.cluster.max_message_bytes, security)
        server = ParameterServer(ctx, job, layout, rank, listener, f"bench-server-{rank}")
        server.store.initialized = True  # values start at zero; no INIT round trip needed
        poller = Poller()
        poller.register(listener)
        addr_q.put(("downpour-curve" if keys else "downpour", rank, listener.address))
        while not stop.is_set():  # ParameterServer.serve's loop, without the coordinator
            if poller.poll(0.05):
                for _ in range(256):
                    try:
                        peer, frames = listener.recv()
                    except zmq.Again:
                        break
                    server.handle(peer, frames)
    except KeyboardInterrupt:
        pass
    finally:
        if listener is not None:
            listener.close()
        if security is not None:
            security.close()
        if ctx is not None:
            ctx.destroy(linger=0)


def echo_server_main(rank: int, copy_threshold: int, addr_q: Any, stop: Any) -> None:
    """A ROUTER that sends every message straight back to its sender (zero-copy)."""
    ctx = sock = None
    try:
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.copy_threshold = copy_threshold
        sock.bind("tcp://127.0.0.1:*")
        addr_q.put(("raw", rank, sock.getsockopt_string(zmq.LAST_ENDPOINT)))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    sock.send_multipart(frames, copy=False)  # [peer, header, payload] back as received
    except KeyboardInterrupt:
        pass
    finally:
        if sock is not None:
            sock.close(linger=0)
        if ctx is not None:
            ctx.destroy(linger=0)


class Children:
    """Spawned server processes, stopped (event, then terminate, then kill) on any exit."""

    def __init__(self, mpctx: Any) -> None:
        self.mpctx = mpctx
        self.procs: list[Any] = []
        self.stop = mpctx.Event()
        self.addr_q = mpctx.Queue()

    def start(self, name: str, target: Callable, *args: Any) -> None:
        p = self.mpctx.Process(target=target, args=(*args, self.addr_q, self.stop), name=name, daemon=True)
        p.start()
        self.procs.append(p)

    def addresses(self, count: int) -> dict[tuple[str, int], str]:
        """Wait until ``count`` children reported the address they bound."""
        found: dict[tuple[str, int], str] = {}
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(found) < count:
            dead = [p for p in self.procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"server process {dead[0].name} exited with code {dead[0].exitcode} during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server processes did not start within {START_TIMEOUT_S:g}s")
            try:
                kind, rank, address = self.addr_q.get(timeout=0.5)
            except queue.Empty:
                continue
            found[(kind, rank)] = address
        return found

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=2.0)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=3.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=3.0)
        self.procs.clear()
        self.addr_q.close()
        self.addr_q.join_thread()


# --------------------------------------------------------------------------- clients (this process)
class DownpourSide:
    def __init__(self, layout: Layout, addresses: dict[int, str], keys: str | None = None) -> None:
        self.ctx = new_context()
        self.security = Security.load(keys, "worker") if keys else None
        self.rpc = RpcClient(self.ctx, "bench-client", request_timeout_s=REQUEST_TIMEOUT_S, security=self.security)
        for rank, addr in addresses.items():
            self.rpc.connect(f"server-{rank}", addr)
        # As an async worker does: a server's keys go out in requests of at most
        # cluster.max_request_bytes, so transfer and update overlap.
        self.kv = KVClient(self.rpc, layout, {rank: f"server-{rank}" for rank in addresses},
                           request_bytes=ClusterConfig().max_request_bytes)
        self.grad = torch.full((layout.numel,), GRAD_VALUE, dtype=torch.float32)
        self.out = torch.zeros(layout.numel, dtype=torch.float32)

    def round_trip(self) -> None:
        self.kv.wait(self.kv.push_pull(self.grad, self.out), timeout_s=REQUEST_TIMEOUT_S)

    def check(self) -> None:
        # After a push of +GRAD_VALUE everywhere the values are negative everywhere: bytes really moved.
        if not bool((self.out < 0).all()):
            raise RuntimeError("Downpour push_pull returned values that were not updated")

    def close(self) -> None:
        self.rpc.close()
        if self.security is not None:
            self.security.close()
        self.ctx.destroy(linger=0)


class RawSide:
    def __init__(self, part_bytes: list[int], addresses: list[str], copy_threshold: int) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.socks = []
        self.parts = [np.full(n // 4, GRAD_VALUE, dtype=np.float32) for n in part_bytes]
        for addr in addresses:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, HWM)
            s.setsockopt(zmq.RCVHWM, HWM)
            s.copy_threshold = copy_threshold
            s.connect(addr)
            self.socks.append(s)
        self.last: list[list[zmq.Frame]] = []

    def round_trip(self) -> None:
        for s, part in zip(self.socks, self.parts, strict=True):
            s.send_multipart([HEADER, part], copy=False)
        self.last = [s.recv_multipart(copy=False) for s in self.socks]

    def check(self) -> None:
        got = [len(frames[-1].buffer) for frames in self.last]
        want = [p.nbytes for p in self.parts]
        if got != want:
            raise RuntimeError(f"raw echo returned {got} bytes, sent {want}")

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.destroy(linger=0)


# --------------------------------------------------------------------------- timing
@dataclass
class SideResult:
    repeats: int = 0
    trial_s: list[float] = field(default_factory=list)
    trial_cpu_s: list[float] = field(default_factory=list)  # machine-wide busy CPU seconds per block

    def rates(self) -> list[float]:
        return [self.repeats / s for s in self.trial_s]

    def summary(self, payload: int) -> dict[str, Any]:
        rates = self.rates()
        rt = statistics.median(rates)
        out = {
            "repeats_per_trial": self.repeats,
            "trial_round_trips_per_s": rates,
            "round_trips_per_s": rt,
            "ms_per_round_trip": 1e3 / rt,
            "gb_per_s": 2 * payload * rt / 1e9,  # P out + P back
        }
        if self.trial_cpu_s:
            out["cpu_ms_per_round_trip"] = statistics.median(1e3 * c / self.repeats for c in self.trial_cpu_s)
            out["cores_busy"] = statistics.median(c / s for c, s in zip(self.trial_cpu_s, self.trial_s))
        return out


def calibrate(fn: Callable[[], None], block_s: float, repeats: int | None, warmup: int) -> int:
    """Warm up; return the round trips per timed block (``repeats`` or about ``block_s`` of work)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    n = warmup
    while time.perf_counter() - t0 < 0.1 and n < 1000:  # enough for a rate estimate
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    if repeats is not None:
        return repeats
    return max(3, min(100_000, int(block_s / per)))


def time_block(fn: Callable[[], None], n: int, result: SideResult) -> None:
    """``n`` round trips; their wall time (and the machine's busy CPU time, where known) go to ``result``."""
    cpu0 = machine_busy_s()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    result.trial_s.append(time.perf_counter() - t0)
    cpu1 = machine_busy_s()
    if cpu0 is not None and cpu1 is not None:
        result.trial_cpu_s.append(cpu1 - cpu0)


@dataclass
class Case:
    label: str
    named_shapes: list[tuple[str, tuple[int, ...]]]
    num_servers: int


def run_case(mpctx: Any, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    layout = make_layout(case.named_shapes, case.num_servers, max_slice_bytes=ClusterConfig().max_slice_bytes)
    payload = layout.numel * 4
    part_bytes = [4 * sum(s.length for s in layout.slices if s.server == r) for r in range(case.num_servers)]
    children = Children(mpctx)
    dp = raw = curve = None
    try:
        shapes = [(n, list(s)) for n, s in case.named_shapes]
        for r in range(case.num_servers):
            children.start(f"downpour-server-{r}", downpour_server_main, r, shapes, case.num_servers, None)
            children.start(f"raw-echo-{r}", echo_server_main, r, args.raw_copy_threshold)
            if args.keys:
                children.start(f"downpour-curve-server-{r}", downpour_server_main, r, shapes, case.num_servers, args.keys)
        addr = children.addresses((3 if args.keys else 2) * case.num_servers)
        dp = DownpourSide(layout, {r: addr[("downpour", r)] for r in range(case.num_servers)})
        raw = RawSide(part_bytes, [addr[("raw", r)] for r in range(case.num_servers)], args.raw_copy_threshold)
        sides = {"downpour": dp, "raw": raw}
        if args.keys:
            curve = DownpourSide(layout, {r: addr[("downpour-curve", r)] for r in range(case.num_servers)}, args.keys)
            sides["curve"] = curve
        results = {name: SideResult() for name in sides}
        for name, side in sides.items():
            results[name].repeats = calibrate(side.round_trip, args.block_s, args.repeats, args.warmup)
            side.check()
        for _ in range(args.trials):  # alternate the sides so that both see the same machine load
            for name, side in sides.items():
                time_block(side.round_trip, results[name].repeats, results[name])
        out = {
            "label": case.label,
            "payload_bytes": payload,
            "numel": layout.numel,
            "servers": case.num_servers,
            "server_bytes": part_bytes,
            "downpour": results["downpour"].summary(payload),
            "raw": results["raw"].summary(payload),
        }
        out["ratio"] = out["downpour"]["round_trips_per_s"] / out["raw"]["round_trips_per_s"]
        if curve is not None:
            out["curve"] = results["curve"].summary(payload)
            out["curve_ratio"] = out["curve"]["round_trips_per_s"] / out["downpour"]["round_trips_per_s"]
            if "cpu_ms_per_round_trip" in out["curve"]:
                # The most CURVE could do here: every core busy at the CPU cost per round trip measured.
                cores = len(os.sched_getaffinity(0))
                out["curve_ceiling_ratio"] = cores * 1e3 / out["curve"]["cpu_ms_per_round_trip"] / out["downpour"]["round_trips_per_s"]
        return out
    finally:
        for side in (dp, raw, curve):
            if side is not None:
                side.close()
        children.close()


# --------------------------------------------------------------------------- main
def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through the finally blocks that stop the servers


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| payload (each way) | servers | Downpour rt/s | Downpour GB/s | raw pyzmq rt/s | raw GB/s | Downpour/raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, w = r["downpour"], r["raw"]
        lines.append(
            f"| {r['label']} | {r['servers']} | {d['round_trips_per_s']:,.1f} | {d['gb_per_s']:.3f} | "
            f"{w['round_trips_per_s']:,.1f} | {w['gb_per_s']:.3f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES,
                    help=f"comma-separated payloads, binary units (1MB = 2^20 bytes); default {DEFAULT_SIZES}")
    ap.add_argument("--repeats", type=int, default=None,
                    help="round trips per timed block (default: auto, about --block-s of work per block)")
    ap.add_argument("--trials", type=int, default=3, help="timed blocks per side, alternating sides (default 3; the median is reported)")
    ap.add_argument("--block-s", type=float, default=0.5, help="target seconds per timed block when --repeats is not given (default 0.5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed round trips per side first (default 3)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-model row (407 KB over 2 servers)")
    ap.add_argument("--raw-copy-threshold", type=int, default=ZERO_COPY_MIN_BYTES,
                    help=f"pyzmq copy_threshold of the raw sockets (default {ZERO_COPY_MIN_BYTES}, Downpour's own)")
    ap.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    ap.add_argument("--curve", action="store_true",
                    help="also time Downpour with CURVE (authenticated, encrypted) against Downpour plain, same run")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    args.keys = None
    if args.curve:
        import tempfile

        args.keys = create_job_keys(os.path.join(tempfile.mkdtemp(prefix="downpour-bench-keys-"), "keys"))
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))

    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(1)  # as a worker runs (training.torch_threads: 1)
    cases = [Case(human(n), [("w", (n // 4,))], 1) for n in sizes]
    if not args.no_reference:
        shapes = param_shapes(mlp())
        numel = sum(int(np.prod(s)) for _, s in shapes)
        cases.append(Case(f"{human(numel * 4)} (reference MLP: {numel:,} float32 = {numel * 4:,} B)", shapes, 2))

    mpctx = mp.get_context(args.start_method)
    rows = []
    t0 = time.perf_counter()
    env = environment()
    try:
        for case in cases:
            row = run_case(mpctx, case, args)
            rows.append(row)
            print(f"  {row['label']}: Downpour {row['downpour']['round_trips_per_s']:.1f} rt/s, "
                  f"raw {row['raw']['round_trips_per_s']:.1f} rt/s, ratio {row['ratio']:.2f}"
                  + (f"; CURVE {row['curve']['round_trips_per_s']:.1f} rt/s, CURVE/plain {row['curve_ratio']:.2f}"
                     if "curve" in row else ""),
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; server processes stopped", file=sys.stderr)
        return 130
    total = time.perf_counter() - t0
    print()
    print(f"Push+pull round trips, P bytes each way (median of {args.trials} alternating blocks per side; "
          f"GB/s counts both directions, 1 GB = 1e9 B):")
    print()
    print(table(rows))
    print()
    if args.curve:
        print("Downpour with CURVE (authenticated, encrypted: the default) against Downpour plain (--insecure):")
        print()
        print("| payload (each way) | servers | plain rt/s | CURVE rt/s | CURVE GB/s | CURVE/plain "
              "| CPU ms/rt plain, CURVE | cores busy plain, CURVE | CURVE/plain, every core busy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            p, c = r["downpour"], r["curve"]
            cpu = (f"{p['cpu_ms_per_round_trip']:.2f}, {c['cpu_ms_per_round_trip']:.2f} | {p['cores_busy']:.2f}, {c['cores_busy']:.2f} | "
                   f"{r['curve_ceiling_ratio']:.2f}" if "curve_ceiling_ratio" in r else "n/a | n/a | n/a")
            print(f"| {r['label']} | {r['servers']} | {p['round_trips_per_s']:.1f} | {c['round_trips_per_s']:.1f} | "
                  f"{c['gb_per_s']:.2f} | {r['curve_ratio']:.2f} | {cpu} |")
        print()
        print("CPU ms/rt: the whole machine's busy CPU time (/proc/stat) per round trip, both processes,")
        print("their ZeroMQ I/O threads and the kernel together. The last column is the ceiling that CPU cost")
        print("sets: CURVE's rate if every core were busy, over plain's measured rate.")
        print()
    print(f"{env['cpus']} CPUs ({env['cpu_model']}), torch {env['torch']}, "
          f"pyzmq {env['pyzmq']} (libzmq {env['libzmq']}); {total:.1f}s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "transport", "environment": env, "total_s": total,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
