"""Decisions about replicated server ranks (``cluster.replicas: k``): where each rank's k backups
live, which backup takes over when a primary dies, and when a rank has its backups again.

A server *process* is named ``HOST/PID`` (a process that took a rank over serves it as a second
server node with the same host and pid). :func:`replan` keeps, for every rank, k live processes
other than the one serving it, preferring other hosts, then the processes keeping the fewest
backups, then the next ones after it in rank order (so k = 1 on n processes is a ring); a backup
stays where it is while its process lives. Servers learn their part of the plan in their heartbeat
answers (:func:`assignment`: ``backups`` [{rank, address}] and ``replica_gen``); a process keeps a
backup thread for each (server/replica.py), which takes the primary's state, then its stream.

When a primary dies (:func:`primary_lost`), the backup furthest along (the highest sequence number
among those the primary itself reported caught up, so with ``replication: sync`` it holds every
push a worker was answered) is promoted: its process is told at once (``PROMOTE``) and again in its
heartbeat answers (``host_ranks``); the backup's server registers for the rank (marked
``promoted``: it loads no checkpoint), workers learn its address in their heartbeat answers and
send their unanswered pushes again, which it applies once. No replacement is loaded from a
checkpoint when such a backup exists. :func:`replan` then places new backups of the rank (and of
the ranks whose backups the dead process kept), which the promoted primary builds while it serves
(state transfer, then catch-up); :func:`heard` records when it has them all.

Every field used here is part of :class:`~downpour.coordinator.model.JobState` (``replica_plan``,
``replica_addresses``, ``replica_gen``, ``hosting``, ``server_slots``) or of the nodes' last
progress, so a restarted coordinator continues the same plan.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from downpour.coordinator.actions import Action, Reply
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED, FailureRecord, Node, Phase
from downpour.protocol import Message, Op

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


def process_of(node: Node) -> str:
    return f"{node.host}/{node.pid}"


def live_processes(st: CoordinatorState) -> dict[str, list[Node]]:
    """Live server processes, each with its server nodes (by rank)."""
    procs: dict[str, list[Node]] = {}
    for n in st.nodes_of("server"):
        procs.setdefault(process_of(n), []).append(n)
    return procs


def replan(st: CoordinatorState) -> bool:
    """Bring the plan up to date with the live processes and the primaries' addresses; returns
    whether it changed (then ``replica_gen`` is raised)."""
    k = st.cl.replicas
    if not k or st.phase == Phase.REGISTERING:
        return False
    procs = live_processes(st)
    order = sorted(procs, key=lambda p: min(n.rank for n in procs[p]))
    position = {p: i for i, p in enumerate(order)}
    primaries = {n.rank: n for n in st.nodes_of("server")}
    plan: dict[int, list[str]] = {}
    addresses: dict[int, str] = {}
    load: Counter[str] = Counter()
    for rank in sorted(set(st.server_slots) - set(primaries)):  # waiting for a promotion: its backups stay as they are
        if rank in st.replica_plan and rank in st.replica_addresses:
            plan[rank] = [p for p in st.replica_plan[rank] if p in procs]
            addresses[rank] = st.replica_addresses[rank]
            load.update(plan[rank])
    for rank, node in sorted(primaries.items()):
        home = process_of(node)
        plan[rank] = [p for p in st.replica_plan.get(rank, []) if p in procs and p != home][:k]
        addresses[rank] = str(node.address)
        load.update(plan[rank])
    for rank, node in sorted(primaries.items()):
        home = process_of(node)
        start = position.get(home, 0)
        while len(plan[rank]) < k:
            free = [p for p in order if p != home and p not in plan[rank]]
            if not free:
                break
            best = min(free, key=lambda p: (procs[p][0].host == node.host, load[p], (position[p] - start) % len(order)))
            plan[rank].append(best)
            load[best] += 1
    if plan == st.replica_plan and addresses == st.replica_addresses:
        return False
    st.replica_plan, st.replica_addresses = plan, addresses
    st.replica_gen += 1
    short = {r: len(p) for r, p in plan.items() if len(p) < k}
    log.info("coordinator: backups (gen %d): %s%s", st.replica_gen, {r: p for r, p in sorted(plan.items())},
             f"; fewer than {k} for ranks {sorted(short)} (too few server processes)" if short else "")
    return True


def assignment(st: CoordinatorState, node: Node) -> dict[str, Any]:
    """What a server's heartbeat answer says about backups: those its process keeps."""
    if not st.cl.replicas or not st.replica_gen:
        return {}
    me = process_of(node)
    keep = [{"rank": r, "address": st.replica_addresses[r]} for r, procs in sorted(st.replica_plan.items())
            if me in procs and r in st.replica_addresses]
    # The processes that keep this node's rank (backup_name of each of their servers): a primary drops any other
    # backup at once (one of a dead process would otherwise hold its answers until it times out).
    procs = live_processes(st)
    keepers = sorted(backup_name(n) for p in st.replica_plan.get(node.rank, []) for n in procs.get(p, []))
    return {"backups": keep, "replica_gen": st.replica_gen, "keepers": keepers}


def _backup_report(node: Node, rank: int) -> tuple[bool, int, str] | None:
    """``node``'s process's backup of ``rank`` as its last heartbeat reported it: (ready, seq, primary address)."""
    report = node.progress.get("backups")
    entry = report.get(str(rank)) if isinstance(report, dict) else None
    if (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is bool and type(entry[1]) is int
            and isinstance(entry[2], str)):
        return entry[0], entry[1], entry[2]
    return None


def backup_name(node: Node) -> str:
    """How the backups in ``node``'s process name themselves to primaries: the name of the server
    that started the process and its pid (a node name alone is reused by a rank's next server)."""
    return f"{node.name}/{node.pid}"


def caught_up(node: Node) -> list[str]:
    """The backups (:func:`backup_name`) that ``node``, a primary, reported caught up."""
    rep = node.progress.get("replication")
    names = rep.get("backups") if isinstance(rep, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def best_backup(st: CoordinatorState, dead: Node) -> tuple[Node, int] | None:
    """The live server node whose process holds the most advanced caught-up backup of ``dead``'s
    rank, and that backup's sequence number (None: no such backup)."""
    confirmed = set(caught_up(dead))
    best: tuple[Node, int] | None = None
    for proc, nodes in sorted(live_processes(st).items()):
        if proc == process_of(dead) or not confirmed.intersection(backup_name(n) for n in nodes):
            continue
        for n in nodes:
            rep = _backup_report(n, dead.rank)
            if rep is not None and rep[0] and rep[2] == dead.address and (best is None or rep[1] > best[1]):
                best = (n, rep[1])
    return best


def kept_by(st: CoordinatorState, node: Node) -> list[int]:
    """The ranks other than ``node``'s whose planned backups include ``node``'s process."""
    me = process_of(node)
    return sorted(r for r, procs in st.replica_plan.items() if me in procs and r != node.rank)


def summary(st: CoordinatorState) -> dict[str, Any]:
    """Backups per rank as planned now (STATUS, summary.json, /metrics): ``planned`` per rank,
    ``caught_up`` as the rank's primary (live, or finished at the job's end) last reported, and
    ``short``: the ranks planned with fewer than ``cluster.replicas`` (too few live server
    processes left; `downpour train` starts no new server process when replicas are set)."""
    primaries = {n.rank: n for n in st.nodes_of("server", (ALIVE, FINISHED))}  # (finished: in the job's summary)
    planned = {r: len(st.replica_plan.get(r, [])) for r in range(st.cl.num_servers)}
    return {"replicas": st.cl.replicas, "planned": {str(r): n for r, n in planned.items()},
            "caught_up": {str(r): len(caught_up(n)) for r, n in sorted(primaries.items())},
            "short": [r for r, n in planned.items() if n < st.cl.replicas] if st.replica_gen else []}


def primary_lost(st: CoordinatorState, now: float, node: Node, reason: str, kind: str,
                 detected_after_s: float, affected: dict[str, list[str]]) -> list[Action] | None:
    """A primary died while training: promote its most advanced caught-up backup (None: there is
    none; the rank then waits for a replacement loaded from a checkpoint, as without replicas)."""
    found = best_backup(st, node)
    if found is None:
        log.warning("coordinator: %s lost and no caught-up backup of rank %d is known", node.name, node.rank)
        return None
    host, seq = found
    node.state = DEAD
    record = FailureRecord(node.name, kind, round(now - st.started, 3), reason, scope="server",
                           detected_after_s=round(detected_after_s, 3), affected=affected,
                           version_at_failure=node.progress.get("version"),
                           # sync: nothing answered is missing; async: up to replication_max_lag (unknown)
                           rolled_back_versions=0 if st.cl.replication == "sync" else None, promoted_to=host.name,
                           backups_lost=kept_by(st, node))
    st.failures.append(record)
    st.server_slots[node.rank] = (now, record)
    st.hosting[node.rank] = host.name
    replan(st)
    short = summary(st)["short"]
    if short:
        log.warning("coordinator: ranks %s now have fewer than %d backups (too few server processes left)", short, st.cl.replicas)
    log.warning("coordinator: %s lost (%s); promoting its backup in %s's process (seq %d); training goes on",
                node.name, reason, host.name, seq)
    return [Reply(host.identity, Message(Op.PROMOTE, meta={"ranks": promotions(st, host)}))]


def promotions(st: CoordinatorState, node: Node) -> list[int]:
    """The ranks ``node``'s process is to promote its backups of (or take over from a checkpoint)."""
    return sorted(r for r, who in st.hosting.items() if who == node.name and r in st.server_slots)


def tell_workers(st: CoordinatorState) -> list[Action]:
    """Where the servers are now, sent unprompted to each worker's heartbeat connection."""
    meta = {"servers": st.server_addresses(), "servers_gen": st.servers_gen}
    return [Reply(w.identity + b".hb", Message(Op.PROMOTE, meta=meta)) for w in st.nodes_of("worker", (ALIVE, DONE))]


def promoted(st: CoordinatorState, now: float, rank: int, record: FailureRecord) -> None:
    """The promoted backup of ``rank`` registered as its primary."""
    at, _ = st.server_slots.get(rank, (now, record))
    record.promoted_after_s = round(now - at, 3)
    replan(st)


def heard(st: CoordinatorState, now: float, node: Node) -> None:
    """A live server's heartbeat: complete the latest failover record of its rank (its first
    request served, its backups rebuilt)."""
    if not st.cl.replicas:
        return
    record = next((r for r in reversed(st.failures) if r.promoted_to is not None and r.node == node.name), None)
    if record is None or record.promoted_after_s is None or node.rank in st.server_slots:
        return
    rep = node.progress.get("replication")
    rep = rep if isinstance(rep, dict) else {}
    first = rep.get("first_request_s")
    if record.failover_s is None and isinstance(first, (int, float)) and not isinstance(first, bool):
        record.failover_s = round(record.promoted_after_s + float(first), 3)
    want = len(st.replica_plan.get(node.rank, []))
    if record.rereplicated_after_s is None and want and len(caught_up(node)) >= want:
        record.rereplicated_after_s = round(now - st.started - record.at_s - record.promoted_after_s, 3)
