"""The coordinator as a state machine: pure decisions, no sockets.

:meth:`CoordinatorState.handle` takes one request (who sent it, the message,
the time) and :meth:`CoordinatorState.tick` takes the time; both return
*actions* (:mod:`~downpour.coordinator.actions`: replies, unprompted sends, the
end of the job) that the service (:mod:`downpour.coordinator.service`) performs.
Time is always passed in, so tests drive a whole job with a fake clock and no network.

The state is data: :class:`~downpour.coordinator.model.JobState` (phases and node
states as enums, failures as records; what a restarted coordinator gets back) plus
what only this process holds (requests waiting for an answer, the health monitor).
This module checks each request (schema, sender, role) and dispatches it; the
decisions live in small modules that take the state and return actions:
:mod:`~downpour.coordinator.membership` (registration, joiners, barriers, shards,
heartbeats, the end of training), :mod:`~downpour.coordinator.failures` (a node
lost, the job failed), :mod:`~downpour.coordinator.hosting` (a lost server's rank:
its replacement or a survivor) and :mod:`~downpour.coordinator.checkpoints`
(checkpoints and the graceful stop). The phases and node states are described in
:mod:`~downpour.coordinator.model`.

Servers are admitted at once; a worker's REGISTER is answered when the whole
cluster is there (it needs every server's address). Nodes learn that they must
stop from the answer to their next heartbeat.

A worker that dies, fails or leaves while training (``cluster.on_worker_failure:
recover``, the default) does not stop the job: the shards it held go back to the
front of the queue (the one it was in resumes after its last acknowledged push),
the servers get the new membership, and a worker may register into its free slot
(a replacement the launcher starts, or any worker started by hand) and is admitted
at once. A worker that asks for a shard while the queue is empty but others still
hold shards is told to wait (and leaves the sync/ssp membership meanwhile), so a
shard put back is always taken up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from downpour.config import JobConfig
from downpour.coordinator import checkpoints, failures, hosting, membership
from downpour.coordinator.actions import Action, CommitCheckpoint, Finish, Reply, SaveModel
from downpour.coordinator.checkpointing import CheckpointPlan
from downpour.coordinator.health import Health
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED, FailureRecord, JobState, Node, NodeState, Phase
from downpour.coordinator.report import job_status, job_summary
from downpour.coordinator.shards import ShardLedger, shard_size_for
from downpour.layout import Layout
from downpour.protocol import Message, Op
from downpour.protocol.ops import ATTEMPT_S, Code, report_data, validate
from downpour.protocol.schema import SchemaError
from downpour.protocol.throttle import LogOnce

__all__ = ["Action", "CommitCheckpoint", "CoordinatorState", "FailureRecord", "Finish", "JobState", "Node", "NodeState",
           "Phase", "Reply", "SaveModel"]

log = logging.getLogger(__name__)


class CoordinatorState(JobState):
    """A job's :class:`JobState` with its config, layout and what this process alone holds."""

    def __init__(self, job: JobConfig, layout: Layout, num_train: int, now: float,
                 checkpoint_url: str | None = None, resume: dict[str, Any] | None = None) -> None:
        """``checkpoint_url``: where checkpoints go (None: no checkpoints). ``resume``: the job state
        of the checkpoint to continue from (``job.json``) plus where it is (``restore``: what the
        servers need to load their shards)."""
        super().__init__(started=now, resume=resume, step_offset=int(resume["step"]) if resume else 0,
                         restore=resume["restore"] if resume is not None else None)
        self.job = job
        self.layout = layout
        self.cl = job.cluster
        self.num_train = num_train
        self.by_identity: dict[bytes, str] = {}  # routing id of the connection a node registered on -> its name
        # Requests held until they can be answered (not saved: the nodes repeat them to a restarted coordinator).
        self.pending_workers: list[tuple[bytes, Message, str]] = []  # REGISTERs waiting for the whole cluster
        self.barriers: dict[str, dict[str, tuple[bytes, Message]]] = {}
        self.done_waiting: dict[str, tuple[bytes, Message]] = {}  # WORKER_DONEs waiting for the end of training
        self.joiners: list[tuple[bytes, Message]] = []  # workers waiting for a free slot while training runs
        # NEXT_SHARDs of workers with nothing to train while others finish theirs (membership.next_shard).
        self.shard_waiters: dict[str, tuple[bytes, Message, float]] = {}
        # Servers that registered for a rank while training ran and no rank was free (a replacement
        # started before the old process was declared dead): answered once a rank frees.
        self.server_joiners: list[tuple[bytes, Message]] = []
        self.ledger = ShardLedger(num_train, shard_size_for(job.data.shard_size, num_train, job.cluster.worker_slots,
                                                            job.training.batch_size), job.training.epochs, job.training.seed)
        self.stop_deadline: float | None = None  # a failed job ends then, whether or not every node heard
        self.stop_told: set[str] = set()
        mon = job.monitor
        silent_after = min(0.5 * self.cl.heartbeat_timeout_s, max(3 * self.cl.heartbeat_interval_s, 1.0))
        self.health = Health(silent_after, mon.stall_after_s, mon.slow_fraction)
        self.refusal_log = LogOnce()  # a refused peer's first refusal per interval is logged
        self.checkpoints = CheckpointPlan(job.checkpoint, checkpoint_url, job.training.consistency == "sync",
                                          self.cl.num_servers, now)
        self.version_sample: tuple[float, int] | None = None  # (time, server version) for the sync margin
        # Buffers each worker sent with WORKER_DONE: (examples, buffers); then their merge (models/buffers.py).
        self.worker_buffers: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        self.final_buffers: dict[str, torch.Tensor] | None = None
        self.pid: int | None = None  # the coordinator process's (set by the service; shown in STATUS)
        # After a restart (persist.adopt_state): the nodes not heard from again yet, since when, and
        # the failure record that waits for them.
        self.reconnecting: tuple[set[str], float, FailureRecord] | None = None
        self.is_local: Callable[[str], bool] = lambda host: True  # whether a host is the coordinator's (set by the service)
        # Whether a process of this machine is running (None: cannot tell; set by the service), and the
        # nodes whose process was seen running: one whose process exited while training is declared
        # dead at once (coordinator/failures.py: exited).
        self.pid_alive: Callable[[int], bool | None] = lambda pid: None
        self.pid_seen: set[tuple[str, int]] = set()
        self.exits_checked_at = -float("inf")
        self.local_hosts: dict[str, bool] = {}
        if resume is not None:  # the checkpoint resumed from is the restore point until a new one is committed
            self.checkpoints.start_due = False
            self.ledger.restore(resume["ledger"])
            self.checkpoints.last_step = self.step_offset

    def affected(self, name: str) -> dict[str, list[str]]:
        """The key ranges (of a server) or data shards (of a worker) that ``name`` holds."""
        return failures.affected(self, name)

    def request_stop(self, now: float) -> list[Action]:
        """Stop the job gracefully (see :func:`downpour.coordinator.checkpoints.request_stop`)."""
        return checkpoints.request_stop(self, now) + membership.wake_shard_waiters(self, now)

    def checkpoint_committed(self, now: float, ok: bool, why: str = "") -> None:
        """The service wrote (or failed to write) the job state and manifest of the pending checkpoint."""
        checkpoints.committed(self, now, ok, why)

    # -- requests -------------------------------------------------------------
    def handle(self, identity: bytes, msg: Message, now: float, role: str | None = None) -> list[Action]:
        """One request. ``role`` is the role of the key that sent it (None without CURVE: not checked);
        a node may only act as the role its key holds. Every ERROR answer to it is counted by code."""
        actions = self._handle(identity, msg, now, role)
        if self.shard_waiters:  # what it changed may answer a parked NEXT_SHARD
            actions += membership.wake_shard_waiters(self, now)
        for a in actions:
            if isinstance(a, Reply) and a.msg.op == Op.ERROR and a.to == identity and a.msg.req_id == msg.req_id:
                code = str(a.msg.meta.get("code"))
                self.rejected[code] = self.rejected.get(code, 0) + 1
        return actions

    def _handle(self, identity: bytes, msg: Message, now: float, role: str | None) -> list[Action]:
        handler = _HANDLERS.get(msg.op)
        if handler is None:
            return self.refuse(identity, msg, Code.BAD_OP, f"the coordinator does not serve {msg.op.name}")
        try:  # every field's type and range before anything reads it
            validate(msg.op, msg.meta)
            if msg.op == Op.REPORT:
                report_data(msg.meta["kind"], msg.meta.get("data"))
        except SchemaError as err:
            return self.refuse(identity, msg, Code.INVALID, str(err))
        if role is not None and msg.op == Op.REGISTER and msg.meta.get("role") != role:
            return self.refuse(identity, msg, Code.FORBIDDEN, f"a {role} key cannot register as {msg.meta.get('role')!r}")
        if msg.op == Op.ABORT and role not in (None, "client"):  # (the launcher's key, with CURVE on)
            return self.refuse(identity, msg, Code.FORBIDDEN, f"a {role} key cannot fail the job")
        if msg.op not in (Op.REGISTER, Op.STATUS, Op.ABORT):
            node = self.nodes.get(msg.meta["node"])
            if node is None:
                return self.refuse(identity, msg, Code.UNKNOWN_NODE, f"node {msg.meta.get('node')!r} is not registered")
            if role is not None and node.role != role:
                return self.refuse(identity, msg, Code.FORBIDDEN, f"a {role} key cannot act for {node.name}")
            if not _same_connection(node.identity, identity):
                return self.refuse(identity, msg, Code.FORBIDDEN, f"{node.name} registered on another connection")
            if node.state == DEAD and msg.op not in (Op.HEARTBEAT, Op.REPORT):
                return self.refuse(identity, msg, Code.DECLARED_DEAD, f"{node.name} was declared dead; its work went to others")
            node.last_seen, node.heard = now, True
            if self.reconnecting is not None:
                failures.reconnected(self, now, node.name)
            return handler(self, identity, msg, now, node)
        return handler(self, identity, msg, now, None)

    def refuse(self, identity: bytes, msg: Message, code: Code, text: str) -> list[Action]:
        if self.refusal_log.first(identity):
            log.warning("coordinator: refused %s from %r: %s", msg.op.name, identity, text)
        return [Reply(identity, msg.error(code, text))]

    def on_report(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        kind, data = msg.meta.get("kind"), msg.meta.get("data")
        data = data if isinstance(data, dict) else {}
        out: list[Action] = [Reply(ident, msg.reply({}))]
        if kind == "error":
            if node.state == DEAD:  # a repeat, or one that was declared dead already
                return out
            return out + failures.lose(self, now, node, str(data.get("error", "failed")), "error")
        if kind == "eval" and node.name != self.evaluator:
            return self.refuse(ident, msg, Code.FORBIDDEN, f"{node.name} was not asked to evaluate")
        if kind == "eval" and node.role == "worker" and self.phase == Phase.EVALUATING:
            self.evaluation = data
            node.state = FINISHED
            self.phase = Phase.STOPPING
            log.info("coordinator: test accuracy %s; stopping servers", data.get("test_accuracy"))
            for who, asked in self.joiners:  # workers that waited in case the evaluator died
                out.append(Reply(who, asked.error(Code.JOB_RUNNING, "the job is over; it takes no new workers")))
            self.joiners = []
            # Before any server hears "stop" (that happens in answers to later heartbeats).
            out.append(SaveModel(self.server_addresses(), self.final_buffers))
        elif kind == "checkpoint" and node.role == "server":
            out += checkpoints.server_report(self, node, data, now)
        elif kind == "server" and node.role == "server":
            node.stats = data
            node.state = FINISHED
            if self.phase == Phase.STOPPING and not self.nodes_of("server"):
                self.phase = Phase.FINISHED
                out.append(Finish(0, self.summary(now)))
        return out

    def on_status(self, ident: bytes, msg: Message, now: float, _: Node | None) -> list[Action]:
        return [Reply(ident, msg.reply(self.status(now)))]

    def on_abort(self, ident: bytes, msg: Message, now: float, _: Node | None) -> list[Action]:
        """The launcher failed the job (every worker process dead, none left to start): the job ends
        as any failure does, with its summary written (what was trained, the checkpoints, why)."""
        node = msg.meta.get("node")
        return [Reply(ident, msg.reply({})), *failures.fail(self, now, node if isinstance(node, str) else "launcher",
                                                             str(msg.meta["reason"]))]

    def tick(self, now: float) -> list[Action]:
        """Time-driven decisions: failures detected, stops, checkpoints due, parked requests answered."""
        actions = self._tick(now)
        if self.shard_waiters:
            actions += membership.wake_shard_waiters(self, now)
        return actions

    def _tick(self, now: float) -> list[Action]:
        if self.phase == Phase.FAILED:
            alive = {n.name for n in self.nodes.values() if n.state in (ALIVE, DONE)}
            if alive.issubset(self.stop_told) or (self.stop_deadline is not None and now >= self.stop_deadline):
                self.phase = Phase.FINISHED
                return [Finish(1, self.summary(now))]
            return []
        if self.phase == Phase.REGISTERING:
            if now - self.started > self.cl.startup_timeout_s:
                have_s, have_w = len(self.nodes_of("server")), len(self.nodes_of("worker"))
                return failures.fail(self, now, "coordinator", f"start timed out after {self.cl.startup_timeout_s:g}s: "
                                  f"{have_s}/{self.cl.num_servers} servers and {have_w}/{self.cl.num_workers} workers registered",
                                  "start_timeout")
            watched = self.nodes_of("server")  # workers wait inside REGISTER, without heartbeats
        else:
            watched = [n for n in self.nodes.values() if n.state in (ALIVE, DONE)]
        for node in failures.exited(self, watched, now):
            why = f"its process (pid {node.pid}) exited; declared dead"
            return failures.lose(self, now, node, why, "dead", now - node.last_seen)
        for node in watched:
            silent = now - node.last_seen
            # After a restart, a node not heard from since its admission may be waiting for a
            # REGISTER answer the old process never sent (see Node.heard): time to repeat it.
            limit = self.cl.heartbeat_timeout_s + (ATTEMPT_S if self.restarts and not node.heard else 0.0)
            since = node.restoring_since
            restoring = "" if since is None else f" while restoring its checkpoint (for {now - since:.1f}s)"
            if silent > limit:
                why = f"no heartbeat for {silent:.1f}s (timeout {limit:g}s){restoring}; declared dead"
                return failures.lose(self, now, node, why, "dead", silent)
            # A restore hung in a live process heartbeats (marked restoring) but never serves.
            if since is not None and now - since > self.cl.startup_timeout_s:
                why = (f"still restoring its checkpoint after {now - since:.1f}s "
                       f"(cluster.startup_timeout_s {self.cl.startup_timeout_s:g}s); declared dead")
                return failures.lose(self, now, node, why, "dead", now - since)
        if self.checkpoints.expired(now):  # (a graceful stop's final one too: the stop then ends without it)
            self.checkpoints.abandon(now, f"not complete after {self.job.checkpoint.timeout_s:g}s")
        if self.stop_requested is not None and self.phase == Phase.TRAINING:
            rank = hosting.unserved_in_stop(self, now)
            if rank is not None:
                return failures.stop_unserved(self, now, f"server-{rank}", f"server-{rank} was lost and no replacement came "
                                              f"within cluster.server_replace_timeout_s of the graceful stop")
            return checkpoints.stop_step(self, now)
        if (self.workerless_since is not None and self.workerless_left and self.stop_requested is None
                and now - self.workerless_since > self.cl.startup_timeout_s):
            # Every worker was asked to leave (SIGTERM, one by one: preempted machines) and none came
            # back in the time a joiner has: the job stops as a graceful stop does, with a final
            # checkpoint to --resume from, instead of failing.
            log.warning("coordinator: every worker left the job and none joined within %gs (cluster.startup_timeout_s); "
                        "stopping it gracefully", self.cl.startup_timeout_s)
            return self.request_stop(now)
        if (self.workerless_since is not None and self.phase != Phase.STOPPING  # (workers leave a graceful stop)
                and now - self.workerless_since > self.cl.startup_timeout_s):
            return failures.fail(self, now, "coordinator", f"every worker was lost and none joined within "
                              f"{self.cl.startup_timeout_s:g}s (cluster.startup_timeout_s)", "no_workers")
        if self.reconnecting is not None:
            failures.reconnected(self, now, None)
        if self.phase != Phase.REGISTERING:  # workers waiting inside REGISTER send no heartbeats
            training = self.phase == Phase.TRAINING and self.train_started is not None
            self.health.update(list(self.nodes.values()), training, now, self.affected)
        if self.phase == Phase.TRAINING and self.server_slots:
            hosting.move_lost_ranks(self, now)
            why = hosting.stranded(self, now)
            if why is not None:
                return failures.fail(self, now, "coordinator", why, "no_servers")
        # (Not while a server's rank waits for its replacement: that rank could not write its part.)
        if (self.phase == Phase.TRAINING and self.train_started is not None and not self.server_slots
                and self.checkpoints.due(now, checkpoints.job_steps(self))):
            return checkpoints.begin(self, now)
        return []

    def status(self, now: float) -> dict[str, Any]:
        return job_status(self, now)

    def summary(self, now: float) -> dict[str, Any]:
        return job_summary(self, now)


def _same_connection(registered: bytes, identity: bytes) -> bool:
    """A node's requests come from the connection it registered on, or from its heartbeat
    connection (routing id: the registered one + ``.hb``). Routing ids hold 128 random bits
    (:func:`downpour.coordinator.client.connection_id`), so another peer cannot guess them."""
    return identity == registered or identity == registered + b".hb"


_HANDLERS = {
    Op.REGISTER: membership.register,
    Op.HEARTBEAT: membership.heartbeat,
    Op.BARRIER: membership.barrier,
    Op.NEXT_SHARD: membership.next_shard,
    Op.SHARD_DONE: membership.shard_done,
    Op.WORKER_DONE: membership.worker_done,
    Op.REPORT: CoordinatorState.on_report,
    Op.LEAVE: membership.leave,
    Op.STATUS: CoordinatorState.on_status,
    Op.ABORT: CoordinatorState.on_abort,
}
