"""Decisions about who is in the job: registration and admission, joiners taking free slots,
barriers, heartbeats, data shards handed out one at a time, workers leaving or finishing, and the
end of training (the evaluator chosen, the workers' buffers merged).

Functions of the coordinator's state (:class:`~downpour.coordinator.state.CoordinatorState`) that
change it and return the actions to perform; ``register`` … ``worker_done`` answer one request each.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from downpour.config import job_to_dict
from downpour.coordinator import checkpoints, failures, hosting, replication
from downpour.coordinator.actions import Action, Reply
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED, Node, Phase
from downpour.coordinator.reach import address_problem as _address_problem
from downpour.coordinator.reach import checkpoint_unreachable as _checkpoint_unreachable
from downpour.errors import ProtocolError
from downpour.models import buffers as bufs
from downpour.protocol import Message, Op
from downpour.protocol.ops import Code

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

# Failures whose slot a newcomer takes (replaced_by names it).
_REPLACEABLE = ("worker", "server", "evaluator")


def tell_servers(st: CoordinatorState) -> list[Action]:
    """Tell the servers which workers a sync round waits for (sent unprompted)."""
    msg = Message(Op.MEMBERSHIP, meta=membership_meta(st))
    return [Reply(s.identity, msg) for s in st.nodes_of("server")]


def membership_meta(st: CoordinatorState) -> dict[str, Any]:
    """What servers hear of the membership: the workers a sync round waits for, and during a
    graceful stop of a sync job ``stopping``: a worker leaving then ends the sync rounds
    (``Policy.freeze``), so none completes without it and the final checkpoint holds the
    parameters of the round every worker left after."""
    meta: dict[str, Any] = {"workers": st.members()}
    if st.stop_requested is not None and st.leave_at is not None:
        meta["stopping"] = True
    return meta


def register(st: CoordinatorState, ident: bytes, msg: Message, now: float, _: Node | None) -> list[Action]:
    role, hint = msg.meta.get("role"), msg.meta.get("rank")
    again = register_again(st, ident, msg, now)
    if again is not None:
        return again
    want = {"server": st.cl.num_servers, "worker": st.cl.num_workers}.get(role)  # type: ignore[arg-type]
    if want is None:
        return st.refuse(ident, msg, Code.BAD_ROLE, f"role must be server or worker, got {role!r}")
    if role == "worker" and st.cl.on_worker_failure == "recover" and st.phase in (Phase.TRAINING, Phase.EVALUATING):
        # It waits for a free slot (or, once training is over, in case the evaluator dies).
        st.joiners.append((ident, msg))
        return admit_joiners(st, now)
    if st.phase == Phase.TRAINING and role == "server" and st.cl.on_server_failure == "recover":
        if hosting.open_slots(st, msg):
            return hosting.replace_server(st, ident, msg, now)
        if type(hint) is int and 0 <= hint < st.cl.num_servers:  # a replacement for that rank, early
            st.server_joiners.append((ident, msg))
            return []
    if st.phase != Phase.REGISTERING:
        return st.refuse(ident, msg, Code.JOB_RUNNING, f"the job is {st.phase}; it takes no new {role}s")
    taken = {n.rank for n in st.nodes.values() if n.role == role}
    free = [r for r in range(want) if r not in taken]
    if not free:
        return st.refuse(ident, msg, Code.JOB_FULL, f"the job already has {want} {role}s")
    rank = hint if type(hint) is int and hint in free else free[0]
    address = msg.meta.get("address")
    if role == "server" and not (isinstance(address, str) and address):
        return st.refuse(ident, msg, Code.BAD_ADDRESS, "a server must give the address it listens on")
    if role == "server" and (problem := address_problem(st, address)):
        refused = st.refuse(ident, msg, Code.BAD_ADDRESS, problem)
        if checkpoint_unreachable(st, address):  # the job's checkpoint.url: no server of that host could ever join
            refused += failures.fail(st, now, "coordinator", f"a server registered from another host: {problem}", "config")
        return refused
    name = f"{role}-{rank}"
    host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
    st.nodes[name] = Node(name, role, rank, ident, address, host, pid if isinstance(pid, int) else 0, last_seen=now)
    st.by_identity[ident] = name
    log.info("coordinator: %s registered (%s, pid %s)", name, msg.meta.get("host"), msg.meta.get("pid"))
    base = admitted(st, name, rank)
    out: list[Action] = []
    if role == "server":
        out.append(Reply(ident, msg.reply({**base, "restore": st.restore})))
    else:
        st.pending_workers.append((ident, msg, name))
    if len(st.nodes_of("server")) == st.cl.num_servers and len(st.nodes_of("worker")) == st.cl.num_workers:
        out += start(st, now)
    return out


def _reach(st: CoordinatorState) -> tuple[str | None, bool, Any]:
    """What reach.py's checks take of the job: its checkpoint location (if any), shared or not, is_local."""
    cp = st.checkpoints
    return cp.url if cp.enabled else None, st.job.checkpoint.shared, st.is_local


def address_problem(st: CoordinatorState, address: str) -> str | None:
    return _address_problem(address, *_reach(st))


def checkpoint_unreachable(st: CoordinatorState, address: str) -> bool:
    return _checkpoint_unreachable(address, *_reach(st))


def admitted(st: CoordinatorState, name: str, rank: int) -> dict[str, Any]:
    """What every answer to an admitted REGISTER holds: the node's name and rank, the job, the layout."""
    return {"node": name, "rank": rank, "job": job_to_dict(st.job), "layout": st.layout.to_dict(),
            "job_steps": st.job.planned_steps(st.num_train),  # the clock of lr schedules and warm-up
            **({"steps_left": steps_left(st, name, rank)} if st.job.training.steps is not None else {})}


def steps_left(st: CoordinatorState, name: str, rank: int) -> int:
    """What is left of ``training.steps`` (a cap per worker) for the worker ``name`` of ``rank``: less
    the steps its rank's earlier processes of this run trained (it replaces one that died), and, in
    a resumed job, the rank's share of the steps the checkpoint holds (each rank of
    ``cluster.num_workers`` an equal share, the first ones one more), so that the job ends where it
    would have ended undisturbed (before, every process started the cap afresh)."""
    t, workers = st.job.training, st.cl.num_workers
    done = sum(int(n.progress.get("steps", 0)) for n in st.nodes.values()
               if n.role == "worker" and n.rank == rank and n.name != name and n.state not in (ALIVE, DONE))
    before = int((st.resume or {}).get("trained") or 0) // t.batch_size
    if rank < workers:
        done += before // workers + (1 if rank < before % workers else 0)
    return max(0, int(t.steps or 0) - done)


def register_again(st: CoordinatorState, ident: bytes, msg: Message, now: float) -> list[Action] | None:
    """A REGISTER from a node that registered already (its answer was lost, or it went to a
    coordinator that was restarted since): the same answer, or a place in the same queue.
    None: not a repeat."""
    for queue in (st.joiners, st.server_joiners):
        for i, (who, _) in enumerate(queue):
            if who == ident:
                queue[i] = (ident, msg)
                return []
    for i, (who, _, name) in enumerate(st.pending_workers):
        if who == ident:
            st.pending_workers[i] = (ident, msg, name)
            return []
    node = st.nodes.get(st.by_identity.get(ident, ""))
    if node is None or node.state not in (ALIVE, DONE) or node.role != msg.meta.get("role"):
        return None
    node.last_seen = now
    if st.reconnecting is not None:
        failures.reconnected(st, now, node.name)
    if node.role == "worker" and st.phase == Phase.REGISTERING:  # it waits for the others again
        st.pending_workers.append((ident, msg, node.name))
        return []
    meta = admitted(st, node.name, node.rank)
    if node.role == "server":  # it has loaded nothing yet: what a server registering now loads
        meta["restore"] = st.restore if st.phase == Phase.REGISTERING else hosting.restore_point(st)
    else:
        meta.update(servers=st.server_addresses(), initializer=node.rank == 0 and not (st.restore or {}).get("full")
                    and st.train_started is None)
    return [Reply(ident, msg.reply(meta))]


def start(st: CoordinatorState, now: float) -> list[Action]:
    st.phase = Phase.TRAINING
    log.info("coordinator: all %d servers and %d workers registered; training", st.cl.num_servers, st.cl.num_workers)
    servers = st.server_addresses()
    out: list[Action] = []
    for ident, msg, name in st.pending_workers:
        node = st.nodes[name]
        node.last_seen = now
        meta = {**admitted(st, name, node.rank),
                "servers": servers, "initializer": node.rank == 0 and not (st.restore or {}).get("full")}
        out.append(Reply(ident, msg.reply(meta)))
    st.pending_workers = []
    replication.replan(st)  # each rank's backups (the servers learn theirs in heartbeat answers)
    return out + tell_servers(st)


def admit_joiners(st: CoordinatorState, now: float) -> list[Action]:
    """Workers registering while training runs take free slots (ranks without a live worker),
    up to ``cluster.max_workers``; the rest wait inside REGISTER until a slot frees (and
    every server's rank has a live server again)."""
    if not joinable(st) or len(st.nodes_of("server")) < st.cl.num_servers:
        return []  # (a server's rank waits for its replacement: a joiner needs every server's address)
    out: list[Action] = []
    while st.joiners and joinable(st):
        live = {n.rank for n in st.nodes.values() if n.role == "worker" and n.state in (ALIVE, DONE)}
        free = [r for r in range(st.cl.worker_slots) if r not in live]
        if not free:
            break
        ident, msg = st.joiners.pop(0)
        hint = msg.meta.get("rank")
        rank = hint if type(hint) is int and hint in free else free[0]
        name, gen = f"worker-{rank}", 1
        while name in st.nodes:
            gen += 1
            name = f"worker-{rank}.{gen}"
        host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
        node = Node(name, "worker", rank, ident, None, host, pid if isinstance(pid, int) else 0, last_seen=now)
        st.nodes[name] = node
        st.by_identity[ident] = name
        st.workerless_since = None
        for f in reversed(st.failures):  # the latest failure of this slot not replaced yet
            if f.scope in _REPLACEABLE and f.replaced_by is None and st.nodes[f.node].rank == rank:
                f.replaced_by = name
                break
        if st.phase == Phase.EVALUATING:  # it takes over the evaluation of a worker that died
            st.evaluator = name
            for at, record in list(st.recovering):
                if "evaluation" in record.affected:
                    record.recovered_after_s = round(now - at, 3)
                    st.recovering.remove((at, record))
        log.info("coordinator: %s joined the running job (%s, pid %s)%s", name, host, pid,
                 " to evaluate the trained model" if st.phase == Phase.EVALUATING else "")
        if st.phase == Phase.TRAINING and checkpoints.ssp(st.job):
            # The servers hold a joiner's pushes until the pending checkpoint's copy (it is not in the
            # cut), and under ssp the others wait for it, the slowest: none would reach the cut.
            st.checkpoints.abandon(now, f"{name} joined before its cut was reached (ssp: the others wait for it)")
        meta = {**admitted(st, name, rank),
                "servers": st.server_addresses(), "initializer": False}
        out.append(Reply(ident, msg.reply(meta)))
    return out + (tell_servers(st) if out else [])


def joinable(st: CoordinatorState) -> bool:
    """A worker may join now: while training, or to evaluate when the evaluator died."""
    return st.phase == Phase.TRAINING or (st.phase == Phase.EVALUATING and st.evaluator is None)


def heartbeat(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    if msg.meta.get("restoring") is True:
        return restoring(st, ident, msg, now, node)
    if node.restoring_since is not None:
        log.info("coordinator: %s restored its checkpoint in %.1fs; serving", node.name, now - node.restoring_since)
        node.restoring_since = None
    progress = msg.meta.get("progress")
    if isinstance(progress, dict):
        node.progress = progress
    metrics = msg.meta.get("metrics")
    if isinstance(metrics, str) and len(metrics) < 256:
        node.metrics = metrics
    if node.role == "server" and node.rank == 0:
        track_version_rate(st, now, node.progress.get("version"))
    slot = st.server_slots.get(node.rank) if node.role == "server" and node.state == ALIVE else None
    if slot is not None:  # a replacement serves (it heartbeats once it loaded its keys): recovered
        at, record = st.server_slots.pop(node.rank)
        record.recovered_after_s = round(now - at, 3)
        log.info("coordinator: %s serves again, %.1fs after its failure was detected", node.name, now - at)
        replication.replan(st)
    if node.role == "server" and node.state == ALIVE:
        replication.heard(st, now, node)
    if node.state == DEAD:  # declared dead, yet alive: its shards went to others, so it must stop
        return [Reply(ident, msg.reply({"stop": f"{node.name} was declared dead (silent too long); its work went to others",
                                        "dead": True}))]
    # Servers stop once the job is over and its last checkpoint is written (or abandoned).
    stop_server = st.phase == Phase.STOPPING and node.role == "server" and st.checkpoints.pending is None
    if st.phase == Phase.FAILED or stop_server:
        st.stop_told.add(node.name)
        reason = st.error if st.phase == Phase.FAILED else "job finished"
        return [Reply(ident, msg.reply({"stop": reason}))]
    if node.role == "server" and st.phase != Phase.REGISTERING:
        # Repeats the last MEMBERSHIP, so a server that missed it still learns who trains;
        # and asks a survivor to take over the ranks left without a replacement. ``ending``: the job
        # is on its way to the end (a graceful stop, its evaluation): a server sent SIGTERM stays
        # for it (its final checkpoint) and stops when told, instead of at once (server/service.py).
        hosts = replication.promotions(st, node)
        ending = st.stop_requested is not None or st.phase in (Phase.EVALUATING, Phase.STOPPING)
        return [Reply(ident, msg.reply({**membership_meta(st), **({"host_ranks": hosts} if hosts else {}),
                                        **replication.assignment(st, node), **({"ending": True} if ending else {})}))]
    meta: dict[str, Any] = {}
    if node.role == "worker" and st.servers_gen:  # a server was replaced: where the servers are now
        meta = {"servers": st.server_addresses(), "servers_gen": st.servers_gen}
    if node.role == "worker" and st.stop_requested is not None and node.state == ALIVE:
        # (With where the servers are: a worker waiting on a replaced server's old process must
        # reach the new one to settle its last push and leave.)
        meta.update(leave="the job is stopping gracefully (final checkpoint)", leave_at=st.leave_at)
    return [Reply(ident, msg.reply(meta))]


def restoring(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    """A server's heartbeat while it loads its checkpoint (that takes seconds for a large one on a
    loaded machine, longer than ``cluster.heartbeat_timeout_s``). It only keeps the node alive (its
    ``last_seen`` was refreshed with the request): it is not serving yet, so nothing else is read
    from it (no progress, no recovery of its rank, no part in the backup plan). One restoring for
    longer than ``cluster.startup_timeout_s`` is declared dead (:meth:`CoordinatorState.tick`)."""
    if node.role != "server":
        return [Reply(ident, msg.error(Code.INVALID, f"meta.restoring: {node.name} is not a server; only servers restore"))]
    if node.state == DEAD:
        return [Reply(ident, msg.reply({"stop": f"{node.name} was declared dead; its work went to others", "dead": True}))]
    if st.phase == Phase.FAILED:
        st.stop_told.add(node.name)
        return [Reply(ident, msg.reply({"stop": st.error}))]
    if node.restoring_since is None:
        node.restoring_since = now
        log.info("coordinator: %s is restoring its checkpoint (alive, not serving yet)", node.name)
    return [Reply(ident, msg.reply({}))]


def track_version_rate(st: CoordinatorState, now: float, version: object) -> None:
    if not isinstance(version, int):
        return
    if st.version_sample is not None and now - st.version_sample[0] >= 0.2:
        st.version_rate = max(0.0, (version - st.version_sample[1]) / (now - st.version_sample[0]))
    if st.version_sample is None or now - st.version_sample[0] >= 0.2:
        st.version_sample = (now, version)


def barrier(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    name = str(msg.meta.get("name"))
    if st.phase == Phase.FAILED:  # (the ones waiting when it failed were answered so by failures.fail)
        return [Reply(ident, msg.error(Code.JOB_FAILED, st.error or "the job failed"))]
    if name == "init" and st.train_started is not None:  # a worker joining a running job
        return [Reply(ident, msg.reply({}))]
    st.barriers.setdefault(name, {})[node.name] = (ident, msg)
    return release_barriers(st, now)


def release_barriers(st: CoordinatorState, now: float) -> list[Action]:
    out: list[Action] = []
    live = {n.name for n in st.training_workers()}
    for name, arrived in list(st.barriers.items()):
        if live.issubset(arrived):
            for ident, msg in arrived.values():
                out.append(Reply(ident, msg.reply({})))
            del st.barriers[name]
            if name == "init" and st.train_started is None:
                st.train_started = now
                st.checkpoints.last_at = now
    return out


def next_shard(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    st.shard_waiters.pop(node.name, None)  # a repeat of a parked request replaces it
    done = msg.meta.get("done")  # the shard the worker just finished (what SHARD_DONE says), first
    if done is not None and not st.ledger.done(node.name, done[0], done[1]):
        return [_not_assigned(ident, msg, node, done[0], done[1])]
    if done is not None:
        _count(node, msg.meta.get("progress"))
    out, meta = _shard_answer(st, now, node)
    if meta is None and st.stop_requested is not None:  # (see wake_shard_waiters)
        meta = _ask_again(st)
    if meta is not None:
        return [*out, Reply(ident, msg.reply(meta))]
    # Others still hold shards; one may come back if its worker dies, and otherwise the last one's
    # completion ends training. The request waits here for either (wake_shard_waiters), so the job
    # ends when its last shard does, not a polling interval later.
    st.shard_waiters[node.name] = (ident, msg, now)
    return out


def _shard_answer(st: CoordinatorState, now: float, node: Node) -> tuple[list[Action], dict[str, Any] | None]:
    """What NEXT_SHARD answers now (None: nothing yet, the worker waits), and the actions that go with it."""
    if st.phase != Phase.TRAINING or node.state != ALIVE:
        return [], {"shard": None}
    # A worker trains one shard at a time: one it holds is handed out again (its request was
    # repeated: the answer was lost, or the coordinator restarted in between).
    shard = st.ledger.held(node.name)
    if shard is None and st.ledger.has_next():
        shard = st.ledger.next(node.name)
    out: list[Action] = []
    if shard is None and st.ledger.assigned and st.cl.on_worker_failure == "recover":
        # Meanwhile this worker pushes nothing, so a sync round (or an ssp bound) must not wait for it.
        if not node.idle:
            node.idle = True
            out += tell_servers(st)
        return out, None
    if node.idle:
        node.idle = False
        out += tell_servers(st)
    if shard is not None and st.recovering:
        key = [shard["epoch"], shard["shard"]]
        for at, record in list(st.recovering):
            if any(r[:2] == key for r in record.requeued):
                record.recovered_after_s = round(now - at, 3)
                st.recovering.remove((at, record))
    return out, {"shard": shard}


def shard_wait_s(st: CoordinatorState) -> float:
    """How long a NEXT_SHARD waits parked at most: well inside the worker's attempt (it sends the
    request again after ``heartbeat_timeout_s`` without an answer)."""
    return min(1.0, 0.25 * st.cl.heartbeat_timeout_s)


def wake_shard_waiters(st: CoordinatorState, now: float) -> list[Action]:
    """Answer the parked NEXT_SHARD requests that can be answered now: a shard came back, the
    last one was done, the job stopped or failed, or one waited :func:`shard_wait_s` (it is told
    to ask again). During a graceful stop nothing stays parked: the worker's leave order comes
    with a heartbeat, and a parked request would hold it from seeing it."""
    out: list[Action] = []
    for name, (ident, msg, since) in list(st.shard_waiters.items()):
        node = st.nodes.get(name)
        if node is None or node.state == DEAD:
            del st.shard_waiters[name]
            out.append(Reply(ident, msg.error(Code.DECLARED_DEAD, f"{name} was declared dead; its work went to others")))
            continue
        actions, meta = _shard_answer(st, now, node)
        out += actions
        if meta is None and st.stop_requested is None and now - since < shard_wait_s(st):
            continue
        del st.shard_waiters[name]
        out.append(Reply(ident, msg.reply(meta if meta is not None else _ask_again(st))))
    return out


def _ask_again(st: CoordinatorState) -> dict[str, Any]:
    """The answer that sends a waiting worker back to ask again: at once after a long wait, after
    a moment during a graceful stop (time for its heartbeat to bring the leave order)."""
    return {"shard": None, "wait_s": 0.001 if st.stop_requested is None else min(0.2, st.cl.heartbeat_interval_s)}


def leave(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    """A worker leaves cleanly: its stats are kept and its shards go back to the queue."""
    if node.role != "worker" or node.state not in (ALIVE, DONE):
        return [Reply(ident, msg.error(Code.BAD_LEAVE, f"{node.name} is not a training worker"))]
    stats = msg.meta.get("stats")
    node.stats = stats if isinstance(stats, dict) else None
    if st.phase != Phase.TRAINING:
        node.state = FINISHED
        return [Reply(ident, msg.reply({}))]
    return [Reply(ident, msg.reply({})),
            *failures.worker_lost(st, now, node, "left", "left", 0.0, position=msg.meta.get("position"), left=True)]


def shard_done(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    epoch, shard = msg.meta.get("epoch"), msg.meta.get("shard")
    if not (isinstance(epoch, int) and isinstance(shard, int)) or not st.ledger.done(node.name, epoch, shard):
        return [_not_assigned(ident, msg, node, epoch, shard)]
    _count(node, msg.meta.get("progress"))
    return [Reply(ident, msg.reply({}))]


def _count(node: Node, progress: Any) -> None:
    """A finished shard's report carries the worker's steps, examples and pushes then: counted from
    now on (a heartbeat may be up to an interval older, and the completed shard is not trained again
    if the worker dies before its next one; its pushes move on with its steps)."""
    if isinstance(progress, dict):
        for k in ("steps", "examples", "pushes"):
            if type(progress.get(k)) is int and progress[k] > int(node.progress.get(k) or 0):
                node.progress = {**node.progress, k: progress[k]}


def _not_assigned(ident: bytes, msg: Message, node: Node, epoch: Any, shard: Any) -> Reply:
    """The refusal of a finished shard (SHARD_DONE, or NEXT_SHARD's ``done``) the worker did not hold."""
    return Reply(ident, msg.error(Code.BAD_SHARD, f"{node.name} was not assigned shard {shard} of epoch {epoch}"))


def worker_done(st: CoordinatorState, ident: bytes, msg: Message, now: float, node: Node) -> list[Action]:
    if st.phase == Phase.FAILED:  # (told "no shard" since the failure): the job does not go on to its evaluation
        return [Reply(ident, msg.error(Code.JOB_FAILED, st.error or "the job failed"))]
    if st.phase in (Phase.EVALUATING, Phase.STOPPING):  # a repeat whose answer was lost: the same answer
        return [Reply(ident, done_answer(st, msg, node.name == st.evaluator and st.phase == Phase.EVALUATING))]
    if node.state == DONE and node.name in st.done_waiting:  # a repeat: it waits on
        st.done_waiting[node.name] = (ident, msg)
        return []
    stats = msg.meta.get("stats")
    node.stats = dict(stats) if isinstance(stats, dict) else {}
    if msg.tensors:
        try:
            examples = node.stats.get("examples", 0)
            st.worker_buffers[node.name] = (float(examples) if isinstance(examples, (int, float)) else 0.0,
                                              bufs.unpack(msg.meta.get("buffers"), msg.tensors))
        except ProtocolError as err:
            log.warning("coordinator: %s sent unreadable buffers (%s); left out", node.name, err)
    node.state = DONE
    st.done_waiting[node.name] = (ident, msg)
    log.info("coordinator: %s finished training", node.name)
    out = tell_servers(st) + release_barriers(st, now)
    if not st.training_workers():
        out += end_training(st, now)
    return out


def end_training(st: CoordinatorState, now: float) -> list[Action]:
    st.train_ended = now
    st.phase = Phase.EVALUATING
    final = checkpoints.begin(st, now, final=True) if st.checkpoints.enabled and st.job.checkpoint.at_end else []
    done = sorted(st.done_waiting.items(), key=lambda kv: st.nodes[kv[0]].rank)
    out: list[Action] = []
    if done:
        merge_buffers(st, done[0][0])
    for i, (name, (ident, msg)) in enumerate(done):
        out.append(Reply(ident, done_answer(st, msg, i == 0)))
        if i == 0:
            st.evaluator = name
        else:
            st.nodes[name].state = FINISHED
    st.done_waiting = {}
    return out + final


def done_answer(st: CoordinatorState, msg: Message, evaluate: bool) -> Message:
    """WORKER_DONE's answer: whether to evaluate, and then with which buffers (as frames)."""
    if not (evaluate and st.final_buffers):
        return msg.reply({"evaluate": evaluate})
    names, tensors = bufs.pack(st.final_buffers)
    return msg.reply({"evaluate": True, "buffers": names}, tensors)


def merge_buffers(st: CoordinatorState, evaluator: str) -> None:
    """The model's buffers by their policies (models/buffers.py), from what the workers sent."""
    reports = list(st.worker_buffers.values())
    mine = st.worker_buffers.get(evaluator, (0.0, None))[1]
    st.final_buffers = bufs.merge(reports, mine, st.job.training) or None
