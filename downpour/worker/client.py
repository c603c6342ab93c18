"""KVClient: the low-level push/pull API (ps-lite's KVWorker).

Values travel as flat float32 vectors in the layout's order (see
:class:`downpour.layout.Layout`): ``grad[s.start:s.stop]`` is key ``s.key``.
Every call sends at once and returns a :class:`Handle`; nothing blocks until
:meth:`KVClient.wait`. One request goes to each server involved, carrying all
of that server's keys in one frame (a view of your tensor, not a copy, when
the keys are contiguous, as the default ``bytes`` partitioner makes them).

Contract:
* A tensor passed to ``push``/``push_pull``/``init`` must not be modified until
  ``wait`` returned for its handle (it is sent without copying).
* ``out`` of ``pull``/``push_pull`` is written only inside ``wait``.
* Keys are given in any order; ``None`` means every key.
* Not thread-safe: use a client from one thread.

When a server listens on an ``ipc://`` socket (processes on one machine), the values
go through shared memory instead (:mod:`downpour.transport.shm`): the request names a
slot holding them, and the server writes its reply's values into that slot. Only
the headers pass through the socket. (Not with compression: its frames are small.)

With a :class:`~downpour.config.CompressionConfig`, pushes are encoded per key
(``downpour.compress``) and pulled values arrive in the configured pull codec;
callers see float32 either way. :attr:`KVClient.wire` counts the bytes of each
direction by part (values, indices, scales, headers).

Why a module of about 400 lines: one class, the push/pull API, with the handle it returns;
the encodings and shared memory it uses live in ``compress`` and ``transport``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import torch

from downpour.compress import PushCompressor, decode_pull, pull_request
from downpour.config import CompressionConfig
from downpour.errors import ConfigError, DownpourError, ProtocolError, RemoteError
from downpour.layout import KeySlice, Layout
from downpour.protocol import Message, Op
from downpour.protocol.rpc import Future, RpcClient
from downpour.transport import Slot, slot_folder

log = logging.getLogger(__name__)


class Pieces:
    """A flat vector held as consecutive 1-D tensors (a model's gradients, parameter by parameter),
    which a push gathers straight into its request's buffer: one pass over the values instead of
    two (concatenating them first, then copying that into a shared-memory slot), about 50 µs a step
    for the reference model. The tensors must stay as they are until the push was waited on."""

    __slots__ = ("tensors", "starts", "numel")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.starts: list[int] = []
        at = 0
        for t in tensors:
            self.starts.append(at)
            at += t.numel()
        self.numel = at

    def _pieces(self, lo: int, hi: int) -> list[torch.Tensor]:
        """The views that make up flat[lo:hi], in order."""
        out = []
        for start, t in zip(self.starts, self.tensors):
            a, b = max(lo, start), min(hi, start + t.numel())
            if a < b:
                out.append(t[a - start : b - start])
        return out

    def slice(self, lo: int, hi: int) -> torch.Tensor:
        pieces = self._pieces(lo, hi)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def copy_into(self, lo: int, hi: int, into: torch.Tensor) -> None:
        at = 0
        for piece in self._pieces(lo, hi):
            into[at : at + piece.numel()].copy_(piece)
            at += piece.numel()

    def vector(self) -> torch.Tensor:
        return torch.cat(self.tensors)


Flat = torch.Tensor | Pieces  # a flat float32 vector in the layout's order, whole or in pieces


@dataclass
class _Part:
    server: int
    keys: list[int]
    ranges: list[tuple[int, int]]  # flat ranges, merged where adjacent
    numel: int

    def gather(self, flat: Flat) -> torch.Tensor:
        if isinstance(flat, Pieces):
            return flat.slice(*self.ranges[0]) if len(self.ranges) == 1 else torch.cat([flat.slice(lo, hi) for lo, hi in self.ranges])
        if len(self.ranges) == 1:
            lo, hi = self.ranges[0]
            return flat[lo:hi]
        return torch.cat([flat[lo:hi] for lo, hi in self.ranges])

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> None:
        at = 0
        for lo, hi in self.ranges:
            out[lo:hi].copy_(values[at : at + hi - lo])
            at += hi - lo

    def gather_into(self, flat: Flat, into: torch.Tensor) -> None:
        at = 0
        for lo, hi in self.ranges:
            if isinstance(flat, Pieces):
                flat.copy_into(lo, hi, into[at : at + hi - lo])
            else:
                into[at : at + hi - lo].copy_(flat[lo:hi])
            at += hi - lo


class _Slots:
    """The shared-memory slots of the requests to one server (see :mod:`downpour.transport.shm`).
    A slot is reused once its request was answered; one whose request went unanswered is dropped."""

    LIMIT = 8  # slots in use at once; more requests in flight go through the socket

    def __init__(self, folder: str, owner: str) -> None:
        self.folder, self.owner = folder, owner
        self.free: list[_Slot] = []
        self.used = 0
        self.closed = False

    def take(self, numel: int) -> _Slot | None:
        """A free slot of at least ``numel`` float32 values (None: all in use). Raises OSError or
        TransportError if no file can be made."""
        for i, item in enumerate(self.free):
            if item.values.numel() >= numel:
                self.used += 1
                return self.free.pop(i)
        if self.used + len(self.free) >= self.LIMIT:
            if not self.free:
                return None
            self.free.pop(0).slot.close()  # too small: make room for a larger one
        slot = Slot(self.folder, self.owner, numel * 4)
        self.used += 1
        return _Slot(self, slot, torch.frombuffer(slot.buffer, dtype=torch.float32))

    def done(self, item: _Slot, reuse: bool) -> None:
        """``item``'s request ended; ``reuse``: it was answered, so the server is done with it."""
        self.used -= 1
        if reuse and not self.closed:
            self.free.append(item)
        else:
            item.slot.close()

    def close(self) -> None:
        self.closed = True
        for item in self.free:
            item.slot.close()
        self.free = []


@dataclass
class _Slot:
    pool: _Slots
    slot: Slot
    values: torch.Tensor  # float32 over the whole slot


class Handle:
    """What :meth:`KVClient.wait` needs to finish one call: per request its part, future, slot and
    whether the reply's values go straight into ``out`` (``meta.into``), and (for a push) its
    message and data, to send again after a failover."""

    __slots__ = ("futures", "out", "sent", "data")

    def __init__(self, futures: list[tuple[_Part, Future, _Slot | None, bool]], out: torch.Tensor | None,
                 sent: dict[int, Message] | None = None, data: Flat | None = None) -> None:
        self.futures = futures
        self.out = out
        self.sent = sent or {}  # id(future) -> the push request it carries (replay)
        self.data = data


class KVClient:
    def __init__(self, rpc: RpcClient, layout: Layout, server_peers: dict[int, str], request_bytes: int | None = None,
                 compression: CompressionConfig | None = None, key_versions: bool = False, shared_memory: bool = True,
                 replay: bool = False) -> None:
        """``server_peers`` maps a server rank to the peer name it is connected under in ``rpc``.

        ``request_bytes``: when set, a server's keys go out in several requests of at most this
        many bytes (whole keys), so that the server updates one while the next is on the wire and
        the replies stream back. Leave it None for sync mode, where a push must hold every key
        of its server. ``compression``: how pushes and pulled values are encoded (None: float32).
        ``key_versions``: pushes carry each key's version (``meta.kv``), as servers with
        consistency per parameter group need. ``shared_memory``: values to servers listening on
        ipc sockets go through shared memory (see :meth:`set_address`). ``replay``: the servers keep
        backups, so a push whose server was replaced (``peer_replaced``: a backup took over) is
        sent again with the same sequence number (``meta.seq``, counted per server), and the new
        primary applies it unless it holds it already."""
        self.key_versions = key_versions
        self.shared_memory = shared_memory
        self.rpc = rpc
        self.layout = layout
        self.peers = server_peers
        self.request_bytes = request_bytes
        self.versions = [0] * len(layout.slices)  # per key: the version last received
        compressor = PushCompressor(compression, layout) if compression is not None else None
        self.compressor = compressor if compressor is not None and compressor.active else None
        self.pq = pull_request(compression) if compression is not None else None
        self.pushes = 0  # pushes made (the clock an ssp server bounds)
        # Bytes each way by part: values, indices, scales, headers (pushes and the values received).
        self.wire: dict[str, Counter[str]] = {"push": Counter(), "pull": Counter()}
        self._all = self._plan(None)
        self._shape = torch.Size([layout.numel])
        self._slots: dict[int, _Slots] = {}  # by server rank: where values go through shared memory
        self.shm_requests = 0  # requests whose values went through shared memory
        self.shm_sent = self.shm_received = 0  # bytes of values through shared memory, each way
        self.replay = replay
        self.seq: dict[int, int] = {}  # by server rank: pushes sent to it (meta.seq)
        self.replayed = 0  # pushes sent again after a failover
        self._into: tuple[Slot, torch.Tensor] | None = None  # the values vector in shared memory (share_values)

    def set_address(self, peer: str, address: str) -> bool:
        """Server ``peer`` listens at ``address`` (now, or since it was replaced). With
        ``shared_memory`` and an ipc address its values go through shared memory. Returns
        whether they will."""
        rank = next((r for r, p in self.peers.items() if p == peer), None)
        if rank is None:
            return False
        old = self._slots.pop(rank, None)
        if old is not None:  # requests still using its slots drop them when they end
            old.close()
        folder = slot_folder(address) if self.shared_memory else None
        if folder is not None and self.compressor is None and self.pq is None:
            self._slots[rank] = _Slots(folder, f"{self.rpc.node}-s{rank}")
        return rank in self._slots

    @property
    def bytes_sent(self) -> int:
        """Bytes sent to servers: the sockets' frames and the values written to shared memory."""
        return self.rpc.bytes_sent + self.shm_sent

    @property
    def bytes_received(self) -> int:
        """Bytes received from servers: the sockets' frames and the values read from shared memory."""
        return self.rpc.bytes_received + self.shm_received

    def close(self) -> None:
        """Remove this client's shared-memory slots (a shared values vector stays mapped while used)."""
        for slots in self._slots.values():
            slots.close()
        self._slots.clear()
        if self._into is not None:
            self._into[0].close()

    def share_values(self) -> torch.Tensor | None:
        """A flat float32 vector of the layout's size in shared memory, for the caller's values (a
        model's parameters): a pull or push+pull whose ``out`` it is then names the range of it
        each server's keys hold (``meta.into``), and the server writes its reply's values there,
        so the caller's copy out of the request's slot goes. None where no server takes shared
        memory (or none could be made). The caller must not read the vector while such a request
        is in flight (its values change under it), and never waits on one answered out of order."""
        if self._into is not None:
            return self._into[1]
        folders = {pool.folder for pool in self._slots.values()}
        if len(folders) != 1 or self.layout.numel == 0:
            return None
        try:
            slot = Slot(folders.pop(), f"{self.rpc.node}-values", self.layout.numel * 4)
        except (OSError, DownpourError) as err:
            log.warning("%s: no shared memory for its values (%s); pulled values are copied", self.rpc.node, err)
            return None
        self._into = (slot, torch.frombuffer(slot.buffer, dtype=torch.float32))
        return self._into[1]

    def _into_meta(self, part: _Part, out: torch.Tensor | None) -> list | None:
        """``meta.into`` for ``part`` when its reply's values may be written straight into ``out``."""
        into = self._into
        if into is None or out is None or len(part.ranges) != 1 or out.data_ptr() != into[1].data_ptr():
            return None
        pool = self._slots.get(part.server)
        if pool is None or pool.folder != os.path.dirname(into[0].path):
            return None
        return [into[0].name, part.ranges[0][0], part.numel]

    def _plan(self, keys: list[int] | None) -> list[_Part]:
        slices: list[KeySlice] = list(self.layout.slices) if keys is None else [self._slice(k) for k in sorted(keys)]
        limit = self.request_bytes // 4 if self.request_bytes else None
        by_server: dict[int, list[_Part]] = {}
        for s in slices:
            group = by_server.setdefault(s.server, [])
            if not group or (limit is not None and group[-1].numel + s.length > limit):
                group.append(_Part(s.server, [], [], 0))
            part = group[-1]
            part.keys.append(s.key)
            part.numel += s.length
            if part.ranges and part.ranges[-1][1] == s.start:
                part.ranges[-1] = (part.ranges[-1][0], s.stop)
            else:
                part.ranges.append((s.start, s.stop))
        return [p for server in sorted(by_server) for p in by_server[server]]

    def _slice(self, key: int) -> KeySlice:
        if not isinstance(key, int) or not 0 <= key < len(self.layout.slices):
            raise ConfigError(f"key {key!r} is not in the layout (0..{len(self.layout.slices) - 1})")
        return self.layout.slices[key]

    def _check(self, t: Flat, what: str) -> None:
        if isinstance(t, Pieces):
            if t.numel != self.layout.numel or any(p.dtype is not torch.float32 or p.dim() != 1 or p.is_cuda for p in t.tensors):
                raise ConfigError(f"{what} in pieces must be 1-D float32 CPU tensors of {self.layout.numel} elements in all, "
                                  f"got {t.numel}")
            return
        if t.dtype is not torch.float32 or t.shape != self._shape or t.is_cuda:
            raise ConfigError(f"{what} must be a flat float32 CPU tensor of {self.layout.numel} elements, "
                              f"got {t.dtype} {tuple(t.shape)} on {t.device}")

    def _send(self, op: Op, keys: list[int] | None, data: Flat | None, out: torch.Tensor | None,
              weight: float = 1.0, versions: list[int] | None = None, extra: dict | None = None, exact: bool = False) -> Handle:
        versions = self.versions if versions is None else versions
        if isinstance(data, Pieces) and self.compressor is not None:  # the codecs take one vector
            data = data.vector()
        parts = self._all if keys is None else self._plan(keys)
        pushing = op in (Op.PUSH, Op.PUSHPULL)
        if pushing:
            self.pushes += 1
        futures = []
        sent: dict[int, Message] = {}
        for part in parts:
            meta: dict = {"keys": part.keys, **extra} if extra else {"keys": part.keys}
            tensors = []
            into = self._into_meta(part, out)
            slot = None
            if self._slots and (data is not None or (out is not None and into is None)):
                slot = self._take_slot(part)
                if slot is None:  # (every slot in use: the values go in a frame, and the reply's come back in one)
                    into = None
            if into is not None:
                meta["into"] = into
            if slot is not None:
                if data is not None:
                    part.gather_into(data, slot.values)
                    self.shm_sent += part.numel * 4
                meta["shm"] = [slot.slot.name, part.numel]
            elif pushing and self.compressor is not None:
                meta["enc"], tensors = self.compressor.encode(part.keys, data)
            elif data is not None:
                tensors.append(part.gather(data))
            if slot is not None or into is not None:
                self.shm_requests += 1
            if pushing and self.compressor is None:
                self.wire["push"]["values"] += part.numel * 4
            if pushing:
                meta["version"] = max(versions[k] for k in part.keys)
                if self.key_versions:
                    meta["kv"] = [versions[k] for k in part.keys]
                meta["weight"] = weight
                meta["clock"] = self.pushes
                self.seq[part.server] = meta["seq"] = self.seq.get(part.server, 0) + 1
            if out is not None and self.pq is not None and not exact:
                meta["pq"] = self.pq
            try:
                fut = self.rpc.request(self.peers[part.server], Message(op, meta=meta, tensors=tensors))
            except BaseException:
                if slot is not None:
                    slot.pool.done(slot, False)
                raise
            if pushing:
                self.wire["push"]["headers"] += fut.sent[0]
                if self.replay:
                    sent[id(fut)] = Message(op, meta=meta, tensors=tensors)
            futures.append((part, fut, slot, into is not None))
        if pushing and self.compressor is not None:
            self.wire["push"].update(self.compressor.bytes)
            self.compressor.bytes.clear()
        return Handle(futures, out, sent, data if sent else None)

    def _take_slot(self, part: _Part) -> _Slot | None:
        slots = self._slots.get(part.server)
        if slots is None:
            return None
        try:
            return slots.take(part.numel)
        except (OSError, DownpourError) as err:  # e.g. the folder is gone or full: the socket carries them
            log.warning("%s: no shared memory for %s (%s); its values go through the socket",
                        self.rpc.node, self.peers[part.server], err)
            del self._slots[part.server]
            slots.close()
            return None

    def init(self, values: torch.Tensor) -> Handle:
        """Offer initial values for every key. The first INIT a server gets wins; later ones are ignored."""
        self._check(values, "values")
        return self._send(Op.INIT, None, values, None)

    def pull(self, out: torch.Tensor, keys: list[int] | None = None, exact: bool = False) -> Handle:
        """Fetch the keys' current values into ``out`` (a flat vector) when waited on.
        ``exact``: float32 values even when the job compresses pulls (for evaluation)."""
        self._check(out, "out")
        return self._send(Op.PULL, keys, None, out, exact=exact)

    def push(self, grad: torch.Tensor, keys: list[int] | None = None, weight: float = 1.0,
             versions: list[int] | None = None) -> Handle:
        """Send a gradient for the keys; each server applies it under its consistency policy.
        ``weight`` (e.g. the batch size) weights this gradient in a sync round's mean.
        ``versions`` (one per key, a copy of :attr:`versions` taken earlier) are the versions of
        the values the gradient was computed on; by default the versions last received."""
        self._check(grad, "grad")
        return self._send(Op.PUSH, keys, grad, None, weight, versions)

    def push_pull(self, grad: Flat, out: torch.Tensor, keys: list[int] | None = None, weight: float = 1.0,
                  versions: list[int] | None = None, position: list[int] | None = None, delta: bool = False,
                  start: int | None = None) -> Handle:
        """Push, then receive the values after that update in the same round trip (one message
        per server each way). Arguments as for :meth:`push`; ``position`` ([epoch, shard, examples
        of the shard done with this gradient]) is kept by the servers for checkpoints. With
        ``delta`` the servers add ``grad`` to the values instead of taking an optimizer step.
        ``start``: a stream batch's push covers offsets (start, position[2]] of partition
        position[1]; each server applies it once (see :meth:`stream_marks`). ``grad`` may come
        in :class:`Pieces` (the parameters' gradients as they are), gathered as they are sent."""
        self._check(grad, "grad")
        self._check(out, "out")
        extra: dict = {"pos": position} if position else {}
        if position and start is not None:
            extra["from"] = start
        if delta:
            extra["delta"] = True
        return self._send(Op.PUSHPULL, keys, grad, out, weight, versions, extra or None)

    def stream_marks(self, shard: list[int], sparse: bool) -> list[int]:
        """Where every server stands in a stream partition (``shard``: [epoch, partition]): the
        offset after which each of its dense requests (by first key) and, with ``sparse``, its
        sparse rows continue. The lowest is where the partition resumes; every other one is a
        point a batch must end at, so that each server applies each event once."""
        futures = {rank: self.rpc.request(peer, Message(Op.MARKS, meta={"shard": list(shard)})) for rank, peer in self.peers.items()}
        out: list[int] = []
        for rank, fut in futures.items():
            meta = fut.result().meta
            held, floor = meta.get("marks"), meta.get("floor", 0)
            if not isinstance(held, dict) or type(floor) is not int or not all(type(v) is int and v >= 0 for v in held.values()):
                raise ProtocolError(f"{fut.peer} answered MARKS with {meta!r:.200}")
            tags = [str(p.keys[0]) for p in self._all if p.server == rank] + (["s"] if sparse else [])
            out += [int(held.get(t, floor)) for t in tags]
        return out

    def wait(self, handle: Handle, timeout_s: float | None = None) -> None:
        """Block until every server answered (or raise: RemoteError if one refused,
        RequestTimeout naming the server that did not answer)."""
        try:
            while handle.futures:
                part, fut, slot, into = handle.futures[0]
                try:
                    reply = fut.result(timeout_s)
                except RemoteError as err:  # answered: the server is done with the slot (unless it was replaced)
                    handle.futures.pop(0)
                    if slot is not None:
                        slot.pool.done(slot, err.code != "peer_replaced")
                    again = handle.sent.pop(id(fut), None) if err.code == "peer_replaced" else None
                    if again is None:
                        raise
                    handle.futures.insert(0, (part, self._resend(part, again, handle.data), None, False))
                    continue
                handle.futures.pop(0)
                try:
                    self._received(part, fut, reply, handle.out, slot, into)
                finally:
                    if slot is not None:
                        slot.pool.done(slot, True)
        except DownpourError:  # the requests not waited for may still be answered: their slots are not reused
            for _, _, slot, _ in handle.futures:
                if slot is not None:
                    slot.pool.done(slot, False)
            handle.futures = []
            raise

    def _resend(self, part: _Part, msg: Message, data: Flat | None) -> Future:
        """Send a push again, as it was (same ``seq``), to its server's new process; values that
        went through shared memory go in a frame this time."""
        meta = {k: v for k, v in msg.meta.items() if k not in ("shm", "into")}
        tensors = msg.tensors if "shm" not in msg.meta or data is None else [part.gather(data)]
        again = Message(msg.op, meta=meta, tensors=tensors)
        fut = self.rpc.request(self.peers[part.server], again)
        self.replayed += 1
        log.info("%s: sent push %d to %s again (its primary was replaced)", self.rpc.node, meta.get("seq", 0), fut.peer)
        return fut

    def _received(self, part: _Part, fut: Future, reply: Message, out: torch.Tensor | None, slot: _Slot | None,
                  into: bool = False) -> None:
        version, kv = reply.meta.get("version"), reply.meta.get("kv")
        if isinstance(kv, list) and len(kv) == len(part.keys) and all(type(v) is int for v in kv):
            for k, v in zip(part.keys, kv):
                self.versions[k] = v
        elif type(version) is int:
            for k in part.keys:
                self.versions[k] = version
        if out is not None and (slot is not None or into) and reply.meta.get("shm") is True:
            pulled = self.wire["pull"]
            pulled["headers"] += fut.received[0]
            pulled["values"] += part.numel * 4
            self.shm_received += part.numel * 4
            if not into:  # (with meta.into the server wrote them into ``out`` already)
                part.scatter(slot.values[: part.numel], out)
        elif out is not None and reply.tensors:
            header, total = fut.received
            pulled = self.wire["pull"]
            pulled["headers"] += header
            if "enc" in reply.meta:
                values = decode_pull(reply.meta["enc"], reply.tensors, part.numel)
                first = reply.tensors[0].numel() * reply.tensors[0].element_size()
                pulled["values"] += first
                pulled["scales"] += total - header - first
            else:
                values = reply.tensors[0]
                pulled["values"] += total - header
            if values.numel() != part.numel:
                raise ProtocolError(f"{fut.peer} returned {values.numel()} values for {part.numel} expected")
            part.scatter(values, out)
