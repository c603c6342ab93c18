"""The tests' one in-process server harness: a ParameterServer behind a real listener (CURVE or
plain, tcp on 127.0.0.1 or ipc), served by a background thread, and raw DEALER clients to talk
to it (tests/test_security.py and its atheris harness, the hostile-peer tests, KVClient's tests).

Every wait here is bounded; every socket is closed with linger 0; the server's ZAP
authenticator is stopped and its context terminated when the server is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import torch
import zmq

from downpour.config import parse_job
from downpour.layout import Layout, make_layout
from downpour.protocol import Message, Op, decode, encode
from downpour.server.service import ParameterServer
from downpour.transport import Listener, Security

WAIT_S = 5.0  # the longest any wait in these tests may take
START_S = 30.0  # starting the server thread (a loaded CI machine is slow to import and bind)
LR = 0.1
# 16 elements in four 4-element keys, all on the one server.
LAYOUT = make_layout([("w", (4, 3)), ("b", (4,))], 1, max_slice_bytes=16)
KEYS = [s.key for s in LAYOUT.server_slices(0)]
NUMEL = LAYOUT.server_numel(0)
INIT = torch.linspace(-1.0, 1.0, NUMEL)


def live_job(sections: dict[str, Any] | None = None, **cluster: Any):
    """The live server's job; ``sections`` adds job sections (``compression``, ``training``)."""
    sections = dict(sections or {})
    return parse_job({
        "model": {"name": "mlp", "args": {"input_shape": [3], "hidden": [4], "num_classes": 2}},
        "optimizer": {"name": "sgd", "lr": LR},
        "training": {"consistency": "async", **sections.pop("training", {})},
        "cluster": {"num_servers": 1, **cluster},
        "monitor": {"metrics": False},
        **sections,
    })


class LiveServer:
    """``ParameterServer.handle`` for every message of a CURVE listener, in a thread of its own
    (which creates, uses and closes the listener). ``call(fn)`` runs ``fn(server)`` in that thread."""

    def __init__(self, keys: str | None, sections: dict[str, Any] | None = None, *, job: Any = None, layout: Layout = LAYOUT,
                 rank: int = 0, bind: str = "tcp://127.0.0.1:*", max_bytes: int = 1 << 20, **cluster: Any) -> None:
        """``job``: the server's job instead of :func:`live_job` (``sections``, ``cluster``); ``layout`` and
        ``rank``: which shard it holds (server-RANK); ``bind``: its listener's address (tcp or ipc)."""
        self.ctx = zmq.Context(io_threads=1)
        self.security = Security.load(keys, "server") if keys else None
        self.job = job if job is not None else live_job(sections, **cluster)
        self.layout, self.rank, self.bind, self.max_bytes = layout, rank, bind, max_bytes
        self.server: ParameterServer | None = None
        self.address: str | None = None
        self.error: BaseException | None = None
        self._calls: queue.Queue = queue.Queue()
        self._wake_address = f"inproc://live-server-wake-{id(self)}"
        self._poke: zmq.Socket | None = None  # the callers' end of the wake-up pair (one calling thread)
        self._ready = threading.Event()
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="live-server", daemon=True)
        self.thread.start()
        if not self._ready.wait(START_S) or self.address is None:
            self.close()
            raise RuntimeError(f"the live server did not start: {self.error!r}")

    def _run(self) -> None:
        listener = None
        wake = self.ctx.socket(zmq.PAIR)  # call() pokes it so that calls run at once, not at the next poll timeout
        try:
            wake.bind(self._wake_address)
            listener = Listener(self.ctx, self.bind, self.max_bytes, self.security)
            self.server = ParameterServer(self.ctx, self.job, self.layout, self.rank, listener, f"server-{self.rank}")
            poller = zmq.Poller()
            poller.register(listener.socket, zmq.POLLIN)
            poller.register(wake, zmq.POLLIN)
            self.address = listener.address
            self._ready.set()
            while not self._halt.is_set():
                ready = dict(poller.poll(50))
                if listener.socket in ready:
                    for _ in range(256):
                        try:
                            peer, frames = listener.recv()
                        except zmq.Again:
                            break
                        self.server.handle(peer, frames)
                if wake in ready:
                    while wake.poll(0):
                        wake.recv()
                while True:
                    try:
                        fn, box, done = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        box.append(fn(self.server))
                    except BaseException as err:  # handed to the caller
                        box.append(err)
                    done.set()
        except BaseException as err:  # reported by close() and alive()
            self.error = err
        finally:
            if listener is not None:
                listener.close()
            wake.close(linger=0)
            self._ready.set()

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def call(self, fn: Callable[[ParameterServer], Any]) -> Any:
        """``fn(server)`` run in the server's thread (no race with its requests)."""
        box: list = []
        done = threading.Event()
        self._calls.put((fn, box, done))
        if self._poke is None:
            self._poke = self.ctx.socket(zmq.PAIR)
            self._poke.setsockopt(zmq.LINGER, 0)
            self._poke.connect(self._wake_address)
        self._poke.send(b"", zmq.NOBLOCK)
        if not done.wait(WAIT_S):
            raise TimeoutError(f"the live server did not run a call within {WAIT_S}s (alive: {self.thread.is_alive()})")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def rejected(self) -> dict[str, int]:
        return self.call(lambda s: dict(s.stats()["rejected"]))

    def values(self) -> torch.Tensor:
        """The shard's parameters, read in the server's thread."""
        return self.call(lambda s: s.store.data.clone())

    def pushes(self) -> int:
        return self.call(lambda s: s.stats()["pushes"])

    def close(self) -> None:
        self._halt.set()
        self.thread.join(WAIT_S)
        if self._poke is not None:
            self._poke.close(linger=0)
        alive = self.thread.is_alive()
        if self.security is not None:
            self.security.close()  # the ZAP authenticator holds a socket of the context
        if not alive:
            self.ctx.term()
        else:  # pragma: no cover - a hang, reported below rather than hanging the tests too
            self.ctx.destroy(linger=0)
        if alive:
            raise RuntimeError("the live server thread did not stop")
        if self.error is not None:
            raise RuntimeError(f"the live server thread failed: {self.error!r}") from self.error

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawClient:
    """A DEALER connected to a listener: a CURVE client of the job's ``server_role`` key with ``security``,
    a plain socket without."""

    def __init__(self, ctx: zmq.Context, address: str, security: Security | None = None, server_role: str = "server",
                 identity: bytes | None = None) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:  # the routing id (a node's name towards servers)
            self.socket.setsockopt(zmq.IDENTITY, identity)
        if security is not None:
            security.connect(self.socket, server_role)
        self.socket.connect(address)
        self._next = 0

    def next_id(self) -> int:
        self._next += 1
        return self._next

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames, copy=True)

    def recv(self, timeout_s: float) -> Message | None:
        """The next reply, or None if none comes within ``timeout_s``."""
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return decode([bytearray(f) for f in self.socket.recv_multipart()])

    def request(self, op: Op, meta: dict | None = None, tensors: list | None = None, timeout_s: float = WAIT_S) -> Message | None:
        req = self.next_id()
        self.send(encode(Message(op, req, meta or {}, tensors or [])))
        reply = self.recv(timeout_s)
        assert reply is None or reply.req_id == req, f"a reply to request {reply.req_id}, expected {req}"
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)


PROBE_BASE = 1 << 61  # request ids of probes: far from those of fuzzed messages


class Prober:
    """Sends any frames, then a PULL probe on the same DEALER; the server answers in order, so the
    replies before the probe's are the frames' replies (none: they were dropped)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.n = 0

    def exchange(self, frames: list, timeout_s: float = WAIT_S) -> tuple[list[Message], Message]:
        self.n += 1
        probe_id = PROBE_BASE + self.n
        self.client.send(frames)
        self.client.send(encode(Message(Op.PULL, probe_id, {"keys": KEYS})))
        before: list[Message] = []
        while True:
            reply = self.client.recv(timeout_s)
            if reply is None:
                raise AssertionError(f"no answer to the probe within {timeout_s}s after {frames!r:.300}")
            if reply.req_id == probe_id:
                assert reply.op == Op.OK and len(reply.tensors) == 1, f"the probe was refused: {reply.meta}"
                return before, reply
            before.append(reply)
            assert len(before) == 1, f"more than one reply to one message: {before}"


# -- an atheris harness (run as a separate process: libFuzzer ends the process) ------------------------------


NAN_F32 = b"\x00\x00\xc0\x7f"  # a float32 NaN, little-endian


def poisoned(frames: list[bytes]) -> list[bytes]:
    """``frames``, unless their header is surely not a PUSH or PUSHPULL, with every frame after the header
    starting with a float32 NaN. A push's values are one float32 frame of at least one 4-element key, so
    no such message is a valid push: fuzzed messages reach every refusal (and valid INITs, no-ops on an
    initialised server, and PULLs), and still can never change a parameter."""
    head, *tensors = frames
    try:
        header = msgpack.unpackb(bytes(head), raw=False, strict_map_key=True)  # as the codec reads it
    except Exception:  # the server drops it unread; poisoned all the same
        header = None
    if isinstance(header, list) and len(header) >= 2 and type(header[1]) is int and header[1] not in (Op.PUSH, Op.PUSHPULL):
        return frames
    return [head, *(NAN_F32 + bytes(t[4:]) if len(t) >= 4 else t for t in tensors)]


def _split(data: bytes) -> list[bytes]:
    """Fuzzer input -> 1..5 frames: [count byte] then per frame [2-byte length][bytes]."""
    if not data:
        return [b""]
    count, pos, frames = 1 + data[0] % 5, 1, []
    for _ in range(count):
        n = int.from_bytes(data[pos : pos + 2], "little")
        pos += 2
        frames.append(data[pos : pos + n])
        pos += n
    return frames


def _join(frames: list) -> bytes:
    return bytes([len(frames) - 1]) + b"".join(len(bytes(f)).to_bytes(2, "little") + bytes(f) for f in frames)


def seeds() -> list[bytes]:
    nan = torch.full((NUMEL,), float("nan"))
    return [_join(encode(m)) for m in (
        Message(Op.INIT, 1, {"keys": KEYS}, [INIT]),
        Message(Op.PULL, 2, {"keys": KEYS}),
        Message(Op.PULL, 3, {"keys": KEYS[1:3]}),
        Message(Op.PUSH, 4, {"keys": KEYS, "version": 0, "weight": 1.0}, [nan]),
        Message(Op.PUSHPULL, 5, {"keys": KEYS[:2], "version": 0}, [nan[:8]]),
    )]


def atheris_main(keys: str, argv: list[str]) -> None:  # pragma: no cover - run in a subprocess by a test
    """Fuzz the live secure server through a worker-key DEALER until libFuzzer's ``-runs``/``-max_total_time``.
    After every input: the server is alive, answers a probe with the initial values, and counted a
    rejection exactly when the input got an ERROR or no reply.

    The server is initialised first (an INIT is then a no-op) and every input is :func:`poisoned`, so
    "the parameters never change" holds for every input."""
    import sys

    import atheris

    live = LiveServer(keys)
    ctx = zmq.Context(io_threads=1)
    worker = Security.load(keys, "worker")
    client = RawClient(ctx, live.address, worker)
    assert client.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
    prober = Prober(client)
    tally = {"inputs": 0, "refused": 0, "counted": 0}

    def one(data: bytes) -> None:
        frames = poisoned(_split(data))
        before = tally["counted"]
        replies, probe = prober.exchange(frames)
        refused = not replies or replies[0].op == Op.ERROR
        tally["inputs"] += 1
        tally["refused"] += refused
        assert live.alive(), "the server thread died"
        assert torch.equal(probe.tensors[0], INIT), f"parameters changed after {frames!r:.300}"
        after = tally["counted"] = sum(live.rejected().values())
        assert after - before == int(refused), f"{after - before} rejections counted for {frames!r:.300} ({replies})"
        if tally["inputs"] % 500 == 0:
            print(f"atheris-tally {tally}", file=sys.stderr, flush=True)

    atheris.Setup(argv, one)
    atheris.Fuzz()
