"""Unix stream sockets between the processes of one machine (transport/uds.py): what ZeroMQ's listener
and channel do, with one wake-up per message; a peer that breaks the framing loses its connection only."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
import zmq

from downpour.errors import TransportError
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.rpc import RpcClient
from downpour.transport import Both, Listener, Poller, UnixChannel, UnixListener, bind_address, uds, unix_path


def _wait(cond, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.001)
    raise AssertionError("timed out")


def _recv(listener: UnixListener, timeout_s: float = 5.0) -> tuple[bytes, list]:
    _wait(listener.ready, timeout_s)
    return listener.recv()


def _reply(channel: UnixChannel, listener: UnixListener | None = None, timeout_s: float = 5.0) -> list:
    """The channel's next message; ``listener``: poll it meanwhile (it writes what the kernel did
    not take at once when polled, as a server's loop does)."""
    _wait(lambda: (listener is not None and listener.ready()) or channel.ready(), timeout_s)
    return channel.recv()


@pytest.fixture
def listener(tmp_path):
    lst = UnixListener(str(tmp_path / "s.uds"), 1 << 30)
    yield lst
    lst.close()


def test_the_unix_socket_sits_beside_an_ipc_address_only():
    assert unix_path("ipc:///run/x/sock/server-0-ab12cd.sock") == "/run/x/sock/server-0-ab12cd.uds"
    assert unix_path("tcp://127.0.0.1:5555") is None
    assert unix_path("ipc:///run/x/other") is None


@pytest.mark.parametrize("sizes", [[0], [5, 0, 7], [300], [3 << 20, 17], [1 << 18, 1 << 18, 1]])
def test_frames_arrive_as_sent_whatever_their_sizes(listener, sizes):
    ch = UnixChannel(listener.path, b"worker-0")
    frames = [os.urandom(n) for n in sizes]
    sending = threading.Thread(target=ch.send, args=(frames,))  # (a large one waits for the listener to read)
    sending.start()
    peer, got = _recv(listener)
    sending.join(timeout=10)
    assert peer == b"worker-0" and [bytes(f) for f in got] == frames
    assert listener.send(b"worker-0", frames[::-1])
    assert [bytes(f) for f in _reply(ch, listener)] == frames[::-1]
    ch.close()


def test_messages_keep_their_order_and_replies_find_their_peer(listener):
    a, b = UnixChannel(listener.path, b"worker-a"), UnixChannel(listener.path, b"worker-b")
    for i in range(200):
        (a if i % 2 else b).send([b"%d" % i, b"x" * (i % 17 * 37)])  # (all within the kernel's buffers: no reader yet)
    seen: dict[bytes, list[int]] = {b"worker-a": [], b"worker-b": []}
    for _ in range(200):
        peer, frames = _recv(listener)
        seen[peer].append(int(bytes(frames[0])))
        listener.send(peer, [bytes(frames[0])])
    assert seen[b"worker-a"] == list(range(1, 200, 2)) and seen[b"worker-b"] == list(range(0, 200, 2))
    assert [int(bytes(_reply(a)[0])) for _ in range(100)] == list(range(1, 200, 2))
    assert [int(bytes(_reply(b)[0])) for _ in range(100)] == list(range(0, 200, 2))
    assert not listener.send(b"worker-c", [b"nobody"])  # not connected here: the caller uses ZeroMQ
    a.close()
    b.close()


def test_a_peer_that_stops_reading_is_queued_for_then_served_without_blocking_the_listener(listener):
    slow, other = UnixChannel(listener.path, b"slow"), UnixChannel(listener.path, b"other")
    slow.send([b"hello"])
    other.send([b"hello"])
    _recv(listener), _recv(listener)
    big = os.urandom(1 << 20)
    t0 = time.monotonic()
    for _ in range(32):  # 32 MB to a peer that reads nothing: far beyond the kernel's buffer
        assert listener.send(b"slow", [big])
    assert time.monotonic() - t0 < 10.0, "the listener blocked on a peer that does not read"
    listener.send(b"other", [b"answer"])
    assert bytes(_reply(other)[0]) == b"answer"  # the other peer is served meanwhile
    for _ in range(32):  # the queue drains as the peer reads (the listener writes when polled)
        deadline = time.monotonic() + 10
        while not slow.ready():
            listener.ready()
            assert time.monotonic() < deadline
        assert bytes(slow.recv()[0]) == big
    slow.close()
    other.close()


def test_a_peer_that_never_reads_is_dropped_past_the_queue_limit(listener, monkeypatch):
    monkeypatch.setattr(uds, "MAX_QUEUED_BYTES", 4 << 20)
    ch = UnixChannel(listener.path, b"deaf")
    ch.send([b"hello"])
    _recv(listener)
    for _ in range(16):
        listener.send(b"deaf", [b"\0" * (1 << 20)])
    assert listener.dropped == 1 and not listener.send(b"deaf", [b"x"])
    ch.close()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _message(frames: list[bytes]) -> bytes:
    body = struct.pack(f"<{len(frames)}I", *map(len, frames)) + b"".join(frames)
    return struct.pack("<II", 4 + len(body), len(frames)) + body


@pytest.mark.parametrize("garbage", [
    struct.pack("<II", 8, 100_000),  # more frames than allowed
    struct.pack("<II", 12, 2) + struct.pack("<II", 1, 1),  # lengths that add up to more than the message
    struct.pack("<II", 0xFFFFFFF0, 1),  # a message larger than the limit
    struct.pack("<II", 2, 1),  # a message too short for its own frame count
], ids=["frames", "lengths", "size", "short"])
def test_a_malformed_stream_closes_that_connection_only(listener, garbage):
    good = UnixChannel(listener.path, b"good")
    bad = _raw(listener.path)
    bad.sendall(_message([b"evil"]) + _message([b"first"]) + garbage)
    good.send([b"still here"])
    got = [_recv(listener) for _ in range(2)]
    assert sorted((p, bytes(f[0])) for p, f in got) == [(b"evil", b"first"), (b"good", b"still here")]
    _wait(lambda: listener.dropped == 1)
    assert bad.recv(1) == b""  # the listener closed it
    assert listener.send(b"good", [b"ok"]) and bytes(_reply(good)[0]) == b"ok"
    good.close()
    bad.close()


@pytest.mark.parametrize("first", [[b""], [b"a", b"b"], [b"\0zmq"], [b"x" * 256]], ids=["empty", "two", "zero", "long"])
def test_a_connection_must_name_itself_first(listener, first):
    bad = _raw(listener.path)
    bad.sendall(_message(first) + _message([b"request"]))
    _wait(lambda: listener.ready() or listener.dropped)
    assert listener.dropped == 1 and not listener.pending()
    bad.close()


def test_a_channel_whose_listener_went_is_closed_and_rpc_requests_time_out(tmp_path):
    ctx = zmq.Context()
    path = str(tmp_path / "srv.sock")
    zl = Listener(ctx, f"ipc://{path}", 1 << 30)
    unix = UnixListener(unix_path(zl.address), 1 << 30)
    server = Both(zl, unix)
    rpc = RpcClient(ctx, "worker-0", request_timeout_s=1.0, unix_sockets=True)
    try:
        rpc.connect("server-0", zl.address)
        assert isinstance(rpc._channels["server-0"], UnixChannel)
        fut = rpc.request("server-0", Message(Op.PULL, meta={"keys": [1]}))
        poller = Poller()
        poller.register(server)
        _wait(lambda: poller.poll(0.01) and server.ready())
        peer, frames = server.recv()
        assert peer == b"worker-0" and decode(frames).op == Op.PULL
        server.send(peer, encode(decode(frames).reply({"version": 3})))
        assert fut.result().meta["version"] == 3
        unix.close()  # the server's process is gone
        t0 = time.process_time()
        with pytest.raises(Exception, match="timed out|no reply"):
            rpc.request("server-0", Message(Op.PULL, meta={"keys": [1]})).result()
        assert time.process_time() - t0 < 0.8, "the client spun on a closed socket"
    finally:
        rpc.close()
        zl.close()
        ctx.term()


def test_without_a_unix_socket_or_with_keys_a_client_uses_zeromq(tmp_path):
    ctx = zmq.Context()
    zl = Listener(ctx, bind_address("ipc", "127.0.0.1", str(tmp_path), "srv"), 1 << 30)
    try:
        for unix_sockets in (True, False):
            rpc = RpcClient(ctx, "worker-0", request_timeout_s=1.0, unix_sockets=unix_sockets)
            rpc.connect("server-0", zl.address)  # no .uds file beside it
            assert not isinstance(rpc._channels["server-0"], UnixChannel)
            rpc.close()
    finally:
        zl.close()
        ctx.term()


def test_a_channel_to_nothing_is_a_transport_error(tmp_path):
    with pytest.raises(TransportError, match="cannot connect"):
        UnixChannel(str(tmp_path / "none.uds"), b"w")


def test_a_lower_limit_applies_to_connections_already_open(listener):
    ch = UnixChannel(listener.path, b"early")  # connected before the limit is lowered
    ch.send([b"x" * 1000])
    assert bytes(_recv(listener)[1][0]) == b"x" * 1000
    listener.set_limit(100)
    ch.send([b"y" * 200_000])  # (the limit allows for the frames' own lengths: well past it)
    _wait(lambda: listener.ready() or listener.dropped)
    assert listener.dropped == 1 and not listener.pending()  # refused: the connection is closed
    late = UnixChannel(listener.path, b"late")
    late.send([b"z" * 50])
    assert bytes(_recv(listener)[1][0]) == b"z" * 50  # within the limit: taken
    late.close()
    ch.close()


def test_both_sides_take_turns_when_both_have_messages(tmp_path):
    ctx = zmq.Context()
    zl = Listener(ctx, f"ipc://{tmp_path / 'srv.sock'}", 1 << 30)
    unix = UnixListener(unix_path(zl.address), 1 << 30)
    server = Both(zl, unix)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"remote")
    dealer.connect(zl.address)
    local = UnixChannel(unix.path, b"local")
    try:
        for i in range(20):
            local.send([b"u%d" % i])
            dealer.send_multipart([b"z%d" % i])
        _wait(lambda: unix.ready() and len(unix._inbox) == 20 and server.zmq.ready())
        order = []
        for _ in range(20):  # the Unix side is full the whole time: the ZeroMQ side still gets every other turn
            peer, _frames = server.recv()
            order.append(peer)
        assert order.count(b"remote") == 10 and order.count(b"local") == 10
        assert all(a != b for a, b in zip(order, order[1:]))
    finally:
        local.close()
        dealer.close(linger=0)
        server.close()
        ctx.term()
