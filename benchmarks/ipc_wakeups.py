"""What a small message's round trip costs between two processes on one host: ZeroMQ over ipc
(Downpour's `Listener`/`Channel`, as a worker and a server use them) against a Unix
``SOCK_SEQPACKET`` socket pair, moving the same bytes.

With shared-memory slots a reference-job step sends each server only a header and a slot
reference (a few hundred bytes), so what such a message costs is the per-message cost of the
step. ZeroMQ moves every message through an I/O thread on each side: the sender's thread wakes its
I/O thread, which writes the socket; the receiver's I/O thread reads it and wakes the receiving
thread. A Unix socket is written and read by the two threads themselves. This measures the
difference: wall time, CPU of both processes (every thread, from /proc) and context switches per
round trip, in alternating timed blocks with both echo processes up at once; the median block of
each side is reported.

This is a benchmark, not a test: on a small, shared machine absolute numbers are noisy; compare
the ratios measured in one run.

    .venv/bin/python benchmarks/ipc_wakeups.py                    # 5 trials of ~1 s per side
    .venv/bin/python benchmarks/ipc_wakeups.py --trials 9 --json wakeups.json
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402

HEADER_BYTES = 160  # about a push request's msgpack header
SLOT_BYTES = 24  # a shared-memory slot reference
START_TIMEOUT_S = 60.0
MAX_DATAGRAM = 65536


def zmq_echo(address: str, ready: Any) -> None:
    from downpour.transport import Listener, Poller, new_context

    listener = Listener(new_context(), address, max_message_bytes=1 << 20)
    poller = Poller()
    poller.register(listener)
    ready.put(os.getpid())
    while True:
        if poller.poll(1.0):
            while True:
                try:
                    peer, frames = listener.recv()
                except Exception:  # WouldBlock: the burst is read
                    break
                if frames and frames[0].bytes == b"stop":
                    return
                listener.send(peer, frames)


def uds_echo(path: str, ready: Any) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    ready.put(os.getpid())
    conn, _ = srv.accept()
    while True:
        msg = conn.recv(MAX_DATAGRAM)
        if not msg or msg == b"stop":
            return
        conn.send(msg)


def process_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (/proc/PID/stat counts the whole thread group)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of every thread of ``pid``."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[-1])
        except OSError:  # a thread that just exited
            pass
    return total


class ZmqSide:
    name = "zeromq ipc"

    def __init__(self, mpctx: Any, folder: str) -> None:
        from downpour.transport import Channel, new_context

        address = f"ipc://{folder}/echo.sock"
        q = mpctx.Queue()
        self.proc = mpctx.Process(target=zmq_echo, args=(address, q), daemon=True)
        self.proc.start()
        self.pid = q.get(timeout=START_TIMEOUT_S)
        self.ctx = new_context()
        self.ch = Channel(self.ctx, address)
        self.frames = [b"h" * HEADER_BYTES, b"s" * SLOT_BYTES]
        import zmq

        self._poller = zmq.Poller()
        self._poller.register(self.ch.socket, zmq.POLLIN)

    def round_trip(self) -> None:
        self.ch.send(self.frames)
        if not self._poller.poll(10_000):
            raise TimeoutError("no echo from the ZeroMQ side within 10 s")
        self.ch.recv()

    def close(self) -> None:
        self.ch.send([b"stop"])
        self.proc.join(10)
        self.ch.close()
        self.ctx.term()


class UdsSide:
    name = "unix seqpacket"

    def __init__(self, mpctx: Any, folder: str) -> None:
        path = os.path.join(folder, "echo.uds")
        q = mpctx.Queue()
        self.proc = mpctx.Process(target=uds_echo, args=(path, q), daemon=True)
        self.proc.start()
        self.pid = q.get(timeout=START_TIMEOUT_S)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.settimeout(10.0)
        self.msg = b"h" * HEADER_BYTES + b"s" * SLOT_BYTES

    def round_trip(self) -> None:
        self.sock.send(self.msg)
        self.sock.recv(MAX_DATAGRAM)

    def close(self) -> None:
        self.sock.send(b"stop")
        self.proc.join(10)
        self.sock.close()


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process (ZeroMQ's I/O thread too)
    return r.ru_utime + r.ru_stime


def time_block(side: Any, n: int) -> dict[str, float]:
    me = os.getpid()
    c0, s0, x0, y0, t0 = self_cpu_s(), process_cpu_s(side.pid), switches(me), switches(side.pid), time.perf_counter()
    for _ in range(n):
        side.round_trip()
    t = time.perf_counter() - t0
    return {"wall_us": t / n * 1e6, "client_cpu_us": (self_cpu_s() - c0) / n * 1e6,
            "server_cpu_us": (process_cpu_s(side.pid) - s0) / n * 1e6,
            "switches": (switches(me) - x0 + switches(side.pid) - y0) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="timed blocks per side, alternating (default 5; median reported)")
    ap.add_argument("--repeats", type=int, default=5000, help="round trips per block (default 5000)")
    ap.add_argument("--json", metavar="PATH", help="also write every block and the environment as JSON")
    args = ap.parse_args(argv)
    mpctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dp-wakeups-") as folder:
        os.makedirs(os.path.join(folder, "z"))
        os.makedirs(os.path.join(folder, "u"))
        sides = [ZmqSide(mpctx, os.path.join(folder, "z")), UdsSide(mpctx, os.path.join(folder, "u"))]
        blocks: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
        try:
            for s in sides:
                for _ in range(200):  # warm-up
                    s.round_trip()
            for _ in range(args.trials):
                for s in sides:
                    blocks[s.name].append(time_block(s, args.repeats))
        finally:
            for s in sides:
                try:
                    s.close()
                except Exception:
                    pass
                if s.proc.is_alive():
                    s.proc.kill()
    med = {name: {k: statistics.median(b[k] for b in bl) for k in bl[0]} for name, bl in blocks.items()}
    print(f"round trip of a {HEADER_BYTES + SLOT_BYTES}-byte message, median of {args.trials} blocks of {args.repeats}:")
    print("| side | wall µs | client CPU µs | server CPU µs | CPU µs, both | context switches |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['wall_us']:.1f} | {m['client_cpu_us']:.1f} | {m['server_cpu_us']:.1f} | "
              f"{m['client_cpu_us'] + m['server_cpu_us']:.1f} | {m['switches']:.2f} |")
    z, u = med["zeromq ipc"], med["unix seqpacket"]
    zc, uc = z["client_cpu_us"] + z["server_cpu_us"], u["client_cpu_us"] + u["server_cpu_us"]
    print(f"zeromq / unix: wall {z['wall_us'] / u['wall_us']:.2f}x, CPU {zc / uc:.2f}x "
          f"({zc - uc:.1f} µs of CPU more per round trip; a reference-job step makes one per server)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "blocks": blocks, "median": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
