"""The job's state as data: what a coordinator knows, and what a restarted one must get back.

:class:`JobState` is a dataclass of plain values, nodes and failure records; the decision modules
(:mod:`~downpour.coordinator.membership`, :mod:`~downpour.coordinator.failures`,
:mod:`~downpour.coordinator.checkpoints`, :mod:`~downpour.coordinator.hosting`) read and change it,
and :mod:`~downpour.coordinator.persist` saves and restores every one of its fields generically
(a new field is saved without touching persist.py; its ``metadata`` says how, see :data:`TIME`).

Life of a job (:class:`Phase`)::

    registering --all servers and workers registered--> training
    training --every worker reported WORKER_DONE--> evaluating
    evaluating --the evaluator's REPORT--> stopping
    stopping --every server's REPORT--> finished
    (any phase) --a node died, failed or the start timed out--> failed --nodes told--> finished

Life of a node (:class:`NodeState`)::

    alive --a worker's WORKER_DONE--> done --the evaluation was handed out--> finished
    alive --a server's final REPORT, a worker's LEAVE, the evaluator's REPORT--> finished
    alive/done --silent past the heartbeat timeout, or it reported an error--> dead

``done`` and ``finished`` differ in what the coordinator still expects: a *done* worker finished
training but still heartbeats, counts as live (a barrier or the end of training waits on the
others, not on it) and may yet be told to evaluate; a *finished* node's part in the job is over,
it sends nothing more and is no longer watched (its stats are final).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Field metadata: the field is a time on the coordinator's clock (saved relative to the job's start).
TIME = {"time": True}
# Field metadata: the field is not saved (it is set again when a coordinator takes over).
TRANSIENT = {"transient": True}


class Phase(StrEnum):
    REGISTERING = "registering"
    TRAINING = "training"
    EVALUATING = "evaluating"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"


class NodeState(StrEnum):
    ALIVE = "alive"  # registered and working (a worker training or waiting for a shard, a server serving)
    DONE = "done"  # a worker that finished training: still heartbeats, may be told to evaluate
    FINISHED = "finished"  # its part is over (left, evaluated, a server's final report): not watched
    DEAD = "dead"  # declared dead (silent too long) or failed: its work went to others


ALIVE, DONE, FINISHED, DEAD = NodeState.ALIVE, NodeState.DONE, NodeState.FINISHED, NodeState.DEAD


@dataclass
class Node:
    name: str
    role: str  # "server" or "worker"
    rank: int
    identity: bytes
    address: str | None
    host: str
    pid: int
    state: NodeState = NodeState.ALIVE
    last_seen: float = field(default=0.0, metadata=TRANSIENT)  # a restarted coordinator hears from it anew
    progress: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] | None = None
    metrics: str | None = None  # HOST:PORT of its Prometheus endpoint, from its heartbeats
    idle: bool = False  # a worker told to wait for a shard (not in the membership meanwhile)
    # It sent a request after its admission, so it has its REGISTER answer. Until then the answer
    # may have been lost with a coordinator that died right after admitting it (and saving that):
    # the node repeats its REGISTER only after ``protocol.ops.ATTEMPT_S``, sending no heartbeat meanwhile.
    heard: bool = False
    # A server loading its checkpoint heartbeats marked ``restoring``: since when (coordinator clock;
    # None: serving, or never restored). Kept alive meanwhile, but not serving; declared dead once it
    # restores for longer than cluster.startup_timeout_s (coordinator/membership.py: restoring).
    restoring_since: float | None = field(default=None, metadata=TRANSIENT)


# Which fields each scope of failure shows in summary.json and STATUS (after the common ones).
_COMMON = ("node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reason", "affected")
_SHOWN = {
    "worker": ("requeued", "replaced_by"),
    "server": ("restored_from", "version_at_failure", "replaced_by", "rolled_back_versions"),
    # (a server rank failed over to a backup shows promoted_to, promoted_after_s, failover_s, rereplicated_after_s)
    "evaluator": ("replaced_by",),
    "job": (),
    "coordinator": ("reconnected_after_s", "down_s"),
}


@dataclass
class FailureRecord:
    """One failure, as summary.json reports it (:meth:`to_dict`). ``scope`` says what the failure
    cost and so which fields apply: ``worker`` (its shards went back to the queue, a joiner takes
    its slot), ``server`` (its rank waits for a replacement that loads a checkpoint), ``evaluator``
    (the next worker to join evaluates), ``job`` (it ended the job), ``coordinator`` (a restart)."""

    node: str
    kind: str  # dead, error, left, start_timeout, no_workers, stopped, ...
    at_s: float  # seconds after the job's start
    reason: str
    scope: str = "job"
    detected_after_s: float | None = 0.0
    recovered_after_s: float | None = None
    affected: dict[str, list[str]] = field(default_factory=dict)
    replaced_by: str | None = None  # worker, server, evaluator: who took its place
    requeued: list[list[int]] = field(default_factory=list)  # worker: [epoch, shard, skip] put back
    restored_from: str | None = None  # server: the checkpoint its replacement loads
    version_at_failure: int | None = None  # server: its version when last heard from
    rolled_back_versions: int | None = None  # server: updates its replacement will not have
    resharded_onto: str | None = None  # server: the survivor that took its rank over
    # server, with replicas: the process whose backup of the rank was promoted (named by a server
    # node of it), detection -> the promoted primary registered, detection -> its first request
    # served, and the promotion -> every backup of the rank caught up again (seconds).
    promoted_to: str | None = None
    promoted_after_s: float | None = None
    failover_s: float | None = None
    rereplicated_after_s: float | None = None
    # server, with replicas: the other ranks whose backup its process kept (placed elsewhere now,
    # when a live process is left for them; summary.json's ``replication`` says how many each has).
    backups_lost: list[int] = field(default_factory=list)
    reconnected_after_s: float | None = None  # coordinator: every node heard from again
    down_s: float | None = None  # coordinator: between its last save and the restart

    def __post_init__(self) -> None:
        if self.scope not in _SHOWN:
            raise ValueError(f"failure scope must be one of {sorted(_SHOWN)}, got {self.scope!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (*_COMMON, *_SHOWN[self.scope])}
        if self.resharded_onto is not None:
            out["resharded_onto"] = self.resharded_onto
        if self.promoted_to is not None:
            out.update(promoted_to=self.promoted_to, promoted_after_s=self.promoted_after_s,
                       failover_s=self.failover_s, rereplicated_after_s=self.rereplicated_after_s)
        if self.backups_lost:
            out["backups_lost"] = self.backups_lost
        return out


@dataclass
class JobState:
    """The coordinator's durable state: everything :mod:`~downpour.coordinator.persist` saves.

    Requests held inside the process (a barrier, WORKER_DONE, a REGISTER waiting for the cluster)
    are not part of it: the nodes repeat them to a restarted coordinator. The data-shard ledger
    and the checkpoint plan keep their own state (a journal, :meth:`CheckpointPlan.export`)."""

    started: float = field(metadata=TRANSIENT)  # the coordinator's clock at the job's start (re-based on restore)
    phase: Phase = Phase.REGISTERING
    train_started: float | None = field(default=None, metadata=TIME)
    train_ended: float | None = field(default=None, metadata=TIME)
    error: str | None = None
    failed_node: str | None = None
    # A graceful stop was asked for (the coordinator got SIGTERM): workers leave at their next
    # step, a final checkpoint is committed, then the job ends with status "stopped".
    stop_requested: float | None = field(default=None, metadata=TIME)
    final_asked: bool = False  # that stop's final checkpoint was asked of the servers
    leave_at: int | None = None  # sync: the round after which every worker leaves (the same for all)
    workerless_since: float | None = field(default=None, metadata=TIME)  # training with no live worker
    workerless_left: bool = False  # ... because the last one left cleanly (SIGTERM: asked to), not died
    # Steps before the checkpoint resumed from (checkpoint names keep growing), that checkpoint's
    # job state, and what servers load at start (resume or warm start).
    step_offset: int = 0
    resume: dict[str, Any] | None = None
    restore: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    evaluator: str | None = None  # the worker told to evaluate
    # How often the servers' addresses changed (workers' heartbeats carry them once it is above 0),
    # and the surviving server asked to take over each rank left without a replacement.
    servers_gen: int = 0
    hosting: dict[int, str] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # requests refused, by reason
    version_rate: float = 0.0  # server versions (updates) per second, as heartbeats report them
    restarts: int = 0  # coordinator restarts (persist.adopt_state)
    nodes: dict[str, Node] = field(default_factory=dict)
    failures: list[FailureRecord] = field(default_factory=list)
    # Worker (and evaluator) failures whose work was not taken up again yet: (detected at, record).
    recovering: list[tuple[float, FailureRecord]] = field(default_factory=list)
    # Server ranks whose server died while training and waits for a replacement: rank -> (detected at, record).
    server_slots: dict[int, tuple[float, FailureRecord]] = field(default_factory=dict)
    # Replication (coordinator/replication.py): the server processes ("HOST/PID") that keep a
    # backup of each rank, and a number raised whenever that plan or a primary's address changes
    # (servers' heartbeat answers carry both).
    replica_plan: dict[int, list[str]] = field(default_factory=dict)
    replica_addresses: dict[int, str] = field(default_factory=dict)
    replica_gen: int = 0

    # -- queries --------------------------------------------------------------
    def nodes_of(self, role: str, states: tuple[NodeState, ...] = (ALIVE,)) -> list[Node]:
        """``role``'s nodes in one of ``states``, by rank."""
        return sorted((n for n in self.nodes.values() if n.role == role and n.state in states), key=lambda n: n.rank)

    def training_workers(self) -> list[Node]:
        return self.nodes_of("worker", (ALIVE,))

    def server_addresses(self) -> list[dict[str, Any]]:
        # pid: a replacement at the same address (a fixed --port) is a new process all the same
        return [{"rank": n.rank, "name": n.name, "address": n.address, "pid": n.pid} for n in self.nodes_of("server", (ALIVE, DONE))]

    def members(self) -> list[str]:
        """The workers a sync round (or an ssp bound) waits for: training, not waiting for a shard."""
        return [n.name for n in self.training_workers() if not n.idle]
