"""The coordinator's contract as seen by servers and workers.

:class:`CoordinatorClient` wraps every request a node makes to the coordinator
(register, heartbeat, barrier, data shards, done, report). Each method states
when it returns; all of them time out with an error naming the coordinator.
:class:`Heartbeat` is driven by the caller's loop (or a thread of its own) and
never blocks.

A coordinator may die and be restarted on the same address (it picks up the job
from its saved state, see :mod:`downpour.coordinator.persist`); what the old
process had not answered is lost. So a request that gets no answer within a
short attempt is sent again, until its own time limit; the coordinator takes a
repeat as the same request (the same shard, the same registration, one place
in a barrier).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from downpour.errors import RequestTimeout, TransportError
from downpour.protocol import Message, Op
from downpour.protocol.ops import ATTEMPT_S
from downpour.protocol.rpc import Future, RpcClient
from downpour.transport import Context, Security

COORDINATOR = "coordinator"
log = logging.getLogger(__name__)


def connection_id(role: str, rank: int | None) -> str:
    """The routing id a node registers with: the coordinator takes the node's requests only from
    it (and from it + ``.hb``, the heartbeat connection), so it holds 128 random bits."""
    return f"{role}-{rank if rank is not None else '?'}-{uuid.uuid4().hex}"


class LeaveWait(Protocol):
    def wait(self, timeout_s: float) -> bool: ...


class CoordinatorClient:
    def __init__(
        self,
        ctx: Context,
        address: str,
        identity: str,
        request_timeout_s: float = 30.0,
        on_push: Callable[[str, Message], None] | None = None,
        abort: threading.Event | None = None,
        abort_reason: Callable[[], str] = lambda: "aborted",
        security: Security | None = None,
        attempt_s: float = ATTEMPT_S,
    ) -> None:
        """``request_timeout_s``: how long a request may go unanswered (its attempts together),
        unless the call gives its own limit; ``attempt_s``: after how long it is sent again."""
        self.identity = identity
        self.attempt_s = attempt_s
        self.rpc = RpcClient(ctx, identity, request_timeout_s, on_push=on_push, abort=abort, abort_reason=abort_reason,
                             security=security)
        self.rpc.connect(COORDINATOR, address, role="coordinator")
        self.node = identity
        self.address, self.secured = address, security is not None
        self._done: list[int] | None = None  # a finished shard not reported yet: [epoch, shard, examples]
        self._done_progress: dict[str, Any] = {}  # and the worker's counters then ({"progress": {steps, examples}})

    def configure(self, request_timeout_s: float, attempt_s: float) -> None:
        """The job's limits, once it is known (``cluster.coordinator_timeout_s``, ``heartbeat_timeout_s``)."""
        self.rpc.request_timeout_s, self.attempt_s = request_timeout_s, attempt_s

    def call(self, op: Op, meta: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Send ``op`` and return the answer; sent again every ``attempt_s`` without one, for
        ``timeout_s`` (default: the client's request timeout) in all."""
        return self.call_message(op, meta, timeout_s).meta

    def call_message(self, op: Op, meta: dict[str, Any] | None = None, timeout_s: float | None = None,
                     tensors: list | None = None) -> Message:
        """:meth:`call` with tensor frames, returning the whole answer (its tensors too)."""
        if self._done is not None and op != Op.NEXT_SHARD:  # reported before anything else is asked
            self._report_done(timeout_s)
        limit = self.rpc.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                return self.rpc.call(COORDINATOR, Message(op, meta=dict(meta or {}, node=self.node), tensors=list(tensors or [])),
                                     min(self.attempt_s, left))
            except RequestTimeout:
                pass
        keys = "; do this node's keys belong to the job? CURVE drops a handshake with other keys silently" if self.secured else ""
        raise RequestTimeout(f"{op.name} to the coordinator got no reply within {limit:g}s (is the coordinator alive and "
                             f"listening at {self.address}{keys}?)", peer=COORDINATOR)

    def register(self, role: str, rank: int | None, address: str | None, timeout_s: float,
                 hosted_by: str | None = None, promoted: bool = False) -> dict[str, Any]:
        """Join the job. Returns once the coordinator admitted this node (for a worker: once
        every server and worker of the job registered): node name, rank, job, layout, servers.
        ``hosted_by``: the server whose process this one runs in (it took over a lost rank);
        ``promoted``: it is that rank's backup, promoted (it loads no checkpoint)."""
        meta = {"role": role, "rank": rank, "address": address, "host": socket.gethostname(), "pid": os.getpid(),
                "hosted_by": hosted_by, **({"promoted": True} if promoted else {})}
        reply = self.call(Op.REGISTER, meta, timeout_s)
        self.node = reply["node"]
        return reply

    def barrier(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Returns when every live worker reached barrier ``name``."""
        return self.call(Op.BARRIER, {"name": name}, timeout_s)

    def next_shard(self, leave: threading.Event | LeaveWait | None = None) -> dict[str, Any] | None:
        """The next data shard to train ({epoch, shard, start, stop}), or None when none is left.
        While other workers still hold shards (one may come back if its worker dies) the
        coordinator says wait: this asks again until it gets a shard or a final None (a stop of
        the job ends the wait through the abort flag, as every request does). ``leave``: an event
        (or anything with its ``wait``) that ends the wait with None (this worker is to leave: a
        graceful stop)."""
        while True:
            reply = self.call(Op.NEXT_SHARD, {"done": self._done, **self._done_progress} if self._done is not None else None)
            self._done = None  # (answered: the coordinator took it)
            wait = reply.get("wait_s")
            if reply.get("shard") is not None or not isinstance(wait, (int, float)) or wait <= 0:
                return reply.get("shard")
            if leave is not None and leave.wait(min(float(wait), 1.0)):
                return None
            if leave is None:
                time.sleep(min(float(wait), 1.0))

    def leave(self, position: list[int] | None, stats: dict[str, Any], timeout_s: float) -> None:
        """Leave the running job cleanly: the coordinator puts this worker's unfinished shards
        back (the one it was in resumes after ``position``) and keeps ``stats``."""
        self.call(Op.LEAVE, {"position": position, "stats": stats}, timeout_s)

    def shard_done(self, epoch: int, shard: int, examples: int, steps: int | None = None, trained: int | None = None,
                   pushes: int | None = None) -> None:
        """Report a finished shard. It travels with the next NEXT_SHARD (one request per shard, not
        two); any other request of this client reports it first, on its own. ``steps``, ``trained``
        and ``pushes``: this worker's steps, examples and pushes so far, which the coordinator counts
        from then on (were the worker to die before its next heartbeat, the shard is not trained
        again: its steps count)."""
        if self._done is not None:
            self._report_done()
        self._done = [epoch, shard, examples]
        progress = {"steps": steps, "examples": trained, **({"pushes": pushes} if pushes is not None else {})}
        self._done_progress = {"progress": progress} if steps is not None and trained is not None else {}

    def _report_done(self, timeout_s: float | None = None) -> None:
        (epoch, shard, examples), self._done = self._done, None
        self.call(Op.SHARD_DONE, {"epoch": epoch, "shard": shard, "examples": examples, **self._done_progress}, timeout_s)

    def worker_done(self, stats: dict[str, Any], timeout_s: float,
                    buffers: tuple[list[str], list] | None = None) -> Message:
        """Returns once every worker finished training; ``evaluate`` (meta) says whether this one
        evaluates. ``buffers``: the model's buffers as (names, tensors), sent as frames; the
        evaluator's answer carries the merged ones the same way (meta ``buffers``: their names)."""
        names, tensors = buffers or ([], [])
        return self.call_message(Op.WORKER_DONE, {"stats": stats, **({"buffers": names} if names else {})}, timeout_s, tensors)

    def report(self, kind: str, data: dict[str, Any], timeout_s: float | None = None) -> None:
        """Hand the coordinator a result (``eval``, ``server`` stats) or this node's fatal ``error``."""
        self.call(Op.REPORT, {"kind": kind, "data": data}, timeout_s)

    def close(self) -> None:
        self.rpc.close()


class Heartbeat:
    """Sends a heartbeat every ``interval_s`` and watches the answers.

    ``tick()`` returns the coordinator's stop reason once it asked the node to
    stop, else None; it raises :class:`TransportError` when the coordinator has
    not answered for ``timeout_s`` (the node should then exit). A heartbeat
    unanswered for a couple of intervals is given up and the next one goes out
    at once, so a restarted coordinator hears from every node within moments.
    """

    def __init__(self, client: CoordinatorClient, interval_s: float, timeout_s: float,
                 on_reply: Callable[[dict[str, Any]], None] | None = None, extra: dict[str, Any] | None = None) -> None:
        """``on_reply`` sees every heartbeat answer (a server takes the membership from it);
        ``extra`` goes into every heartbeat (for example ``metrics``: this node's metrics address)."""
        self.client = client
        self.extra = dict(extra or {})
        self.on_reply = on_reply
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.attempt_s = min(timeout_s, max(2 * interval_s, 2.0))
        self._fut: Future | None = None
        self._last_ok = time.monotonic()
        self.declared_dead = False  # the coordinator's stop said this node was declared dead
        self._next = 0.0

    @property
    def answered_at(self) -> float:
        """When (time.monotonic) the coordinator last answered a heartbeat (at first: when this was made)."""
        return self._last_ok

    def tick(self, progress: Callable[[], dict[str, Any]] | None = None) -> str | None:
        """``progress`` is called only when a heartbeat goes out (so it may cost a little)."""
        now = time.monotonic()
        if self._fut is not None and self._fut.done():
            fut, self._fut = self._fut, None
            meta = fut.result().meta
            self._last_ok = now
            if self.on_reply is not None:
                self.on_reply(meta)
            if meta.get("stop"):
                self.declared_dead = meta.get("dead") is True  # (its work went to others: a replacement takes the rank)
                return str(meta["stop"])
        elif self._fut is not None and self._fut.expired():  # lost (the coordinator may have restarted)
            self._fut, self._next = None, now
        if now - self._last_ok > self.timeout_s:
            raise TransportError(f"{self.client.node}: coordinator silent for {now - self._last_ok:.1f}s; giving up")
        if self._fut is None and now >= self._next:
            self._next = now + self.interval_s
            meta = {**self.extra, "node": self.client.node, "progress": progress() if progress else {}}
            msg = Message(Op.HEARTBEAT, meta=meta)
            self._fut = self.client.rpc.request(COORDINATOR, msg, timeout_s=self.attempt_s)
        return None


class RestoringHeartbeat:
    """Heartbeats marked ``restoring`` from a thread of its own while a server loads its state
    before serving (a checkpoint of a few hundred thousand rows takes seconds on a loaded machine,
    longer than ``cluster.heartbeat_timeout_s``): the coordinator keeps the node alive, not serving.

    Use as a context manager around the restore. It sends on a connection of its own (the routing
    id the node registered with + ``.hb``; a zmq socket stays on one thread) every ``interval_s``
    and gives up after ``limit_s`` (``cluster.startup_timeout_s``): a restore hung in a live
    process then goes silent and is declared dead, as the coordinator declares a node that
    heartbeats restoring for that long. ``reason``: the coordinator's stop order, if it gave one
    (the serve loop hears it again in its first heartbeat answer)."""

    def __init__(self, ctx: Context, address: str, identity: str, node: str, interval_s: float, limit_s: float,
                 security: Security | None = None) -> None:
        self.ctx, self.address, self.identity, self.node, self.security = ctx, address, identity, node, security
        self.interval_s, self.limit_s = interval_s, limit_s
        self.reason: str | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{node}-restoring-heartbeat", daemon=True)

    def __enter__(self) -> RestoringHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._halt.set()
        self._thread.join(timeout=5.0 + self.interval_s)

    @property
    def running(self) -> bool:
        """Whether heartbeats still go out (False once stopped, given up or told to stop)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        client = CoordinatorClient(self.ctx, self.address, f"{self.identity}.hb", security=self.security)
        client.node = self.node
        heartbeat = Heartbeat(client, self.interval_s, self.limit_s, extra={"restoring": True})
        give_up = time.monotonic() + self.limit_s
        try:
            while time.monotonic() < give_up:
                reason = heartbeat.tick()
                if reason is not None:
                    self.reason = reason
                    return
                if self._halt.wait(min(0.1, self.interval_s / 4)):
                    return
            log.warning("%s: still restoring after %gs (cluster.startup_timeout_s): no more heartbeats; "
                        "the coordinator declares it dead", self.node, self.limit_s)
        except (TransportError, RequestTimeout):  # the coordinator is silent: the serve loop finds out
            pass
        finally:
            client.close()
