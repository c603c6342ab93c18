"""When to checkpoint, and whether a checkpoint is complete: pure decisions on the coordinator's clock.

A checkpoint begins with a ``CHECKPOINT`` to every server, at a cut every server reaches with the
same pushes applied: a common future version in sync mode (every shard holds the same round), a
push number per worker in async and ssp mode (server/snapshot.py); at once for a graceful stop's
final checkpoint and the end of training, when no worker pushes. Each server copies
its shard, writes it in the background and reports the file's SHA-256. When every server
reported, the coordinator writes the job's state (``job.json``) and then the manifest, which
makes the checkpoint exist. A checkpoint not complete within ``checkpoint.timeout_s`` is
abandoned; the previous one stays the latest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from downpour.config import CheckpointConfig

log = logging.getLogger(__name__)

JOB_STATE = "job.json"


@dataclass
class Pending:
    name: str
    step: int
    asked: float
    at_version: int | None
    final: bool
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    retries: int = 0
    passed: int = 0  # sync: the highest version a server reported when it passed at_version
    versions: dict[str, int] = field(default_factory=dict)  # server rank -> its version in the checkpoint
    # async/ssp: while the cut is being placed, each server's answer to the probe (server -> worker
    # -> the highest push number it has seen of that worker), of the servers asked; None otherwise.
    probes: dict[str, dict[str, int]] | None = None
    probed: set[str] = field(default_factory=set)  # the servers asked


class CheckpointPlan:
    def __init__(self, cfg: CheckpointConfig, url: str | None, sync: bool, num_servers: int, now: float) -> None:
        self.cfg = cfg
        self.url = url
        self.enabled = cfg.enabled and url is not None
        self.sync = sync
        self.num_servers = num_servers
        self.pending: Pending | None = None
        self.last_at = now
        self.last_step = 0
        self.committed: list[dict[str, Any]] = []
        self.abandoned = 0
        self.replaced = 0  # begun, then replaced by a newer one before all its parts came (a sync cut it missed, say)
        self.final_abandoned: str | None = None  # why the final checkpoint (end of training, a graceful stop) was not written
        self._seq = 0
        # checkpoint.at_start: the first checkpoint is due as soon as training starts (a resumed job
        # has its restore point already: the coordinator turns this off).
        self.start_due = self.enabled and cfg.at_start

    def due(self, now: float, step: int) -> bool:
        if not self.enabled or self.pending is not None:
            return False
        if self.start_due:
            return True
        if self.committed and self.committed[-1]["step"] == step:  # nothing was pushed since: the same state again
            return False
        by_time = self.cfg.every_s is not None and now - self.last_at >= self.cfg.every_s
        by_steps = self.cfg.every_steps is not None and step - self.last_step >= self.cfg.every_steps
        return by_time or by_steps

    def begin(self, now: float, step: int, at_version: int | None, final: bool = False) -> Pending:
        """A new checkpoint (it replaces one still pending, which is abandoned)."""
        if self.pending is not None:
            log.info("coordinator: checkpoint %s replaced by a newer one", self.pending.name)
            self.replaced += 1
            self.pending = None
        self._seq += 1
        self.start_due = False
        # Named by the step, plus a sequence number: two checkpoints at one step never collide.
        name = f"ckpt-{step:012d}-{self._seq:04d}"
        self.pending = Pending(name, step, now, at_version, final)
        self.last_at, self.last_step = now, step
        return self.pending

    def on_report(self, server: str, data: dict[str, Any]) -> str:
        """A server's report: 'complete' (all servers in), 'missed' (sync: it passed at_version),
        'failed' (it could not write), 'wait', or 'stale' (not the pending checkpoint)."""
        p = self.pending
        if p is None or data.get("name") != p.name:
            return "stale"
        if data.get("missed"):
            return "missed"
        if data.get("error"):
            return "failed"
        p.reports[server] = data
        return "complete" if len(p.reports) == self.num_servers else "wait"

    def expired(self, now: float) -> bool:
        return self.pending is not None and now - self.pending.asked > self.cfg.timeout_s

    def abandon(self, now: float, why: str) -> None:
        if self.pending is not None:
            log.error("coordinator: checkpoint %s abandoned: %s", self.pending.name, why)
            self.abandoned += 1
            if self.pending.final:
                self.final_abandoned = f"{self.pending.name}: {why}"
            self.pending = None

    def committed_now(self, now: float, write_s: float) -> None:
        p = self.pending
        assert p is not None
        self.committed.append({"name": p.name, "step": p.step, "write_s": write_s, "final": p.final, "versions": p.versions})
        if p.final:
            self.final_abandoned = None
        self.pending = None

    def export(self, base: float) -> dict[str, Any]:
        """What a restarted coordinator needs (times relative to ``base``, the job's start)."""
        return {"committed": self.committed, "abandoned": self.abandoned, "replaced": self.replaced, "seq": self._seq,
                "last_step": self.last_step,
                "last_at": self.last_at - base, "pending": self.pending.name if self.pending else None,
                "final_abandoned": self.final_abandoned}

    def adopt(self, saved: dict[str, Any], base: float, resumed: bool) -> None:
        """Continue from :meth:`export`'s ``saved``. A checkpoint that was being written is
        abandoned (its servers' reports went to the old process)."""
        self.committed, self.abandoned = list(saved["committed"]), int(saved["abandoned"])
        self._seq, self.last_step = int(saved["seq"]), int(saved["last_step"])
        self.last_at = base + float(saved["last_at"])
        self.final_abandoned = saved.get("final_abandoned")
        self.replaced = int(saved.get("replaced") or 0)  # (a state saved before the count existed: none)
        self.start_due = self.start_due and self._seq == 0 and not resumed
        if saved["pending"]:
            self.abandoned += 1
            log.warning("coordinator: checkpoint %s was being written when the coordinator stopped; abandoned", saved["pending"])

    def summary(self) -> dict[str, Any]:
        writes = [c["write_s"] for c in self.committed]
        return {
            "enabled": self.enabled,
            "url": self.url,
            "count": len(self.committed),
            "last_step": self.committed[-1]["step"] if self.committed else None,
            "last": self.committed[-1]["name"] if self.committed else None,
            "mean_write_s": sum(writes) / len(writes) if writes else None,
            "abandoned": self.abandoned,
            "replaced": self.replaced,  # (count + abandoned + replaced: the checkpoints begun, the names' sequence)
            **({"final_abandoned": self.final_abandoned} if self.final_abandoned else {}),
        }


def sync_margin(rate_per_s: float, heartbeat_interval_s: float) -> int:
    """How many rounds ahead a sync checkpoint is placed: far enough that every server hears
    of it before reaching that version (one heartbeat of lag, twice over), but soon."""
    return int(rate_per_s * (2 * heartbeat_interval_s + 0.25)) + 5


MAX_WIDENING = 4


def widening(retries: int) -> int:
    """How many margins ahead the cut of a checkpoint asked again is placed after ``retries``
    servers passed it: twice as far each time, at most :data:`MAX_WIDENING` times. Each new ask
    starts from where the servers were last seen (the passing server's own version, in sync mode;
    a fresh probe, async), so a wider margin only covers a slower delivery; left to double, five
    retries put a short job's checkpoint past its end (32 margins, thousands of rounds)."""
    return min(2**retries, MAX_WIDENING)


def clock_margin(pushes_per_s: float, heartbeat_interval_s: float) -> int:
    """How many pushes ahead of a worker's last reported count an async checkpoint's cut is placed:
    the count is at most a heartbeat old, and the CHECKPOINT goes straight to the servers, so a
    heartbeat and a half of the worker's pushes, plus a few, puts it ahead of every server (one
    already past it says so, and the cut moves further ahead)."""
    return int(pushes_per_s * (1.5 * heartbeat_interval_s + 0.1)) + 3


def probe_margin(pushes_per_s: float, round_trip_s: float) -> int:
    """How many pushes ahead of the highest push number the servers reported (to a probe answered
    within ``round_trip_s``) an async checkpoint's cut is placed: those numbers are at most a round
    trip old when the CHECKPOINT goes out, and it takes about half of one to arrive, so twice the
    round trip of the worker's pushes, plus 2 (a server already past says so: the cut moves ahead)."""
    return int(pushes_per_s * 2 * round_trip_s) + 2
