"""What the coordinator reports: the job's status while it runs, and its summary at the end.

Plain functions of a :class:`CoordinatorState` (kept out of the state machine's file, which
holds the decisions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from downpour.coordinator.state import CoordinatorState

from downpour.config import STREAM_SPAN
from downpour.coordinator import replication
from downpour.coordinator.model import ALIVE, DEAD, DONE, FINISHED


def job_status(self: CoordinatorState, now: float) -> dict[str, Any]:
    """The job as it stands (STATUS: the launcher's progress, `downpour status`, the dashboard)."""
    workers = self.nodes_of("worker", (ALIVE, DONE, FINISHED, DEAD))
    examples = sum(int(n.progress.get("examples", 0)) for n in workers)
    losses = [float(n.progress["loss"]) for n in workers if n.state in (ALIVE, DONE) and "loss" in n.progress]
    elapsed = (self.train_ended or now) - self.train_started if self.train_started is not None else 0.0
    # (None: a stream, trained until stopped, unless training.steps ends it)
    planned = None if self.ledger.shard_size >= STREAM_SPAN else self.num_train * self.job.training.epochs
    if self.job.training.steps is not None:
        by_steps = self.job.training.steps * self.job.training.batch_size * self.cl.num_workers
        planned = by_steps if planned is None else min(planned, by_steps)
    servers = [n.progress for n in self.nodes_of("server", (ALIVE, DONE, FINISHED))]
    pushes = sum(int(p.get("pushes", 0)) for p in servers)
    return {
        "job": self.job.name,
        "phase": self.phase,
        "error": self.error,
        "coordinator": {"pid": self.pid, "restarts": self.restarts},
        "consistency": self.job.training.consistency,
        "num_servers": self.cl.num_servers,
        "num_workers": self.cl.num_workers,
        "elapsed_s": now - self.started,
        "train_s": elapsed,
        "examples": examples,
        "planned_examples": planned,
        "steps": sum(int(n.progress.get("steps", 0)) for n in workers),
        "examples_per_s": examples / elapsed if elapsed > 0 else 0.0,
        "loss": sum(losses) / len(losses) if losses else None,
        "staleness": {
            "pushes": pushes,
            "mean": sum(float(p.get("staleness_mean", 0.0)) * int(p.get("pushes", 0)) for p in servers) / pushes if pushes else 0.0,
            "max": max((int(p.get("staleness_max", 0)) for p in servers), default=0),
        },
        "optimizer": _effective(servers),
        "bytes": {"sent": sum(int(n.progress.get("bytes_sent", 0)) for n in workers),
                  "received": sum(int(n.progress.get("bytes_received", 0)) for n in workers)},
        "data_shards": self.ledger.summary(),
        "nodes": [
            {"name": n.name, "role": n.role, "rank": n.rank, "state": n.state, "host": n.host, "pid": n.pid, "address": n.address,
             "heartbeat_age_s": round(now - n.last_seen, 3), "metrics": n.metrics, "progress": n.progress,
             **({"restoring_s": round(now - n.restoring_since, 3)} if n.restoring_since is not None else {})}
            for n in sorted(self.nodes.values(), key=lambda n: (n.role, n.rank))
        ],
        "alerts": self.health.current(now),
        "failures": [f.to_dict() for f in self.failures],
        **({"replication": replication.summary(self)} if self.cl.replicas else {}),
        "checkpoints": self.checkpoints.summary(),
    }


def _stopped_early(self: CoordinatorState) -> bool:
    return self.stop_requested is not None and not self.ledger.complete()


def _stopped_at_once(self: CoordinatorState) -> bool:
    """Stopped as asked (SIGTERM, Ctrl-C, a preemption) but ended at once, with why under ``stopped``:
    before training began (nothing to continue from), or a server lost during the stop (``--resume``
    continues from the last committed checkpoint). Not a failure of the job."""
    return self.error is not None and bool(self.failures) and self.failures[-1].kind == "stopped"


def job_summary(self: CoordinatorState, now: float) -> dict[str, Any]:
    """What summary.json holds at the end of the job."""
    # A worker that died sent no final stats: its last heartbeat's progress stands in for them.
    workers = {n.name: n.stats or {**n.progress, "state": n.state} for n in self.nodes_of("worker", (ALIVE, DONE, FINISHED, DEAD))}
    servers = {n.name: n.stats or {} for n in self.nodes_of("server", (ALIVE, DONE, FINISHED, DEAD))}
    hist: dict[int, int] = {}
    for s in servers.values():
        for k, v in (s.get("staleness_histogram") or {}).items():
            hist[int(k)] = hist.get(int(k), 0) + int(v)
    examples = sum(int(w.get("examples", 0)) for w in workers.values())
    steps = sum(int(w.get("steps", 0)) for w in workers.values())
    train_s = (self.train_ended or now) - self.train_started if self.train_started is not None else 0.0
    ev = self.evaluation or {}
    at_start = _stopped_at_once(self)
    return {
        # stopped: a graceful stop ended training early (its final checkpoint resumes it)
        "status": ("stopped" if at_start else "failed") if self.error is not None
        else "stopped" if _stopped_early(self) else "ok",
        "error": None if at_start else self.error,
        **({"stopped": self.error} if at_start else {}),
        "failed_node": self.failed_node,
        "job": self.job.name,
        "test_accuracy": ev.get("test_accuracy"),
        "test_loss": ev.get("test_loss"),
        **({"test_loss_undefined": ev["test_loss_undefined"]} if ev.get("test_loss_undefined") else {}),
        # Binary (CTR) jobs: AUC and log loss, beside the best the data allow when it is known.
        **{k: ev[k] for k in ("test_auc", "test_auc_undefined", "test_logloss", "test_logloss_undefined", "optimum_auc",
                              "optimum_logloss") if k in ev},
        "test_metrics": ev.get("metrics") or {},  # training.metrics, by name
        **({"test_metric_errors": ev["metric_errors"]} if ev.get("metric_errors") else {}),  # the ones that failed
        "examples": examples,
        "steps": steps,
        "wall_s": now - self.started,
        "train_s": train_s,
        "examples_per_s": examples / train_s if train_s > 0 else 0.0,
        "num_servers": self.cl.num_servers,
        "num_workers": self.cl.num_workers,  # (what the job started with)
        # Worker processes that trained: more with an elastic job's joiners, and with replacements.
        "workers_trained": sum(1 for w in workers.values() if int(w.get("examples", 0)) > 0),
        "consistency": self.job.training.consistency,
        "staleness": _histogram_summary(hist),
        "optimizer": _optimizer_summary(self.job, servers.values()),
        "wire": _wire_summary(workers.values(), steps),
        "accuracy_curve": _curve(workers.values(), train_s, examples, ev),
        "data_shards": self.ledger.summary(),
        "failures": [f.to_dict() for f in self.failures],
        **({"replication": replication.summary(self)} if self.cl.replicas else {}),
        "checkpoints": self.checkpoints.summary(),
        "resumed_from": (self.resume or {}).get("name"),
        # Examples trained in this run and the runs before it (what the checkpoint this run resumed from holds).
        "job_examples": _before(self) + examples,
        "coordinator_refused": dict(self.rejected),
        "workers": workers,
        "servers": servers,
    }


def _effective(servers: list[dict[str, Any]]) -> dict[str, float]:
    """The effective lr and momentum now, as the first server that reported them uses them."""
    return next((dict(p["optimizer"]) for p in servers if isinstance(p.get("optimizer"), dict)), {})


def _optimizer_summary(job, servers) -> dict[str, Any]:
    """The job's stated (one-worker) hyperparameters, and what the servers made of them over time
    (server/scaling.py): the resolved scaling and the first server's trace of effective values
    ([job step, lr, explicit momentum, total momentum, recent mean staleness])."""
    opt = job.optimizer
    stated = {"name": opt.name, "lr": opt.lr, "momentum": getattr(opt, "momentum", None), "scaling": opt.scaling,
              "schedule": opt.schedule.model_dump(mode="json") if opt.schedule is not None else None}
    effective = next((s["optimizer"] for s in servers if isinstance(s.get("optimizer"), dict)), None)
    return {"stated": stated, "effective": effective}


def _histogram_summary(hist: dict[int, int]) -> dict[str, Any]:
    total = sum(hist.values())
    if not total:
        return {"pushes": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "histogram": {}}

    def pct(q: float) -> int:
        seen = 0
        for k in sorted(hist):
            seen += hist[k]
            if seen >= q * total:
                return k
        return max(hist)

    return {
        "pushes": total,
        "mean": sum(k * v for k, v in hist.items()) / total,
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": max(hist),
        "histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def _before(st) -> int:
    """The examples a resumed job had trained before this run: its checkpoint's ledger says (a stream's
    shards are partitions of offsets, not counts: there, the count the checkpoint carried)."""
    resume = st.resume or {}
    trained = resume.get("trained")
    if trained is None or st.job.data.name == "stream":
        trained = resume.get("examples", 0)
    return int(trained or 0)


def _curve(workers, train_s: float, examples: int, ev: dict[str, Any]) -> list[list[float]]:
    """Worker 0's accuracy curve (monitor.eval_every_shards), ending with the final evaluation."""
    curve = next((list(w["curve"]) for w in workers if w.get("curve")), [])
    if curve and ev.get("test_accuracy") is not None:
        curve.append([train_s, examples, ev["test_accuracy"]])
    return curve


def _wire_summary(workers, steps: int) -> dict[str, Any]:
    """Bytes every worker pushed and pulled, by part, in all, per push and per training step
    (all workers together; a push covers several steps with accumulate or local_steps)."""
    pushes = sum(int(w.get("pushes", 0)) for w in workers)
    out: dict[str, Any] = {"pushes": pushes}
    for direction in ("push", "pull"):
        parts: dict[str, int] = {"values": 0, "indices": 0, "scales": 0, "headers": 0}
        for w in workers:
            for part, n in ((w.get("wire") or {}).get(direction) or {}).items():
                if part in parts and isinstance(n, int):
                    parts[part] += n
        total = sum(parts.values())
        out[direction] = {**parts, "total": total, "per_push": total / pushes if pushes else 0.0,
                          "per_step": total / steps if steps else 0.0}
    return out
