"""Unix stream sockets for requests between processes of one machine: one wake-up per message.

A ZeroMQ message crosses four threads: the sender's, its ZeroMQ I/O thread, the receiver's I/O
thread, then the receiver's; each hand-over is a wake-up and a context switch. Measured on a
2-core VM (benchmarks/RESULTS.md §23) a small round trip costs ~99 µs of CPU that way against
~5 µs over a Unix socket, where the receiving thread reads the sender's bytes itself. A local
job's workers and servers therefore talk over a Unix socket beside each server's ZeroMQ one
(``cluster.unix_sockets``); everything else (the coordinator, replication, other hosts) stays on
ZeroMQ.

* :class:`UnixListener`: a server's listening socket at :func:`unix_path` of its ipc address,
  with the same ``recv``/``ready``/``send(peer, frames)`` as :class:`~downpour.transport.Listener`.
  Peers are named by the identity their channel sends first, as a ZeroMQ DEALER's is.
* :class:`UnixChannel`: a requester's connection, with :class:`~downpour.transport.Channel`'s
  ``send``/``recv``/``ready``.
* :class:`Both`: a ZeroMQ listener and a Unix one behind one listener's interface (a reply
  goes back the way its peer's last request came).

Wire format, per message: ``<total:u32> <count:u32> <length:u32> × count`` then the frames'
bytes (``total`` counts what follows itself). Frames arrive as they were sent: the layers
above decode and validate them exactly as ZeroMQ's. What this module checks: the lengths add
up, ``count`` is at most :data:`MAX_FRAMES`, a message is at most the listener's byte limit,
and the first message of a connection is its identity (1–255 bytes). A connection that breaks
any of these is closed, logged once, and the listener goes on with the others.

Who may connect: the socket lives in the job's socket folder (0700, this user's), and a
listener also refuses a peer whose credentials (``SO_PEERCRED``) are another user's. Jobs with
CURVE keys (tcp) never use it.

Back-pressure: a listener never blocks on a peer. What the kernel does not take at once is
queued per connection and written when the socket can take more (the listener's ``ready``
does it, woken by its epoll set); a connection whose queue passes :data:`MAX_QUEUED_BYTES`
is closed (its peer stopped reading). A channel's ``send`` waits until the kernel took the
message, at most ``send_timeout_s``; past that, or once the listener is gone, the channel is
closed and its requests end by their own timeouts, as ZeroMQ's would with a dead peer.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from downpour.errors import TransportError

log = logging.getLogger(__name__)

MAX_FRAMES = 8192
MAX_QUEUED_BYTES = 256 << 20  # a listener's unsent bytes to one peer before it gives up on that peer
_HEAD = struct.Struct("<II")
_READ = 1 << 18  # bytes read per recv
_READS = 64  # reads per look at a connection
_IOV = 512  # buffers per sendmsg (the kernel's IOV_MAX is 1024): more are joined first


def unix_path(address: str) -> str | None:
    """Where the Unix socket beside a server's ZeroMQ ``ipc://…/NAME.sock`` listens (None: the
    address is not an ipc one, so there is none)."""
    if not address.startswith("ipc://") or not address.endswith(".sock"):
        return None
    return address[len("ipc://") : -len(".sock")] + ".uds"


def _frames_of(frames: Sequence[Any]) -> list[memoryview]:
    out = []
    for f in frames:
        buf = getattr(f, "buffer", f)  # (zmq.Frame)
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        out.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
    return out


def _pack(frames: Sequence[Any]) -> list[memoryview | bytes]:
    """One message as buffers for sendmsg: the head, then the frames themselves (no copy)."""
    views = _frames_of(frames)
    count = len(views)
    lengths = [v.nbytes for v in views]
    head = _HEAD.pack(4 + 4 * count + sum(lengths), count) + struct.pack(f"<{count}I", *lengths)
    parts: list[memoryview | bytes] = [head, *views]
    if len(parts) > _IOV:
        parts = [b"".join(parts)]
    return parts


def _advance(parts: list, sent: int) -> list:
    """What is left of ``parts`` after ``sent`` bytes went, copied (the caller's buffers may change)."""
    rest = []
    for p in parts:
        n = len(p) if isinstance(p, bytes) else p.nbytes
        if sent >= n:
            sent -= n
            continue
        rest.append(bytes(p[sent:]))
        sent = 0
    return rest


class _Reader:
    """Messages out of a byte stream, kept as separate buffers (a message's frames are views of
    its own buffer, which nothing reuses: the layers above may keep tensors over them)."""

    __slots__ = ("buf", "big", "got", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.buf = bytearray()
        self.big: bytearray | None = None  # a message larger than one read, filled in place
        self.got = 0
        self.max_bytes = max_bytes

    def feed(self, sock: socket.socket, into: deque) -> bool:
        """Read what ``sock`` has; complete messages go to ``into`` as frame lists. False: the
        peer closed. Raises TransportError on a malformed stream."""
        for _ in range(_READS):  # (bounded: one busy peer cannot keep the node reading; it is polled again)
            try:
                if self.big is not None:
                    n = sock.recv_into(memoryview(self.big)[self.got :])
                    if n == 0:
                        return False
                    self.got += n
                    if self.got == len(self.big):
                        into.append(self._split(memoryview(self.big)))
                        self.big = None
                    continue
                data = sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                return True
            if not data:
                return False
            self.buf += data
            self._parse(into)
        return True

    def _parse(self, into: deque) -> None:
        buf = self.buf
        at = 0
        while len(buf) - at >= _HEAD.size:
            total, count = _HEAD.unpack_from(buf, at)
            if total > self.max_bytes + 4 * (MAX_FRAMES + 1) or count > MAX_FRAMES or 4 + 4 * count > total:
                raise TransportError(f"a message of {total} bytes in {count} frames (limits: {self.max_bytes} bytes, {MAX_FRAMES} frames)")
            end = at + 4 + total
            if end > len(buf):
                if total > _READ:  # the rest goes straight into the message's own buffer
                    self.big = bytearray(total)
                    have = len(buf) - at - 4
                    self.big[:have] = buf[at + 4 :]
                    self.got = have
                    at = len(buf)
                break
            into.append(self._split(memoryview(bytes(buf[at + 4 : end]))))
            at = end
        del buf[:at]

    def _split(self, body: memoryview) -> list[memoryview]:
        count = struct.unpack_from("<I", body, 0)[0]
        lengths = struct.unpack_from(f"<{count}I", body, 4)
        at = 4 + 4 * count
        if at + sum(lengths) != len(body):
            raise TransportError(f"frame lengths add up to {sum(lengths)} bytes, the message holds {len(body) - at}")
        frames = []
        for n in lengths:
            frames.append(body[at : at + n])
            at += n
        return frames


class _Conn:
    __slots__ = ("sock", "peer", "reader", "out", "queued", "writing")

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self.sock = sock
        self.peer: bytes | None = None  # the identity, from the first message
        self.reader = _Reader(max_bytes)
        self.out: deque = deque()  # buffers the kernel did not take yet
        self.queued = 0
        self.writing = False  # registered for EPOLLOUT


class UnixListener:
    """A listening Unix stream socket at ``path`` (removed by :meth:`close`)."""

    def __init__(self, path: str, max_message_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_message_bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.sock.bind(path)
            self.sock.listen(256)
        except OSError as err:
            self.sock.close()
            raise TransportError(f"cannot listen at {path}: {err}") from None
        self.sock.setblocking(False)
        self.poll = select.epoll()  # readable whenever a connection or the listening socket is: the node's poller waits on it
        self.poll.register(self.sock.fileno(), select.EPOLLIN)
        self._conns: dict[int, _Conn] = {}
        self._by_peer: dict[bytes, _Conn] = {}
        self._inbox: deque = deque()  # (peer, frames)
        self.dropped = 0  # connections closed for a malformed stream or a peer that stopped reading
        self._uid = os.getuid()

    def fileno(self) -> int:
        return self.poll.fileno()

    def knows(self, peer: bytes) -> bool:
        return peer in self._by_peer

    def set_limit(self, max_message_bytes: int) -> None:
        """The largest message taken from now on, on open connections too (a larger one closes its connection)."""
        self.max_bytes = max_message_bytes
        for conn in self._conns.values():
            conn.reader.max_bytes = max_message_bytes

    def pending(self) -> bool:
        """A message is read and waiting (the poller will not say so again)."""
        return bool(self._inbox)

    def ready(self) -> bool:
        if not self._inbox:
            self._service()
        return bool(self._inbox)

    def recv(self) -> tuple[bytes, list]:
        return self._inbox.popleft()

    def _service(self) -> None:
        for fd, events in self.poll.poll(0):
            if fd == self.sock.fileno():
                self._accept()
                continue
            conn = self._conns.get(fd)
            if conn is None:
                continue
            if events & select.EPOLLOUT and not self._flush(conn):
                continue
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._read(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # (EMFILE and the like: the peer's connect fails, the listener goes on)
                log.warning("unix listener %s: cannot accept: %s", self.path, err)
                return
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != self._uid:
                log.warning("unix listener %s: refused a connection from user %d", self.path, uid)
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, self.max_bytes)
            self._conns[sock.fileno()] = conn
            self.poll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, conn: _Conn) -> None:
        got: deque = deque()
        why: str | None = None
        try:
            alive = conn.reader.feed(conn.sock, got)
        except TransportError as err:  # (the messages complete before the bad one still count)
            alive, why = False, f"malformed stream: {err}"
        except OSError as err:
            alive, why = False, None if err.errno in (errno.ECONNRESET, errno.EPIPE) else str(err)
        for frames in got:
            if conn.peer is None:  # the first message names the peer
                ident = bytes(frames[0]) if len(frames) == 1 else b""
                if not 0 < len(ident) <= 255 or ident[0] == 0:
                    alive, why = False, f"the first message must be an identity of 1 to 255 bytes ({len(frames)} frame(s))"
                    break
                conn.peer = ident
                self._by_peer[ident] = conn  # (a peer that connects again takes its name over)
                continue
            self._inbox.append((conn.peer, frames))
        if not alive:
            self._drop(conn, why)

    def _drop(self, conn: _Conn, why: str | None) -> None:
        if why is not None:
            self.dropped += 1
            log.warning("unix listener %s: closed the connection of %r: %s", self.path, conn.peer, why)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is None:
            return
        try:
            self.poll.unregister(fd)
        except OSError:
            pass
        conn.sock.close()
        if conn.peer is not None and self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]

    def send(self, peer: bytes, frames: Sequence[Any]) -> bool:
        """Send to ``peer`` if it is connected here (False: it is not). Never blocks."""
        conn = self._by_peer.get(peer)
        if conn is None:
            return False
        parts = _pack(frames)
        if conn.out:
            self._queue(conn, _advance(parts, 0))
            return True
        try:
            sent = conn.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)  # the peer is gone: its reply is dropped, as ZeroMQ drops one to a vanished peer
            return True
        rest = _advance(parts, sent)
        if rest:
            self._queue(conn, rest)
        return True

    def _queue(self, conn: _Conn, rest: list) -> None:
        conn.out.extend(rest)
        conn.queued += sum(len(r) for r in rest)
        if conn.queued > MAX_QUEUED_BYTES:
            self._drop(conn, f"{conn.queued} bytes of replies unread")
            return
        if not conn.writing:
            conn.writing = True
            self.poll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: _Conn) -> bool:
        """Write queued bytes; False if the connection was closed."""
        while conn.out:
            head = conn.out[0]
            try:
                n = conn.sock.send(head)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._close(conn)
                return False
            conn.queued -= n
            if n < len(head):
                conn.out[0] = head[n:]
                return True
            conn.out.popleft()
        conn.writing = False
        self.poll.modify(conn.sock.fileno(), select.EPOLLIN)
        return True

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self.poll.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class UnixChannel:
    """A connection to the :class:`UnixListener` at ``path``, as ``identity``. Raises
    TransportError if nothing listens there."""

    def __init__(self, path: str, identity: bytes, max_message_bytes: int = 1 << 30, send_timeout_s: float = 30.0) -> None:
        self.address = path
        self.send_timeout_s = send_timeout_s
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.socket.connect(path)
        except OSError as err:
            self.socket.close()
            raise TransportError(f"cannot connect to {path}: {err}") from None
        self.socket.setblocking(False)
        self.closed = False
        self._reader = _Reader(max_message_bytes)
        self._inbox: deque = deque()
        self.send([identity])

    def send(self, frames: Sequence[Any]) -> None:
        """Hand the message to the kernel, waiting (at most ``send_timeout_s``) while the listener
        is behind; a channel that cannot send is closed (its requests then time out)."""
        if self.closed:
            return
        parts = _pack(frames)
        deadline = None
        while parts:
            try:
                sent = self.socket.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                self._close(f"send failed: {err}")
                return
            parts = _advance(parts, sent) if sent else parts
            if parts:
                now = time.monotonic()
                deadline = deadline or now + self.send_timeout_s
                if now >= deadline:
                    self._close(f"the listener took nothing for {self.send_timeout_s:.0f}s")
                    return
                select.select([], [self.socket], [], deadline - now)

    def ready(self) -> bool:
        if not self._inbox and not self.closed:
            try:
                alive = self._reader.feed(self.socket, self._inbox)
            except TransportError as err:
                self._close(f"malformed stream: {err}")
                return bool(self._inbox)
            except OSError as err:
                self._close(str(err))
                return bool(self._inbox)
            if not alive:
                self._close(None)
        return bool(self._inbox)

    def recv(self) -> list:
        if not self._inbox and not self.ready():
            raise BlockingIOError("no message waiting")
        return self._inbox.popleft()

    def _close(self, why: str | None) -> None:
        if why is not None:
            log.warning("unix channel to %s closed: %s", self.address, why)
        self.closed = True

    def close(self) -> None:
        self.closed = True
        self.socket.close()


class Both:
    """A node's ZeroMQ listener and its Unix one as one listener: requests from either, each
    reply back the way its peer's requests come (a peer connected over the Unix socket is
    answered there). Everything else (address, security, limits) is the ZeroMQ listener's."""

    def __init__(self, zmq_listener: Any, unix: UnixListener) -> None:
        self.zmq, self.unix = zmq_listener, unix
        self.address = zmq_listener.address
        self.security = zmq_listener.security
        self.socket = zmq_listener.socket
        self._zmq_first = False  # which side recv looks at first (alternates)

    def pollables(self) -> list[Any]:
        return [self.zmq.socket, self.unix]

    def limit(self, max_message_bytes: int, timeout_s: float = 5.0) -> None:
        self.zmq.limit(max_message_bytes, timeout_s)
        self.unix.set_limit(max_message_bytes)

    def pending(self) -> bool:
        return self.unix.pending()

    def ready(self) -> bool:
        return self.unix.ready() or self.zmq.ready()

    def recv(self) -> tuple[bytes, list]:
        # Taken from each side in turn when both have messages: a busy Unix side (the machine's
        # workers) never starves the ZeroMQ one (the coordinator, backups, other hosts), nor the reverse.
        self._zmq_first = not self._zmq_first
        if self._zmq_first and self.zmq.ready():
            return self.zmq.recv()
        if self.unix.pending() or self.unix.ready():
            return self.unix.recv()
        return self.zmq.recv()

    def peer_role(self, frames: list) -> str | None:
        return self.zmq.peer_role(frames)

    def peer_rank(self, frames: list) -> int | None:
        return self.zmq.peer_rank(frames)

    def send(self, peer: bytes, frames: Sequence[Any], track: bool = False) -> list:
        if self.unix.send(peer, frames):
            return []  # (copied into the kernel or a queue: nothing lent)
        return self.zmq.send(peer, frames, track)

    def close(self) -> None:
        self.unix.close()
        self.zmq.close()
