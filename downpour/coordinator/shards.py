"""The data-shard plan and ledger.

Each epoch puts the training set's examples in its own seeded random order; shard
``i`` of that epoch is positions ``[i * shard_size, (i + 1) * shard_size)`` of that
order, so shards are drawn anew every epoch (with shards fixed across epochs, sync
training on 3 workers lost about 1.3 points of test accuracy in a simulation). Each
epoch hands the shards out in its own seeded order, one at a time, to whichever
worker asks next (so a fast worker takes more). The ledger records who trained
which shard of which epoch, so that every shard is trained once per epoch.

For checkpoints the ledger can say where the job stood at the moment the servers
took their snapshot (:meth:`ShardLedger.state_at`): each worker's last push carries
its data position (epoch, shard, examples of the shard done), so shards it started
later go back to the queue, and the shard it was in resumes after the examples
already in the parameters (``skip``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from downpour.errors import ConfigError

# The adaptive shard size (``data.shard_size: null``): at least this many shards per worker slot
# each epoch, and no shard larger than MAX_AUTO_SHARD examples.
SHARDS_PER_WORKER = 4
MAX_AUTO_SHARD = 2048

log = logging.getLogger(__name__)


def shard_size_for(shard_size: int | None, num_examples: int, worker_slots: int, batch_size: int) -> int:
    """``shard_size`` if given; else the largest size (at most MAX_AUTO_SHARD, but at least one
    batch: a shard shorter than a batch would cut every batch short) that cuts an epoch into
    SHARDS_PER_WORKER shards per worker slot or more. With one whole-epoch shard per worker,
    small data would not be mixed between workers within an epoch."""
    if shard_size is not None:
        return shard_size
    per = -(-max(1, num_examples) // (SHARDS_PER_WORKER * max(1, worker_slots)))
    return max(1, min(MAX_AUTO_SHARD, per), min(batch_size, num_examples))


@dataclass
class ShardLedger:
    num_examples: int
    shard_size: int
    epochs: int
    seed: int
    queue: deque = field(default_factory=deque)
    epoch: int = -1
    assigned: dict[tuple[int, int], str] = field(default_factory=dict)
    completed: dict[tuple[int, int], str] = field(default_factory=dict)
    # Examples of a shard already trained (a shard resumed from a checkpoint), skipped when handed out;
    # base_skip keeps them after the shard is done (a later snapshot may still undo its hand-out).
    skips: dict[tuple[int, int], int] = field(default_factory=dict)
    base_skip: dict[tuple[int, int], int] = field(default_factory=dict)
    # The shards each worker was handed, in order (to undo those begun after a snapshot), and
    # when (a count over all workers), so that undone shards go back in their first order.
    log: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    handed_at: dict[tuple[int, int], int] = field(default_factory=dict)
    requeued: int = 0  # shards put back because their worker left or died
    released: set = field(default_factory=set)  # (worker, shard key) put back by release()
    # Every call that changed the ledger, in order, as plain data: replaying it (:meth:`replay`)
    # rebuilds the ledger exactly. The coordinator appends it to its state file as it grows, so a
    # save costs what changed, not the whole history.
    journal: list = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.num_examples, (shard + 1) * self.shard_size)

    def next(self, node: str) -> dict | None:
        """The next shard for ``node`` ({epoch, shard, start, stop}), or None when all are handed out."""
        self.journal.append(["next", node])
        while not self.queue:
            if self.epoch + 1 >= self.epochs:
                return None
            self.epoch += 1
            order = np.random.default_rng([self.seed, 0x5EED, self.epoch]).permutation(self.num_shards)
            self.queue.extend((self.epoch, int(s)) for s in order)
        epoch, shard = self.queue.popleft()
        self.assigned[(epoch, shard)] = node
        self.log.setdefault(node, []).append((epoch, shard))
        self.handed_at[(epoch, shard)] = len(self.handed_at)
        return self._describe(epoch, shard)

    def has_next(self) -> bool:
        """Whether :meth:`next` would hand out a shard (it changes nothing)."""
        return bool(self.queue) or self.epoch + 1 < self.epochs

    def held(self, node: str) -> dict | None:
        """The unfinished shard ``node`` was handed last, described as :meth:`next` does (None: none)."""
        mine = [k for k, who in self.assigned.items() if who == node]
        return self._describe(*max(mine, key=lambda k: self.handed_at.get(k, -1))) if mine else None

    def _describe(self, epoch: int, shard: int) -> dict:
        start, stop = self.bounds(shard)
        return {"epoch": epoch, "shard": shard, "start": start, "stop": stop, "skip": self.skips.get((epoch, shard), 0)}

    def done(self, node: str, epoch: int, shard: int) -> bool:
        """Record a finished shard; False if ``node`` was not training it. Saying so twice is
        harmless (a repeated request whose answer was lost)."""
        if self.completed.get((epoch, shard)) == node and (epoch, shard) not in self.assigned:
            return True
        if self.assigned.get((epoch, shard)) != node:
            return False
        self.journal.append(["done", node, epoch, shard])
        del self.assigned[(epoch, shard)]
        self.completed[(epoch, shard)] = node
        self.skips.pop((epoch, shard), None)
        return True

    def release(self, node: str, position: list[int] | None) -> list[list[int]]:
        """``node`` left or died: the shards it was handed and had not finished go back to the
        front of the queue, in the order it got them. The one ``position`` ([epoch, shard,
        examples done]: its last acknowledged push) names resumes after those examples, or
        counts as completed if they were all of it. Returns [[epoch, shard, skip], ...] requeued."""
        self.journal.append(["release", node, position])
        mine = sorted((k for k, who in self.assigned.items() if who == node), key=lambda k: self.handed_at.get(k, -1))
        back: list[tuple[int, int]] = []
        for key in mine:
            del self.assigned[key]
            skip = self.skips.get(key, 0)
            if position is not None and (position[0], position[1]) == key:
                skip = max(skip, int(position[2]))
            lo, hi = self.bounds(key[1])
            if skip >= hi - lo:  # every example of it reached the servers
                self.completed[key] = node
                self.skips.pop(key, None)
                continue
            if key in self.log.get(node, []):  # no longer its: a later snapshot must not undo it through this log
                self.log[node].remove(key)
            self.released.add((node, key))
            if skip:
                self.skips[key] = skip
            back.append(key)
        self.queue.extendleft(reversed(back))
        self.requeued += len(back)
        return [[e, s, self.skips.get((e, s), 0)] for e, s in back]

    # -- checkpoints ------------------------------------------------------------
    def state_at(self, positions: dict[str, list[int]], final: bool = False) -> dict:
        """The ledger as it stood when the servers took a snapshot, as plain data.

        ``positions`` maps a worker to its data position in that snapshot: [epoch, shard,
        examples of the shard done] of its last push included. The shard a worker was in
        resumes after those examples (or counts as completed if they were all of it); shards
        it was handed afterwards were not begun then, nor were those of a worker with no position.
        ``final``: a snapshot taken with no worker training (the end of training, a graceful stop's
        last checkpoint): a shard reported done is done, whatever the last push's position says (a
        stream partition ends at its end marker, read after its last push, not at a bound)."""
        completed = set(self.completed)
        skips = {**self.base_skip, **self.skips}
        back: dict[tuple[int, int], None] = dict.fromkeys(self.assigned)  # unfinished now: unfinished then
        for node, handed in self.log.items():
            pos = positions.get(node)
            key = (pos[0], pos[1]) if pos is not None else None
            if (node, key) in self.released:  # its last push was in a shard since put back: the rest was before
                at, pos = len(handed) - 1, None
            else:
                at = handed.index(key) if key in handed else -1
            if at >= 0 and pos is not None:
                lo, hi = self.bounds(key[1])
                if pos[2] >= hi - lo or (final and key in self.completed):
                    completed.add(key)
                    back.pop(key, None)
                    skips.pop(key, None)
                else:
                    completed.discard(key)
                    back[key] = None
                    skips[key] = pos[2]
            for later in handed[at + 1 :]:  # handed out after the snapshot
                if final and later in self.completed:
                    continue
                completed.discard(later)
                back[later] = None
        first = sorted(back, key=lambda k: self.handed_at.get(k, -1))  # as they were first handed out
        queue = [*first, *(k for k in self.queue if k not in back)]
        return {"epoch": self.epoch, "completed": sorted([e, s] for e, s in completed),
                "queue": [[e, s, skips.get((e, s), 0)] for e, s in queue],
                "num_examples": self.num_examples, "shard_size": self.shard_size}

    @staticmethod
    def trained_in(state: dict) -> int | None:
        """How many examples a :meth:`state_at` state says were trained (every epoch's completed shards
        and the parts of shards done); None for a state without the data's length (an older one)."""
        n, size = state.get("num_examples"), state.get("shard_size")
        if n is None or size is None:
            return None
        n, size = int(n), int(size)
        whole = sum(min(size, n - int(s) * size) for _, s in state.get("completed") or [])
        return whole + sum(int(k) for _, _, k in state.get("queue") or [])

    def earliest(self, node: str, positions: list[list[int]]) -> list[int]:
        """Of one worker's positions as several servers saw them (async: each server's copy is
        taken at its own moment), the earliest: what every server's parameters include."""
        handed = self.log.get(node, [])

        def order(pos: list[int]) -> tuple[int, int]:
            key = (pos[0], pos[1])
            return (handed.index(key) if key in handed else -1, pos[2])

        return min(positions, key=order)

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state_at`'s plain data (a checkpoint's job state). Its shards keep their
        size (the automatic one follows the worker count, which a resumed job may change); data of
        another length is refused: the shards would name other examples."""
        n, size = state.get("num_examples"), state.get("shard_size")
        if n is not None and int(n) != self.num_examples:
            raise ConfigError(f"the checkpoint was trained on {int(n)} training examples, this job's data holds "
                              f"{self.num_examples}: resume it on the same data, or start a new job from its parameters "
                              "with checkpoint.init_from")
        if size is not None and int(size) != self.shard_size:
            log.info("coordinator: the resumed job keeps its checkpoint's shards of %d examples (this job's would be %d)",
                     int(size), self.shard_size)
            self.shard_size = int(size)
        self.journal.append(["restore", state])
        self.epoch = int(state["epoch"])
        self.completed = {(int(e), int(s)): "checkpoint" for e, s in state["completed"]}
        self.queue = deque((int(e), int(s)) for e, s, _ in state["queue"])
        self.skips = {(int(e), int(s)): int(k) for e, s, k in state["queue"] if int(k) > 0}
        self.base_skip = dict(self.skips)
        self.assigned, self.log, self.handed_at = {}, {}, {}
        self.released = set()

    # -- the coordinator's own state (it survives a restart of the coordinator) -------------------
    def replay(self, journal: list) -> None:
        """Apply a :attr:`journal` (another ledger's, from the same start): the same calls in the
        same order give the same ledger, its queue, hand-out order and skips included."""
        for event in journal:
            kind, args = event[0], event[1:]
            if kind == "next":
                self.next(*args)
            elif kind == "done":
                self.done(*args)
            elif kind == "release":
                self.release(*args)
            elif kind == "restore":
                self.restore(*args)
            else:
                raise ValueError(f"unknown ledger event {kind!r}")

    def complete(self) -> bool:
        """Every shard of every epoch was trained (none handed out, queued or still to come)."""
        return not self.assigned and not self.queue and self.epoch + 1 >= self.epochs

    def summary(self) -> dict:
        per_epoch: dict[int, int] = {}
        for epoch, _ in self.completed:
            per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
        return {
            "num_shards": self.num_shards,
            "shard_size": self.shard_size,
            "completed_per_epoch": {str(e): n for e, n in sorted(per_epoch.items())},
            "unfinished": len(self.assigned) + len(self.queue),  # of the epochs begun: handed out or waiting
            # of the whole job: every shard of every epoch not completed yet (epochs not begun too)
            "remaining": max(0, self.epochs * self.num_shards - len(self.completed)),
            "requeued": self.requeued,
        }
