"""Decisions about server ranks whose server was lost: what a replacement loads, who replaces it,
and which survivor takes a rank over when no replacement comes (``cluster.server_replace_timeout_s``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from downpour.coordinator import membership, replication
from downpour.coordinator.actions import Action, Reply
from downpour.coordinator.model import ALIVE, Node
from downpour.protocol import Message
from downpour.protocol.ops import Code

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


def restore_point(st: CoordinatorState) -> dict[str, Any] | None:
    """What a replacement server loads: the latest committed checkpoint (or the one this job
    resumed from, if none was committed since)."""
    if st.checkpoints.committed:
        return {"url": st.checkpoints.url, "name": st.checkpoints.committed[-1]["name"],
                "layout": st.layout.to_dict(), "full": True}
    return st.restore if (st.restore or {}).get("full") else None


def open_slots(st: CoordinatorState, msg: Message) -> list[int]:
    """The ranks waiting for a server that the one registering with ``msg`` may take: not one a
    replacement registered for already, nor one whose backup is being promoted (unless it is that
    backup's process: ``hosted_by`` the server told to promote it)."""
    out = []
    for rank, (_, record) in sorted(st.server_slots.items()):
        node = st.nodes.get(f"server-{rank}")
        if node is not None and node.state == ALIVE:
            continue
        if record.promoted_to is not None and msg.meta.get("hosted_by") != st.hosting.get(rank, record.promoted_to):
            continue
        out.append(rank)
    return out


def replace_server(st: CoordinatorState, ident: bytes, msg: Message, now: float) -> list[Action]:
    """A server registering while a server's rank waits for a replacement takes that rank and
    loads the latest checkpoint; workers learn its address from their heartbeats."""
    hint, address = msg.meta.get("rank"), msg.meta.get("address")
    if not (isinstance(address, str) and address):
        return st.refuse(ident, msg, Code.BAD_ADDRESS, "a server must give the address it listens on")
    if problem := membership.address_problem(st, address):
        return st.refuse(ident, msg, Code.BAD_ADDRESS, problem)
    slots = open_slots(st, msg)
    rank = hint if type(hint) is int and hint in slots else min(slots)
    _, record = st.server_slots[rank]
    st.hosting.pop(rank, None)
    host_of = msg.meta.get("hosted_by")
    if isinstance(host_of, str) and host_of in st.nodes:  # a survivor took the rank over
        record.resharded_onto = host_of
    name = f"server-{rank}"
    old = st.nodes.get(name)
    if old is not None:
        st.by_identity.pop(old.identity, None)
    host, pid = str(msg.meta.get("host", "?")), msg.meta.get("pid")
    st.nodes[name] = Node(name, "server", rank, ident, address, host, pid if isinstance(pid, int) else 0, last_seen=now)
    st.by_identity[ident] = name
    st.servers_gen += 1
    record.replaced_by = f"{name} (pid {pid})"
    promoted = msg.meta.get("promoted") is True and record.promoted_to is not None
    if promoted:
        replication.promoted(st, now, rank, record)
        log.info("coordinator: %s's backup promoted (pid %s); it serves the rank's state as its primary had it", name, pid)
    else:
        if record.promoted_to is not None:  # the backup was not caught up after all: a checkpoint it is
            log.warning("coordinator: %s's backup in %s could not be promoted; it loads checkpoint %s instead",
                        name, record.promoted_to, (restore_point(st) or {}).get("name"))
            record.promoted_to, record.rolled_back_versions = None, None
            record.restored_from = (restore_point(st) or {}).get("name")
        replication.replan(st)
        log.info("coordinator: %s replaced (pid %s); it loads checkpoint %s", name, pid, (restore_point(st) or {}).get("name"))
    base = membership.admitted(st, name, rank)
    answer = Reply(ident, msg.reply({**base, "restore": restore_point(st)}))
    out = [answer, *membership.tell_servers(st), *membership.admit_joiners(st, now)]
    if promoted:  # workers learn at once where the rank is served now (their heartbeat answers repeat it)
        out += replication.tell_workers(st)
    return out


def move_lost_ranks(st: CoordinatorState, now: float) -> None:
    """Ranks without a replacement for ``cluster.server_replace_timeout_s`` go to the surviving
    server process that holds the fewest bytes (it loads them from the latest checkpoint)."""
    for rank, (at, record) in sorted(st.server_slots.items()):
        host = st.nodes.get(st.hosting.get(rank, ""))
        if host is not None and host.state == ALIVE:
            continue  # asked already; it is loading them (or promoting its backup of the rank)
        served = st.nodes.get(f"server-{rank}")
        if served is not None and served.state == ALIVE:
            continue  # its replacement registered; it serves once its keys are loaded
        if now - at < st.cl.server_replace_timeout_s:
            continue
        load: dict[tuple[str, int], int] = {}  # bytes per surviving process (one may serve several ranks)
        first: dict[tuple[str, int], Node] = {}
        for n in st.nodes_of("server"):
            if n.rank not in st.server_slots:
                proc = (n.host, n.pid)
                load[proc] = load.get(proc, 0) + st.layout.server_numel(n.rank)
                first.setdefault(proc, n)
        if not load:
            return
        proc = min(load, key=lambda p: (load[p], first[p].rank))
        st.hosting[rank] = first[proc].name
        log.warning("coordinator: no replacement for server-%d after %.0fs; %s takes over its keys from checkpoint %s",
                    rank, now - at, first[proc].name, record.restored_from)


def stranded(st: CoordinatorState, now: float) -> str | None:
    """Why the job cannot go on when a rank has waited for a server longer than
    ``cluster.server_replace_timeout_s`` plus ``cluster.startup_timeout_s`` while no server process
    is alive to take it over and no replacement registered (every server process gone, none
    started, or none able to start); else None."""
    if st.nodes_of("server", (ALIVE,)):
        return None
    limit = st.cl.server_replace_timeout_s + st.cl.startup_timeout_s
    late = sorted(rank for rank, (at, _) in st.server_slots.items() if now - at > limit)
    if not late:
        return None
    point = (restore_point(st) or {}).get("name")
    return (f"no server process is left and no replacement registered within {limit:g}s (cluster.server_replace_timeout_s + "
            f"cluster.startup_timeout_s) for rank(s) {late}" + (f"; --resume continues from checkpoint {point}" if point else ""))


def unserved_in_stop(st: CoordinatorState, now: float) -> int | None:
    """During a graceful stop: a rank lost before the stop whose replacement has not come within
    ``cluster.server_replace_timeout_s`` of the stop (the stopping launcher starts none; one started
    before may still register). None: every rank is served, or may still be."""
    since = st.stop_requested if st.stop_requested is not None else now
    for rank, (at, _) in sorted(st.server_slots.items()):
        served = st.nodes.get(f"server-{rank}")
        host = st.nodes.get(st.hosting.get(rank, ""))
        if (served is not None and served.state == ALIVE) or (host is not None and host.state == ALIVE):
            continue
        if now - max(at, since) > st.cl.server_replace_timeout_s:
            return rank
    return None
