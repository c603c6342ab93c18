"""Does spreading CURVE over several connections (and ZeroMQ I/O threads) raise its throughput?

Raw pyzmq, no Downpour code: a ROUTER echo process and, here, K DEALER sockets connected to it,
each side with K ZeroMQ I/O threads. One round trip sends the payload in frames of 2 MiB
(Downpour's request size) spread round-robin over the K connections and waits for all of them to
come back. Plain and CURVE (Curve25519 handshake, XSalsa20-Poly1305 on every frame) alternate for
each K, in the same run; the ratio is CURVE's round trips per second over plain's.

libzmq encrypts and decrypts a frame in the I/O thread of the connection that carries it, so on a
machine with idle cores, more connections would spread the crypto over more threads. This measures
whether that helps where both processes share 2 cores.

    .venv/bin/python benchmarks/curve_connections.py                      # 16MB, K = 1,2,4, 2 trials
    .venv/bin/python benchmarks/curve_connections.py --connections 1,2 --seconds 2
    .venv/bin/python benchmarks/curve_connections.py --cipher             # only libsodium's speed

``--cipher`` times the cipher itself: ``crypto_box_easy_afternm`` and its opening (what CURVE
runs on every frame) of the libsodium that pyzmq's libzmq links, called through ctypes on
one core, for several buffer sizes.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import multiprocessing as mp
import os
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

import zmq  # noqa: E402

from benchmarks.common import environment  # noqa: E402

FRAME = 2 << 20
TIMEOUT_MS = 30_000


def echo_main(k: int, keys: tuple[bytes, bytes] | None, port_q: Any, stop: Any) -> None:
    """ROUTER echo with ``k`` I/O threads; a CURVE server when ``keys`` (public, secret) are given."""
    ctx = zmq.Context(io_threads=k)
    sock = ctx.socket(zmq.ROUTER)
    try:
        if keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = keys
        port_q.put(sock.bind_to_random_port("tcp://127.0.0.1"))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                while True:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    sock.send_multipart(msg, copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


def rate(k: int, curve: bool, payload: int, seconds: float, mpctx: Any) -> float:
    """Round trips per second of ``payload`` bytes each way over ``k`` connections."""
    server_keys, client_keys = zmq.curve_keypair(), zmq.curve_keypair()
    port_q, stop = mpctx.Queue(), mpctx.Event()
    proc = mpctx.Process(target=echo_main, args=(k, server_keys if curve else None, port_q, stop), daemon=True)
    proc.start()
    ctx = zmq.Context(io_threads=k)
    socks: list[zmq.Socket] = []
    try:
        port = port_q.get(timeout=TIMEOUT_MS / 1000)
        poller = zmq.Poller()
        for _ in range(k):
            d = ctx.socket(zmq.DEALER)
            if curve:
                d.curve_serverkey = server_keys[0]
                d.curve_publickey, d.curve_secretkey = client_keys
            d.connect(f"tcp://127.0.0.1:{port}")
            poller.register(d, zmq.POLLIN)
            socks.append(d)
        frame = bytearray(os.urandom(FRAME))
        frames = max(1, payload // FRAME)

        def round_trip() -> None:
            for j in range(frames):
                socks[j % k].send(frame, copy=False)
            got = 0
            while got < frames:
                ready = poller.poll(TIMEOUT_MS)
                if not ready:
                    raise RuntimeError(f"no echo within {TIMEOUT_MS / 1000:g}s")
                for d, _ in ready:
                    while True:
                        try:
                            d.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        got += 1

        for _ in range(3):
            round_trip()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            round_trip()
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        for d in socks:
            d.close(linger=0)
        ctx.term()
        stop.set()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def cipher_speeds(sizes: list[int], total: int = 64 << 20) -> list[tuple[int, float, float]]:
    """(size, encrypt GB/s, decrypt GB/s) of XSalsa20-Poly1305 in pyzmq's libsodium, one core."""
    zmq_dir = os.path.dirname(zmq.__file__)
    found = sorted(glob.glob(os.path.join(zmq_dir, os.pardir, "pyzmq.libs", "libsodium*.so*")))
    if not found:
        raise SystemExit(f"no libsodium bundled with pyzmq under {zmq_dir}/../pyzmq.libs")
    lib = ctypes.CDLL(found[0])
    if lib.sodium_init() < 0:
        raise SystemExit("sodium_init failed")
    key, nonce = ctypes.create_string_buffer(32), ctypes.create_string_buffer(24)
    out = []
    for size in sizes:
        plain, box = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size + 16)
        reps = max(1, total // size)
        t0 = time.perf_counter()
        for _ in range(reps):
            lib.crypto_box_easy_afternm(box, plain, ctypes.c_ulonglong(size), nonce, key)
        enc = reps * size / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        for _ in range(reps):
            if lib.crypto_box_open_easy_afternm(plain, box, ctypes.c_ulonglong(size + 16), nonce, key) != 0:
                raise RuntimeError("a box failed to open")
        dec = reps * size / (time.perf_counter() - t0) / 1e9
        out.append((size, enc, dec))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", default="1,2,4", help="comma-separated K values (default 1,2,4)")
    ap.add_argument("--payload-mb", type=int, default=16, help="MiB each way per round trip (default 16)")
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement (default 4)")
    ap.add_argument("--trials", type=int, default=2, help="measurements of each K and mode (default 2)")
    ap.add_argument("--cipher", action="store_true", help="only time libsodium's cipher per buffer size, one core")
    args = ap.parse_args(argv)
    if args.cipher:
        print("| buffer | encrypt GB/s | decrypt GB/s |")
        print("|---:|---:|---:|")
        for size, enc, dec in cipher_speeds([64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20]):
            print(f"| {size >> 10} KiB | {enc:.2f} | {dec:.2f} |")
        return 0
    ks = [int(k) for k in args.connections.split(",") if k.strip()]
    if not ks or min(ks) < 1 or args.trials < 1 or args.seconds <= 0 or args.payload_mb < 2:
        ap.error("--connections must list positive integers; --trials ≥ 1, --seconds > 0, --payload-mb ≥ 2")
    mpctx = mp.get_context("spawn")
    env = environment()
    print(f"{args.payload_mb} MiB each way in 2 MiB frames; {env['cpus']} CPUs ({env['cpu_model']}), "
          f"pyzmq {env['pyzmq']} (libzmq {env['libzmq']})\n")
    print("| K connections | trial | plain rt/s | CURVE rt/s | CURVE/plain |")
    print("|---:|---:|---:|---:|---:|")
    for trial in range(1, args.trials + 1):
        for k in ks:
            plain = rate(k, False, args.payload_mb << 20, args.seconds, mpctx)
            curve = rate(k, True, args.payload_mb << 20, args.seconds, mpctx)
            print(f"| {k} | {trial} | {plain:.1f} | {curve:.1f} | {curve / plain:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
