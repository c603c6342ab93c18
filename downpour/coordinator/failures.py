"""Decisions about failures: a node lost (dead, failed or gone), what that costs, and the job's end.

Functions of the coordinator's state (:class:`~downpour.coordinator.state.CoordinatorState`) that
change it and return the actions to perform. A worker lost while training gives its shards back and
frees its slot (``cluster.on_worker_failure: recover``); a server lost while training waits for a
replacement that loads the latest checkpoint (``cluster.on_server_failure: recover``); the evaluator
lost while evaluating is replaced by the next worker to join; anything else ends the job
(:func:`fail`). Every failure is one :class:`~downpour.coordinator.model.FailureRecord`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from downpour.coordinator import hosting, membership, replication
from downpour.coordinator.actions import Action, Reply, SaveModel
from downpour.coordinator.health import describe_affected
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED, FailureRecord, Node, Phase
from downpour.protocol.ops import Code

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

EXIT_CHECK_S = 0.2  # how often the processes of this machine's nodes are looked for (exited)


def affected(st: CoordinatorState, name: str) -> dict[str, list[str]]:
    """The key ranges (of a server) or data shards (of a worker) that ``name`` holds."""
    node = st.nodes.get(name)
    if node is None:
        return {}
    if node.role == "server":
        keys = [st.layout.describe(s) for s in st.layout.server_slices(node.rank)]
        return {"keys": keys if len(keys) <= 8 else [*keys[:8], f"... {len(keys)} keys in all"]}
    shards = sorted(k for k, who in st.ledger.assigned.items() if who == name)
    return {"shards": [f"epoch {e} shard {s}" for e, s in shards]}


def exited(st: CoordinatorState, watched: list[Node], now: float) -> list[Node]:
    """Nodes of this machine whose process exited while training: declared dead without waiting for
    the heartbeat timeout. A dead worker is what an async checkpoint's cut, a sync round or an ssp
    bound would otherwise wait for (the servers hold pushes past the cut until it leaves the
    membership), and a dead server what its workers' requests, its failover or its replacement
    would. Only a process once seen running counts (a node in another process namespace that
    happens to name a pid of this one is never judged by it): a live node is never declared dead
    because of this check, a pid reused by another process only delays detection to the heartbeat
    timeout. Nodes of other machines are left to the heartbeat timeout. At most every
    ``EXIT_CHECK_S`` (a look at /proc per node). After training (the evaluation, saving the model)
    servers only, and not those told to stop: the model is saved from them."""
    if st.phase not in (Phase.TRAINING, Phase.EVALUATING, Phase.STOPPING) or now < st.exits_checked_at + EXIT_CHECK_S:
        return []
    if st.phase != Phase.TRAINING:  # (a process that was told to stop may serve another rank too: not that one either)
        told = {(st.nodes[n].host, st.nodes[n].pid) for n in st.stop_told if n in st.nodes}
        watched = [n for n in watched if n.role == "server" and n.name not in st.stop_told and (n.host, n.pid) not in told]
    st.exits_checked_at = now
    out = []
    for n in watched:
        local = st.local_hosts.get(n.host)
        if local is None:  # (a name lookup: once per host)
            local = st.local_hosts[n.host] = st.is_local(n.host)
        if not local or type(n.pid) is not int:
            continue
        alive = st.pid_alive(n.pid)
        if alive:
            st.pid_seen.add((n.name, n.pid))
        elif alive is False and (n.name, n.pid) in st.pid_seen:
            out.append(n)
    return out


def lose(st: CoordinatorState, now: float, node: Node, reason: str, kind: str, detected_after_s: float = 0.0) -> list[Action]:
    """``node`` died or failed: a worker while training is recovered from (unless the job says
    fail); anything else stops the job."""
    if node.role == "worker" and st.phase == Phase.TRAINING and st.cl.on_worker_failure == "recover":
        return worker_lost(st, now, node, reason, kind, detected_after_s)
    if node.role == "worker" and st.phase == Phase.EVALUATING and st.cl.on_worker_failure == "recover":
        return evaluator_lost(st, now, node, reason, kind, detected_after_s)
    if node.role == "server" and st.stop_requested is not None and st.phase in (Phase.TRAINING, Phase.STOPPING):
        return server_lost_in_stop(st, now, node, reason, kind, detected_after_s)
    pending = st.checkpoints.pending
    if node.role == "server" and pending is not None and node.name not in pending.reports:
        # Its part of the checkpoint will never come (a replacement or a promoted backup knows nothing
        # of it): the next one is begun when due, not after checkpoint.timeout_s.
        st.checkpoints.abandon(now, f"{node.name} was lost before it wrote its part")
    if node.role == "server" and st.phase == Phase.TRAINING and st.cl.on_server_failure == "recover":
        if st.cl.replicas:  # a backup takes over, losing nothing
            promoted = replication.primary_lost(st, now, node, reason, kind, detected_after_s, affected(st, node.name))
            if promoted is not None:
                return promoted
        if hosting.restore_point(st) is not None:
            return server_lost(st, now, node, reason, kind, detected_after_s)
        reason += (" (no checkpoint committed yet to restart it from)" if st.checkpoints.enabled else
                   " (checkpoint.enabled is false: there is no checkpoint to restart a server from)")
    if node.role == "server" and st.phase in (Phase.EVALUATING, Phase.STOPPING) and st.checkpoints.committed:
        last = st.checkpoints.committed[-1]
        reason += (f"; training was over, but without it the trained parameters are not whole, so model.pt is not written: "
                   f"--resume continues from checkpoint {last['name']}" + (
                       ", the end of training's: it trains nothing more, evaluates and writes model.pt" if last.get("final")
                       else f" (step {last.get('step')})"))
    node.state = DEAD
    return fail(st, now, node.name, reason, kind, detected_after_s)


def server_lost_in_stop(st: CoordinatorState, now: float, node: Node, reason: str, kind: str, detected_after_s: float) -> list[Action]:
    """A server lost during a graceful stop: no replacement is started while the job stops (the
    launcher starts none), so its rank's part of the final checkpoint, and of ``model.pt``, will
    never come. A backup takes over where there is one; else the job ends now (:func:`stop_unserved`)."""
    pending = st.checkpoints.pending
    if pending is not None and node.name not in pending.reports:  # (a promoted backup knows nothing of it either)
        st.checkpoints.abandon(now, f"{node.name} was lost during the graceful stop before it wrote its part")
    if st.cl.replicas and st.phase == Phase.TRAINING:
        promoted = replication.primary_lost(st, now, node, reason, kind, detected_after_s, affected(st, node.name))
        if promoted is not None:
            return promoted
    node.state = DEAD
    return stop_unserved(st, now, node.name, f"{node.name} was lost during the graceful stop ({reason})")


def stop_unserved(st: CoordinatorState, now: float, node: str, why: str) -> list[Action]:
    """End a graceful stop at once, without its final checkpoint, because a server rank has no
    process to write its part: the job ends ``stopped`` as asked, and ``--resume`` continues from
    the last committed checkpoint (or the one this job resumed from), whose data positions match
    its parameters (what was trained after it is trained again, once)."""
    if st.checkpoints.pending is not None:
        st.checkpoints.abandon(now, why)
    last = st.checkpoints.committed[-1] if st.checkpoints.committed else None
    point = (hosting.restore_point(st) or {}).get("name")
    if last is not None and last.get("final"):
        then = f"the final checkpoint {last['name']} was committed before it: --resume continues from it"
    elif point is not None:
        then = (f"the final checkpoint cannot be written: --resume continues from checkpoint {point}"
                + (f" (step {last.get('step')})" if last is not None else "") + " and trains again what was trained after it")
    else:
        then = "no checkpoint was committed: there is nothing to continue from"
    log.warning("coordinator: %s; %s", why, then)
    return fail(st, now, node, f"{why}; {then}", "stopped")


def server_lost(st: CoordinatorState, now: float, node: Node, reason: str, kind: str, detected_after_s: float) -> list[Action]:
    """Keep training on the other servers; the server's rank waits for a replacement, which
    loads the latest checkpoint. What that server applied since then is lost (reported)."""
    node.state = DEAD
    point = hosting.restore_point(st) or {}
    record = FailureRecord(node.name, kind, round(now - st.started, 3), reason, scope="server",
                           detected_after_s=round(detected_after_s, 3), affected=affected(st, node.name),
                           restored_from=point.get("name"), version_at_failure=node.progress.get("version"),
                           rolled_back_versions=rolled_back(st, node), backups_lost=replication.kept_by(st, node))
    st.failures.append(record)
    st.server_slots[node.rank] = (now, record)
    replication.replan(st)  # (the backups its process kept move elsewhere)
    log.warning("coordinator: %s lost (%s); waiting for a replacement to load checkpoint %s; training goes on",
                node.name, reason, point.get("name"))
    if st.server_joiners:  # a replacement registered already, before this one was declared dead
        ident, msg = st.server_joiners.pop(0)
        return hosting.replace_server(st, ident, msg, now)
    return []


def rolled_back(st: CoordinatorState, node: Node) -> int | None:
    """Updates of ``node``'s rank that its replacement will not have: its version when last heard
    from, less its version in the checkpoint it is restored from (None: unknown, also where that
    heartbeat is older than the checkpoint: the updates applied after both are not known)."""
    at = node.progress.get("version")
    saved = (st.checkpoints.committed[-1].get("versions") or {}).get(str(node.rank)) if st.checkpoints.committed else None
    return at - saved if type(at) is int and type(saved) is int and at >= saved else None


def evaluator_lost(st: CoordinatorState, now: float, node: Node, reason: str, kind: str, detected_after_s: float) -> list[Action]:
    """The worker evaluating the trained model died: the next worker to register (a
    replacement) evaluates instead; none within ``cluster.startup_timeout_s`` ends the job."""
    node.state = DEAD
    st.failures.append(FailureRecord(node.name, kind, round(now - st.started, 3), reason, scope="evaluator",
                                     detected_after_s=round(detected_after_s, 3),
                                     affected={"evaluation": ["the test-set evaluation of the trained model"]}))
    st.recovering.append((now, st.failures[-1]))
    st.evaluator = None
    st.workerless_since = now
    log.warning("coordinator: %s lost while evaluating (%s); the next worker to join evaluates", node.name, reason)
    return membership.admit_joiners(st, now)


def worker_lost(st: CoordinatorState, now: float, node: Node, reason: str, kind: str, detected_after_s: float,
                 position: object = None, left: bool = False) -> list[Action]:
    """Put ``node``'s shards back, tell the servers, free its slot for a joiner."""
    held = affected(st, node.name)
    had_finished = node.state == DONE
    node.state = FINISHED if left else DEAD
    pos = node.progress.get("position") if position is None else position
    pos = pos if isinstance(pos, list) and len(pos) == 3 and all(type(x) is int and x >= 0 for x in pos) else None
    requeued = st.ledger.release(node.name, pos)
    st.done_waiting.pop(node.name, None)
    for arrived in st.barriers.values():
        arrived.pop(node.name, None)
    if left:
        log.info("coordinator: %s left the job; %d shard(s) back in the queue", node.name, len(requeued))
    else:
        record = FailureRecord(node.name, kind, round(now - st.started, 3), reason, scope="worker",
                               detected_after_s=round(detected_after_s, 3), affected=held, requeued=requeued)
        st.failures.append(record)
        if requeued:  # recovered once one of them is handed out again
            st.recovering.append((now, record))
        else:  # it held no unfinished shard: nothing to redo
            record.recovered_after_s = 0.0
        log.warning("coordinator: %s lost (%s); %s; training goes on", node.name, reason,
                    f"{len(requeued)} shard(s) back in the queue" if requeued else
                    ("it had finished training" if had_finished else "it held no shard"))
    out = membership.tell_servers(st) + membership.release_barriers(st, now) + membership.admit_joiners(st, now)
    if not st.training_workers() and not st.done_waiting:
        st.workerless_since, st.workerless_left = now, left
    elif not st.training_workers():
        out += membership.end_training(st, now)
    return out


def fail(st: CoordinatorState, now: float, node: str, reason: str, kind: str = "error", detected_after_s: float = 0.0) -> list[Action]:
    if st.phase in (Phase.FAILED, Phase.FINISHED):
        return []
    trained = st.phase == Phase.EVALUATING  # training is over: only the evaluation failed
    held = affected(st, node)
    st.failures.append(FailureRecord(node, kind, round(now - st.started, 3), reason,
                                     detected_after_s=round(detected_after_s, 3), affected=held))
    if any(held.values()):
        reason = f"{reason} ({describe_affected(held)})"
    if kind == "stopped":  # (a stop that ends the job at once, as asked: summary.json says stopped)
        log.warning("coordinator: job stopped: %s: %s", node, reason)
    else:
        log.error("coordinator: job failed: %s: %s", node, reason)
    st.phase = Phase.FAILED
    st.error = f"{node}: {reason}"
    st.failed_node = node
    st.stop_deadline = now + 3 * st.cl.heartbeat_interval_s + 1.0
    out: list[Action] = []
    # Requests parked in a barrier or the start would otherwise wait for their timeout.
    for ident, msg, _ in st.pending_workers:
        out.append(Reply(ident, msg.error(Code.JOB_FAILED, st.error)))
    for waiting in [*st.barriers.values(), st.done_waiting]:
        for ident, msg in waiting.values():
            out.append(Reply(ident, msg.error(Code.JOB_FAILED, st.error)))
    for ident, msg in [*st.joiners, *((i, m) for i, m, _ in st.shard_waiters.values())]:
        out.append(Reply(ident, msg.error(Code.JOB_FAILED, st.error)))
    st.pending_workers, st.barriers, st.done_waiting, st.joiners, st.shard_waiters = [], {}, {}, [], {}
    if trained and len(st.nodes_of("server", (ALIVE, DONE))) == st.cl.num_servers:
        # The trained parameters are whole on the servers: model.pt is written as on success.
        out.append(SaveModel(st.server_addresses(), st.final_buffers))
    return out


def reconnected(st: CoordinatorState, now: float, name: str | None) -> None:
    """After a coordinator restart: ``name`` was heard from (None: only look whether anyone is
    still awaited). The coordinator's failure counts as recovered when the first node gets an
    answer, and as reconnected once every node alive at the restart was heard from (or was
    declared dead)."""
    waiting, since, record = st.reconnecting
    if name is not None and record.recovered_after_s is None:  # serving again: the first node got through
        record.recovered_after_s = round(now - since, 3)
    waiting.discard(name)
    waiting.intersection_update(n.name for n in st.nodes.values() if n.state in (ALIVE, DONE))
    if not waiting:
        record.reconnected_after_s = round(now - since, 3)
        if record.recovered_after_s is None:
            record.recovered_after_s = record.reconnected_after_s
        st.reconnecting = None
        log.info("coordinator: every node reconnected, %.1fs after the coordinator's failure was detected", now - since)
