"""ZeroMQ sockets behind four verbs: bind, connect, send, receive.

* :class:`Listener` (ROUTER) is bound by a node that answers requests (a server,
  the coordinator). ``recv`` yields ``(peer, frames)``; ``send(peer, frames)``
  answers that peer, at any time and in any order.
* :class:`Channel` (DEALER) connects to one listener. Several requests may be in
  flight on it; replies come back in whatever order the peer sends them.

Sends never block the caller on the network (ZeroMQ's I/O thread moves the
bytes) and pass buffers without copying. A socket belongs to one thread.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import zmq

from downpour.errors import TransportError
from downpour.transport.security import Security

# Messages queued per socket before sends block (ZeroMQ high-water marks).
_HWM = 10_000
# Messages a listener queues per connection before ZeroMQ stops reading that connection: a peer
# sending faster than the node serves waits (TCP back-pressure) instead of filling its memory.
_LISTENER_RCVHWM = 1_000
# Frames below this size are copied into ZeroMQ's buffer rather than lent to it.
# Lending costs a round trip through pyzmq's garbage-collector thread per frame,
# which for a few hundred kB costs more CPU than one memcpy (measured: see
# benchmarks/RESULTS.md); large frames are lent, never copied.
ZERO_COPY_MIN_BYTES = 1 << 20

# The transport's types, under the transport's names: the layers above name these, never zmq's.
Context = zmq.Context  # one per process: every socket of a node is made from it (new_context)
WouldBlock = zmq.Again  # recv() found no message waiting (poll first, or check ready() before each)
_SNDMORE = int(zmq.SNDMORE)  # a plain int: combining pyzmq's enum flags costs a Python call each time
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def send_copies(nbytes: int) -> bool:
    """Whether a frame of ``nbytes`` is copied during ``send`` (so its memory may change right
    after) rather than lent to ZeroMQ until the bytes are on the wire."""
    return nbytes < ZERO_COPY_MIN_BYTES


def new_context() -> zmq.Context:
    """A fresh ZeroMQ context (one per process, passed explicitly; never a global)."""
    return zmq.Context(io_threads=1)


def bind_address(transport: str, host: str, ipc_dir: str | None, name: str, port: int | None = None) -> str:
    """The address a node binds: ``tcp://host:port`` (``port`` None or 0: a free one) or an ipc path in ``ipc_dir``."""
    if transport == "ipc":
        if not ipc_dir:
            raise TransportError("ipc transport needs a socket folder (the run folder)")
        os.makedirs(ipc_dir, mode=0o700, exist_ok=True)
        return f"ipc://{os.path.join(ipc_dir, name)}.sock"
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{port or '*'}"


class Listener:
    """A bound ROUTER socket. ``address`` is the concrete address peers connect to.

    With ``security`` it is a CURVE server that admits only the job's keys, and
    :meth:`peer_role` tells the role whose key sent a message."""

    def __init__(self, ctx: zmq.Context, address: str, max_message_bytes: int, security: Security | None = None) -> None:
        self.security = security
        self.socket = ctx.socket(zmq.ROUTER)
        if security is not None:
            security.serve(self.socket, ctx)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, _HWM)
        self.socket.setsockopt(zmq.RCVHWM, _LISTENER_RCVHWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)  # per frame; larger peers are cut off
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped
        self.socket.copy_threshold = ZERO_COPY_MIN_BYTES
        try:
            self.socket.bind(address)
        except zmq.ZMQError as err:
            self.socket.close()
            raise TransportError(f"cannot bind {address}: {err}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def limit(self, max_message_bytes: int, timeout_s: float = 5.0) -> None:
        """Cut off peers that send a frame above ``max_message_bytes`` from now on (a server learns
        the job's limit after it bound its address): the same address is bound again with it, so
        every connection made since has it (a peer connecting meanwhile is refused and retries)."""
        self.socket.unbind(self.address)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        deadline = time.monotonic() + timeout_s
        while True:
            try:  # the old listener closes in ZeroMQ's I/O thread: the address may still be busy
                self.socket.bind(self.address)
                return
            except zmq.ZMQError as err:
                if time.monotonic() > deadline:
                    raise TransportError(f"cannot bind {self.address} again: {err}") from None
                time.sleep(0.01)

    def recv(self) -> tuple[bytes, list[zmq.Frame]]:
        """One message, without blocking (call after a poll or :meth:`ready` said one waits;
        :data:`WouldBlock` otherwise)."""
        frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        return frames[0].bytes, frames[1:]

    def pending(self) -> bool:
        """Whether a message was read ahead and waits where a poll does not see it (never, here;
        transport/uds.py's listeners may)."""
        return False

    def ready(self) -> bool:
        """Whether a message is waiting now (as :meth:`Channel.ready`): a burst read as ``recv``
        while ``ready()`` ends on a check, not on the :data:`WouldBlock` a last ``recv`` raises."""
        return bool(self.socket.getsockopt(_EVENTS) & _POLLIN)

    def peer_role(self, frames: list[zmq.Frame]) -> str | None:
        """The role of the key that sent ``frames`` (None without security: anyone may send)."""
        if self.security is None or not frames:
            return None
        try:
            return self.security.role_of(frames[0].get("User-Id"))
        except (zmq.ZMQError, AttributeError):
            return None

    def peer_rank(self, frames: list[zmq.Frame]) -> int | None:
        """The worker rank the key that sent ``frames`` is bound to (a per-worker key), else None."""
        if self.security is None or not frames:
            return None
        try:
            return self.security.rank_of(frames[0].get("User-Id"))
        except (zmq.ZMQError, AttributeError):
            return None

    def send(self, peer: bytes, frames: Sequence[Any], track: bool = False) -> list[zmq.MessageTracker | None]:
        """Send to ``peer``. With ``track``, returns one entry per frame: a tracker for each
        frame lent to ZeroMQ (not copied, see :func:`send_copies`), whose memory must not
        change until ``tracker.done``; None for frames that were copied."""
        if not track:  # (send_multipart checks every frame and combines flags through an enum per frame)
            send, last = self.socket.send, len(frames) - 1
            send(peer, _SNDMORE if frames else 0, copy=False)
            for i, part in enumerate(frames):
                send(part, _SNDMORE if i < last else 0, copy=False)
            return []
        self.socket.send(peer, zmq.SNDMORE)
        trackers: list[zmq.MessageTracker | None] = []
        for i, part in enumerate(frames):
            flags = zmq.SNDMORE if i < len(frames) - 1 else 0
            lent = isinstance(part, memoryview) and not send_copies(part.nbytes)
            t = self.socket.send(part, flags, copy=False, track=lent)
            trackers.append(t if lent else None)
        return trackers

    def close(self) -> None:
        self.socket.close(linger=0)


class Channel:
    """A DEALER socket connected to one listener."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes | None = None,
                 security: Security | None = None, server_role: str = "server", send_timeout_s: float = 30.0) -> None:
        """With ``security``, a CURVE client that checks the listener holds ``server_role``'s key.
        A send waits at most ``send_timeout_s`` for a connection to take it (ZeroMQ holds a DEALER's
        sends while it has none: the peer is not there, or a key handshake failed), then fails."""
        self.address = address
        self.send_timeout_s = send_timeout_s
        self.secure = security is not None
        self.socket = ctx.socket(zmq.DEALER)
        if security is not None:
            security.connect(self.socket, server_role)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, _HWM)
        self.socket.setsockopt(zmq.RCVHWM, _HWM)
        self.socket.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout_s * 1000)))
        self.socket.copy_threshold = ZERO_COPY_MIN_BYTES
        if identity:
            self.socket.setsockopt(zmq.IDENTITY, identity)
        try:
            self.socket.connect(address)
        except zmq.ZMQError as err:
            self.socket.close()
            raise TransportError(f"cannot connect to {address}: {err}") from None

    def send(self, frames: Sequence[Any]) -> None:
        send, last = self.socket.send, len(frames) - 1
        try:
            for i, part in enumerate(frames):  # (as Listener.send: int flags, no per-frame checks)
                send(part, _SNDMORE if i < last else 0, copy=False)
        except zmq.Again:
            keys = ("this node's keys are not the job's (--keys on one side, --insecure on the other, or another "
                    "job's folder)" if self.secure else "the peer expects keys (started with --keys) and this node has none")
            raise TransportError(f"no connection to {self.address} took a message within {self.send_timeout_s:.0f}s: the "
                                 f"peer is not running there, or {keys}") from None

    def recv(self) -> list[zmq.Frame]:
        """One message, without blocking (call after a poll said it is readable)."""
        return self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)

    def ready(self) -> bool:
        """Whether a message is waiting now. Reading a burst as ``while ch.ready(): ch.recv()``
        ends without the :data:`WouldBlock` exception a last ``recv`` raises (1.1 µs a check
        against 3.7 µs for the exception, measured with pyzmq 27 in process)."""
        return bool(self.socket.getsockopt(_EVENTS) & _POLLIN)

    def close(self) -> None:
        self.socket.close(linger=0)


class Poller:
    """Waits until any registered listener or channel has a message."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._owner: dict[Any, Any] = {}

    def register(self, endpoint: Any) -> None:
        """A listener or channel (ZeroMQ's, or transport/uds.py's: anything with a ``socket`` that
        has a ``fileno``, or ``pollables()``)."""
        for s in _pollables(endpoint):
            self._poller.register(s, zmq.POLLIN)
            self._owner[_key(s)] = endpoint

    def unregister(self, endpoint: Any) -> None:
        for s in _pollables(endpoint):
            if self._owner.pop(_key(s), None) is not None:
                self._poller.unregister(s)

    def poll(self, timeout_s: float) -> list[Any]:
        """The endpoints with a message waiting, after at most ``timeout_s`` seconds."""
        if not self._owner:  # (ZeroMQ's poll of nothing returns at once: a waiting caller would spin)
            time.sleep(max(0.0, timeout_s))
            return []
        ready = self._poller.poll(max(0, math.ceil(timeout_s * 1000)))
        owners = [self._owner[s] for s, _ in ready]
        return owners if len(owners) < 2 else list(dict.fromkeys(owners))  # (one endpoint may have two sockets)


def _key(s: Any) -> Any:
    """How a poll names a registered object: a ZeroMQ socket as itself, anything else by its file descriptor."""
    return s if isinstance(s, zmq.Socket) else s.fileno()


def _pollables(endpoint: Any) -> list[Any]:
    more = getattr(endpoint, "pollables", None)
    return more() if more is not None else [endpoint.socket]
