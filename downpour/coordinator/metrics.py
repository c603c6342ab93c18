"""The coordinator's Prometheus metrics, from its last status snapshot (never its live state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from downpour.monitor import Families

_STATES = ("alive", "done", "finished", "dead")
_PHASES = ("registering", "training", "evaluating", "stopping", "finished", "failed")


def coordinator_metrics(snapshot: Callable[[], dict[str, Any] | None]) -> Callable[[Families], None]:
    def fill(f: Families) -> None:
        s = snapshot()
        if s is None:
            return
        for phase in _PHASES:
            f.gauge("downpour_coordinator_phase", "1 for the job's current phase, 0 for the others.",
                    float(s["phase"] == phase), phase=phase)
        counts: dict[tuple[str, str], int] = {(r, st): 0 for r in ("server", "worker") for st in _STATES}
        for n in s["nodes"]:
            counts[(n["role"], n["state"])] = counts.get((n["role"], n["state"]), 0) + 1
            f.gauge("downpour_coordinator_heartbeat_age_seconds", "Seconds since each node's last heartbeat.",
                    n["heartbeat_age_s"], node_name=n["name"], node_role=n["role"])
        for (role, state), n in counts.items():
            f.gauge("downpour_coordinator_nodes", "Nodes by role and state.", n, node_role=role, state=state)
        shards = s["data_shards"]
        done = sum(shards["completed_per_epoch"].values())
        f.counter("downpour_coordinator_shards_completed_total", "Data shards trained to completion.", done)
        f.gauge("downpour_coordinator_shards_unfinished", "Data shards handed out or waiting, not yet completed.", shards["unfinished"])
        f.counter("downpour_coordinator_examples_total", "Training examples processed by all workers.", s["examples"])
        f.gauge("downpour_coordinator_examples_per_second", "The job's examples per second over the last sample interval.",
                s.get("recent_examples_per_s"))
        f.gauge("downpour_coordinator_loss", "Mean training loss of the live workers.", s["loss"])
        f.gauge("downpour_coordinator_staleness_mean", "Mean staleness of all pushes so far.", s["staleness"]["mean"])
        opt = s.get("optimizer") or {}
        f.gauge("downpour_coordinator_effective_lr", "Learning rate the servers apply now (schedule and scaling).", opt.get("lr"))
        f.gauge("downpour_coordinator_effective_momentum", "Explicit momentum the servers apply now.", opt.get("momentum"))
        by_kind: dict[str, int] = {}
        for failure in s["failures"]:
            by_kind[failure["kind"]] = by_kind.get(failure["kind"], 0) + 1
        for kind in ("dead", "error", "start_timeout"):
            f.counter("downpour_coordinator_failures_total", "Node failures seen, by kind.", by_kind.get(kind, 0), kind=kind)
        cp = s.get("checkpoints") or {}
        if cp.get("enabled"):
            f.counter("downpour_coordinator_checkpoints_total", "Checkpoints completed (manifest written).", cp.get("count", 0))
            f.counter("downpour_coordinator_checkpoints_abandoned_total", "Checkpoints abandoned (a server failed or timed out).",
                      cp.get("abandoned", 0))
            f.gauge("downpour_coordinator_checkpoint_seconds", "Mean time from a checkpoint's request to its manifest.",
                    cp.get("mean_write_s"))
            f.gauge("downpour_coordinator_checkpoint_last_step", "Job step of the latest complete checkpoint.", cp.get("last_step"))
        rep = s.get("replication")
        if rep:  # cluster.replicas: a rank short of backups (too few server processes left) shows here
            for rank, n in rep["planned"].items():
                f.gauge("downpour_coordinator_backups_planned", "Backups planned for each server rank.", n, rank=rank)
            for rank, n in rep["caught_up"].items():
                f.gauge("downpour_coordinator_backups_caught_up", "Backups each rank's primary last reported caught up.",
                        n, rank=rank)
            f.gauge("downpour_coordinator_ranks_short_of_backups", "Server ranks with fewer backups planned than "
                    "cluster.replicas.", len(rep["short"]))
        alerts: dict[str, int] = {"silent": 0, "stalled": 0, "slow": 0}
        for a in s["alerts"]:
            alerts[a["kind"]] = alerts.get(a["kind"], 0) + 1
        for kind, n in alerts.items():
            f.gauge("downpour_coordinator_alerts", "Nodes currently diagnosed silent, stalled or slow.", n, kind=kind)

    return fill
