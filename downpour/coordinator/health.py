"""Diagnosis instead of silent hangs: which node is silent, stalled or falling behind,
since when, and which key ranges or data shards it holds up.

:class:`Health` is pure logic driven by the coordinator's clock (``update`` takes
the nodes and the time), so tests drive it with a fake clock. The coordinator
logs each alert when it starts and when it clears, and shows the current ones
in ``STATUS`` (so in the dashboard and ``downpour status``).

Kinds:

* ``silent``: no heartbeat for ``silent_after_s`` (well before the node is
  declared dead at ``cluster.heartbeat_timeout_s``).
* ``stalled``: a training worker whose step count has not moved for
  ``monitor.stall_after_s`` (waiting on a dead server, a lost sync round, a hung
  data read, a deadlock in user code).
* ``slow``: a training worker below ``monitor.slow_fraction`` of the other
  workers' median examples/s for ``monitor.stall_after_s`` (a straggler).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class NodeView(Protocol):
    name: str
    role: str
    state: str
    last_seen: float
    progress: dict[str, Any]


@dataclass
class Alert:
    node: str
    kind: str
    since: float  # coordinator clock (seconds) when the condition began
    message: str
    affected: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "since_s": round(now - self.since, 3),
                "message": self.message, "affected": self.affected}


class Health:
    def __init__(self, silent_after_s: float, stall_after_s: float, slow_fraction: float) -> None:
        self.silent_after_s = silent_after_s
        self.stall_after_s = stall_after_s
        self.slow_fraction = slow_fraction
        self.alerts: dict[tuple[str, str], Alert] = {}
        self._steps: dict[str, tuple[int, float]] = {}  # worker -> (steps, when they last changed)
        self._slow_since: dict[str, float] = {}

    def update(self, nodes: list[NodeView], training: bool, now: float,
               affected: Callable[[str], dict[str, list[str]]]) -> None:
        """Re-evaluate every node; ``training`` says whether workers should be making steps now;
        ``affected(node)`` names the keys or shards a node holds (asked when an alert begins)."""
        found: dict[tuple[str, str], tuple[float, str]] = {}
        live = [n for n in nodes if n.state in ("alive", "done")]
        for n in live:
            silent = now - n.last_seen
            if silent >= self.silent_after_s:
                found[(n.name, "silent")] = (n.last_seen, f"{n.name} sent no heartbeat for {silent:.1f}s")
        # A worker waiting for a shard (others hold the last ones) makes no steps on purpose.
        workers = [n for n in live if n.role == "worker" and n.state == "alive" and not getattr(n, "idle", False)]
        for n in workers:
            steps = int(n.progress.get("steps", 0))
            last = self._steps.get(n.name)
            if last is None or last[0] != steps or not training:
                self._steps[n.name] = (steps, now)
            elif now - last[1] >= self.stall_after_s:
                found[(n.name, "stalled")] = (last[1], f"{n.name} made no step for {now - last[1]:.1f}s (at step {steps})")
        rates = {n.name: float(n.progress.get("examples_per_s", 0.0)) for n in workers}
        for n in workers:
            others = [r for name, r in rates.items() if name != n.name]
            slow = training and bool(others) and rates[n.name] < self.slow_fraction * statistics.median(others)
            if not slow:
                self._slow_since.pop(n.name, None)
                continue
            since = self._slow_since.setdefault(n.name, now)
            if now - since >= self.stall_after_s:
                median = statistics.median(others)
                found[(n.name, "slow")] = (since, f"{n.name} runs at {rates[n.name]:.0f} examples/s, "
                                                  f"below {self.slow_fraction:g} x the others' median {median:.0f}")
        names = {n.name for n in live}
        for key in [k for k in self.alerts if k not in found]:
            alert = self.alerts.pop(key)
            if alert.node not in names:  # declared dead or gone: not "no longer silent" (its end was logged)
                continue
            log.info("coordinator: %s is no longer %s (after %.1fs)", alert.node, alert.kind, now - alert.since)
        for key, (since, message) in found.items():
            alert = self.alerts.get(key)
            if alert is None:
                alert = self.alerts[key] = Alert(key[0], key[1], since, message, affected(key[0]))
                log.warning("coordinator: %s: %s", message, describe_affected(alert.affected))
            else:
                alert.message = message

    def current(self, now: float) -> list[dict[str, Any]]:
        return [a.to_dict(now) for a in sorted(self.alerts.values(), key=lambda a: (a.since, a.node))]


def describe_affected(affected: dict[str, list[str]]) -> str:
    parts = []
    if affected.get("keys"):
        parts.append("holds keys " + ", ".join(affected["keys"]))
    if affected.get("shards"):
        parts.append("training " + ", ".join(affected["shards"]))
    return "; ".join(parts) or "holds no keys or shards"
