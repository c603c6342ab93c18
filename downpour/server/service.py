"""The parameter-server process: register, then answer INIT/PULL/PUSH/PUSHPULL until told to stop.

One thread does everything (no locks, no GIL contention): it polls its
listener, decodes each request, validates it fully *before* touching the
shard, and answers. A bad request gets an ERROR reply (or, if even its header
is unreadable, is dropped) and is counted under ``rejected``; it never changes
a parameter and never stops the loop.

A server process may also take over a rank whose server died and got no
replacement (the coordinator asks, in a heartbeat answer): it then runs that
rank as a second server, on a thread of its own, loaded from the latest
checkpoint (:class:`HostedRanks`).

Why one module over 400 lines: the request handlers share one object's state (the store, the
consistency rounds, the sequence numbers of applied pushes, the counters) on one thread, and
``run_server`` is the process around it. What stands apart already lives beside it: update
rules (``optim.py``), consistency (``consistency.py``), sparse tables (``sparse.py``),
snapshots (``snapshot.py``), replication (``replica.py``), metrics (``metrics.py``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from downpour.compress import Codec, decode_push, pull_codec
from downpour.compress.plan import pull_request
from downpour.config import JobConfig, parse_job
from downpour.coordinator.client import COORDINATOR, CoordinatorClient, Heartbeat, RestoringHeartbeat, connection_id
from downpour.errors import DownpourError, ProtocolError, TransportError
from downpour.layout import Layout
from downpour.monitor import Buckets, HttpEndpoint, metrics_route, node_labels
from downpour.processes import EXIT_TERMINATED, REPEAT_S, TermSignal, apply_cpu_policy, die_by_sigterm
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.ops import MAX_GRADIENT, Code, validate
from downpour.protocol.schema import SchemaError
from downpour.protocol.throttle import LogOnce, RateLimit
from downpour.server.consistency import POLICIES, AsyncPolicy, Policy, Push, SyncPolicy, values_reply
from downpour.server.grouped import GroupedPolicy, key_modes
from downpour.server.kernels import KERNEL as DENSE_KERNEL
from downpour.server.kernels import float32_at_most, within
from downpour.server.lookahead import make_lookahead
from downpour.server.metrics import server_metrics
from downpour.server.optim import make_rule
from downpour.server.replays import is_replay, record
from downpour.server.replica import BackupHost, NullListener, PrimaryLink, changes_state, server_state
from downpour.server.scaling import Hyperparams
from downpour.server.snapshot import OldParams, Snapshotter, restore_store
from downpour.server.sparse import SparseShard
from downpour.server.store import ShardStore
from downpour.storage import CheckpointStore
from downpour.transport import (
    Both,
    Context,
    Listener,
    Poller,
    Security,
    SlotMaps,
    UnixListener,
    WouldBlock,
    advertised,
    bind_address,
    bound_name,
    slot_folder,
    unix_path,
)

log = logging.getLogger(__name__)

_POLL_S = 0.05  # longest idle wait between heartbeat/coordinator checks
_COORDINATOR_CHECK_S = 0.005  # how often a busy server looks for coordinator messages (MEMBERSHIP, stop)
_WORKER_OPS = frozenset({Op.INIT, Op.PULL, Op.PUSH, Op.PUSHPULL, Op.SPARSE})
_HELD_OPS = frozenset({Op.PUSH, Op.PUSHPULL, Op.SPARSE})  # held past an async cut by their meta.clock (snapshot.py)


# The float32 bound equal to MAX_GRADIENT for float32 values (what the compiled check compares).
_MAX_GRADIENT_F32 = float32_at_most(MAX_GRADIENT)


def bounded(what: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` if every value is finite and at most :data:`MAX_GRADIENT` in magnitude (so no update
    rule turns it into Inf); ProtocolError otherwise. No copy. One read-only pass over the values
    (server/kernels.py: compiled for float32 where built)."""
    if t.numel() and not within(t, _MAX_GRADIENT_F32 if t.dtype == torch.float32 else MAX_GRADIENT):
        raise ProtocolError(f"{what} values contain NaN or Inf, or exceed {MAX_GRADIENT:g} in magnitude")
    return t


class ParameterServer:
    """One shard of the job's parameters behind a listener."""

    def __init__(self, ctx: Context, job: JobConfig, layout: Layout, rank: int, listener: Listener, name: str,
                 planned_steps: int | None = None) -> None:
        self.job, self.rank, self.name = job, rank, name
        self.listener = listener
        self.store = ShardStore(layout.server_slices(rank), lambda n: make_rule(job.optimizer, job.effective_lr(), n))
        # The lr and momentum of each update: schedule and scaling (``planned_steps``: the job's length in job steps).
        self.hyper = self.store.hyper = Hyperparams(job, planned_steps)
        self.store.lookahead = make_lookahead(job, self.store)  # async_rule: lookahead's per-worker momentum
        self.store.max_keys = job.cluster.max_keys_per_request
        self.sparse = SparseShard(layout, rank, job.sparse, job.training.seed, job.cluster.max_sparse_ids_per_request)
        self.limit = RateLimit(job.cluster.max_requests_per_s)
        self.refusal_log = LogOnce()
        # What the job configured: the push codecs, the pull precision, local-SGD deltas.
        comp = job.compression
        self.push_codecs = {"none", comp.push.codec, *(g.push.codec for g in comp.groups)}
        self.pull_request = pull_request(comp)
        self.deltas = job.training.local_steps > 1
        self.staleness: Counter[int] = Counter()
        if job.training.consistency_groups:
            modes = key_modes(job.training, layout, rank)
            self.policy: Policy = GroupedPolicy(self.store, self._record_staleness, job.training, modes)
        else:
            self.policy = POLICIES[job.training.consistency](self.store, self._record_staleness, job.training)
            if isinstance(self.policy, (AsyncPolicy, SyncPolicy)):  # replies' values go straight into the request's slot
                self.policy.reply_slot = self._reply_slot
        self._pull_codecs: dict[tuple, Codec] = {}  # built once per distinct request ``pq``
        self.max_bytes = job.cluster.max_message_bytes
        self.counts: Counter[str] = Counter()
        self.members: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.apply_s = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        # For the metrics (None when the job turned them off: nothing is recorded).
        self.timing = job.monitor.metrics
        self.request_times: dict[Op, Buckets] = {op: Buckets() for op in self._HANDLERS}
        self.apply_times = Buckets()
        # Traffic per key, counted in transfers of the key's values (a push+pull is two):
        # requests for every key (the usual case) are one counter, others per key.
        self.full_transfers = 0
        self.key_transfers: Counter[int] = Counter()
        # Each worker's data position ([epoch, shard, examples of it done]) as of its last push here,
        # saved with the shard so that a resumed job continues from the same data.
        self.positions: dict[str, list[int]] = {}
        # Stream partitions (online learning): per "epoch:shard:TAG", the offset the last push of
        # that partition applied here ended at (TAG: a dense push's first key, or "s" for sparse
        # rows), saved with the shard. A stream push carries the offsets it covers, (from, pos[2]]:
        # it is applied when it starts at or before the mark and ends after it, answered without
        # being applied when it ends at or before it (its events are in this shard already), and
        # refused (stream_gap) when it starts after it. ``mark_floor``: the mark of tags not held
        # ("epoch:shard" -> offset; set when restored from a checkpoint of another layout).
        self.marks: dict[str, int] = {}
        self.mark_floor: dict[str, int] = {}
        self.snapshots = Snapshotter(self.store, rank, job.optimizer.name, name, self.sparse)
        self.snapshots.marks = lambda: self.marks
        self.snapshots.members = lambda: self.members
        # Pushes past an async checkpoint's cut, held until its copy is taken (snapshot.py): (peer, request).
        self._held: list[tuple[bytes, Message]] = []
        # Requesters on this machine (an ipc listener) may pass values through shared memory
        # (transport/shm.py): the slots they name, and where each request's reply values go.
        folder = slot_folder(listener.address) if job.cluster.shared_memory else None
        self.slots = SlotMaps(folder) if folder else None
        self._slot_out: dict[tuple[bytes, int], torch.Tensor] = {}
        # Each slot's tensor over its mapping, as its last request named it ((name, first value) ->
        # (mapping, tensor)): a worker names the same slot and range in every request, and a view costs a microsecond or two.
        self._slot_views: dict[tuple[str, int], tuple[object, torch.Tensor]] = {}
        # Replication (server/replica.py): the stream to this rank's backups (None: a backup's
        # own server, or a job without replicas), and the last push sequence number applied per
        # worker ("NAME" dense, "NAME/sparse"), so that a push replayed after a failover applies once.
        self.replicas: PrimaryLink | None = None
        self.applied: dict[str, int] = {}
        # Per worker's row stream, the seqs below its last applied one that never came here (sent
        # to a replaced primary, overtaken by a later one): applied when sent again (replays.py).
        self.skipped: dict[str, list[int]] = {}
        self.backup_host: BackupHost | None = None  # the backups this process keeps (for heartbeats)
        self.applied_seq = 0  # a backup's server: the last seq of its primary's stream it applied
        # A promoted backup: when it started serving, and how long until its first worker request.
        self.promoted_at: float | None = None
        self.first_request_s: float | None = None

    def adopt(self, listener: Listener, name: str) -> None:
        """A promoted backup starts serving under ``name`` behind ``listener``."""
        self.listener, self.name = listener, name
        self.promoted_at = time.monotonic()
        self.snapshots.node = name
        folder = slot_folder(listener.address) if self.job.cluster.shared_memory else None
        self.slots = SlotMaps(folder) if folder else None
        self._slot_views = {}
        self.limit = RateLimit(self.job.cluster.max_requests_per_s)

    def replicate(self) -> None:
        """Become a primary that keeps backups (they say hello on this server's listener)."""
        self.replicas = PrimaryLink(self.rank, self.job.cluster, lambda peer, frames: self.listener.send(peer, frames),
                                    lambda: server_state(self))

    def _record_staleness(self, s: int) -> None:
        # Exact up to 1023, then one bucket per power of two (keyed by its lower bound): a peer
        # pushing ever older versions cannot grow the histogram (and every stats()) without bound.
        self.staleness[s if s < 1024 else 1 << (s.bit_length() - 1)] += 1
        self.staleness_sum += s
        self.hyper.observe(s)
        if s > self.staleness_max:
            self.staleness_max = s

    def _count_transfer(self, idx: list[int], times: int) -> None:
        if idx is self.store.all:
            self.full_transfers += times
        else:
            for i in idx:
                self.key_transfers[i] += times

    # -- request handling ------------------------------------------------
    def handle(self, peer: bytes, frames: list) -> None:
        """One request: refused (answered ERROR with a :class:`Code`, counted) unless it passes every
        check; a handler that fails anyway answers ERROR ``internal`` and the loop goes on."""
        self.bytes_in += sum(map(len, frames))
        # A worker's own key: one rate window per key, whatever its connections.
        bound = self.listener.peer_rank(frames) if self.listener.security is not None else None
        if self.limit.over(peer if bound is None else b"key:worker-%d" % bound):
            self.rejected[Code.RATE_LIMITED] += 1  # dropped unanswered: answering would cost as much as serving
            return
        try:
            msg = decode(frames, self.max_bytes)
        except ProtocolError as err:
            log.debug("%s: malformed message from %r: %s", self.name, peer, err)
            if err.req_id is not None:
                self._send(peer, Message(Op.ERROR, err.req_id, {"code": Code.MALFORMED, "error": str(err)}))
            else:
                self.rejected[Code.MALFORMED] += 1  # nobody to answer: dropped and counted
            return
        try:
            self._handle(peer, frames, msg)
        except Exception as err:  # a bug, not the sender's fault: nothing was applied (checks come first)
            if self.refusal_log.first(peer):
                log.exception("%s: %s from %r failed: %s", self.name, msg.op.name, peer, err)
            self._reject(peer, msg, Code.INTERNAL, f"{self.name} failed to handle {msg.op.name}")

    def _handle(self, peer: bytes, frames: list, msg: Message) -> None:
        handler = self._HANDLERS.get(msg.op)
        if handler is None:
            self._reject(peer, msg, Code.BAD_OP, f"a server does not serve {msg.op.name}")
            return
        if self.listener.security is not None:
            role = self.listener.peer_role(frames)
            if role == "server" and msg.op in (Op.REPLICA_HELLO, Op.REPLICA_ACK):
                pass  # another server's backup of this rank
            elif role not in ("worker", "coordinator"):
                self._reject(peer, msg, Code.FORBIDDEN, f"a {role or 'foreign'} key may not use a server")
                return
            if role == "coordinator" and msg.op not in (Op.PULL, Op.SPARSE):
                self._reject(peer, msg, Code.FORBIDDEN, f"the coordinator's key may only read, not {msg.op.name}")
                return
            bound = self.listener.peer_rank(frames)
            if bound is not None and not bound_name(bound, peer.decode(errors="replace")):
                self._reject(peer, msg, Code.FORBIDDEN, f"worker-{bound}'s key cannot act as {peer.decode(errors='replace')!r:.40}")
                return
        try:
            validate(msg.op, msg.meta)
        except SchemaError as err:
            self._reject(peer, msg, Code.INVALID, str(err))
            return
        if "shm" in msg.meta or "into" in msg.meta:
            try:
                self._from_slot(peer, msg)
            except ProtocolError as err:
                self._reject(peer, msg, Code.INVALID, str(err))
                return
        if self.promoted_at is not None and self.first_request_s is None and msg.op in _WORKER_OPS:
            self.first_request_s = time.monotonic() - self.promoted_at
            log.info("%s: first request as the promoted primary, %.3fs after taking over", self.name, self.first_request_s)
        # (looked up only while a checkpoint is pending or requests are held: neither, usually)
        if msg.op in _HELD_OPS and (self.snapshots.armed is not None or self._held) and self._must_hold(peer, msg):
            self._held.append((peer, msg))  # past the pending checkpoint's cut: applied once the copy is taken
            self._take_snapshot()
            return
        self._dispatch(peer, msg)

    def _must_hold(self, peer: bytes, msg: Message) -> bool:
        """Is this push or SPARSE request past the pending checkpoint's cut? A SPARSE request that
        follows a held one of its worker is held too: their ``seq`` says which were applied."""
        return self.snapshots.holds(peer.decode(errors="replace"), msg.meta.get("clock")) or (
            msg.op == Op.SPARSE and any(p == peer and m.op == Op.SPARSE for p, m in self._held))

    def _dispatch(self, peer: bytes, msg: Message) -> None:
        """Run a checked request's handler and send its replies (to backups first)."""
        t0 = time.perf_counter()
        try:
            replies = self._HANDLERS[msg.op](self, peer, msg)
        except ProtocolError as err:
            self._reject(peer, msg, Code.INVALID, str(err))
            return
        if self.replicas is not None and changes_state(msg):  # backups get it before anyone hears of it
            replies = self.replicas.release(self.replicas.forward(peer, msg), replies)
        for to, reply in replies:
            self._send(to, reply)
        if self.timing:
            self.request_times[msg.op].observe(time.perf_counter() - t0)
        self._take_snapshot()

    def _take_snapshot(self) -> None:
        """Take the pending checkpoint's copy if its moment came; then apply the pushes held for it."""
        if self.snapshots.armed is not None and self.snapshots.maybe_take(self.positions):
            self._release_held()

    def _release_held(self) -> None:
        """Apply the held pushes, in the order they came, that the (new or no) pending checkpoint does not hold."""
        held, self._held = self._held, []
        for peer, msg in held:
            if self._must_hold(peer, msg):
                self._held.append((peer, msg))
            else:
                self._dispatch(peer, msg)

    def _from_slot(self, peer: bytes, msg: Message) -> None:
        """A request whose values are in a shared-memory slot (``meta.shm``: [name, numel]): they
        become the request's tensor, and the reply's values go back into the slot, or into the
        part of a slot ``meta.into`` names ([name, first value, numel]: a worker's parameters,
        which then take the pulled values in place)."""
        if self.slots is None:
            raise ProtocolError("this server takes no shared memory (it does not listen on an ipc socket)")
        shm, into = msg.meta.get("shm"), msg.meta.get("into")
        if msg.op not in (Op.INIT, Op.PULL, Op.PUSH, Op.PUSHPULL) or msg.tensors or "enc" in msg.meta:
            raise ProtocolError(f"{msg.op.name} with tensors, compression or of this kind cannot use shared memory")
        values = None
        if shm is not None:
            if not (isinstance(shm, list) and len(shm) == 2 and type(shm[1]) is int and shm[1] > 0):
                raise ProtocolError(f"meta.shm must be [slot name, number of values], got {shm!r}")
            values = self._slot_view(shm[0], 0, shm[1])
            if msg.op != Op.PULL:
                msg.tensors = [values]
                self.bytes_in += shm[1] * 4
        if into is not None:
            if msg.op not in (Op.PULL, Op.PUSHPULL):
                raise ProtocolError(f"{msg.op.name} is not answered with values: meta.into is for PULL and PUSHPULL")
            if not (isinstance(into, list) and len(into) == 3 and type(into[1]) is int and type(into[2]) is int
                    and into[1] >= 0 and into[2] > 0):
                raise ProtocolError(f"meta.into must be [slot name, first value, number of values], got {into!r}")
            if shm is not None and into[2] != shm[1]:
                raise ProtocolError(f"meta.into holds {into[2]} values, the request's slot {shm[1]}")
            values = self._slot_view(into[0], into[1], into[2])
        if values is not None and msg.op in (Op.PULL, Op.PUSHPULL):
            if len(self._slot_out) > 10_000:  # requests never answered (a worker that left): forget them
                self._slot_out.clear()
            self._slot_out[(peer, msg.req_id)] = values

    def _slot_view(self, name: object, first: int, numel: int) -> torch.Tensor:
        """``numel`` float32 values of slot ``name`` from value ``first`` on; ProtocolError if it is
        not a slot this server may map or holds fewer values."""
        try:
            buffer = self.slots.map(name)
        except TransportError as err:
            raise ProtocolError(str(err)) from None
        key = (name, first)
        view = self._slot_views.get(key)
        if view is not None and view[0] is buffer and view[1].numel() == numel:
            return view[1]  # (the same mapping and range as its last request: the same tensor)
        if (first + numel) * 4 > len(buffer):
            raise ProtocolError(f"shared-memory slot {name} holds {len(buffer) // 4} values, not {first} + {numel}")
        values = torch.frombuffer(buffer, dtype=torch.float32, count=numel, offset=first * 4)
        if len(self._slot_views) >= 256:  # (it keeps mappings alive: bounded like SlotMaps' own)
            self._slot_views.clear()
        self._slot_views[key] = (buffer, values)
        return values

    def _reply_slot(self, peer: bytes, req_id: int) -> torch.Tensor | None:
        """The shared-memory slot a reply's values may be written into before the reply is sent;
        none while backups follow this server (the request's gradient, which that slot holds, is
        forwarded to them after the policy applied it)."""
        return self._slot_out.get((peer, req_id)) if self.replicas is None else None

    def _reject(self, peer: bytes, msg: Message, code: str, text: str) -> None:
        self._send(peer, msg.error(code, text))

    def _send(self, peer: bytes, msg: Message) -> None:
        if msg.op == Op.ERROR:  # every refusal is counted by its code
            self.rejected[str(msg.meta.get("code"))] += 1
        if self._slot_out:
            into = self._slot_out.pop((peer, msg.req_id), None)
            if (into is not None and msg.op == Op.OK and len(msg.tensors) == 1 and "enc" not in msg.meta
                    and msg.tensors[0].dtype == torch.float32 and msg.tensors[0].numel() == into.numel()):
                if into.data_ptr() != msg.tensors[0].data_ptr():  # (the policy may have written them there)
                    into.copy_(msg.tensors[0])
                msg = Message(Op.OK, msg.req_id, {**msg.meta, "shm": True})
                self.bytes_out += into.numel() * 4
        frames = encode(msg)
        self.bytes_out += sum(map(len, frames))
        if not msg.tensors:  # (a header alone: nothing lent)
            self.listener.send(peer, frames)
            return
        shared = [self.store.shares_memory(t) for t in msg.tensors]
        trackers = self.listener.send(peer, frames, track=any(shared))
        for t, is_shared, tracker in zip(msg.tensors, shared, trackers[1:]):
            if is_shared and tracker is not None:  # lent, not copied: no change until it is sent
                self.store.lend(t, tracker)

    def _pull_codec(self, msg: Message) -> Codec | None:
        pq = msg.meta.get("pq")
        if pq is None:
            return None
        if pq != self.pull_request:
            raise ProtocolError(f"pq {pq!r:.60} is not this job's pull precision ({self.pull_request})")
        # type() is exact: True == 1 would otherwise share a cache entry with a valid request.
        key = tuple(pq) if isinstance(pq, list) and all(type(x) is str or type(x) is int for x in pq) else None
        codec = self._pull_codecs.get(key) if key is not None else None
        if codec is None:
            codec = pull_codec(pq)  # raises ProtocolError for anything malformed
            if len(self._pull_codecs) < 64:
                self._pull_codecs[key] = codec
        return codec

    def _values(self, msg: Message) -> tuple[list[int], torch.Tensor]:
        idx = self.store.resolve(msg.meta.get("keys"))
        enc = msg.meta.get("enc")
        if enc is not None:  # a compressed push: every decoder validates (lengths, indices, NaN/Inf)
            if msg.op not in (Op.PUSH, Op.PUSHPULL):
                raise ProtocolError(f"{msg.op.name} values cannot be compressed")
            for entry in enc:  # (the schema made each entry [codec, meta, tensors])
                if entry[0] not in self.push_codecs:
                    raise ProtocolError(f"codec {entry[0]!r} is not one this job pushes with ({sorted(self.push_codecs)})")
            return idx, bounded(msg.op.name, decode_push(enc, msg.tensors, [self.store.lengths[i] for i in idx]))
        if len(msg.tensors) != 1:
            raise ProtocolError(f"{msg.op.name} carries {len(msg.tensors)} tensors, expected 1")
        t = msg.tensors[0]
        if t.dtype != torch.float32 or t.dim() != 1:
            raise ProtocolError(f"{msg.op.name} values must be a 1-d float32 tensor, got {t.dtype} {tuple(t.shape)}")
        want = self.store.size_of(idx)
        if t.numel() != want:
            raise ProtocolError(f"{msg.op.name} values hold {t.numel()} elements, the keys need {want}")
        return idx, bounded(msg.op.name, t)

    def on_init(self, peer: bytes, msg: Message):
        """Initial values for some keys; the first INIT of each key wins (later ones are ignored)."""
        idx, values = self._values(msg)
        written = self.store.init_keys(idx, values)
        if written and self.store.initialized:
            log.info("%s: initialized %d parameters (last from %r)", self.name, self.store.numel, peer)
        return [(peer, msg.reply({"initialized": written}))]

    def on_pull(self, peer: bytes, msg: Message):
        if not self.store.initialized:
            return [(peer, msg.error("uninitialized", "parameters not initialized yet"))]
        idx = self.store.resolve(msg.meta.get("keys"))
        codec = self._pull_codec(msg)
        self.counts["pull"] += 1
        self._count_transfer(idx, 1)
        return [(peer, values_reply(msg, self.store.version(idx), self.store.read(idx, snapshot=False), codec))]

    def on_push(self, peer: bytes, msg: Message):
        if not self.store.initialized:
            return [(peer, msg.error("uninitialized", "parameters not initialized yet"))]
        idx, grad = self._values(msg)
        version, weight = msg.meta.get("version"), msg.meta.get("weight", 1.0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ProtocolError(f"push version must be a non-negative integer, got {version!r}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise ProtocolError(f"push weight must be a positive number, got {weight!r}")
        clock, delta, kv = msg.meta.get("clock"), msg.meta.get("delta", False), msg.meta.get("kv")
        if kv is not None and not (isinstance(kv, list) and len(kv) == len(idx) and all(type(v) is int and v >= 0 for v in kv)):
            raise ProtocolError("push kv must list one non-negative integer version per key")
        if clock is not None and (type(clock) is not int or clock < 1):
            raise ProtocolError(f"push clock must be a positive integer, got {clock!r}")
        if type(delta) is not bool:
            raise ProtocolError(f"push delta must be true or false, got {delta!r}")
        if delta and not self.deltas:
            raise ProtocolError("delta pushes are for local SGD (training.local_steps > 1); this job takes gradients")
        codec = self._pull_codec(msg) if msg.op == Op.PUSHPULL else None
        who = peer.decode(errors="replace")
        if self.members and who not in self.members:  # (a worker back from waiting for a shard: it pulls and goes on)
            return [(peer, msg.error(Code.NOT_MEMBER, f"{who!r:.40} is not in the job's current membership"))]
        push = Push(peer, msg, idx, grad, float(weight), version, codec, delta, clock, kv)
        seq = msg.meta.get("seq")
        if seq is not None and seq <= self.applied.get(who, 0):  # a replay of a push applied already
            return self._replayed(push)
        mark, verdict = (None, "apply") if msg.meta.get("from") is None else (  # (not a stream batch's push)
            self._stream_mark(msg, str(msg.meta["keys"][0]) if msg.meta["keys"] else ""))
        if verdict == "gap":
            return [(peer, msg.error(Code.STREAM_GAP, self._gap_text(msg, mark)))]
        pos = msg.meta.get("pos")
        if verdict == "skip":  # its events are in this shard already: answered, not applied
            self.counts["stream_skipped"] += 1
            self.positions[who] = pos
            return self._replayed(push)
        refused = self.policy.refuse(push)
        if refused is not None:  # refused by the policy: not counted, its data position not kept
            return [refused]
        if seq is not None:
            self.applied[who] = seq
        self.snapshots.applied(who, clock, idx is self.store.all)
        if mark is not None:
            self.marks[mark] = pos[2]
        if isinstance(pos, list) and len(pos) == 3 and all(type(x) is int and x >= 0 for x in pos):
            self.positions[who] = pos
        self.counts["push"] += 1
        if msg.op == Op.PUSHPULL:
            self.counts["pull"] += 1
        self._count_transfer(idx, 2 if msg.op == Op.PUSHPULL else 1)
        t0 = time.perf_counter()
        replies = self.policy.push(push)
        took = time.perf_counter() - t0
        self.apply_s += took
        if self.timing:
            self.apply_times.observe(took)
        return replies

    def _stream_mark(self, msg: Message, tag: str) -> tuple[str | None, str]:
        """Of a push: the mark it is checked against ("epoch:shard:TAG"; None: not a stream
        batch's push) and the verdict: "apply", "skip" (every event of it is here already) or
        "gap" (events before it are not)."""
        pos, start = msg.meta.get("pos"), msg.meta.get("from")
        if pos is None or start is None:
            return None, "apply"
        if start >= pos[2]:
            raise ProtocolError(f"a stream push covers offsets (from, pos[2]]: from {start} is not before {pos[2]}")
        name = f"{pos[0]}:{pos[1]}:{tag}"
        mark = self.marks.get(name, self.mark_floor.get(f"{pos[0]}:{pos[1]}", 0))
        if pos[2] <= mark:
            return name, "skip"
        return name, "gap" if start > mark else "apply"

    def _gap_text(self, msg: Message, mark: str | None) -> str:
        self.counts["stream_gap"] += 1
        pos = msg.meta["pos"]
        held = self.marks.get(mark or "", self.mark_floor.get(f"{pos[0]}:{pos[1]}", 0))
        return (f"{self.name} holds partition {pos[1]} up to offset {held}; this push starts after {msg.meta['from']} "
                "(ask MARKS and resume there)")

    def on_marks(self, peer: bytes, msg: Message):
        """Where this server stands in one stream partition: each tag's mark, and the floor."""
        epoch, shard = msg.meta["shard"]
        prefix = f"{epoch}:{shard}:"
        held = {k[len(prefix):]: v for k, v in self.marks.items() if k.startswith(prefix)}
        return [(peer, msg.reply({"marks": held, "floor": self.mark_floor.get(f"{epoch}:{shard}", 0)}))]

    def _replayed(self, p: Push):
        """A push sent again after a failover that this server applied already: answered with the
        current values (or, when it waits in a sync round, once that round completes), not applied."""
        self.counts["replayed"] += 1
        rebind = getattr(self.policy, "rebind", None)
        if rebind is not None and rebind(p):
            return []
        return [self.policy._answer(p)]

    def on_sparse(self, peer: bytes, msg: Message):
        """Update, then read, rows of sparse tables (server/sparse.py validates the whole request first)."""
        if not self.sparse:
            return [(peer, msg.error("no_tables", "this job has no sparse tables"))]
        t0 = time.perf_counter()
        who, seq = peer.decode(errors="replace") + "/sparse", msg.meta.get("seq")
        replay = seq is not None and is_replay(self.applied, self.skipped, who, seq)  # applied already: read only
        mark, verdict = self._stream_mark(msg, "s") if not replay else (None, "apply")
        if verdict == "gap":
            return [(peer, msg.error(Code.STREAM_GAP, self._gap_text(msg, mark)))]
        if verdict == "skip":
            self.counts["stream_skipped"] += 1
        reply = self.sparse.handle(msg, replay=replay or verdict == "skip")
        if replay:
            self.counts["replayed"] += 1
        elif seq is not None:
            record(self.applied, self.skipped, who, seq)
        if not replay and reply.op == Op.OK:
            self.snapshots.rows_applied(who[: -len("/sparse")], msg.meta.get("clock"))
        if mark is not None and verdict == "apply" and reply.op == Op.OK:
            self.marks[mark] = msg.meta["pos"][2]
        self.apply_s += time.perf_counter() - t0
        return [(peer, reply)]

    def on_replica_hello(self, peer: bytes, msg: Message):
        if self.replicas is None:
            return [(peer, msg.error(Code.BAD_OP, f"{self.name} keeps no backups"))]
        if msg.meta["rank"] != self.rank:
            return [(peer, msg.error(Code.REPLICA_RANK, f"{self.name} is the primary of rank {self.rank}, not {msg.meta['rank']}"))]
        self.replicas.hello(peer, msg.meta["node"])
        return []

    def on_replica_ack(self, peer: bytes, msg: Message):
        if self.replicas is None or msg.meta["rank"] != self.rank:
            self.rejected[Code.REPLICA_RANK] += 1
            return []
        return self.replicas.ack(peer, msg.meta["node"], msg.meta["seq"])

    _HANDLERS = {Op.INIT: on_init, Op.PULL: on_pull, Op.PUSH: on_push, Op.PUSHPULL: on_push, Op.SPARSE: on_sparse,
                 Op.MARKS: on_marks, Op.REPLICA_HELLO: on_replica_hello, Op.REPLICA_ACK: on_replica_ack}

    # -- coordinator messages ---------------------------------------------
    def on_coordinator(self, peer: str, msg: Message) -> None:
        if msg.op == Op.MEMBERSHIP:
            self.set_workers(msg.meta.get("workers"), msg.meta.get("stopping", False))
        elif msg.op == Op.CHECKPOINT and msg.meta.get("probe"):  # an async cut being placed: where the workers stand here
            self.snapshots.probe(str(msg.meta.get("name")), [(p.decode(errors="replace"), m.meta.get("clock")) for p, m in self._held])
        elif msg.op == Op.CHECKPOINT:
            self.snapshots.request(msg.meta, self.positions)
            if self.snapshots.armed is None or self._held:  # taken at once, or a new cut: what it no longer holds goes on
                self._release_held()

    def restore(self, order: dict[str, Any], layout: Layout) -> None:
        """Load this server's keys from a checkpoint (``--resume``: with optimizer state and versions;
        ``init_from``: values only). Every file read is checked against the manifest's SHA-256."""
        store = CheckpointStore(str(order["url"]))
        manifest = store.manifest(str(order["name"]))
        old = OldParams(store, manifest, Layout.from_dict(order["layout"]))
        filled = restore_store(self.store, layout, old, bool(order.get("full")))
        if order.get("full"):
            self.positions = {}
            self.snapshots.clocks, self.snapshots.row_clocks = {}, {}
            self.policy.restored()
            self.marks, self.mark_floor = old.marks_for(self.rank, layout.num_servers)
        log.info("%s: %s %d of %d keys from %s", self.name, "restored" if order.get("full") else "warm-started",
                 filled, len(self.store.keys), store.where(manifest.name))
        if self.sparse:
            rows = self.sparse.restore(store, manifest, old.layout, bool(order.get("full")))
            log.info("%s: %d rows of sparse tables from %s", self.name, rows, store.where(manifest.name))

    def set_workers(self, workers: object, stopping: object = False) -> None:
        """The workers a sync round waits for (from MEMBERSHIP, repeated in heartbeat answers).
        ``stopping``: the job stops gracefully, so a worker gone from them ends the sync rounds
        (``Policy.freeze``) instead of leaving the others to complete rounds without it."""
        if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
            return
        if set(workers) != self.members:
            frozen = self.policy.freeze() if stopping is True and self.members - set(workers) else []
            self.members = set(workers)
            self.hyper.set_workers(len(self.members))
            replies = frozen + self.policy.set_workers(self.members)
            if self.replicas is not None:
                replies = self.replicas.release(self.replicas.forward_membership(sorted(self.members)), replies)
            for to, reply in replies:
                self._send(to, reply)
            self._take_snapshot()  # a worker of an async checkpoint's cut may have left

    def progress(self) -> dict[str, Any]:
        """What the heartbeat carries to the coordinator (its dashboard and diagnosis)."""
        pushes = self.counts["push"]
        return {"pushes": pushes, "pulls": self.counts["pull"], "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "staleness_mean": self.staleness_sum / pushes if pushes else 0.0, "staleness_max": self.staleness_max,
                "rejected": sum(self.rejected.values()), "apply_s": self.apply_s,
                "version": max(self.store.versions, default=0), "optimizer": self.hyper.progress(),
                **({"replication": self._replication()} if self.replicas is not None else {}),
                **({"backups": self.backup_host.report()} if self.backup_host is not None else {})}

    def _replication(self) -> dict[str, Any]:
        assert self.replicas is not None
        out = self.replicas.stats()
        if self.first_request_s is not None:
            out["first_request_s"] = round(self.first_request_s, 4)
        return out

    def stats(self) -> dict[str, Any]:
        total = sum(self.staleness.values())
        mean = self.staleness_sum / total if total else 0.0
        return {
            "rank": self.rank,
            "numel": self.store.numel,
            "keys": len(self.store.keys),
            "pushes": self.counts["push"],
            "pulls": self.counts["pull"],
            "rejected": dict(self.rejected),
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "staleness_mean": mean,
            "apply_s": self.apply_s,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "version": max(self.store.versions, default=0),
            "cpu_s": time.process_time(),
            "optimizer": self.hyper.report(),
            "dense_kernel": DENSE_KERNEL,
            **({"sparse": self.sparse.stats()} if self.sparse else {}),
            **self.policy.stats(),
            **({"replication": {**self._replication(), "replayed": self.counts["replayed"]}} if self.replicas is not None else {}),
        }

    def serve(self, coord: CoordinatorClient, heartbeat: Heartbeat, leave: Callable[[], bool] | None = None) -> str | None:
        """Answer requests until the coordinator says stop; returns its reason. None: ``leave()``
        (looked at with the coordinator's messages) said to stop first."""
        poller = Poller()
        poller.register(self.listener)
        next_check = 0.0
        while True:
            # (a Unix listener may hold messages it read ahead, which no poll reports: transport/uds.py)
            if self.listener.pending() or poller.poll(_POLL_S):
                listener = self.listener
                for i in range(256):  # bounded burst, then look at the coordinator again
                    if i and not listener.ready():  # (the poll said the first one waits)
                        break
                    try:
                        peer, frames = listener.recv()
                    except WouldBlock:  # (not expected after ready(): a guard)
                        break
                    self.handle(peer, frames)
            now = time.monotonic()
            if now >= next_check:  # not per request: a poll of the coordinator costs a system call
                next_check = now + _COORDINATOR_CHECK_S
                coord.rpc.pump(0)
                if self.snapshots.expired(now):
                    self._release_held()
                for report in self.snapshots.finished():  # answers are not awaited: the coordinator counts reports
                    coord.rpc.request(COORDINATOR, Message(Op.REPORT, meta={"node": coord.node, "kind": "checkpoint", "data": report}))
                if self.replicas is not None:  # a backup that keeps replies waiting too long is dropped
                    for to, reply in self.replicas.tick():
                        self._send(to, reply)
                reason = heartbeat.tick(self.progress)
                if reason is not None:
                    return reason
                if leave is not None and leave():
                    return None


class HostedRanks:
    """Ranks of dead servers this process took over, each a whole server (:func:`run_server`) on
    a thread of its own: it registers for the rank, loads it from the latest checkpoint, serves
    and heartbeats like any replacement. Its request loop shares the process's cores and GIL
    with the first server's."""

    def __init__(self, start: dict[str, Any]) -> None:
        self.start = start  # run_server's arguments, but rank
        self.threads: dict[int, threading.Thread] = {}

    def offer(self, ranks: object) -> None:
        for rank in ranks if isinstance(ranks, list) else []:
            if type(rank) is int and rank not in self.threads:
                backups = self.start.get("backups")
                promote = backups.take(rank) if backups is not None else None
                if promote is not None:
                    log.warning("%s: promoting its backup of server-%d (its primary died)", self.start["hosted_by"], rank)
                else:
                    log.warning("%s: taking over server-%d's keys (its server died and got no replacement)",
                                self.start["hosted_by"], rank)
                t = threading.Thread(target=run_server, kwargs={**self.start, "rank": rank, "promote": promote}, daemon=True,
                                     name=f"server-{rank}-hosted")
                self.threads[rank] = t
                t.start()

    def join(self, timeout_s: float) -> None:
        """Wait for the hosted servers to finish (they stop when the job does, like this one)."""
        deadline = time.monotonic() + timeout_s
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))


def run_server(ctx: Context, coordinator: str, host: str = "127.0.0.1", rank: int | None = None, ipc_dir: str | None = None,
               metrics_host: str | None = None, security: Security | None = None, hosted_by: str | None = None,
               advertise: str | None = None, port: int | None = None, backups: BackupHost | None = None,
               promote: ParameterServer | None = None) -> int:
    """Entry point of ``downpour server``: returns the process exit code. ``metrics_host``
    overrides the job's ``monitor.http_host`` for this server's metrics endpoint. ``hosted_by``:
    the server whose process runs this one (it took over a lost rank; see :class:`HostedRanks`).
    It listens on ``host:port`` (``port`` None: a free one) and tells peers the address
    :func:`~downpour.transport.advertised` picks (``advertise``: this host name or address instead).
    ``backups``: the backups this process keeps (a hosted rank shares its process's);
    ``promote``: a backup's server that takes over its rank (it loads nothing)."""
    import uuid

    identity = connection_id("server", rank)
    promoted_seq = promote.applied_seq if promote is not None else 0
    coord = CoordinatorClient(ctx, coordinator, identity, request_timeout_s=30.0, security=security)
    server: ParameterServer | None = None
    endpoint: HttpEndpoint | None = None
    unix: UnixListener | None = None
    try:
        # Bind before registering: the coordinator hands our address to the workers.
        transport = "ipc" if coordinator.startswith("ipc://") else "tcp"
        zmq_listener = Listener(ctx, bind_address(transport, host, ipc_dir, f"server-{rank}-{uuid.uuid4().hex[:6]}", port), 1 << 30,
                                security)
        zmq_listener.address = advertised(zmq_listener.address, coordinator, advertise, f"server (rank {rank})")
        listener: Listener | Both = zmq_listener
        # Workers on this machine send their requests over a Unix socket beside the ipc one (transport/uds.py):
        # listening before registering, as workers may connect as soon as the coordinator names this server.
        path = unix_path(zmq_listener.address) if transport == "ipc" and security is None else None
        if path is not None:
            unix = UnixListener(path, 1 << 30)
            listener = Both(zmq_listener, unix)
        reply = coord.register("server", rank, listener.address, timeout_s=120.0, hosted_by=hosted_by, promoted=promote is not None)
        job = parse_job(reply["job"], source="coordinator")
        apply_cpu_policy(job.cluster.cpu_policy)
        layout = Layout.from_dict(reply["layout"])
        if unix is not None and not job.cluster.unix_sockets:  # (workers will not look for it)
            unix.close()
            listener, unix = zmq_listener, None
        if job.cluster.max_message_bytes < 1 << 30:  # the job's frame limit on every connection from now on
            listener.limit(job.cluster.max_message_bytes)
        # Updates are elementwise and memory-bound: more intra-op threads only contend with other processes.
        torch.set_num_threads(job.training.torch_threads)
        planned = reply.get("job_steps")
        if promote is not None and promote.rank == int(reply["rank"]):  # it holds the rank's state already
            server = promote
            server.adopt(listener, reply["node"])
            log.warning("%s: promoted: serving its backup's state (seq %d) as the primary", server.name, promoted_seq)
        elif reply.get("restore"):  # heartbeats marked restoring meanwhile: a large restore outlasts the heartbeat timeout
            with RestoringHeartbeat(ctx, coordinator, identity, reply["node"], job.cluster.heartbeat_interval_s,
                                    job.cluster.startup_timeout_s, security):
                server = ParameterServer(ctx, job, layout, int(reply["rank"]), listener, reply["node"],
                                         planned if type(planned) is int and planned > 0 else None)
                server.restore(reply["restore"], layout)
        else:
            server = ParameterServer(ctx, job, layout, int(reply["rank"]), listener, reply["node"],
                                     planned if type(planned) is int and planned > 0 else None)
        if job.cluster.replicas:
            server.replicate()
            if backups is None:
                steps = planned if type(planned) is int and planned > 0 else None
                # Named "NAME/PID" for its primaries: unique, where a replacement reuses the node name.
                backups = BackupHost(ctx, job, layout, f"{server.name}/{os.getpid()}", security, lambda r, name: ParameterServer(
                    ctx, job, layout, r, NullListener(), name, steps))  # type: ignore[arg-type]
            server.backup_host = backups
        coord.configure(job.cluster.coordinator_timeout_s, job.cluster.heartbeat_timeout_s)
        log.info("%s: serving %d parameters in %d keys at %s (dense update rules: %s)", server.name, server.store.numel,
                 len(server.store.keys), listener.address, DENSE_KERNEL)
        if job.monitor.metrics:
            route = metrics_route(server_metrics(server, layout), node_labels(job.name, "server", server.rank, server.name))
            endpoint = HttpEndpoint(metrics_host or job.monitor.http_host, 0, {"/metrics": route}, server.name)
        hosted = HostedRanks({"ctx": ctx, "coordinator": coordinator, "host": host, "ipc_dir": ipc_dir, "advertise": advertise,
                              "metrics_host": metrics_host, "security": security, "hosted_by": server.name,
                              "backups": backups})

        def on_push(peer: str, msg: Message) -> None:  # unprompted orders of the coordinator
            server.on_coordinator(peer, msg)
            if msg.op == Op.PROMOTE:
                hosted.offer(msg.meta.get("ranks"))

        coord.rpc.on_push = on_push

        ending = [False]  # the coordinator said the job is on its way to the end (a graceful stop, its evaluation)

        def on_reply(meta: dict[str, Any]) -> None:
            if meta.get("ending") is True:
                ending[0] = True
            server.set_workers(meta.get("workers"), meta.get("stopping", False))
            keepers = meta.get("keepers")
            if server.replicas is not None and isinstance(keepers, list) and all(isinstance(k, str) for k in keepers):
                for to, answer in server.replicas.keep(keepers):
                    server._send(to, answer)
            if backups is not None:
                backups.offer(meta)
            hosted.offer(meta.get("host_ranks"))

        hb = Heartbeat(coord, job.cluster.heartbeat_interval_s, job.cluster.coordinator_timeout_s, on_reply=on_reply,
                       extra={"metrics": advertised(endpoint.address, coordinator, advertise, "metrics", True)} if endpoint else None)
        # SIGTERM while serving: a service manager stopping every process of the job (the coordinator
        # then stops it gracefully, and its final checkpoint needs this server), or this server alone
        # taken away. So it serves on until a heartbeat answered REPEAT_S or more after the signal
        # says which: the job ending, it stops when told (exit 0); else it stops now and its rank is
        # replaced (EXIT_TERMINATED). A second SIGTERM ends it at once, as the first did before.
        term = TermSignal(lambda: None, again=die_by_sigterm).install() if threading.current_thread() is threading.main_thread() else None

        def leave() -> bool:
            return term is not None and term.at is not None and not ending[0] and hb.answered_at - term.at >= REPEAT_S

        reason = server.serve(coord, hb, leave)
        if reason is None:
            log.warning("%s: stopping: SIGTERM, and the job is not ending (exit %d: the rank's replacement loads the latest "
                        "checkpoint)", server.name, EXIT_TERMINATED)
            return EXIT_TERMINATED
        if term is not None and term.at is not None:
            log.info("%s: SIGTERM: served on until the job's end", server.name)
        if hb.declared_dead:  # alive after all, but its rank waits for a replacement: exit as a failed process
            log.error("%s: stopping: %s; exiting with code 1 so that the launcher starts the rank's replacement",
                      server.name, reason)
            return 1
        log.info("%s: stopping: %s", server.name, reason)
        coord.report("server", server.stats())
        hosted.join(timeout_s=3 * job.cluster.heartbeat_interval_s + 5.0)
        if backups is not None and hosted_by is None:
            backups.close()
        return 0
    except DownpourError as err:
        log.error("%s: %s", server.name if server else identity, err)
        return 1
    finally:
        if endpoint is not None:
            endpoint.close()
        if unix is not None:  # (its socket file goes with it)
            unix.close()
        coord.close()
