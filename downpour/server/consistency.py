"""Consistency policies: when a server applies a push and when it answers.

* :class:`AsyncPolicy` (Downpour/ASP): apply every push on arrival, answer at once.
* :class:`SyncPolicy` (BSP): a round is the shard's current version. Each live
  worker pushes once per round; when every worker in the membership has pushed,
  the weighted mean of their gradients is applied once and every waiting
  worker is answered with the new values. A worker that leaves (done, dead)
  is dropped from the membership, and a round waiting only for it completes.

A policy returns the replies to send; it never touches sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from downpour.protocol import Message, Op
from downpour.server.store import ShardStore


@dataclass
class Push:
    peer: bytes
    msg: Message
    idx: list[int]
    grad: torch.Tensor
    weight: float
    version: int  # the version the worker's values had

    @property
    def wants_values(self) -> bool:
        return self.msg.op == Op.PUSHPULL


Reply = tuple[bytes, Message]


class Policy:
    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None]) -> None:
        self.store = store
        self.record_staleness = record_staleness

    def push(self, p: Push) -> list[Reply]:
        raise NotImplementedError

    def set_workers(self, workers: set[str]) -> list[Reply]:
        return []

    def _answer(self, p: Push, values: torch.Tensor | None = None) -> Reply:
        version = self.store.version(p.idx)
        if p.wants_values:
            if values is None:  # a view: the send copies it, or lends it under copy-on-write
                values = self.store.read(p.idx, snapshot=False)
            return p.peer, p.msg.reply({"version": version}, [values])
        return p.peer, p.msg.reply({"version": version})


class AsyncPolicy(Policy):
    def push(self, p: Push) -> list[Reply]:
        self.record_staleness(self.store.version(p.idx) - p.version)
        self.store.apply(p.idx, p.grad)
        return [self._answer(p)]


class SyncPolicy(Policy):
    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None]) -> None:
        super().__init__(store, record_staleness)
        self.workers: set[str] = set()
        self.waiting: dict[str, Push] = {}
        self.acc: torch.Tensor | None = None
        self.weight = 0.0
        self._all = store.all

    def push(self, p: Push) -> list[Reply]:
        who = p.peer.decode(errors="replace")
        current = self.store.version(self._all)
        if p.idx is not self._all and p.idx != self._all:
            return [(p.peer, p.msg.error("sync_partial", "sync mode needs every key of the server in each push"))]
        if p.version != current:
            return [(p.peer, p.msg.error("sync_round", f"push for round {p.version}, server is at round {current}"))]
        if who in self.waiting:
            return [(p.peer, p.msg.error("sync_duplicate", f"{who} already pushed for round {current}"))]
        if self.acc is None:
            self.acc = p.grad.mul(p.weight)
        else:
            self.acc.add_(p.grad, alpha=p.weight)
        self.weight += p.weight
        self.waiting[who] = p
        self.record_staleness(0)
        return self._maybe_complete()

    def set_workers(self, workers: set[str]) -> list[Reply]:
        self.workers = set(workers)
        return self._maybe_complete()

    def _maybe_complete(self) -> list[Reply]:
        # No membership yet means the coordinator has not said who trains: keep waiting.
        if not self.waiting or not self.workers or not self.workers.issubset(self.waiting):
            return []
        assert self.acc is not None
        self.store.apply(self._all, self.acc.div_(self.weight))
        values = self.store.read(self._all) if any(p.wants_values for p in self.waiting.values()) else None
        replies = [self._answer(p, values) for p in self.waiting.values()]
        self.waiting.clear()
        self.acc, self.weight = None, 0.0
        return replies


POLICIES: dict[str, type[Policy]] = {"async": AsyncPolicy, "sync": SyncPolicy}
