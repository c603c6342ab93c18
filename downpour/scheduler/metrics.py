"""The scheduler on ``/metrics``: queue length, waits and each queue's and user's share, computed
from the jobs when scraped (nothing is counted twice or goes stale)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from downpour.scheduler.model import Phase
from downpour.scheduler.resources import RESOURCE_NAMES


class SchedulerCollector:
    def __init__(self, scheduler) -> None:
        self.s = scheduler

    def collect(self):
        s = self.s
        with s.lock:
            jobs = list(s.jobs.values())
            now = s.clock()
        phases = GaugeMetricFamily("downpour_scheduler_jobs", "Jobs by phase", labels=["phase"])
        for p in Phase:
            phases.add_metric([p.value], sum(1 for j in jobs if j.phase is p))
        queued = [j for j in jobs if j.phase is Phase.QUEUED]
        length = GaugeMetricFamily("downpour_scheduler_queue_length", "Queued jobs per queue and user", labels=["queue", "user"])
        wait = GaugeMetricFamily("downpour_scheduler_wait_seconds", "Longest current wait of a queued job (since it was "
                                 "submitted or last stopped), per queue and user", labels=["queue", "user"])
        groups: dict[tuple[str, str], list] = {}
        for j in queued:
            groups.setdefault((j.queue, j.user), []).append(j)
        for (q, u), js in sorted(groups.items()):
            length.add_metric([q, u], len(js))
            wait.add_metric([q, u], max(now - j.extra.get("queued_since_s", j.submitted_s) for j in js))
        started = [j for j in jobs if j.first_started_s is not None]
        first_wait = GaugeMetricFamily("downpour_scheduler_first_wait_seconds_mean",
                                       "Mean wait from submission to first start, per queue and user", labels=["queue", "user"])
        per: dict[tuple[str, str], list[float]] = {}
        for j in started:
            per.setdefault((j.queue, j.user), []).append(j.first_started_s - j.submitted_s)
        for (q, u), ws in sorted(per.items()):
            first_wait.add_metric([q, u], sum(ws) / len(ws))
        share = GaugeMetricFamily("downpour_scheduler_dominant_share", "Dominant share of the cluster held, per queue "
                                  "(user label empty) and per user", labels=["queue", "user"])
        held: dict[tuple[str, str], object] = {}
        for j in jobs:
            if j.phase.holds_resources:
                for key in ((j.queue, ""), (j.queue, j.user)):
                    held[key] = held[key] + j.demand if key in held else j.demand
        for (q, u), r in sorted(held.items()):
            share.add_metric([q, u], r.dominant_share(s.capacity))
        cap = GaugeMetricFamily("downpour_scheduler_capacity", "The cluster's resources", labels=["resource"])
        free = GaugeMetricFamily("downpour_scheduler_free", "Resources no job holds", labels=["resource"])
        free_total = s.capacity
        for j in jobs:
            if j.phase.holds_resources:
                free_total = free_total - j.demand
        for n in RESOURCE_NAMES:
            cap.add_metric([n], getattr(s.capacity, n))
            free.add_metric([n], getattr(free_total, n))
        pre = CounterMetricFamily("downpour_scheduler_preemptions", "Preemptions of jobs")
        pre.add_metric([], sum(j.preemptions for j in jobs))
        res = CounterMetricFamily("downpour_scheduler_restarts", "Restarts of failed jobs")
        res.add_metric([], sum(j.restarts for j in jobs))
        yield from (phases, length, wait, first_wait, share, cap, free, pre, res)
