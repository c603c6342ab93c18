"""The coordinator as a state machine: pure decisions, no sockets.

:meth:`CoordinatorState.handle` takes one request (who sent it, the message,
the time) and :meth:`CoordinatorState.tick` takes the time; both return
*actions* — replies, unprompted sends, the end of the job — that the service
(:mod:`downpour.coordinator.service`) performs. Time is always passed in, so
tests drive a whole job with a fake clock and no network.

Life of a job::

    registering --all servers and workers registered--> training
    training --every worker reported WORKER_DONE--> evaluating
    evaluating --the evaluator's REPORT--> stopping
    stopping --every server's REPORT--> finished
    (any phase) --a node died, failed or the start timed out--> failed

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
from dataclasses import dataclass, field
from typing import Any

import torch

from downpour.config import JobConfig, job_to_dict
from downpour.coordinator.checkpointing import CheckpointPlan, sync_margin
from downpour.coordinator.client import ATTEMPT_S
from downpour.coordinator.health import Health, describe_affected
from downpour.coordinator.reach import address_problem
from downpour.coordinator.report import ALIVE, DEAD, DONE, FINISHED, job_status, job_summary
from downpour.coordinator.shards import ShardLedger, shard_size_for
from downpour.errors import ProtocolError
from downpour.layout import Layout
from downpour.models import buffers as bufs
from downpour.protocol import Message, Op
from downpour.protocol.ops import Code, report_data, validate
from downpour.protocol.schema import SchemaError
from downpour.protocol.throttle import LogOnce

log = logging.getLogger(__name__)


@dataclass
class Reply:
    to: bytes
    msg: Message


@dataclass
class Finish:
    code: int
    summary: dict[str, Any]


@dataclass
class SaveModel:
    """Pull the final parameters from the servers (still serving) and save them."""

    servers: list[dict[str, Any]]
    buffers: dict[str, torch.Tensor] | None = None  # the model's merged buffers (models/buffers.py), saved beside the parameters


@dataclass
class CommitCheckpoint:
    """Every server wrote its file: write the job's state, then the manifest (which commits it)."""

    name: str
    step: int
    files: dict[str, dict[str, Any]]  # server file -> {"sha256", "bytes"}
    job_state: dict[str, Any]
    final: bool
    needs: list[str] = field(default_factory=list)  # earlier checkpoints holding the base of its sparse deltas


Action = Reply | Finish | SaveModel | CommitCheckpoint



@dataclass
class Node:
    name: str
    role: str
    rank: int
    identity: bytes
    address: str | None
    host: str
    pid: int
    state: str = ALIVE
    last_seen: float = 0.0
    progress: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] | None = None
    metrics: str | None = None  # HOST:PORT of its Prometheus endpoint, from its heartbeats
    idle: bool = False  # a worker told to wait for a shard (not in the membership meanwhile)
    # It sent a request after its admission, so it has its REGISTER answer. Until then the answer
    # may have been lost with a coordinator that died right after admitting it (and saving that):
    # the node repeats its REGISTER only after ``client.ATTEMPT_S``, sending no heartbeat meanwhile.
    heard: bool = False


class CoordinatorState:
    def __init__(self, job: JobConfig, layout: Layout, num_train: int, now: float,
                 checkpoint_url: str | None = None, resume: dict[str, Any] | None = None) -> None:
        """``checkpoint_url``: where checkpoints go (None: no checkpoints). ``resume``: the job state
        of the checkpoint to continue from (``job.json``) plus where it is (``restore``: what the
        servers need to load their shards)."""
        self.job = job
        self.layout = layout
        self.cl = job.cluster
        self.phase = "registering"
        self.started = now
        self.train_started: float | None = None
        self.train_ended: float | None = None
        self.nodes: dict[str, Node] = {}
        self.by_identity: dict[bytes, str] = {}
        self.pending_workers: list[tuple[bytes, Message, str]] = []
        self.barriers: dict[str, dict[str, tuple[bytes, Message]]] = {}
        self.done_waiting: dict[str, tuple[bytes, Message]] = {}
        self.ledger = ShardLedger(num_train, shard_size_for(job.data.shard_size, num_train, job.cluster.worker_slots,
                                                            job.training.batch_size), job.training.epochs, job.training.seed)
        self.num_train = num_train
        self.evaluation: dict[str, Any] | None = None
        self.error: str | None = None
        self.failed_node: str | None = None
        self.stop_deadline: float | None = None
        self.stop_told: set[str] = set()
        # A graceful stop was asked for (the coordinator got SIGTERM): workers leave at their next
        # step, a final checkpoint is committed, then the job ends with status "stopped".
        self.stop_requested: float | None = None
        self.final_asked = False  # that stop's final checkpoint was asked of the servers
        self.leave_at: int | None = None  # sync: the round after which every worker leaves (the same for all)
        mon = job.monitor
        silent_after = min(0.5 * self.cl.heartbeat_timeout_s, max(3 * self.cl.heartbeat_interval_s, 1.0))
        self.health = Health(silent_after, mon.stall_after_s, mon.slow_fraction)
        self.failures: list[dict[str, Any]] = []
        # Worker failures whose work was not taken up again yet: (detected at, failure record).
        self.recovering: list[tuple[float, dict[str, Any]]] = []
        self.joiners: list[tuple[bytes, Message]] = []  # workers waiting for a free slot while training runs
        # Server ranks whose server died while training and waits for a replacement:
        # rank -> (detected at, failure record); and how often the servers' addresses changed
        # (workers' heartbeats carry the addresses once it is above 0).
        self.server_slots: dict[int, tuple[float, dict[str, Any]]] = {}
        # Ranks without a replacement after cluster.server_replace_timeout_s, and the surviving
        # server asked to take each over (it hears so in its heartbeat answers).
        self.hosting: dict[int, str] = {}
        self.servers_gen = 0
        # Servers that registered for a rank while training ran and no rank was free (a replacement
        # started before the old process was declared dead): answered once a rank frees.
        self.server_joiners: list[tuple[bytes, Message]] = []
        self.workerless_since: float | None = None  # training with no live worker (waiting for one to join)
        self.rejected: dict[str, int] = {}  # requests refused, by reason
        self.refusal_log = LogOnce()  # a refused peer's first refusal per interval is logged
        self.checkpoints = CheckpointPlan(job.checkpoint, checkpoint_url, job.training.consistency == "sync",
                                          self.cl.num_servers, now)
        if resume is not None:  # the checkpoint resumed from is the restore point until a new one is committed
            self.checkpoints.start_due = False
        self._versions: tuple[float, int] | None = None  # (time, server version) for the sync margin
        self.version_rate = 0.0  # server versions (updates) per second, as heartbeats report them
        self.resume = resume
        self.restore: dict[str, Any] | None = None  # what servers load at start (resume or warm start)
        # Steps and examples before the checkpoint resumed from: checkpoint names keep growing.
        self.step_offset = int(resume["step"]) if resume else 0
        self.evaluator: str | None = None  # the worker told to evaluate
        # Buffers each worker sent with WORKER_DONE: (examples, buffers); then their merge (models/buffers.py).
        self.worker_buffers: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        self.final_buffers: dict[str, torch.Tensor] | None = None
        # Coordinator restarts (see persist.adopt_state), and after one: the nodes not heard from
        # again yet, since when, and the failure record that waits for them.
        self.restarts = 0
        self.pid: int | None = None  # the coordinator process's (set by the service; shown in STATUS)
        self.reconnecting: tuple[set[str], float, dict[str, Any]] | None = None
        self.is_local: Callable[[str], bool] = lambda host: True  # whether a host is the coordinator's (set by the service)
        if resume is not None:
            self.ledger.restore(resume["ledger"])
            self.restore = resume["restore"]
            self.checkpoints.last_step = self.step_offset

    # -- helpers ------------------------------------------------------------
    def _role(self, role: str, states: tuple[str, ...] = (ALIVE,)) -> list[Node]:
        return sorted((n for n in self.nodes.values() if n.role == role and n.state in states), key=lambda n: n.rank)

    def _training_workers(self) -> list[Node]:
        return self._role("worker", (ALIVE,))

    def _server_addresses(self) -> list[dict[str, Any]]:
        return [{"rank": n.rank, "name": n.name, "address": n.address} for n in self._role("server", (ALIVE, DONE))]

    def _members(self) -> list[str]:
        """The workers a sync round (or an ssp bound) waits for: training, not waiting for a shard."""
        return [n.name for n in self._training_workers() if not n.idle]

    def _membership(self) -> list[Action]:
        """Tell the servers which workers a sync round waits for (sent unprompted)."""
        workers = self._members()
        msg = Message(Op.MEMBERSHIP, meta={"workers": workers})
        return [Reply(s.identity, msg) for s in self._role("server")]

    def affected(self, name: str) -> dict[str, list[str]]:
        """The key ranges (of a server) or data shards (of a worker) that ``name`` holds."""
        node = self.nodes.get(name)
        if node is None:
            return {}
        if node.role == "server":
            keys = [self.layout.describe(s) for s in self.layout.server_slices(node.rank)]
            return {"keys": keys if len(keys) <= 8 else [*keys[:8], f"... {len(keys)} keys in all"]}
        shards = sorted(k for k, who in self.ledger.assigned.items() if who == name)
        return {"shards": [f"epoch {e} shard {s}" for e, s in shards]}

    def _lose(self, now: float, node: Node, reason: str, kind: str, detected_after_s: float = 0.0) -> list[Action]:
        """``node`` died or failed: a worker while training is recovered from (unless the job says
        fail); anything else stops the job."""
        if node.role == "worker" and self.phase == "training" and self.cl.on_worker_failure == "recover":
            return self._worker_lost(now, node, reason, kind, detected_after_s)
        if node.role == "worker" and self.phase == "evaluating" and self.cl.on_worker_failure == "recover":
            return self._evaluator_lost(now, node, reason, kind, detected_after_s)
        if node.role == "server" and self.phase == "training" and self.cl.on_server_failure == "recover":
            if self._restore_point() is not None:
                return self._server_lost(now, node, reason, kind, detected_after_s)
            reason += " (no checkpoint committed yet to restart it from)"
        node.state = DEAD
        return self._fail(now, node.name, reason, kind, detected_after_s)

    def _restore_point(self) -> dict[str, Any] | None:
        """What a replacement server loads: the latest committed checkpoint (or the one this job
        resumed from, if none was committed since)."""
        if self.checkpoints.committed:
            return {"url": self.checkpoints.url, "name": self.checkpoints.committed[-1]["name"],
                    "layout": self.layout.to_dict(), "full": True}
        return self.restore if (self.restore or {}).get("full") else None

    def _server_lost(self, now: float, node: Node, reason: str, kind: str, detected_after_s: float) -> list[Action]:
        """Keep training on the other servers; the server's rank waits for a replacement, which
        loads the latest checkpoint. What that server applied since then is lost (reported)."""
        node.state = DEAD
        point = self._restore_point() or {}
        record = {"node": node.name, "kind": kind, "at_s": round(now - self.started, 3),
                  "detected_after_s": round(detected_after_s, 3), "recovered_after_s": None, "reason": reason,
                  "affected": self.affected(node.name), "restored_from": point.get("name"),
                  "version_at_failure": node.progress.get("version"), "replaced_by": None,
                  "rolled_back_versions": self._rolled_back(node)}
        self.failures.append(record)
        self.server_slots[node.rank] = (now, record)
        log.warning("coordinator: %s lost (%s); waiting for a replacement to load checkpoint %s; training goes on",
                    node.name, reason, point.get("name"))
        if self.server_joiners:  # a replacement registered already, before this one was declared dead
            ident, msg = self.server_joiners.pop(0)
            return self._replace_server(ident, msg, now)
        return []

    def _rolled_back(self, node: Node) -> int | None:
        """Updates of ``node``'s rank that its replacement will not have: its version when last heard
        from, less its version in the checkpoint it is restored from (None: unknown)."""
        at = node.progress.get("version")
        saved = (self.checkpoints.committed[-1].get("versions") or {}).get(str(node.rank)) if self.checkpoints.committed else None
        return max(0, at - saved) if type(at) is int and type(saved) is int else None

    def _evaluator_lost(self, now: float, node: Node, reason: str, kind: str, detected_after_s: float) -> list[Action]:
        """The worker evaluating the trained model died: the next worker to register (a
        replacement) evaluates instead; none within ``cluster.startup_timeout_s`` ends the job."""
        node.state = DEAD
        self.failures.append({"node": node.name, "kind": kind, "at_s": round(now - self.started, 3),
                              "detected_after_s": round(detected_after_s, 3), "recovered_after_s": None, "reason": reason,
                              "affected": {"evaluation": ["the test-set evaluation of the trained model"]}, "replaced_by": None})
        self.recovering.append((now, self.failures[-1]))
        self.evaluator = None
        self.workerless_since = now
        log.warning("coordinator: %s lost while evaluating (%s); the next worker to join evaluates", node.name, reason)
        return self._admit_joiners(now)

    def _worker_lost(self, now: float, node: Node, reason: str, kind: str, detected_after_s: float,
                     position: object = None, left: bool = False) -> list[Action]:
        """Put ``node``'s shards back, tell the servers, free its slot for a joiner."""
        affected = self.affected(node.name)
        had_finished = node.state == DONE
        node.state = FINISHED if left else DEAD
        pos = node.progress.get("position") if position is None else position
        pos = pos if isinstance(pos, list) and len(pos) == 3 and all(type(x) is int and x >= 0 for x in pos) else None
        requeued = self.ledger.release(node.name, pos)
        self.done_waiting.pop(node.name, None)
        for arrived in self.barriers.values():
            arrived.pop(node.name, None)
        if left:
            log.info("coordinator: %s left the job; %d shard(s) back in the queue", node.name, len(requeued))
        else:
            record = {"node": node.name, "kind": kind, "at_s": round(now - self.started, 3),
                      "detected_after_s": round(detected_after_s, 3), "recovered_after_s": None, "reason": reason,
                      "affected": affected, "requeued": requeued, "replaced_by": None}
            self.failures.append(record)
            if requeued:  # recovered once one of them is handed out again
                self.recovering.append((now, record))
            else:  # it held no unfinished shard: nothing to redo
                record["recovered_after_s"] = 0.0
            log.warning("coordinator: %s lost (%s); %s; training goes on", node.name, reason,
                        f"{len(requeued)} shard(s) back in the queue" if requeued else
                        ("it had finished training" if had_finished else "it held no shard"))
        out = self._membership() + self._release_barriers(now) + self._admit_joiners(now)
        if not self._training_workers() and not self.done_waiting:
            self.workerless_since = now
        elif not self._training_workers():
            out += self._end_training(now)
        return out

    def _fail(self, now: float, node: str, reason: str, kind: str = "error", detected_after_s: float = 0.0) -> list[Action]:
        if self.phase in ("failed", "finished"):
            return []
        affected = self.affected(node)
        self.failures.append({"node": node, "kind": kind, "at_s": round(now - self.started, 3),
                              "detected_after_s": round(detected_after_s, 3), "recovered_after_s": None,
                              "reason": reason, "affected": affected})
        if any(affected.values()):
            reason = f"{reason} ({describe_affected(affected)})"
        log.error("coordinator: job failed: %s: %s", node, reason)
        self.phase = "failed"
        self.error = f"{node}: {reason}"
        self.failed_node = node
        self.stop_deadline = now + 3 * self.cl.heartbeat_interval_s + 1.0
        out: list[Action] = []
        # Requests parked in a barrier or the start would otherwise wait for their timeout.
        for ident, msg, _ in self.pending_workers:
            out.append(Reply(ident, msg.error("job_failed", self.error)))
        for waiting in [*self.barriers.values(), self.done_waiting]:
            for ident, msg in waiting.values():
                out.append(Reply(ident, msg.error("job_failed", self.error)))
        for ident, msg in self.joiners:
            out.append(Reply(ident, msg.error("job_failed", self.error)))
        self.pending_workers, self.barriers, self.done_waiting, self.joiners = [], {}, {}, []
        return out

    # -- requests -------------------------------------------------------------
    def handle(self, identity: bytes, msg: Message, now: float, role: str | None = None) -> list[Action]:
        """One request. ``role`` is the role of the key that sent it (None without CURVE: not checked);
        a node may only act as the role its key holds. Every ERROR answer to it is counted by code."""
        actions = self._handle(identity, msg, now, role)
        for a in actions:
            if isinstance(a, Reply) and a.msg.op == Op.ERROR and a.to == identity and a.msg.req_id == msg.req_id:
                code = str(a.msg.meta.get("code"))
                self.rejected[code] = self.rejected.get(code, 0) + 1
        return actions

    def _handle(self, identity: bytes, msg: Message, now: float, role: str | None) -> list[Action]:
        handler = _HANDLERS.get(msg.op)
        if handler is None:
            return self._refuse(identity, msg, Code.BAD_OP, f"the coordinator does not serve {msg.op.name}")
        try:  # every field's type and range before anything reads it
            validate(msg.op, msg.meta)
            if msg.op == Op.REPORT:
                report_data(msg.meta["kind"], msg.meta.get("data"))
        except SchemaError as err:
            return self._refuse(identity, msg, Code.INVALID, str(err))
        if role is not None and msg.op == Op.REGISTER and msg.meta.get("role") != role:
            return self._refuse(identity, msg, Code.FORBIDDEN, f"a {role} key cannot register as {msg.meta.get('role')!r}")
        if msg.op not in (Op.REGISTER, Op.STATUS):
            node = self.nodes.get(msg.meta["node"])
            if node is None:
                return self._refuse(identity, msg, Code.UNKNOWN_NODE, f"node {msg.meta.get('node')!r} is not registered")
            if role is not None and node.role != role:
                return self._refuse(identity, msg, Code.FORBIDDEN, f"a {role} key cannot act for {node.name}")
            if not _same_connection(node.identity, identity):
                return self._refuse(identity, msg, Code.FORBIDDEN, f"{node.name} registered on another connection")
            if node.state == DEAD and msg.op not in (Op.HEARTBEAT, Op.REPORT):
                return self._refuse(identity, msg, Code.DECLARED_DEAD, f"{node.name} was declared dead; its work went to others")
            node.last_seen, node.heard = now, True
            if self.reconnecting is not None:
                self._reconnected(now, node.name)
            return handler(self, identity, msg, now, node)
        return handler(self, identity, msg, now, None)

    def _reconnected(self, now: float, name: str | None) -> None:
        """After a coordinator restart: ``name`` was heard from (None: only look whether anyone is
        still awaited). The coordinator's failure counts as recovered when the first node gets an
        answer, and as reconnected once every node alive at the restart was heard from (or was
        declared dead)."""
        waiting, since, record = self.reconnecting
        if name is not None and record["recovered_after_s"] is None:  # serving again: the first node got through
            record["recovered_after_s"] = round(now - since, 3)
        waiting.discard(name)
        waiting.intersection_update(n.name for n in self.nodes.values() if n.state in (ALIVE, DONE))
        if not waiting:
            record["reconnected_after_s"] = round(now - since, 3)
            if record["recovered_after_s"] is None:
                record["recovered_after_s"] = record["reconnected_after_s"]
            self.reconnecting = None
            log.info("coordinator: every node reconnected, %.1fs after the coordinator's failure was detected", now - since)

    def _refuse(self, identity: bytes, msg: Message, code: Code, text: str) -> list[Action]:
        if self.refusal_log.first(identity):
            log.warning("coordinator: refused %s from %r: %s", msg.op.name, identity, text)
        return [Reply(identity, msg.error(code, text))]

    def on_register(self, ident: bytes, msg: Message, now: float, _: Node | None) -> list[Action]:
        role, hint = msg.meta.get("role"), msg.meta.get("rank")
        again = self._register_again(ident, msg, now)
        if again is not None:
            return again
        want = {"server": self.cl.num_servers, "worker": self.cl.num_workers}.get(role)  # type: ignore[arg-type]
        if want is None:
            return self._refuse(ident, msg, "bad_role", f"role must be server or worker, got {role!r}")
        if role == "worker" and self.cl.on_worker_failure == "recover" and self.phase in ("training", "evaluating"):
            # It waits for a free slot (or, once training is over, in case the evaluator dies).
            self.joiners.append((ident, msg))
            return self._admit_joiners(now)
        if self.phase == "training" and role == "server" and self.cl.on_server_failure == "recover":
            if self.server_slots:
                return self._replace_server(ident, msg, now)
            if type(hint) is int and 0 <= hint < self.cl.num_servers:  # a replacement for that rank, early
                self.server_joiners.append((ident, msg))
                return []
        if self.phase != "registering":
            return self._refuse(ident, msg, "job_running", f"the job is {self.phase}; it takes no new {role}s")
        taken = {n.rank for n in self.nodes.values() if n.role == role}
        free = [r for r in range(want) if r not in taken]
        if not free:
            return self._refuse(ident, msg, "job_full", f"the job already has {want} {role}s")
        rank = hint if type(hint) is int and hint in free else free[0]
        address = msg.meta.get("address")
        if role == "server" and not (isinstance(address, str) and address):
            return self._refuse(ident, msg, "bad_address", "a server must give the address it listens on")
        if role == "server" and (problem := self._address_problem(address)):
            return self._refuse(ident, msg, "bad_address", problem)
        name = f"{role}-{rank}"
        host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
        self.nodes[name] = Node(name, role, rank, ident, address, host, pid if isinstance(pid, int) else 0, last_seen=now)
        self.by_identity[ident] = name
        log.info("coordinator: %s registered (%s, pid %s)", name, msg.meta.get("host"), msg.meta.get("pid"))
        base = self._admitted(name, rank)
        out: list[Action] = []
        if role == "server":
            out.append(Reply(ident, msg.reply({**base, "restore": self.restore})))
        else:
            self.pending_workers.append((ident, msg, name))
        if len(self._role("server")) == self.cl.num_servers and len(self._role("worker")) == self.cl.num_workers:
            out += self._start(now)
        return out

    def _address_problem(self, address: str) -> str | None:
        cp = self.checkpoints
        return address_problem(address, cp.url if cp.enabled else None, self.job.checkpoint.shared, self.is_local)

    def _admitted(self, name: str, rank: int) -> dict[str, Any]:
        """What every answer to an admitted REGISTER holds: the node's name and rank, the job, the layout."""
        return {"node": name, "rank": rank, "job": job_to_dict(self.job), "layout": self.layout.to_dict(),
                "job_steps": self.job.planned_steps(self.num_train)}  # the clock of lr schedules and warm-up

    def _register_again(self, ident: bytes, msg: Message, now: float) -> list[Action] | None:
        """A REGISTER from a node that registered already (its answer was lost, or it went to a
        coordinator that was restarted since): the same answer, or a place in the same queue.
        None: not a repeat."""
        for queue in (self.joiners, self.server_joiners):
            for i, (who, _) in enumerate(queue):
                if who == ident:
                    queue[i] = (ident, msg)
                    return []
        for i, (who, _, name) in enumerate(self.pending_workers):
            if who == ident:
                self.pending_workers[i] = (ident, msg, name)
                return []
        node = self.nodes.get(self.by_identity.get(ident, ""))
        if node is None or node.state not in (ALIVE, DONE) or node.role != msg.meta.get("role"):
            return None
        node.last_seen = now
        if self.reconnecting is not None:
            self._reconnected(now, node.name)
        if node.role == "worker" and self.phase == "registering":  # it waits for the others again
            self.pending_workers.append((ident, msg, node.name))
            return []
        meta = self._admitted(node.name, node.rank)
        if node.role == "server":  # it has loaded nothing yet: what a server registering now loads
            meta["restore"] = self.restore if self.phase == "registering" else self._restore_point()
        else:
            meta.update(servers=self._server_addresses(), initializer=node.rank == 0 and not (self.restore or {}).get("full")
                        and self.train_started is None)
        return [Reply(ident, msg.reply(meta))]

    def _start(self, now: float) -> list[Action]:
        self.phase = "training"
        log.info("coordinator: all %d servers and %d workers registered; training", self.cl.num_servers, self.cl.num_workers)
        servers = self._server_addresses()
        out: list[Action] = []
        for ident, msg, name in self.pending_workers:
            node = self.nodes[name]
            node.last_seen = now
            meta = {**self._admitted(name, node.rank),
                    "servers": servers, "initializer": node.rank == 0 and not (self.restore or {}).get("full")}
            out.append(Reply(ident, msg.reply(meta)))
        self.pending_workers = []
        return out + self._membership()

    def _replace_server(self, ident: bytes, msg: Message, now: float) -> list[Action]:
        """A server registering while a server's rank waits for a replacement takes that rank and
        loads the latest checkpoint; workers learn its address from their heartbeats."""
        hint, address = msg.meta.get("rank"), msg.meta.get("address")
        if not (isinstance(address, str) and address):
            return self._refuse(ident, msg, "bad_address", "a server must give the address it listens on")
        if problem := self._address_problem(address):
            return self._refuse(ident, msg, "bad_address", problem)
        rank = hint if type(hint) is int and hint in self.server_slots else min(self.server_slots)
        _, record = self.server_slots[rank]
        self.hosting.pop(rank, None)
        host_of = msg.meta.get("hosted_by")
        if isinstance(host_of, str) and host_of in self.nodes:  # a survivor took the rank over
            record["resharded_onto"] = host_of
        name = f"server-{rank}"
        old = self.nodes.get(name)
        if old is not None:
            self.by_identity.pop(old.identity, None)
        host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
        self.nodes[name] = Node(name, "server", rank, ident, address, host, pid if isinstance(pid, int) else 0, last_seen=now)
        self.by_identity[ident] = name
        self.servers_gen += 1
        record["replaced_by"] = f"{name} (pid {pid})"
        log.info("coordinator: %s replaced (pid %s); it loads checkpoint %s", name, pid, (self._restore_point() or {}).get("name"))
        base = self._admitted(name, rank)
        return [Reply(ident, msg.reply({**base, "restore": self._restore_point()}))] + self._membership() + self._admit_joiners(now)

    def _admit_joiners(self, now: float) -> list[Action]:
        """Workers registering while training runs take free slots (ranks without a live worker),
        up to ``cluster.max_workers``; the rest wait inside REGISTER until a slot frees (and
        every server's rank has a live server again)."""
        if not self._joinable() or len(self._role("server")) < self.cl.num_servers:
            return []  # (a server's rank waits for its replacement: a joiner needs every server's address)
        out: list[Action] = []
        while self.joiners and self._joinable():
            live = {n.rank for n in self.nodes.values() if n.role == "worker" and n.state in (ALIVE, DONE)}
            free = [r for r in range(self.cl.worker_slots) if r not in live]
            if not free:
                break
            ident, msg = self.joiners.pop(0)
            hint = msg.meta.get("rank")
            rank = hint if type(hint) is int and hint in free else free[0]
            name, gen = f"worker-{rank}", 1
            while name in self.nodes:
                gen += 1
                name = f"worker-{rank}.{gen}"
            host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
            node = Node(name, "worker", rank, ident, None, host, pid if isinstance(pid, int) else 0, last_seen=now)
            self.nodes[name] = node
            self.by_identity[ident] = name
            self.workerless_since = None
            for f in reversed(self.failures):  # the latest failure of this slot not replaced yet
                if "replaced_by" in f and f["replaced_by"] is None and self.nodes[f["node"]].rank == rank:
                    f["replaced_by"] = name
                    break
            if self.phase == "evaluating":  # it takes over the evaluation of a worker that died
                self.evaluator = name
                for at, record in list(self.recovering):
                    if "evaluation" in record["affected"]:
                        record["recovered_after_s"] = round(now - at, 3)
                        self.recovering.remove((at, record))
            log.info("coordinator: %s joined the running job (%s, pid %s)%s", name, host, pid,
                     " to evaluate the trained model" if self.phase == "evaluating" else "")
            meta = {**self._admitted(name, rank),
                    "servers": self._server_addresses(), "initializer": False}
            out.append(Reply(ident, msg.reply(meta)))
        return out + (self._membership() if out else [])

    def _move_lost_ranks(self, now: float) -> None:
        """Ranks without a replacement for ``cluster.server_replace_timeout_s`` go to the surviving
        server process that holds the fewest bytes (it loads them from the latest checkpoint)."""
        for rank, (at, record) in sorted(self.server_slots.items()):
            host = self.nodes.get(self.hosting.get(rank, ""))
            if host is not None and host.state == ALIVE:
                continue  # asked already; it is loading them
            if now - at < self.cl.server_replace_timeout_s:
                continue
            load: dict[tuple[str, int], int] = {}  # bytes per surviving process (one may serve several ranks)
            first: dict[tuple[str, int], Node] = {}
            for n in self._role("server"):
                if n.rank not in self.server_slots:
                    proc = (n.host, n.pid)
                    load[proc] = load.get(proc, 0) + self.layout.server_numel(n.rank)
                    first.setdefault(proc, n)
            if not load:
                return
            proc = min(load, key=lambda p: (load[p], first[p].rank))
            self.hosting[rank] = first[proc].name
            log.warning("coordinator: no replacement for server-%d after %.0fs; %s takes over its keys from checkpoint %s",
                        rank, now - at, first[proc].name, record.get("restored_from"))

    def _joinable(self) -> bool:
        """A worker may join now: while training, or to evaluate when the evaluator died."""
        return self.phase == "training" or (self.phase == "evaluating" and self.evaluator is None)

    def on_heartbeat(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        progress = msg.meta.get("progress")
        if isinstance(progress, dict):
            node.progress = progress
        metrics = msg.meta.get("metrics")
        if isinstance(metrics, str) and len(metrics) < 256:
            node.metrics = metrics
        if node.role == "server" and node.rank == 0:
            self._track_version_rate(now, node.progress.get("version"))
        slot = self.server_slots.get(node.rank) if node.role == "server" and node.state == ALIVE else None
        if slot is not None:  # a replacement serves (it heartbeats once it loaded its keys): recovered
            at, record = self.server_slots.pop(node.rank)
            record["recovered_after_s"] = round(now - at, 3)
            log.info("coordinator: %s serves again, %.1fs after its failure was detected", node.name, now - at)
        if node.state == DEAD:  # declared dead, yet alive: its shards went to others, so it must stop
            return [Reply(ident, msg.reply({"stop": f"{node.name} was declared dead (silent too long); its work went to others"}))]
        # Servers stop once the job is over and its last checkpoint is written (or abandoned).
        stop_server = self.phase == "stopping" and node.role == "server" and self.checkpoints.pending is None
        if self.phase == "failed" or stop_server:
            self.stop_told.add(node.name)
            reason = self.error if self.phase == "failed" else "job finished"
            return [Reply(ident, msg.reply({"stop": reason}))]
        if node.role == "server" and self.phase != "registering":
            # Repeats the last MEMBERSHIP, so a server that missed it still learns who trains;
            # and asks a survivor to take over the ranks left without a replacement.
            hosts = sorted(r for r, who in self.hosting.items() if who == node.name and r in self.server_slots)
            return [Reply(ident, msg.reply({"workers": self._members(), **({"host_ranks": hosts} if hosts else {})}))]
        if node.role == "worker" and self.stop_requested is not None and node.state == ALIVE:
            order = {"leave": "the job is stopping gracefully (final checkpoint)", "leave_at": self.leave_at}
            return [Reply(ident, msg.reply(order))]
        if node.role == "worker" and self.servers_gen:  # a server was replaced: where the servers are now
            return [Reply(ident, msg.reply({"servers": self._server_addresses(), "servers_gen": self.servers_gen}))]
        return [Reply(ident, msg.reply({}))]

    def _track_version_rate(self, now: float, version: object) -> None:
        if not isinstance(version, int):
            return
        if self._versions is not None and now - self._versions[0] >= 0.2:
            self.version_rate = max(0.0, (version - self._versions[1]) / (now - self._versions[0]))
        if self._versions is None or now - self._versions[0] >= 0.2:
            self._versions = (now, version)

    # -- checkpoints ----------------------------------------------------------
    def _job_steps(self) -> int:
        """Optimizer steps of all workers: a finished worker's exact count, else its last heartbeat's."""
        workers = self._role("worker", (ALIVE, DONE, FINISHED, DEAD))
        return self.step_offset + sum(int((n.stats or n.progress).get("steps", 0)) for n in workers)

    def _begin_checkpoint(self, now: float, final: bool = False, retries: int = 0) -> list[Action]:
        at_version = None
        if self.checkpoints.sync and not final:
            known = max((int(n.progress.get("version", 0)) for n in self._role("server")), default=0)
            at_version = known + sync_margin(self.version_rate, self.cl.heartbeat_interval_s) * 2**retries
        p = self.checkpoints.begin(now, self._job_steps(), at_version, final)
        p.retries = retries
        log.info("coordinator: checkpoint %s at step %d%s", p.name, p.step,
                 f" (servers copy at version {at_version})" if at_version is not None else "")
        committed = self.checkpoints.committed
        # Servers with sparse tables write only the rows changed since the last checkpoint when
        # that one was committed (else a full base): they are told which one was.
        msg = Message(Op.CHECKPOINT, meta={"name": p.name, "url": self.checkpoints.url, "keep": self.job.checkpoint.keep,
                                           "at_version": at_version, "committed": committed[-1]["name"] if committed else None,
                                           "full_every": self.job.checkpoint.sparse_full_every})
        return [Reply(n.identity, msg) for n in self._role("server")]

    def _checkpoint_report(self, node: Node, data: dict[str, Any], now: float) -> list[Action]:
        verdict = self.checkpoints.on_report(node.name, data)
        p = self.checkpoints.pending
        if verdict == "missed" and p is not None:
            if p.retries >= 5:
                self.checkpoints.abandon(now, f"{node.name} kept passing the version asked for")
                return []
            log.info("coordinator: %s passed version %s before hearing of checkpoint %s; asking again",
                     node.name, p.at_version, p.name)
            return self._begin_checkpoint(now, retries=p.retries + 1)
        if verdict == "failed":
            self.checkpoints.abandon(now, f"{node.name}: {data.get('error')}")
        if verdict != "complete" or p is None:
            return []
        positions: dict[str, list[list[int]]] = {}
        for report in p.reports.values():
            for worker, pos in (report.get("positions") or {}).items():
                if isinstance(pos, list) and len(pos) == 3 and all(isinstance(x, int) for x in pos):
                    positions.setdefault(worker, []).append(pos)
        state = {
            "ledger": self.ledger.state_at({w: self.ledger.earliest(w, ps) for w, ps in positions.items()}),
            "step": p.step,
            "version": max(int(r.get("version", 0)) for r in p.reports.values()),
            "examples": int((self.resume or {}).get("examples", 0))
            + sum(int(n.progress.get("examples", 0)) for n in self._role("worker", (ALIVE, DONE, FINISHED, DEAD))),
            "resumed_from": (self.resume or {}).get("name"),
            **({"buffers": bufs.to_json(self.final_buffers)} if self.final_buffers else {}),
        }
        p.versions = {str(self.nodes[n].rank): int(r.get("version", 0)) for n, r in p.reports.items() if n in self.nodes}
        files = {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in p.reports.values()}
        for r in p.reports.values():  # a server's sparse tables: their own file
            extra = r.get("sparse")
            if isinstance(extra, dict):
                files[str(extra["file"])] = {"sha256": str(extra["sha256"]), "bytes": int(extra["bytes"])}
        needs = sorted({str(n) for r in p.reports.values() for n in (r.get("needs") or []) if n != p.name})
        return [CommitCheckpoint(p.name, p.step, files, state, p.final, needs)]

    def checkpoint_committed(self, now: float, ok: bool, why: str = "") -> None:
        """The service wrote (or failed to write) the job state and manifest of the pending checkpoint."""
        if ok:
            self.checkpoints.committed_now(now, now - self.checkpoints.pending.asked)
        else:
            self.checkpoints.abandon(now, why)

    def on_barrier(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        name = str(msg.meta.get("name"))
        if name == "init" and self.train_started is not None:  # a worker joining a running job
            return [Reply(ident, msg.reply({}))]
        self.barriers.setdefault(name, {})[node.name] = (ident, msg)
        return self._release_barriers(now)

    def _release_barriers(self, now: float) -> list[Action]:
        out: list[Action] = []
        live = {n.name for n in self._training_workers()}
        for name, arrived in list(self.barriers.items()):
            if live.issubset(arrived):
                for ident, msg in arrived.values():
                    out.append(Reply(ident, msg.reply({})))
                del self.barriers[name]
                if name == "init" and self.train_started is None:
                    self.train_started = now
                    self.checkpoints.last_at = now
        return out

    def on_next_shard(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        if self.phase != "training" or node.state != ALIVE:
            return [Reply(ident, msg.reply({"shard": None}))]
        # A worker trains one shard at a time: one it holds is handed out again (its request was
        # repeated: the answer was lost, or the coordinator restarted in between).
        shard = self.ledger.held(node.name) or self.ledger.next(node.name)
        out: list[Action] = []
        if shard is None and self.ledger.assigned and self.cl.on_worker_failure == "recover":
            # Others still hold shards; one may come back if its worker dies. Meanwhile this
            # worker pushes nothing, so a sync round (or an ssp bound) must not wait for it.
            if not node.idle:
                node.idle = True
                out += self._membership()
            return [*out, Reply(ident, msg.reply({"shard": None, "wait_s": min(0.2, self.cl.heartbeat_interval_s)}))]
        if node.idle:
            node.idle = False
            out += self._membership()
        if shard is not None and self.recovering:
            key = [shard["epoch"], shard["shard"]]
            for at, record in list(self.recovering):
                if any(r[:2] == key for r in record.get("requeued", [])):
                    record["recovered_after_s"] = round(now - at, 3)
                    self.recovering.remove((at, record))
        return [*out, Reply(ident, msg.reply({"shard": shard}))]

    def on_leave(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        """A worker leaves cleanly: its stats are kept and its shards go back to the queue."""
        if node.role != "worker" or node.state not in (ALIVE, DONE):
            return [Reply(ident, msg.error("bad_leave", f"{node.name} is not a training worker"))]
        stats = msg.meta.get("stats")
        node.stats = stats if isinstance(stats, dict) else None
        if self.phase != "training":
            node.state = FINISHED
            return [Reply(ident, msg.reply({}))]
        return [Reply(ident, msg.reply({})),
                *self._worker_lost(now, node, "left", "left", 0.0, position=msg.meta.get("position"), left=True)]

    def on_shard_done(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        epoch, shard = msg.meta.get("epoch"), msg.meta.get("shard")
        if not (isinstance(epoch, int) and isinstance(shard, int)) or not self.ledger.done(node.name, epoch, shard):
            return [Reply(ident, msg.error("bad_shard", f"{node.name} was not assigned shard {shard} of epoch {epoch}"))]
        return [Reply(ident, msg.reply({}))]

    def on_worker_done(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        if self.phase in ("evaluating", "stopping"):  # a repeat whose answer was lost: the same answer
            return [Reply(ident, self._done_answer(msg, node.name == self.evaluator and self.phase == "evaluating"))]
        if node.state == DONE and node.name in self.done_waiting:  # a repeat: it waits on
            self.done_waiting[node.name] = (ident, msg)
            return []
        stats = msg.meta.get("stats")
        node.stats = dict(stats) if isinstance(stats, dict) else {}
        if msg.tensors:
            try:
                examples = node.stats.get("examples", 0)
                self.worker_buffers[node.name] = (float(examples) if isinstance(examples, (int, float)) else 0.0,
                                                  bufs.unpack(msg.meta.get("buffers"), msg.tensors))
            except ProtocolError as err:
                log.warning("coordinator: %s sent unreadable buffers (%s); left out", node.name, err)
        node.state = DONE
        self.done_waiting[node.name] = (ident, msg)
        log.info("coordinator: %s finished training", node.name)
        out = self._membership() + self._release_barriers(now)
        if not self._training_workers():
            out += self._end_training(now)
        return out

    def _end_training(self, now: float) -> list[Action]:
        self.train_ended = now
        self.phase = "evaluating"
        final = self._begin_checkpoint(now, final=True) if self.checkpoints.enabled and self.job.checkpoint.at_end else []
        done = sorted(self.done_waiting.items(), key=lambda kv: self.nodes[kv[0]].rank)
        out: list[Action] = []
        if done:
            self._merge_buffers(done[0][0])
        for i, (name, (ident, msg)) in enumerate(done):
            out.append(Reply(ident, self._done_answer(msg, i == 0)))
            if i == 0:
                self.evaluator = name
            else:
                self.nodes[name].state = FINISHED
        self.done_waiting = {}
        return out + final

    def _done_answer(self, msg: Message, evaluate: bool) -> Message:
        """WORKER_DONE's answer: whether to evaluate, and then with which buffers (as frames)."""
        if not (evaluate and self.final_buffers):
            return msg.reply({"evaluate": evaluate})
        names, tensors = bufs.pack(self.final_buffers)
        return msg.reply({"evaluate": True, "buffers": names}, tensors)

    def _merge_buffers(self, evaluator: str) -> None:
        """The model's buffers by their policies (models/buffers.py), from what the workers sent."""
        reports = list(self.worker_buffers.values())
        mine = self.worker_buffers.get(evaluator, (0.0, None))[1]
        self.final_buffers = bufs.merge(reports, mine, self.job.training) or None

    def on_report(self, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
        kind, data = msg.meta.get("kind"), msg.meta.get("data")
        data = data if isinstance(data, dict) else {}
        out: list[Action] = [Reply(ident, msg.reply({}))]
        if kind == "error":
            if node.state == DEAD:  # a repeat, or one that was declared dead already
                return out
            return out + self._lose(now, node, str(data.get("error", "failed")), "error")
        if kind == "eval" and node.name != self.evaluator:
            return self._refuse(ident, msg, Code.FORBIDDEN, f"{node.name} was not asked to evaluate")
        if kind == "eval" and node.role == "worker" and self.phase == "evaluating":
            self.evaluation = data
            node.state = FINISHED
            self.phase = "stopping"
            log.info("coordinator: test accuracy %s; stopping servers", data.get("test_accuracy"))
            for who, asked in self.joiners:  # workers that waited in case the evaluator died
                out.append(Reply(who, asked.error("job_running", "the job is over; it takes no new workers")))
            self.joiners = []
            # Before any server hears "stop" (that happens in answers to later heartbeats).
            out.append(SaveModel(self._server_addresses(), self.final_buffers))
        elif kind == "checkpoint" and node.role == "server":
            out += self._checkpoint_report(node, data, now)
        elif kind == "server" and node.role == "server":
            node.stats = data
            node.state = FINISHED
            if self.phase == "stopping" and not self._role("server"):
                self.phase = "finished"
                out.append(Finish(0, self.summary(now)))
        return out

    def on_status(self, ident: bytes, msg: Message, now: float, _: Node | None) -> list[Action]:
        return [Reply(ident, msg.reply(self.status(now)))]

    # -- graceful stop ------------------------------------------------------
    def request_stop(self, now: float) -> list[Action]:
        """Stop the job without losing work (the coordinator got SIGTERM; ``downpour train`` sends it
        on the first Ctrl-C or SIGTERM). Training workers are told to leave after their current step
        (in heartbeat answers): each settles its last push and LEAVEs with its exact data position,
        so its shard goes back to the queue. Once none trains, a final checkpoint is committed, the
        trained parameters are saved, the servers stop, and the summary says ``status: stopped``.
        ``--resume`` then continues from that checkpoint and trains every example once. A job still
        registering fails at once (nothing to keep); one already evaluating simply finishes."""
        if self.stop_requested is not None or self.phase not in ("registering", "training"):
            return []
        self.stop_requested = now
        if self.checkpoints.sync:  # every worker leaves after the same round, placed as a sync checkpoint is
            known = max((int(n.progress.get("version", 0)) for n in self._role("server")), default=0)
            self.leave_at = known + sync_margin(self.version_rate, self.cl.heartbeat_interval_s)
        log.warning("coordinator: graceful stop requested: workers leave after %s, then a final checkpoint",
                    "their current step" if self.leave_at is None else f"round {self.leave_at}")
        if self.phase == "registering":
            return self._fail(now, "coordinator", "stopped (SIGTERM) before training began", "stopped")
        return []

    def _stop_step(self, now: float) -> list[Action]:
        """The next step of a graceful stop, once no worker trains any more."""
        if self._training_workers():
            return []
        p = self.checkpoints.pending
        if self.checkpoints.enabled and not self.final_asked:
            self.final_asked = True
            self.train_ended = now
            if p is not None:  # a periodic one (sync: at a version no push will reach now): the final one replaces it
                self.checkpoints.abandon(now, "superseded by the final checkpoint of a graceful stop")
            return self._begin_checkpoint(now, final=True)
        if p is not None:
            return []  # the final checkpoint is being written
        self.train_ended = self.train_ended or now
        self.phase = "stopping"  # servers hear "stop" in their next heartbeat answer, after the model is saved
        log.info("coordinator: graceful stop: %s; stopping servers",
                 f"checkpoint {self.checkpoints.committed[-1]['name']} committed" if self.checkpoints.committed else "no checkpoint")
        return [SaveModel(self._server_addresses())]

    # -- time -------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        if self.phase == "failed":
            alive = {n.name for n in self.nodes.values() if n.state in (ALIVE, DONE)}
            if alive.issubset(self.stop_told) or (self.stop_deadline is not None and now >= self.stop_deadline):
                self.phase = "finished"
                return [Finish(1, self.summary(now))]
            return []
        if self.phase == "registering":
            if now - self.started > self.cl.startup_timeout_s:
                have_s, have_w = len(self._role("server")), len(self._role("worker"))
                return self._fail(now, "coordinator", f"start timed out after {self.cl.startup_timeout_s:g}s: "
                                  f"{have_s}/{self.cl.num_servers} servers and {have_w}/{self.cl.num_workers} workers registered",
                                  "start_timeout")
            watched = self._role("server")  # workers wait inside REGISTER, without heartbeats
        else:
            watched = [n for n in self.nodes.values() if n.state in (ALIVE, DONE)]
        for node in watched:
            silent = now - node.last_seen
            # After a restart, a node not heard from since its admission may be waiting for a
            # REGISTER answer the old process never sent (see Node.heard): time to repeat it.
            limit = self.cl.heartbeat_timeout_s + (ATTEMPT_S if self.restarts and not node.heard else 0.0)
            if silent > limit:
                why = f"no heartbeat for {silent:.1f}s (timeout {limit:g}s); declared dead"
                return self._lose(now, node, why, "dead", silent)
        if self.stop_requested is not None and self.phase == "training":
            return self._stop_step(now)
        if self.workerless_since is not None and now - self.workerless_since > self.cl.startup_timeout_s:
            return self._fail(now, "coordinator", f"every worker was lost and none joined within "
                              f"{self.cl.startup_timeout_s:g}s (cluster.startup_timeout_s)", "no_workers")
        if self.reconnecting is not None:
            self._reconnected(now, None)
        if self.phase != "registering":  # workers waiting inside REGISTER send no heartbeats
            training = self.phase == "training" and self.train_started is not None
            self.health.update(list(self.nodes.values()), training, now, self.affected)
        if self.phase == "training" and self.server_slots:
            self._move_lost_ranks(now)
        if self.checkpoints.expired(now):
            self.checkpoints.abandon(now, f"not complete after {self.job.checkpoint.timeout_s:g}s")
        if self.phase == "training" and self.train_started is not None and self.checkpoints.due(now, self._job_steps()):
            return self._begin_checkpoint(now)
        return []

    # -- reporting ----------------------------------------------------------
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
    Op.REGISTER: CoordinatorState.on_register,
    Op.HEARTBEAT: CoordinatorState.on_heartbeat,
    Op.BARRIER: CoordinatorState.on_barrier,
    Op.NEXT_SHARD: CoordinatorState.on_next_shard,
    Op.SHARD_DONE: CoordinatorState.on_shard_done,
    Op.WORKER_DONE: CoordinatorState.on_worker_done,
    Op.REPORT: CoordinatorState.on_report,
    Op.LEAVE: CoordinatorState.on_leave,
    Op.STATUS: CoordinatorState.on_status,
}
