"""Decisions about checkpoints and the graceful stop: when to ask the servers for a checkpoint, what
a complete one commits (the job's state: ledger, step, examples), and the steps of a stop that
keeps every trained example (workers leave, a final checkpoint, the model saved, servers stop).
When checkpoints are due and whether one is complete is :class:`~downpour.coordinator.checkpointing.CheckpointPlan`'s.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from downpour.coordinator import failures
from downpour.coordinator.actions import Action, CommitCheckpoint, Reply, SaveModel
from downpour.coordinator.checkpointing import clock_margin, probe_margin, sync_margin, widening
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED, Node, Phase
from downpour.models import buffers as bufs
from downpour.protocol import Message, Op

if TYPE_CHECKING:
    from downpour.config import JobConfig
    from downpour.coordinator.checkpointing import Pending
    from downpour.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


def job_steps(st: CoordinatorState) -> int:
    """Optimizer steps of all workers: a finished worker's exact count, else its last heartbeat's."""
    workers = st.nodes_of("worker", (ALIVE, DONE, FINISHED, DEAD))
    return st.step_offset + sum(int((n.stats or n.progress).get("steps", 0)) for n in workers)


def ssp(job: JobConfig) -> bool:
    """Whether any of the job's keys trains under ssp (its workers wait for the slowest)."""
    t = job.training
    return "ssp" in {t.consistency, *(g.consistency for g in t.consistency_groups)}


def cut_clocks(st: CoordinatorState, retries: int, at_start: bool = False, seen: dict[str, int] | None = None,
               round_trip_s: float = 0.0) -> dict[str, int]:
    """An async or ssp checkpoint's cut: per training worker, the number of its last push the copy
    holds (its ``meta.clock``), far enough ahead of where it stands that every server hears of the
    checkpoint first, placed at its own push rate so that the workers reach it about together.
    Where it stands: ``seen``, the highest push number any server reported to the probe (answered
    within ``round_trip_s``: :func:`~downpour.coordinator.checkpointing.probe_margin` ahead), else
    the push count its last heartbeat carried (up to a heartbeat old:
    :func:`~downpour.coordinator.checkpointing.clock_margin` ahead). The step-0 checkpoint
    (``at_start``) is cut where the workers stand (no push yet) when nothing was refused; a server
    already past a worker's number reports ``missed``, and the cut moves further ahead, twice as
    far each time (up to :func:`~downpour.coordinator.checkpointing.widening`). Workers without
    a push count yet are left out: a server holds all their pushes
    until it copies (none of them are in the checkpoint). Not under ssp, where the others would
    wait for such a worker: it is cut as standing at 0."""
    at: dict[str, int] = {}  # where each worker stands
    margins: dict[str, int] = {}
    bounded = ssp(st.job)
    for n in st.training_workers():
        pushes, examples = n.progress.get("pushes"), n.progress.get("examples")
        if type(pushes) is not int:
            if not bounded:
                continue
            pushes, examples = 0, None
        rate = float(n.progress.get("examples_per_s") or 0.0) * pushes / examples if examples else 0.0
        rate = rate or st.version_rate
        if seen is not None:
            at[n.name] = max(pushes, seen.get(n.name, 0))
            margins[n.name] = probe_margin(rate, round_trip_s) * widening(retries)
            continue
        at[n.name] = pushes
        margins[n.name] = 0 if at_start and retries == 0 else clock_margin(rate, st.cl.heartbeat_interval_s) * widening(retries)
    if bounded and at:
        # A worker more than the bound ahead waits for the slowest (its answers are held); were the
        # slowest's next push held for the cut meanwhile, neither would reach it. One margin for all
        # (the widest) above where each stands keeps the cuts as far apart as the workers are, which
        # ssp keeps within the bound of each other. (Not "within the bound of the lowest number":
        # push numbers are each worker's own count, and the servers count one that joined later,
        # a replacement, from the slowest's clock; its number is thousands below the others'.)
        widest = max(margins.values())
        return {w: p + widest for w, p in at.items()}
    return {w: p + margins[w] for w, p in at.items()}


def begin(st: CoordinatorState, now: float, final: bool = False, retries: int = 0, passed: int = 0) -> list[Action]:
    """Ask the servers for a checkpoint. Async and ssp (not the step-0 one, nor a final one): first
    a probe, each server answering with the highest push number it has seen of each worker, so
    that the cut goes just past where the workers stand (:func:`probed` sends the CHECKPOINT).
    Sync: a version ahead of the highest any server reported, by heartbeat or (``passed``) when it
    said it was already past the version asked for."""
    at_version, at_clock = None, None
    probe = not st.checkpoints.sync and not final and not st.checkpoints.start_due
    if st.checkpoints.sync and not final:
        known = max((int(n.progress.get("version", 0)) for n in st.nodes_of("server")), default=0)
        at_version = max(known, passed) + sync_margin(st.version_rate, st.cl.heartbeat_interval_s) * widening(retries)
    elif not final and not probe:  # async and ssp: every server copies with the same pushes applied (server/snapshot.py)
        at_clock = cut_clocks(st, retries, at_start=st.checkpoints.start_due)
    p = st.checkpoints.begin(now, job_steps(st), at_version, final)
    p.retries, p.passed = retries, passed
    if probe:
        servers = st.nodes_of("server")
        p.probes, p.probed = {}, {n.name for n in servers}
        return [Reply(n.identity, Message(Op.CHECKPOINT, meta={"name": p.name, "probe": True})) for n in servers]
    return _ask(st, p, at_version, at_clock)


def probed(st: CoordinatorState, node: Node, data: dict[str, Any], now: float) -> list[Action]:
    """A server's answer to the probe of the pending checkpoint; with every server's in, the cut is
    placed past the highest push number any of them has seen of each worker."""
    p = st.checkpoints.pending
    if p is None or p.probes is None or data.get("name") != p.name or node.name not in p.probed:
        return []
    clocks = data.get("clocks")
    p.probes[node.name] = {str(w): c for w, c in clocks.items() if type(c) is int} if isinstance(clocks, dict) else {}
    if set(p.probes) < p.probed:
        return []
    seen: dict[str, int] = {}
    for answer in p.probes.values():
        for w, c in answer.items():
            seen[w] = max(seen.get(w, 0), c)
    p.probes = None
    log.info("coordinator: checkpoint %s: the servers have seen pushes %s (probe answered in %.3fs)", p.name, seen, now - p.asked)
    return _ask(st, p, None, cut_clocks(st, p.retries, seen=seen, round_trip_s=now - p.asked))


def _ask(st: CoordinatorState, p: Pending, at_version: int | None, at_clock: dict[str, int] | None) -> list[Action]:
    log.info("coordinator: checkpoint %s at step %d%s", p.name, p.step,
             f" (servers copy at version {at_version})" if at_version is not None
             else f" (servers copy after pushes {at_clock})" if at_clock else "")
    committed = st.checkpoints.committed
    # Servers with sparse tables write only the rows changed since the last checkpoint when
    # that one was committed (else a full base): they are told which one was.
    msg = Message(Op.CHECKPOINT, meta={"name": p.name, "url": st.checkpoints.url, "keep": st.job.checkpoint.keep,
                                       "at_version": at_version, "at_clock": at_clock, "timeout_s": st.job.checkpoint.timeout_s,
                                       "committed": committed[-1]["name"] if committed else None,
                                       "full_every": st.job.checkpoint.sparse_full_every})
    return [Reply(n.identity, msg) for n in st.nodes_of("server")]


def server_report(st: CoordinatorState, node: Node, data: dict[str, Any], now: float) -> list[Action]:
    if data.get("probe"):
        return probed(st, node, data, now)
    verdict = st.checkpoints.on_report(node.name, data)
    p = st.checkpoints.pending
    if verdict == "missed" and p is not None:
        if p.retries >= 5:
            st.checkpoints.abandon(now, f"{node.name} kept passing the version asked for")
            return []
        if p.at_version is not None:
            version = data.get("version")
            p.passed = max(p.passed, version if type(version) is int else 0)
            log.info("coordinator: %s passed version %s (at %s) before hearing of checkpoint %s; asking again",
                     node.name, p.at_version, version, p.name)
        else:  # (an async cut: a worker's push past it was applied there already)
            log.info("coordinator: %s applied pushes past checkpoint %s's cut before hearing of it; asking again",
                     node.name, p.name)
        return begin(st, now, retries=p.retries + 1, passed=p.passed)
    if verdict == "failed":
        st.checkpoints.abandon(now, f"{node.name}: {data.get('error')}")
    if verdict != "complete" or p is None:
        return []
    positions: dict[str, list[list[int]]] = {}
    for rep in p.reports.values():
        for worker, pos in (rep.get("positions") or {}).items():
            if isinstance(pos, list) and len(pos) == 3 and all(isinstance(x, int) for x in pos):
                positions.setdefault(worker, []).append(pos)
    state = {
        "ledger": st.ledger.state_at({w: st.ledger.earliest(w, ps) for w, ps in positions.items()}, final=p.final),
        "step": p.step,
        "version": max(int(r.get("version", 0)) for r in p.reports.values()),
        # A worker that left or finished: its exact count (a graceful stop's final checkpoint); else its
        # last heartbeat's (a stream job's count after --resume starts from this: data.name stream)
        "examples": int((st.resume or {}).get("examples", 0))
        + sum(int((n.stats or n.progress).get("examples", 0)) for n in st.nodes_of("worker", (ALIVE, DONE, FINISHED, DEAD))),
        "resumed_from": (st.resume or {}).get("name"),
        **({"buffers": bufs.to_json(st.final_buffers)} if st.final_buffers else {}),
    }
    p.versions = {str(st.nodes[n].rank): int(r.get("version", 0)) for n, r in p.reports.items() if n in st.nodes}
    files = {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in p.reports.values()}
    for r in p.reports.values():  # a server's sparse tables: their own file
        extra = r.get("sparse")
        if isinstance(extra, dict):
            files[str(extra["file"])] = {"sha256": str(extra["sha256"]), "bytes": int(extra["bytes"])}
    needs = sorted({str(n) for r in p.reports.values() for n in (r.get("needs") or []) if n != p.name})
    return [CommitCheckpoint(p.name, p.step, files, state, p.final, needs)]


def committed(st: CoordinatorState, now: float, ok: bool, why: str = "") -> None:
    """The service wrote (or failed to write) the job state and manifest of the pending checkpoint."""
    if ok:
        st.checkpoints.committed_now(now, now - st.checkpoints.pending.asked)
    else:
        st.checkpoints.abandon(now, why)


def request_stop(st: CoordinatorState, now: float) -> list[Action]:
    """Stop the job without losing work (the coordinator got SIGTERM; ``downpour train`` sends it
    on the first Ctrl-C or SIGTERM). Training workers are told to leave after their current step
    (in heartbeat answers): each settles its last push and LEAVEs with its exact data position,
    so its shard goes back to the queue. Once none trains, a final checkpoint is committed, the
    trained parameters are saved, the servers stop, and the summary says ``status: stopped``.
    ``--resume`` then continues from that checkpoint and trains every example once. A job still
    registering ends at once (nothing to keep: its summary says ``stopped``, with why under
    ``stopped``); one already evaluating simply finishes."""
    if st.stop_requested is not None or st.phase not in (Phase.REGISTERING, Phase.TRAINING):
        return []
    st.stop_requested = now
    if st.checkpoints.sync:  # every worker leaves after the same round, placed as a sync checkpoint is
        known = max((int(n.progress.get("version", 0)) for n in st.nodes_of("server")), default=0)
        st.leave_at = known + sync_margin(st.version_rate, st.cl.heartbeat_interval_s)
    log.warning("coordinator: graceful stop requested: workers leave after %s, then a final checkpoint",
                "their current step" if st.leave_at is None else f"round {st.leave_at}")
    if st.phase == Phase.REGISTERING:
        return failures.fail(st, now, "coordinator", "stopped (SIGTERM) before training began", "stopped")
    return []


def stop_step(st: CoordinatorState, now: float) -> list[Action]:
    """The next step of a graceful stop, once no worker trains any more."""
    if st.training_workers():
        return []
    p = st.checkpoints.pending
    if st.checkpoints.enabled and not st.final_asked:
        st.final_asked = True
        st.train_ended = now
        if p is not None:  # a periodic one (sync: at a version no push will reach now): the final one replaces it
            st.checkpoints.abandon(now, "superseded by the final checkpoint of a graceful stop")
        return begin(st, now, final=True)
    if p is not None:
        return []  # the final checkpoint is being written
    st.train_ended = st.train_ended or now
    st.phase = Phase.STOPPING  # servers hear "stop" in their next heartbeat answer, after the model is saved
    log.info("coordinator: graceful stop: %s; stopping servers",
             f"checkpoint {st.checkpoints.committed[-1]['name']} committed" if st.checkpoints.committed else "no checkpoint")
    return [SaveModel(st.server_addresses())]
