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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from downpour.errors import ConfigError, ProtocolError
from downpour.layout import KeySlice, Layout
from downpour.protocol import Message, Op
from downpour.protocol.rpc import Future, RpcClient


@dataclass
class _Part:
    server: int
    keys: list[int]
    ranges: list[tuple[int, int]]  # flat ranges, merged where adjacent
    numel: int

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        if len(self.ranges) == 1:
            lo, hi = self.ranges[0]
            return flat[lo:hi]
        return torch.cat([flat[lo:hi] for lo, hi in self.ranges])

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> None:
        at = 0
        for lo, hi in self.ranges:
            out[lo:hi].copy_(values[at : at + hi - lo])
            at += hi - lo


class Handle:
    """What :meth:`KVClient.wait` needs to finish one call."""

    __slots__ = ("futures", "out")

    def __init__(self, futures: list[tuple[_Part, Future]], out: torch.Tensor | None) -> None:
        self.futures = futures
        self.out = out


class KVClient:
    def __init__(self, rpc: RpcClient, layout: Layout, server_peers: dict[int, str], request_bytes: int | None = None) -> None:
        """``server_peers`` maps a server rank to the peer name it is connected under in ``rpc``.

        ``request_bytes``: when set, a server's keys go out in several requests of at most this
        many bytes (whole keys), so that the server updates one while the next is on the wire and
        the replies stream back. Leave it None for sync mode, where a push must hold every key
        of its server."""
        self.rpc = rpc
        self.layout = layout
        self.peers = server_peers
        self.request_bytes = request_bytes
        self.versions = [0] * len(layout.slices)  # per key: the version last received
        self._all = self._plan(None)
        self._shape = torch.Size([layout.numel])

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

    def _check(self, t: torch.Tensor, what: str) -> None:
        if t.dtype is not torch.float32 or t.shape != self._shape or t.is_cuda:
            raise ConfigError(f"{what} must be a flat float32 CPU tensor of {self.layout.numel} elements, "
                              f"got {t.dtype} {tuple(t.shape)} on {t.device}")

    def _send(self, op: Op, keys: list[int] | None, data: torch.Tensor | None, out: torch.Tensor | None,
              weight: float = 1.0, versions: list[int] | None = None, extra: dict | None = None) -> Handle:
        versions = self.versions if versions is None else versions
        parts = self._all if keys is None else self._plan(keys)
        futures = []
        for part in parts:
            meta: dict = {"keys": part.keys, **extra} if extra else {"keys": part.keys}
            tensors = []
            if data is not None:
                tensors.append(part.gather(data))
                if op in (Op.PUSH, Op.PUSHPULL):
                    meta["version"] = max(versions[k] for k in part.keys)
                    meta["weight"] = weight
            futures.append((part, self.rpc.request(self.peers[part.server], Message(op, meta=meta, tensors=tensors))))
        return Handle(futures, out)

    def init(self, values: torch.Tensor) -> Handle:
        """Offer initial values for every key. The first INIT a server gets wins; later ones are ignored."""
        self._check(values, "values")
        return self._send(Op.INIT, None, values, None)

    def pull(self, out: torch.Tensor, keys: list[int] | None = None) -> Handle:
        """Fetch the keys' current values into ``out`` (a flat vector) when waited on."""
        self._check(out, "out")
        return self._send(Op.PULL, keys, None, out)

    def push(self, grad: torch.Tensor, keys: list[int] | None = None, weight: float = 1.0,
             versions: list[int] | None = None) -> Handle:
        """Send a gradient for the keys; each server applies it under its consistency policy.
        ``weight`` (e.g. the batch size) weights this gradient in a sync round's mean.
        ``versions`` (one per key, a copy of :attr:`versions` taken earlier) are the versions of
        the values the gradient was computed on; by default the versions last received."""
        self._check(grad, "grad")
        return self._send(Op.PUSH, keys, grad, None, weight, versions)

    def push_pull(self, grad: torch.Tensor, out: torch.Tensor, keys: list[int] | None = None, weight: float = 1.0,
                  versions: list[int] | None = None, position: list[int] | None = None) -> Handle:
        """Push, then receive the values after that update in the same round trip (one message
        per server each way). Arguments as for :meth:`push`; ``position`` ([epoch, shard, examples
        of the shard done with this gradient]) is kept by the servers for checkpoints."""
        self._check(grad, "grad")
        self._check(out, "out")
        return self._send(Op.PUSHPULL, keys, grad, out, weight, versions, {"pos": position} if position else None)

    def wait(self, handle: Handle, timeout_s: float | None = None) -> None:
        """Block until every server answered (or raise: RemoteError if one refused,
        RequestTimeout naming the server that did not answer)."""
        for part, fut in handle.futures:
            reply = fut.result(timeout_s)
            version = reply.meta.get("version")
            if type(version) is int:
                for k in part.keys:
                    self.versions[k] = version
            if handle.out is not None and reply.tensors:
                values = reply.tensors[0]
                if values.numel() != part.numel:
                    raise ProtocolError(f"{fut.peer} returned {values.numel()} values for {part.numel} expected")
                part.scatter(values, handle.out)
        handle.futures = []
