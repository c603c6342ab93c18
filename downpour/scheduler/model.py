"""The scheduler's view of a job: who asked, what it needs, where it is in its life.

The same :class:`Job` record serves the simulator and the service; the service adds where the
job's processes run (``run_dir``, ``pid``). Times are seconds on the scheduler's clock (simulated
or ``time.time()``), never read here: whoever owns the clock passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from downpour.scheduler.resources import Resources, total


class Phase(StrEnum):
    QUEUED = "queued"        # waiting for resources (new, preempted, or waiting to restart)
    RUNNING = "running"
    STOPPING = "stopping"    # asked to checkpoint and stop (preempted or cancelled); still holds its resources
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED, Phase.CANCELLED)

    @property
    def holds_resources(self) -> bool:
        return self in (Phase.RUNNING, Phase.STOPPING)


@dataclass
class Job:
    """One job. ``tasks`` is its gang: one resource vector per process (servers, then workers)."""

    id: int
    tasks: tuple[Resources, ...]
    submitted_s: float
    user: str = "default"
    queue: str = "default"
    priority: int = 0
    name: str = ""
    phase: Phase = Phase.QUEUED
    placement: tuple[str, ...] | None = None   # node of each task while it holds resources
    started_s: float | None = None             # start of the current run
    first_started_s: float | None = None
    finished_s: float | None = None
    attained: float = 0.0                      # service received: tasks x seconds run (Tiresias' 2D attained service)
    preemptions: int = 0
    restarts: int = 0                          # restarts after failures
    retrying: bool = False                     # queued again after its attempt failed: preempts nobody (decide.py)
    not_before_s: float = 0.0                  # back-off: not restarted before this time
    cancel_requested: bool = False
    # When this job last preempted others to start, until it starts (whoever performs a Preempt sets
    # it, a Start clears it): under a policy with ``keeps_claims`` it starts first (decide.py).
    claimed_s: float | None = None
    message: str = ""
    # The service's: where the job runs.
    run_dir: str = ""
    pid: int | None = None
    attempt: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def demand(self) -> Resources:
        return total(self.tasks)

    @property
    def width(self) -> int:
        """Tasks in the gang: the unit of attained service (as GPUs are in Tiresias)."""
        return len(self.tasks)

    def attained_at(self, now: float) -> float:
        """Attained service including the current run so far."""
        if self.phase is Phase.RUNNING and self.started_s is not None:
            return self.attained + self.width * max(0.0, now - self.started_s)
        return self.attained

    def entity(self, level: str) -> str:
        return self.queue if level == "queue" else f"{self.queue}/{self.user}"
