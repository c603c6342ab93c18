"""Request tracking: futures over channels, typed replies, timeouts that name the peer.

:class:`RpcClient` is single-threaded (ps-lite's "customer"): ``request`` sends
at once and returns a :class:`Future`; ``Future.result`` pumps the client's
sockets until that reply (or its deadline) arrives, resolving any other replies
it meets on the way. Messages a peer sends unprompted (``STOP``,
``MEMBERSHIP``) go to ``on_push``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from downpour.errors import JobFailed, ProtocolError, RemoteError, RequestTimeout, TransportError
from downpour.protocol.codec import decode, encode
from downpour.protocol.messages import REPLY_OPS, Message, Op
from downpour.transport import Channel, Context, Poller, Security, UnixChannel, unix_path

log = logging.getLogger(__name__)

_ABORT_CHECK_S = 0.2  # how often a waiting future looks at the abort flag


class Future:
    """The eventual reply to one request."""

    __slots__ = ("_client", "peer", "req_id", "deadline", "_reply", "_op", "sent", "received", "ready_at")

    def __init__(self, client: RpcClient, peer: str, req_id: int, op: Op, deadline: float) -> None:
        self._client = client
        self.peer = peer
        self.req_id = req_id
        self.deadline = deadline
        self._reply: Message | None = None
        self._op = op
        # (header bytes, all bytes) of the request and of its reply: for byte accounting.
        self.sent = (0, 0)
        self.received = (0, 0)
        self.ready_at = 0.0  # a simulated slow link delivers the reply no earlier than this

    def done(self) -> bool:
        if self._reply is None:
            self._client.pump(0.0)
        return self._reply is not None

    def expired(self) -> bool:
        """No reply and past the deadline (the request is then forgotten)."""
        if self._reply is None and time.monotonic() > self.deadline:
            self._client._forget(self.req_id)
            return True
        return False

    def result(self, timeout_s: float | None = None) -> Message:
        """The reply. Raises :class:`RemoteError` if the peer answered with an error,
        :class:`RequestTimeout` (naming the peer) if no reply came before the request's
        deadline or ``timeout_s``, whichever is first."""
        deadline = self.deadline if timeout_s is None else min(self.deadline, time.monotonic() + timeout_s)
        while self._reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._client._forget(self.req_id)
                raise RequestTimeout(
                    f"{self._op.name} to {self.peer} got no reply within {self._client.request_timeout_s:g}s "
                    f"(is {self.peer} alive?)",
                    peer=self.peer,
                )
            abort = self._client.abort
            if abort is not None and abort.is_set():
                self._client._forget(self.req_id)
                raise JobFailed(f"{self._client.node}: {self._client.abort_reason()}", node=self._client.node)
            if self._client.on_wait is not None:  # e.g. apply a peer's new address (it may answer this future)
                self._client.on_wait()
                if self._reply is not None:
                    break
            self._client.pump(min(left, _ABORT_CHECK_S))
        wait = self.ready_at - time.monotonic()
        if wait > 0:  # the reply is still "on the wire" of the simulated link
            time.sleep(wait)
        reply = self._reply
        if reply.op == Op.ERROR:
            raise RemoteError(
                f"{self.peer} refused {self._op.name}: {reply.meta.get('error', '?')}",
                peer=self.peer,
                code=str(reply.meta.get("code", "")),
            )
        return reply

    def _resolve(self, reply: Message) -> None:
        self._reply = reply


class RpcClient:
    """Requests to named peers, each over its own channel."""

    def __init__(
        self,
        ctx: Context,
        node: str,
        request_timeout_s: float,
        max_message_bytes: int = 1 << 30,
        on_push: Callable[[str, Message], None] | None = None,
        abort: threading.Event | None = None,
        abort_reason: Callable[[], str] = lambda: "aborted",
        security: Security | None = None,
        link_bytes_per_s: float | None = None,
        unix_sockets: bool = False,
    ) -> None:
        """``abort``: when set (by another thread), every wait ends with :class:`JobFailed`
        carrying ``abort_reason()`` instead of waiting out its timeout. ``security``: the node's
        CURVE keys (every channel then authenticates and encrypts). ``link_bytes_per_s``
        simulates a slow network link (each direction its own): a send returns only after its
        bytes would have left, a reply is delivered only after its bytes would have arrived.
        ``unix_sockets``: a peer at an ``ipc://`` address that also listens on a Unix socket
        (transport/uds.py) is reached there (one wake-up per message instead of ZeroMQ's three);
        never with ``security``."""
        self.link_bytes_per_s = link_bytes_per_s
        self._link_out = 0.0  # when the simulated link is free again, each direction
        self._link_in = 0.0
        self.ctx = ctx
        self.security = security
        self._on_push = on_push
        self._held: list[tuple[str, Message]] = []  # unprompted messages that came before on_push was set
        self.abort = abort
        self.abort_reason = abort_reason
        self.node = node
        self.request_timeout_s = request_timeout_s
        self.max_message_bytes = max_message_bytes
        self.unix_sockets = unix_sockets and security is None
        self._channels: dict[str, Channel | UnixChannel] = {}
        self._names: dict[Channel | UnixChannel, str] = {}
        self._poller = Poller()
        self._pending: dict[int, Future] = {}
        self._next_id = 1
        self.bytes_sent = 0  # header and tensor frames, every message (for monitoring)
        self.bytes_received = 0
        # Called (on this client's thread) whenever a wait looks at the abort flag, before it polls.
        self.on_wait: Callable[[], None] | None = None

    def connect(self, peer: str, address: str, role: str = "server") -> None:
        """Connect to ``peer`` at ``address``; ``role`` is the peer's (whose public key it must hold)."""
        if peer in self._channels:
            return
        ch: Channel | UnixChannel | None = None
        path = unix_path(address) if self.unix_sockets else None
        if path is not None and os.path.exists(path):
            try:
                ch = UnixChannel(path, self.node.encode(), self.max_message_bytes, self.request_timeout_s)
            except TransportError as err:  # (a listener that went away: ZeroMQ's socket still serves, or waits)
                log.info("%s: %s; using %s", self.node, err, address)
        if ch is None:
            ch = Channel(self.ctx, address, identity=self.node.encode(), security=self.security, server_role=role,
                         send_timeout_s=self.request_timeout_s)
        self._channels[peer] = ch
        self._names[ch] = peer
        self._poller.register(ch)

    def reconnect(self, peer: str, address: str, role: str = "server") -> int:
        """``peer`` moved to ``address`` (a replacement process): connect there instead, and end
        every request still waiting on the old one with ERROR ``peer_replaced``. Returns how many."""
        old = self._channels.pop(peer, None)
        if old is not None:
            self._poller.unregister(old)
            self._names.pop(old, None)
            old.close()
        self.connect(peer, address, role)
        lost = [f for f in self._pending.values() if f.peer == peer]
        for fut in lost:
            self._pending.pop(fut.req_id, None)
            fut._resolve(Message(Op.ERROR, fut.req_id, {"code": "peer_replaced", "error": f"{peer} was replaced by a new process"}))
        return len(lost)

    def peers(self) -> list[str]:
        return list(self._channels)

    def request(self, peer: str, msg: Message, timeout_s: float | None = None) -> Future:
        """Send ``msg`` to ``peer`` now; the reply arrives through the returned future."""
        msg.req_id = self._next_id
        self._next_id += 1
        fut = Future(self, peer, msg.req_id, msg.op, time.monotonic() + (timeout_s or self.request_timeout_s))
        self._pending[msg.req_id] = fut
        frames = encode(msg)
        size = sum(len(f) for f in frames)
        fut.sent = (len(frames[0]), size)
        self.bytes_sent += size
        try:
            self._channels[peer].send(frames)
        except TransportError:
            self._pending.pop(msg.req_id, None)
            raise
        if self.link_bytes_per_s:
            now = time.monotonic()
            self._link_out = max(now, self._link_out) + size / self.link_bytes_per_s
            time.sleep(self._link_out - now)
        return fut

    def call(self, peer: str, msg: Message, timeout_s: float | None = None) -> Message:
        return self.request(peer, msg, timeout_s).result()

    def pump(self, timeout_s: float) -> None:
        """Receive whatever arrives within ``timeout_s`` (at least one poll)."""
        for ch in self._poller.poll(timeout_s):
            while ch.ready():
                self._dispatch(self._names[ch], ch.recv())
            if getattr(ch, "closed", False):  # a Unix channel whose listener went: its requests time out
                self._poller.unregister(ch)

    def _dispatch(self, peer: str, frames: list) -> None:
        size = sum(len(f) for f in frames)
        self.bytes_received += size
        try:
            msg = decode(frames, self.max_message_bytes)
        except ProtocolError as err:
            log.warning("%s: dropped a malformed message from %s: %s", self.node, peer, err)
            return
        if msg.op in REPLY_OPS:
            fut = self._pending.pop(msg.req_id, None)
            if fut is not None:
                fut.received = (len(frames[0]), size)
                if self.link_bytes_per_s:
                    self._link_in = max(time.monotonic(), self._link_in) + size / self.link_bytes_per_s
                    fut.ready_at = self._link_in
                fut._resolve(msg)
        elif self._on_push is not None:
            self._on_push(peer, msg)
        else:
            self._held.append((peer, msg))

    @property
    def on_push(self) -> Callable[[str, Message], None] | None:
        return self._on_push

    @on_push.setter
    def on_push(self, fn: Callable[[str, Message], None] | None) -> None:
        """Set the handler of unprompted messages; messages held so far are handed to it now."""
        self._on_push = fn
        held, self._held = self._held, []
        for peer, msg in held:
            if fn is not None:
                fn(peer, msg)

    def _forget(self, req_id: int) -> None:
        self._pending.pop(req_id, None)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        self._names.clear()
        self._pending.clear()
