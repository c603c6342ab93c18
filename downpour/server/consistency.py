"""Consistency policies: when a server applies a push and when it answers.

* :class:`AsyncPolicy` (Downpour/ASP): apply every push on arrival, answer at once.
  With ``training.staleness_lr`` a push ``s`` versions stale is applied scaled by 1/s.
* :class:`SyncPolicy` (BSP): a round is the shard's current version. Each live
  worker pushes once per round; when every worker in the membership has pushed,
  the weighted mean of their gradients is applied once and every waiting
  worker is answered with the new values. A worker that leaves (done, dead)
  is dropped from the membership, and a round waiting only for it completes.
  Except in a graceful stop (:meth:`Policy.freeze`): a worker leaving then
  ends the rounds, so none completes without it (see there).
* :class:`SSPPolicy` (stale synchronous parallel): applies as async, but the
  reply to a worker's push number ``c`` (its clock, sent with the push) waits
  until ``c - slowest <= staleness_bound``, where ``slowest`` is the lowest
  clock among the live workers of the membership. The worker waits for that
  reply before its next step, so no worker runs more than the bound ahead.

A policy returns the replies to send; it never touches sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from downpour.compress import Codec, encode_pull
from downpour.config import TrainingConfig
from downpour.protocol import Message, Op
from downpour.protocol.ops import Code
from downpour.server import kernels
from downpour.server.store import ShardStore


@dataclass
class Push:
    peer: bytes
    msg: Message
    idx: list[int]
    grad: torch.Tensor
    weight: float
    version: int  # the version the worker's values had
    pull: Codec | None = None  # how the reply's values are encoded (None: float32)
    delta: bool = False  # ``grad`` is a change to add to the values (local SGD), not a gradient
    clock: int | None = None  # how many pushes the worker has made, this one included (SSP)
    key_versions: list[int] | None = None  # per key of the request (consistency per group)

    @property
    def wants_values(self) -> bool:
        return self.msg.op == Op.PUSHPULL


Reply = tuple[bytes, Message]


def values_reply(msg: Message, version: int, values: torch.Tensor, pull: Codec | None) -> Message:
    """The OK reply carrying ``values``, encoded with ``pull`` when the request asked for it."""
    if pull is None:
        return msg.reply({"version": version}, [values])
    enc, tensors = encode_pull(pull, values)
    return msg.reply({"version": version, "enc": enc}, tensors)


class Policy:
    """``keys``: the store indices this policy governs (all of them unless the job sets
    consistency per parameter group, see ``grouped.py``)."""

    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None], training: TrainingConfig | None = None,
                 keys: list[int] | None = None) -> None:
        self.store = store
        self.record_staleness = record_staleness
        self.training = training or TrainingConfig()
        self.keys = store.all if keys is None else keys

    def refuse(self, p: Push) -> Reply | None:
        """The error reply if ``p`` would be refused (checked before anything is applied)."""
        return None

    def push(self, p: Push) -> list[Reply]:
        raise NotImplementedError

    def set_workers(self, workers: set[str]) -> list[Reply]:
        return []

    def restored(self) -> None:
        """The server took its state from a checkpoint while the job's workers were running (a
        replacement, or a resumed job): what they pushed before is unknown here."""

    def freeze(self) -> list[Reply]:
        """A graceful stop of a sync job: a worker left (for good, with its data position), so no
        round completes any more (sync: refusals for the pushes waiting, see SyncPolicy)."""
        return []

    def stats(self) -> dict[str, int]:
        """Figures this policy adds to the server's stats."""
        return {}

    def _answer(self, p: Push, values: torch.Tensor | None = None) -> Reply:
        version = self.store.version(p.idx)
        if p.wants_values:
            if values is None:  # a view: the send copies it, or lends it under copy-on-write
                values = self.store.read(p.idx, snapshot=False)
            return p.peer, values_reply(p.msg, version, values, p.pull)
        return p.peer, p.msg.reply({"version": version})


class AsyncPolicy(Policy):
    """With the store's ``lookahead`` (``async_rule: lookahead``, server/lookahead.py) a gradient
    goes to its worker's momentum buffer and a reply carries the look-ahead values. The update and
    the reply's values are one pass (server/kernels.py): written straight into the memory
    ``reply_slot(peer, req_id)`` names when the server sets it (the request's shared-memory slot,
    which the server offers only where nothing reads the request's gradient there afterwards)."""

    reply_slot: Callable[[bytes, int], torch.Tensor | None] | None = None

    def push(self, p: Push) -> list[Reply]:
        into = None
        if self.reply_slot is not None and p.wants_values and p.pull is None:
            into = self.reply_slot(p.peer, p.msg.req_id)
            if into is not None and into.numel() != self.store.size_of(p.idx):
                into = None
        return [self._answer(p, self._apply(p, p.wants_values, into))]

    def set_workers(self, workers: set[str]) -> list[Reply]:
        if self.store.lookahead is not None:
            self.store.lookahead.keep(set(workers))
        return []

    def _apply(self, p: Push, reply: bool = False, into: torch.Tensor | None = None) -> torch.Tensor | None:
        """Apply ``p``; with ``reply``, also the values ``p``'s worker is sent, in the same pass: into
        ``into`` when given. Returns them (None: no values were written, the stored ones are sent)."""
        # A push of a version past this server's is from values it no longer holds: it was restored
        # from a checkpoint behind where its predecessor stood (or a peer said so): not stale at all.
        stale = max(0, self.store.version(p.idx) - p.version)
        self.record_staleness(stale)
        grad = p.grad / stale if self.training.staleness_lr and stale > 1 else p.grad
        if self.store.lookahead is not None and not p.delta:
            return self.store.lookahead.step(p.peer.decode(errors="replace"), p.idx, grad, reply, into)
        self.store.apply(p.idx, grad, delta=p.delta, out=into)
        return into

    def _answer(self, p: Push, values: torch.Tensor | None = None) -> Reply:
        if values is None and p.wants_values and self.store.lookahead is not None:
            values = self.store.lookahead.values(p.idx, p.peer.decode(errors="replace"))
        return super()._answer(p, values)


class SSPPolicy(AsyncPolicy):
    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None], training: TrainingConfig | None = None,
                 keys: list[int] | None = None) -> None:
        super().__init__(store, record_staleness, training, keys)
        self.bound = self.training.staleness_bound
        self.workers: set[str] = set()
        # Clocks are the workers' push counts plus an offset: a worker that joins a running job
        # (or comes back after waiting for a shard) starts level with the slowest member instead
        # of holding everyone back until its count catches up.
        self.clocks: dict[str, int] = {}
        self.raw: dict[str, int] = {}  # each worker's own last push count
        self.offsets: dict[str, int] = {}
        self.held: list[tuple[str, int, Push]] = []
        self.max_lead = 0  # the largest lead (in pushes) of a worker over the slowest when answered
        # Restored from a checkpoint (a replacement server): the workers' push counts go on from
        # wherever each one was (a replaced worker's from 1, the others' from thousands), so each
        # worker's first push here is counted level with the slowest heard from (1 if none was, as
        # at the start of a job), or where a membership placed it.
        self.late = False

    def restored(self) -> None:
        self.late = True

    def refuse(self, p: Push) -> Reply | None:
        if p.clock is None:
            return p.peer, p.msg.error("ssp_clock", "ssp mode needs the worker's clock in each push")
        return None

    def push(self, p: Push) -> list[Reply]:
        refused = self.refuse(p)
        if refused is not None:
            return [refused]
        self._apply(p)
        who = p.peer.decode(errors="replace")
        if self.late and who not in self.raw:
            known = [self.clocks[w] for w in self.workers if w != who and w in self.raw]
            self.offsets[who] = max(1, self.clocks.get(who, min(known, default=0))) - p.clock
        self.raw[who] = max(self.raw.get(who, 0), p.clock)
        clock = p.clock + self.offsets.get(who, 0)
        self.clocks[who] = max(self.clocks.get(who, 0), clock)
        self.held.append((who, clock, p))
        return self._release()

    def set_workers(self, workers: set[str]) -> list[Reply]:
        workers = set(workers)
        super().set_workers(workers)
        if self.workers:  # not the first membership: newcomers start level with the slowest member
            stay = workers & self.workers
            level = min((self.clocks.get(w, 0) for w in stay), default=None)
            for w in workers - self.workers:
                if level is not None:  # (a clock never goes back: one back from waiting for a shard keeps its offset)
                    self.offsets[w] = max(self.offsets.get(w, 0), level - self.raw.get(w, 0))
                    self.clocks[w] = self.raw.get(w, 0) + self.offsets[w]
        self.workers = workers
        return self._release()

    def stats(self) -> dict[str, int]:
        return {"ssp_max_lead": self.max_lead}

    def _release(self) -> list[Reply]:
        # Before the coordinator named the workers (or for a worker it no longer counts) nothing is held.
        slowest = min((self.clocks.get(w, 0) for w in self.workers), default=None)
        out, keep = [], []
        for who, clock, p in self.held:
            lead = clock - slowest if slowest is not None and who in self.workers else 0
            if lead <= self.bound:
                self.max_lead = max(self.max_lead, lead)
                out.append(self._answer(p))
            else:
                keep.append((who, clock, p))
        self.held = keep
        return out


class SyncPolicy(Policy):
    """``reply_slot``: as AsyncPolicy's (set by the server where replies may go into request slots)."""

    reply_slot: Callable[[bytes, int], torch.Tensor | None] | None = None

    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None], training: TrainingConfig | None = None,
                 keys: list[int] | None = None) -> None:
        super().__init__(store, record_staleness, training, keys)
        self.workers: set[str] = set()
        self.waiting: dict[str, Push] = {}
        self.delta = False
        self._all = self.keys
        self.frozen = False  # a graceful stop: no round completes any more (freeze)

    def refuse(self, p: Push) -> Reply | None:
        if self.frozen:
            return p.peer, p.msg.error(Code.STOPPING, "the job is stopping: no more sync rounds")
        current = self.store.version(self._all)
        if p.idx is not self._all and p.idx != self._all:
            return p.peer, p.msg.error("sync_partial", "sync mode needs every key of the server in each push")
        if p.version != current:
            return p.peer, p.msg.error("sync_round", f"push for round {p.version}, server is at round {current}")
        who = p.peer.decode(errors="replace")
        if self.workers and who not in self.workers:  # (a worker back from waiting for a shard: it pulls and goes on)
            return p.peer, p.msg.error("not_member", f"{who} is not in this round's membership")
        if who in self.waiting:
            return p.peer, p.msg.error("sync_duplicate", f"{who} already pushed for round {current}")
        return None

    def push(self, p: Push) -> list[Reply]:
        refused = self.refuse(p)
        if refused is not None:
            return [refused]
        who = p.peer.decode(errors="replace")
        self.delta = p.delta
        self.waiting[who] = p  # summed when the round completes, in rank order (see _mean)
        self.record_staleness(0)
        return self._maybe_complete()

    def set_workers(self, workers: set[str]) -> list[Reply]:
        self.workers = set(workers)
        return self._maybe_complete()

    def freeze(self) -> list[Reply]:
        """The job stops gracefully and a worker left after its last round: a round it did not push
        to can never complete with every worker, and completing it with fewer (the weighted mean
        of the others, at another lr) would train differently from an uninterrupted run. That
        happens when a worker hears of the stop after the round every worker was told to leave
        after: the others, having left there, would leave it training alone until it hears. So
        the waiting pushes are refused (``stopping``: not applied, their workers leave at their
        last applied push) and so is every push from now on."""
        self.frozen = True
        replies = [(p.peer, p.msg.error(Code.STOPPING, "the job is stopping: no more sync rounds")) for p in self.waiting.values()]
        self.waiting.clear()
        return replies

    def rebind(self, p: Push) -> bool:
        """``p`` repeats a push waiting in this round (a worker's replay after a failover): its
        answer goes to ``p``'s request when the round completes. False: it waits for nothing here."""
        who = p.peer.decode(errors="replace")
        old = self.waiting.get(who)
        if old is None:
            return False
        old.peer, old.msg, old.pull, old.grad = p.peer, p.msg, p.pull, p.grad
        return True

    def _ranked(self) -> list[Push]:
        """The round's pushes in the workers' rank order, the order their mean sums them in: float
        addition is not associative, so summing in arrival order would make a sync job's parameters
        depend on timing (a stopped-and-resumed job would not land on an uninterrupted run's)."""
        return [self.waiting[w] for w in sorted(self.waiting, key=_rank_order)]

    def _slot(self, p: Push) -> torch.Tensor | None:
        """Where ``p``'s reply values may be written before it is sent (its request's shared-memory
        slot, see AsyncPolicy), or None."""
        if self.reply_slot is None or not p.wants_values or p.pull is not None:
            return None
        into = self.reply_slot(p.peer, p.msg.req_id)
        return into if into is not None and into.numel() == self.store.size_of(self._all) else None

    def _maybe_complete(self) -> list[Reply]:
        # No membership yet means the coordinator has not said who trains: keep waiting.
        if self.frozen or not self.waiting or not self.workers or not self.workers.issubset(self.waiting):
            return []
        pushes = self._ranked()
        if not self.delta and self.store.rule.fuses_mean:
            # Mean, step and the replies' values in one pass (server/kernels.py), each reply's values
            # written into its request's slot where it has one.
            slots = {id(p): self._slot(p) for p in pushes}
            self.store.apply_mean(self._all, [p.grad for p in pushes], [p.weight for p in pushes],
                                  [s for s in slots.values() if s is not None], pushes=len(pushes))
        else:
            slots = {}
            self.store.apply(self._all, kernels.mean([p.grad for p in pushes], [p.weight for p in pushes]),
                             delta=self.delta, pushes=len(pushes))
        values = None
        if any(p.wants_values and slots.get(id(p)) is None for p in pushes):
            values = self.store.read(self._all)
        replies = [self._answer(p, values if slots.get(id(p)) is None else slots[id(p)]) for p in self.waiting.values()]
        self.waiting.clear()
        return replies


def _rank_order(who: str) -> tuple[int, str]:
    """Sort key of a routing id ``worker-R`` or ``worker-R.G``: the rank, then the name."""
    head = who.partition(".")[0]
    rank = head.rpartition("-")[2]
    return (int(rank) if rank.isdigit() else 1 << 30, who)


POLICIES: dict[str, type[Policy]] = {"async": AsyncPolicy, "sync": SyncPolicy, "ssp": SSPPolicy}
