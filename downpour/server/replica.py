"""Replication of a server rank: a primary's stream of changes, and the backups that follow it.

State-machine replication (Li et al., OSDI 2014, replicate after aggregation; here: replicate
the requests themselves). Every request that may change the primary's shard (INIT, PUSH,
PUSHPULL, SPARSE that is not a peek) and every change of the sync membership is given the
next sequence number and forwarded, as the primary handled it and in that order, to each
backup (``REPLICATE``). A backup runs the same :class:`~downpour.server.service.ParameterServer`
code on the same requests in the same order, so its shard, optimizer state, sparse rows,
sync round and the table of the pushes it applied (for exactly-once replay) stay bit-equal to
the primary's. Nothing is pickled: headers are msgpack, state is one safetensors buffer.

Acknowledgement (:class:`PrimaryLink`): the reply to a request forwarded as ``seq`` goes out
only once every caught-up backup acknowledged ``seq - max_lag`` (sync: ``max_lag`` 0, so a
worker never holds an acknowledgement that a backup lacks; async: bounded lag). A backup that
joins is sent the primary's whole state (``REPLICA_STATE``, at the current ``seq``) and then
the stream; it counts for acknowledgements once it acknowledged that state (caught up). A
backup silent past ``timeout_s`` while replies wait for it is dropped (it may say hello again).

The backup side (:class:`Backup`) is a thread in another server process with a DEALER to the
primary's listener. It takes only the next ``seq``: a duplicate, a gap, or a message for another
rank is refused and counted (``refused``), and changes nothing; after a gap it asks for the
state again. A backup has no listener of its own: it cannot serve a worker before it is
promoted (:meth:`BackupHost.take`, then ``run_server(promote=...)``).

Why one module over 400 lines: the primary's link, the backup and the host that holds backups
speak one wire protocol to each other (REPLICATE, REPLICA_STATE, acknowledgements); keeping the
three sides together keeps that protocol readable in one place.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from downpour.config import ClusterConfig, JobConfig
from downpour.errors import DownpourError, ProtocolError
from downpour.layout import Layout
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.ops import REPLICA_STREAM, Code
from downpour.protocol.schema import SchemaError
from downpour.server.replays import parse_skipped
from downpour.server.snapshot import LOOKAHEAD, LOOKAHEAD_SUM, bad_lookahead, lookahead_tensors
from downpour.transport import Channel, Context, Poller, Security, WouldBlock

if TYPE_CHECKING:
    from downpour.server.service import ParameterServer

log = logging.getLogger(__name__)

# Requests that may change a shard (a SPARSE peek does not, and is not forwarded).
REPLICATED = frozenset({Op.INIT, Op.PUSH, Op.PUSHPULL, Op.SPARSE})
_IDLE_ACK_S = 0.5  # a backup with nothing to acknowledge says it is there this often
_HELLO_AGAIN_S = 5.0  # a backup whose state has not come asks again after this long
_RESTARTS = 3  # a backup whose thread stops on an error is started again this often per rank, then left stopped

Reply = tuple[bytes, Message]


def changes_state(msg: Message) -> bool:
    return msg.op in REPLICATED and not (msg.op == Op.SPARSE and msg.meta.get("peek"))


# -- the primary's side ---------------------------------------------------------------------------
@dataclass
class _Follower:
    peer: bytes
    node: str
    state_seq: int  # the seq of the state it was sent
    acked: int = 0
    ready: bool = False  # it acknowledged that state: it holds everything up to ``acked``
    heard: float = 0.0


@dataclass
class _Held:
    seq: int
    replies: list[Reply]
    since: float


class PrimaryLink:
    """The primary's replication: forwards changes, tracks acknowledgements, holds replies.

    ``send(peer, frames)`` sends on the primary's listener; ``state()`` returns the server's
    state as (tensors, info) for a joining backup. Single-threaded: the server's request loop
    calls every method."""

    def __init__(self, rank: int, cluster: ClusterConfig, send: Callable[[bytes, list], None],
                 state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank, self.send, self.state, self.clock = rank, send, state, clock
        self.max_lag = 0 if cluster.replication == "sync" else cluster.replication_max_lag
        self.timeout_s = cluster.heartbeat_timeout_s  # a backup that long behind with replies waiting is dropped
        self.seq = 0
        self.followers: dict[bytes, _Follower] = {}
        self.held: deque[_Held] = deque()
        self.counts: Counter[str] = Counter()  # forwarded, bytes, transfers, transfer_bytes, dropped, refused.*
        self.max_seen_lag = 0

    # -- the stream ----------------------------------------------------------------------------
    def forward(self, peer: bytes, msg: Message) -> int:
        """Forward a request the primary just handled (before its replies go out). Returns its seq."""
        self.seq += 1
        if not self.followers:
            return self.seq
        meta = {k: v for k, v in msg.meta.items() if k not in ("shm", "into", "pq")}
        # Values in a shared-memory slot are overwritten by the reply: the backup gets a copy.
        tensors = [t.clone() for t in msg.tensors] if "shm" in msg.meta else msg.tensors
        op = Op.PUSH if msg.op == Op.PUSHPULL else msg.op  # a backup answers nobody: no values to read back
        self._stream(Message(Op.REPLICATE, 0, {"rank": self.rank, "seq": self.seq, "peer": peer.decode(errors="replace"),
                                               "op": int(op), "m": meta}, tensors))
        return self.seq

    def forward_membership(self, workers: list[str]) -> int:
        self.seq += 1
        if self.followers:
            self._stream(Message(Op.REPLICATE, 0, {"rank": self.rank, "seq": self.seq, "peer": "",
                                                   "op": int(Op.MEMBERSHIP), "m": {"workers": list(workers)}}))
        return self.seq

    def _stream(self, msg: Message) -> None:
        frames = encode(msg)
        size = sum(len(f) for f in frames)
        for f in self.followers.values():
            self.send(f.peer, frames)
            self.counts["forwarded"] += 1
            self.counts["bytes"] += size

    def release(self, seq: int, replies: list[Reply]) -> list[Reply]:
        """The replies of the request forwarded as ``seq`` that may go now (the rest are held)."""
        if not replies:
            return []
        if not self.held and self._clear(seq):
            return replies
        self.held.append(_Held(seq, replies, self.clock()))
        return self._drain()

    def _floor(self) -> int | None:
        ready = [f.acked for f in self.followers.values() if f.ready]
        return min(ready) if ready else None

    def _clear(self, seq: int) -> bool:
        floor = self._floor()
        return floor is None or floor >= seq - self.max_lag

    def _drain(self) -> list[Reply]:
        out: list[Reply] = []
        while self.held and self._clear(self.held[0].seq):
            out += self.held.popleft().replies
        return out

    def lag(self) -> int:
        """Forwarded requests the slowest caught-up backup does not hold yet."""
        floor = self._floor()
        return 0 if floor is None else self.seq - floor

    # -- backups ---------------------------------------------------------------------------------
    def hello(self, peer: bytes, node: str) -> None:
        """A backup (re)joins: send it the whole state as of ``seq``; the stream follows."""
        tensors, info = self.state()
        data = st_save(tensors, metadata={"info": json.dumps(info)})
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.followers[peer] = _Follower(peer, node, self.seq, heard=self.clock())
        self.counts["transfers"] += 1
        self.counts["transfer_bytes"] += len(data)
        self.send(peer, encode(Message(Op.REPLICA_STATE, 0, {"rank": self.rank, "seq": self.seq, "info": {"node": node}}, [blob])))
        log.info("server-%d: backup %s joined; sent %.1f MB of state at seq %d", self.rank, node, len(data) / 1e6, self.seq)

    def ack(self, peer: bytes, node: str, seq: int) -> list[Reply]:
        """A backup holds everything up to ``seq``. Returns replies that may go now."""
        f = self.followers.get(peer)
        if f is None:  # dropped earlier (or never said hello): it gets the state again
            self.counts["refused.unknown_backup"] += 1
            self.hello(peer, node)
            return []
        f.heard = self.clock()
        if seq > self.seq or seq < f.acked:
            self.counts[f"refused.{Code.REPLICA_ORDER}"] += 1
            return []
        f.acked = seq
        if not f.ready and seq >= f.state_seq:
            f.ready = True
            log.info("server-%d: backup %s caught up at seq %d", self.rank, f.node, seq)
        self.max_seen_lag = max(self.max_seen_lag, self.lag())
        return self._drain()

    def keep(self, nodes: list[str]) -> list[Reply]:
        """The coordinator's plan: only backups kept by ``nodes`` (server names of their processes)
        follow this primary; any other is dropped now. Returns replies that may go now."""
        for peer, f in list(self.followers.items()):
            if f.node not in nodes:
                log.info("server-%d: backup %s is no longer planned (its process died or it moved); dropped", self.rank, f.node)
                del self.followers[peer]
                self.counts["dropped"] += 1
        return self._drain()

    def tick(self) -> list[Reply]:
        """Drop caught-up backups that kept replies waiting for ``timeout_s`` (dead, or hung)."""
        if not self.held or self.clock() - self.held[0].since < self.timeout_s:
            return []
        need = self.held[0].seq - self.max_lag
        for peer, f in list(self.followers.items()):
            if f.ready and f.acked < need:
                log.warning("server-%d: backup %s did not acknowledge seq %d within %.1fs; dropped",
                            self.rank, f.node, need, self.timeout_s)
                del self.followers[peer]
                self.counts["dropped"] += 1
        return self._drain()

    def stats(self) -> dict[str, Any]:
        return {"seq": self.seq, "lag": self.lag(), "max_lag": self.max_seen_lag, "held": len(self.held),
                "backups": sorted(f.node for f in self.followers.values() if f.ready),
                "catching_up": sorted(f.node for f in self.followers.values() if not f.ready), **self.counts}


# -- state transfer ---------------------------------------------------------------------------------
def server_state(server: ParameterServer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a backup needs to continue as ``server`` would: the shard, rule state, versions,
    job steps, sparse rows, the pushes applied per worker, data positions, the membership, the
    staleness mean, and a sync round's pushes still waiting (their gradients and headers)."""
    store = server.store
    tensors = {"data": store.data.clone(), "versions": torch.tensor(store.versions, dtype=torch.int64),
               "steps": torch.tensor(store.steps, dtype=torch.int64),
               "init": torch.tensor(store.key_initialized, dtype=torch.uint8)}
    for k, v in store.rule.state().items():
        tensors[f"state.{k}"] = v.clone()
    tensors |= lookahead_tensors(store)  # lookahead.<worker> and lookahead_sum, as in shard files
    if server.sparse:
        for name, table in server.sparse.tables.items():
            for k, v in table.snapshot(True).items():
                tensors[f"sparse/{name}/{k}"] = torch.from_numpy(v.copy())
        server.sparse.chain = []  # (that snapshot restarted the tables' change tracking: the next checkpoint is a base)
    waiting = []
    for i, (who, p) in enumerate(getattr(server.policy, "waiting", {}).items()):
        tensors[f"waiting.{i}"] = p.grad.clone()
        waiting.append({"who": who, "peer": p.peer.decode(errors="replace"), "weight": p.weight, "version": p.version,
                        "delta": p.delta, "meta": {k: v for k, v in p.msg.meta.items() if k not in ("shm", "into", "pq")}})
    hyper = server.hyper.staleness
    info = {"positions": server.positions, "applied": server.applied, "skipped": server.skipped, "members": sorted(server.members),
            "counts": {k: server.counts[k] for k in ("push", "pull", "replayed")},
            "sparse_counts": dict(server.sparse.counts) if server.sparse else {},
            "marks": server.marks, "mark_floor": server.mark_floor,
            "staleness": [hyper.n, hyper.value], "waiting": waiting}
    return tensors, info


def load_state(server: ParameterServer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Make ``server`` (a backup's, just built) equal to the primary that sent :func:`server_state`.
    Every tensor's shape is checked first: a state for another layout changes nothing."""
    from downpour.server.consistency import Push

    store = server.store
    n_keys = len(store.keys)
    want = {"data": (store.numel,), "versions": (n_keys,), "steps": (n_keys,), "init": (n_keys,),
            **{f"state.{k}": tuple(v.shape) for k, v in store.rule.state().items()}}
    for k, shape in want.items():
        if k not in tensors or tuple(tensors[k].shape) != shape:
            raise ProtocolError(f"state field {k}: {tuple(tensors[k].shape) if k in tensors else 'missing'}, expected {shape}")
    for k, v in tensors.items():
        if bad_lookahead(k, v, store.numel):
            raise ProtocolError(f"state field {k}: {v.dtype} {tuple(v.shape)}, expected float32 ({store.numel},)")
    sparse: dict[str, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("sparse/"):
            _, name, field_name = k.split("/", 2)
            if name not in server.sparse.tables:
                raise ProtocolError(f"state holds rows of table {name!r}, which this job does not have")
            sparse.setdefault(name, {})[field_name] = v.numpy()
    store.data = tensors["data"].clone()
    store.lent = []
    store.versions = [int(v) for v in tensors["versions"]]
    store.steps = [int(v) for v in tensors["steps"]]
    store.key_initialized = [bool(v) for v in tensors["init"]]
    store.initialized = all(store.key_initialized)
    for k, v in store.rule.state().items():
        v.copy_(tensors[f"state.{k}"])
    if store.lookahead is not None:
        store.lookahead.load({k[len(LOOKAHEAD) :]: v for k, v in tensors.items() if k.startswith(LOOKAHEAD)}, tensors.get(LOOKAHEAD_SUM))
    for name, snap in sparse.items():
        server.sparse.tables[name].restore([snap])
    server.positions = {str(k): list(v) for k, v in info.get("positions", {}).items()}
    server.applied = {str(k): int(v) for k, v in info.get("applied", {}).items()}
    server.skipped = parse_skipped(info.get("skipped"))
    counts = info.get("counts")
    for k, v in (counts if isinstance(counts, dict) else {}).items():  # what the rank's primaries applied before it joined
        if k in ("push", "pull", "replayed") and type(v) is int and v >= 0:
            server.counts[k] = v
    sparse_counts = info.get("sparse_counts")
    for k, v in (sparse_counts if isinstance(sparse_counts, dict) and server.sparse else {}).items():
        if k in ("requests", "keys_pushed", "keys_pulled") and type(v) is int and v >= 0:
            server.sparse.counts[k] = v
    server.marks = {str(k): int(v) for k, v in info.get("marks", {}).items()}
    server.mark_floor = {str(k): int(v) for k, v in info.get("mark_floor", {}).items()}
    server.set_workers(list(info.get("members", [])))
    n, value = info.get("staleness", [0, 0.0])
    server.hyper.staleness.n, server.hyper.staleness.value = int(n), float(value)
    waiting = getattr(server.policy, "waiting", None)
    if waiting is not None:
        waiting.clear()
        server.policy.acc, server.policy.weight = None, 0.0
        for i, w in enumerate(info.get("waiting", [])):  # the round in progress, re-added in its order
            msg = Message(Op.PUSH, 0, w["meta"], [])
            server.policy.push(Push(w["peer"].encode(), msg, store.all, tensors[f"waiting.{i}"].clone(), float(w["weight"]),
                                    int(w["version"]), None, bool(w["delta"])))


# -- the backup's side ----------------------------------------------------------------------------
class NullListener:
    """Where a backup's server sends its replies: nowhere (it answers no worker)."""

    security: Security | None = None
    address = "backup"

    def send(self, peer: bytes, frames: list, track: bool = False) -> list:
        return []

    def pending(self) -> bool:
        return False

    def close(self) -> None:
        pass


@dataclass
class BackupStatus:
    seq: int = 0
    ready: bool = False
    applied: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class Backup:
    """One rank's backup: follows its primary at ``primary`` (see the module docstring).

    Call :meth:`handle` with each message from the primary (tests do, with no thread), or
    :meth:`start` a thread that connects, says hello, and acknowledges what it applied."""

    def __init__(self, server: ParameterServer, primary: str, node: str) -> None:
        self.server, self.rank, self.primary, self.node = server, server.rank, primary, node
        self.status = BackupStatus()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # -- the stream -------------------------------------------------------------------------------
    def handle(self, msg: Message) -> bool:
        """One message from the primary; returns whether it was taken (else counted in ``refused``)."""
        st = self.status
        schema = REPLICA_STREAM.get(msg.op)
        try:
            if schema is None:
                raise SchemaError(f"a backup takes no {msg.op.name}")
            schema.check(msg.meta, "meta")
        except SchemaError as err:
            return self._refuse(Code.INVALID, str(err))
        meta = msg.meta
        if meta["rank"] != self.rank:
            return self._refuse(Code.REPLICA_RANK, f"{msg.op.name} for rank {meta['rank']}; this backs up rank {self.rank}")
        if msg.op == Op.REPLICA_STATE:
            try:
                self._install(msg)
            except (ProtocolError, SafetensorError, ValueError, KeyError, RuntimeError) as err:
                return self._refuse(Code.INVALID, f"state not installed: {err}")
            st.seq, st.ready = meta["seq"], True
            self.server.applied_seq = st.seq
            return True
        seq = meta["seq"]
        if not st.ready:
            return self._refuse(Code.REPLICA_ORDER, f"seq {seq} before the state it follows")
        if seq <= st.seq:
            return self._refuse(Code.REPLICA_DUPLICATE, f"seq {seq} again (holds up to {st.seq})")
        if seq != st.seq + 1:
            st.ready = False  # a gap: what follows cannot be applied; ask for the state again
            return self._refuse(Code.REPLICA_ORDER, f"seq {seq} after {st.seq}")
        self._apply(meta, msg.tensors)
        st.seq = self.server.applied_seq = seq
        st.applied += 1
        return True

    def _refuse(self, code: str, text: str) -> bool:
        self.status.refused[str(code)] += 1
        if self.status.refused[str(code)] == 1:
            log.warning("%s: refused a message from the primary: %s", self.node, text)
        return False

    def _apply(self, meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        op = Op(meta["op"]) if meta["op"] in Op._value2member_map_ else None
        if op == Op.MEMBERSHIP:
            self.server.set_workers(meta["m"].get("workers"))
        elif op in REPLICATED:
            # The same checks and code as the primary ran (a request it refused is refused here too).
            self.server._handle(meta["peer"].encode(), [], Message(op, 0, meta["m"], list(tensors)))
        else:
            self._refuse(Code.INVALID, f"op {meta['op']} is not one a primary forwards")

    def _install(self, msg: Message) -> None:
        if len(msg.tensors) != 1 or msg.tensors[0].dtype != torch.uint8:
            raise ProtocolError("REPLICA_STATE carries one u8 tensor")
        data = msg.tensors[0].numpy().tobytes()
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        info = json.loads(header["__metadata__"]["info"])
        load_state(self.server, tensors, info)

    # -- the thread -------------------------------------------------------------------------------
    def start(self, ctx: Context, security: Security | None) -> None:
        self._thread = threading.Thread(target=self._run, args=(ctx, security), daemon=True, name=f"backup-{self.rank}")
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread (it holds the server untouched from then on)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, ctx: Context, security: Security | None) -> None:
        ch = Channel(ctx, self.primary, identity=f"backup-{self.rank}-{self.node}".encode(), security=security)
        poller = Poller()
        poller.register(ch)
        hello = Message(Op.REPLICA_HELLO, 0, {"rank": self.rank, "node": self.node})
        max_bytes = self.server.max_bytes
        try:
            ch.send(encode(hello))
            asked, acked, last_ack = time.monotonic(), 0, 0.0
            while not self._halt.is_set():
                got = False
                if poller.poll(0.05):
                    for _ in range(256):
                        try:
                            frames = ch.recv()
                        except WouldBlock:
                            break
                        try:
                            msg = decode(frames, max_bytes)
                        except ProtocolError as err:
                            self._refuse(Code.MALFORMED, str(err))
                            continue
                        was_ready = self.status.ready
                        self.handle(msg)
                        got = True
                        if was_ready and not self.status.ready:  # a gap: start over
                            ch.send(encode(hello))
                            asked = time.monotonic()
                now = time.monotonic()
                st = self.status
                if st.ready and (st.seq != acked or (not got and now - last_ack > _IDLE_ACK_S)):
                    ch.send(encode(Message(Op.REPLICA_ACK, 0, {"rank": self.rank, "seq": st.seq, "node": self.node})))
                    acked, last_ack = st.seq, now
                elif not st.ready and now - asked > _HELLO_AGAIN_S:
                    ch.send(encode(hello))
                    asked = now
        except Exception as err:  # never take the host process down; the coordinator sees it not ready
            self.error = f"{type(err).__name__}: {err}"
            self.status.ready = False
            log.exception("%s: backup of server-%d stopped: %s", self.node, self.rank, err)
        finally:
            ch.close()


class BackupHost:
    """The backups this server process keeps, as the coordinator assigns them (heartbeat answers:
    ``backups`` [{rank, address}], ``replica_gen``). Thread-safe: every server thread of the
    process (its own, hosted ranks) hands in its heartbeat answers."""

    def __init__(self, ctx: Context, job: JobConfig, layout: Layout, node: str, security: Security | None,
                 make_server: Callable[[int, str], ParameterServer]) -> None:
        self.ctx, self.job, self.layout, self.node, self.security = ctx, job, layout, node, security
        self.make_server = make_server
        self.backups: dict[int, Backup] = {}
        self.wanted: dict[int, str] = {}  # rank -> its primary's address, as the latest plan says
        self.gen = -1
        self.lock = threading.Lock()
        self.promoted = 0
        self.restarts: Counter[int] = Counter()  # backups started again after their thread stopped on an error
        self.failed: dict[int, int] = {}  # rank -> the plan (gen) under which its backup could not be made

    def offer(self, meta: dict[str, Any]) -> None:
        gen, want = meta.get("replica_gen"), meta.get("backups")
        if type(gen) is not int or not isinstance(want, list):
            return
        wanted: dict[int, str] = {}
        for entry in want:
            if isinstance(entry, dict) and type(entry.get("rank")) is int and isinstance(entry.get("address"), str):
                wanted[entry["rank"]] = entry["address"]
        with self.lock:
            if gen > self.gen:
                self.gen, self.wanted = gen, wanted
                for rank, b in list(self.backups.items()):
                    if wanted.get(rank) != b.primary:
                        b.stop()
                        del self.backups[rank]
            for rank, address in self.wanted.items():
                old = self.backups.get(rank)
                if old is not None:
                    if old.running or old.error is None or self.restarts[rank] >= _RESTARTS:
                        continue  # (one that failed that often stays stopped: its primary reports it missing)
                    self.restarts[rank] += 1  # its thread stopped on an error: a new backup, from a state transfer
                    log.warning("%s: backup of server-%d stopped (%s); starting it again (%d of %d)",
                                self.node, rank, old.error, self.restarts[rank], _RESTARTS)
                elif self.failed.get(rank) == self.gen:
                    continue
                try:
                    b = Backup(self.make_server(rank, f"backup-{rank}@{self.node}"), address, self.node)
                except DownpourError as err:
                    log.error("%s: cannot keep a backup of server-%d: %s", self.node, rank, err)
                    self.failed[rank] = self.gen  # (tried again under the next plan, not at every heartbeat answer)
                    continue
                b.start(self.ctx, self.security)
                self.backups[rank] = b
                log.info("%s: keeping a backup of server-%d (primary at %s)", self.node, rank, address)

    def take(self, rank: int) -> ParameterServer | None:
        """Promotion: the backup of ``rank`` stops following and its server is returned (None:
        no caught-up backup of that rank here)."""
        with self.lock:
            b = self.backups.get(rank)
            if b is None:
                return None
            b.stop()
            del self.backups[rank]
            if not b.status.ready:
                return None
            self.promoted += 1
            return b.server

    def report(self) -> dict[str, list]:
        """For heartbeats: rank -> [ready, seq, primary address]."""
        with self.lock:
            return {str(r): [b.status.ready and b.running, b.status.seq, b.primary] for r, b in self.backups.items()}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {str(r): {"seq": b.status.seq, "ready": b.status.ready, "applied": b.status.applied,
                             "refused": dict(b.status.refused), "primary": b.primary, "restarts": self.restarts[r],
                             **({"error": b.error} if b.error else {})} for r, b in self.backups.items()}

    def close(self) -> None:
        with self.lock:
            for b in self.backups.values():
                b.stop(1.0)
            self.backups.clear()
