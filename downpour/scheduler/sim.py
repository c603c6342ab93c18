"""A trace-driven simulator: the scheduler's own policy code on a simulated clock.

:func:`simulate` replays a trace (:class:`TraceJob`: when a job is submitted, how long it runs
alone, its gang) through :func:`decide` and performs the actions as the service would, with two
costs of preemption: a preempted job holds its resources ``stop_s`` more while it writes its final
checkpoint, and every resume costs ``resume_s`` of extra running (start-up, loading the checkpoint).
Progress is kept across a preemption (the job stops at a checkpoint), as ``--resume`` does.

:func:`synthetic_trace` draws a heavy-tailed workload shaped after published cluster traces:
Microsoft's Philly (Jeon et al., "Analysis of Large-Scale Multi-Tenant GPU Clusters for DNN
Training Workloads", USENIX ATC 2019) and the trace Tiresias was evaluated on (Gu et al., NSDI
2019): most jobs are small (one or two tasks) and short, a few are wide, and run times are
heavy-tailed over orders of magnitude (log-normal body, Pareto tail). The parameters are ours, chosen
for that shape, not fitted to either trace; they are arguments, so other shapes are one call away.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from downpour.scheduler.decide import Preempt, Start, decide
from downpour.scheduler.model import Job, Phase
from downpour.scheduler.policies import LeastAttainedService, Policy
from downpour.scheduler.resources import Resources


@dataclass(frozen=True)
class TraceJob:
    id: int
    submit_s: float
    duration_s: float          # running time alone, with the whole gang
    tasks: tuple[Resources, ...]
    user: str = "u0"
    queue: str = "default"
    priority: int = 0


def synthetic_trace(n_jobs: int = 400, seed: int = 0, load: float = 1.2, cluster_cpus: int = 64,
                    widths: tuple[tuple[int, float], ...] = ((1, 0.55), (2, 0.2), (4, 0.15), (8, 0.07), (16, 0.03)),
                    median_s: float = 600.0, sigma: float = 1.6, tail_fraction: float = 0.05, tail_alpha: float = 1.2,
                    max_s: float = 86400.0,
                    users: int = 8, queues: int = 2) -> list[TraceJob]:
    """``n_jobs`` jobs arriving as a Poisson process whose offered load (task-seconds asked per
    second, over ``cluster_cpus``) is ``load``. Widths (tasks per job) from ``widths``; durations
    log-normal (median ``median_s``, shape ``sigma``) with a ``tail_fraction`` of Pareto(``tail_alpha``)
    jobs scaled by the 99th percentile of the body, cut at ``max_s``; users Zipf-ish (user 0 submits most)."""
    rng = random.Random(seed)
    sizes, probs = zip(*widths)
    user_w = [1.0 / (k + 1) for k in range(users)]
    drawn = []
    for _ in range(n_jobs):
        width = rng.choices(sizes, probs)[0]
        if rng.random() < tail_fraction:
            duration = median_s * math.exp(2.33 * sigma) * rng.paretovariate(tail_alpha)
        else:
            duration = rng.lognormvariate(math.log(median_s), sigma)
        drawn.append((width, min(max_s, max(1.0, duration))))
    # Arrival rate from the drawn work itself, so that the offered load is ``load`` whatever the tail gave.
    work = sum(w * d for w, d in drawn)
    rate = n_jobs * load * cluster_cpus / work
    jobs, t = [], 0.0
    for i, (width, duration) in enumerate(drawn):
        t += rng.expovariate(rate)
        u = rng.choices(range(users), user_w)[0]
        jobs.append(TraceJob(i, t, duration, tuple(Resources(cpus=1, memory_mb=1024) for _ in range(width)),
                             user=f"u{u}", queue=f"q{u % queues}", priority=rng.choice((0, 0, 0, 1, 2))))
    return jobs


@dataclass
class SimResult:
    policy: str
    jobs: list[Job]
    durations: dict[int, float]
    capacity: Resources
    busy_cpu_s: float = 0.0
    rounds: int = 0
    starts: list[int] = field(default_factory=list)   # job ids in the order they first started

    def jct(self) -> list[float]:
        return [j.finished_s - j.submitted_s for j in self.jobs]

    def report(self) -> dict[str, float]:
        jct = sorted(self.jct())
        first = min(j.submitted_s for j in self.jobs)
        makespan = max(j.finished_s for j in self.jobs) - first
        return {"jobs": len(jct), "mean_jct_s": sum(jct) / len(jct), "p95_jct_s": quantile(jct, 0.95),
                "makespan_s": makespan, "utilization": self.busy_cpu_s / (self.capacity.cpus * makespan),
                "jain_fairness": jain(self.user_progress().values()),
                "preemptions": sum(j.preemptions for j in self.jobs)}

    def user_progress(self) -> dict[str, float]:
        """Per user: the mean over its jobs of (run time alone / JCT), 1 = never waited."""
        per: dict[str, list[float]] = {}
        for j in self.jobs:
            per.setdefault(j.user, []).append(self.durations[j.id] / (j.finished_s - j.submitted_s))
        return {u: sum(v) / len(v) for u, v in per.items()}


def jain(values) -> float:
    """Jain's fairness index (Σx)² / (n·Σx²): 1 when all are equal, 1/n when one has everything."""
    xs = list(values)
    sq = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * sq) if sq > 0 else 1.0


def quantile(sorted_values: list[float], q: float) -> float:
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def simulate(trace: list[TraceJob], nodes: dict[str, Resources], policy: Policy, *, stop_s: float = 30.0,
             resume_s: float = 30.0, tick_s: float = 60.0, min_run_s: float = 0.0, max_rounds: int = 10_000_000) -> SimResult:
    """Replay ``trace`` on ``nodes`` under ``policy``; every job runs to completion."""
    jobs = {t.id: Job(t.id, t.tasks, t.submit_s, user=t.user, queue=t.queue, priority=t.priority) for t in trace}
    remaining = {t.id: t.duration_s for t in trace}
    stop_at: dict[int, float] = {}
    arrivals = sorted(trace, key=lambda t: t.submit_s)
    capacity = Resources()
    for r in nodes.values():
        capacity = capacity + r
    result = SimResult(policy.name, list(jobs.values()), {t.id: t.duration_s for t in trace}, capacity)
    known: list[Job] = []
    a, now, done = 0, 0.0, 0

    def stop_running(j: Job, t: float) -> None:
        ran = t - j.started_s
        j.attained += j.width * ran
        remaining[j.id] -= ran
        j.extra["last_run_s"] = ran
        result.busy_cpu_s += j.demand.cpus * ran

    while done < len(jobs):
        result.rounds += 1
        if result.rounds > max_rounds:
            raise RuntimeError(f"simulation of {policy.name} did not finish in {max_rounds} rounds")
        for j in known:  # completions and finished stops at `now`
            if j.phase is Phase.RUNNING and j.started_s + remaining[j.id] <= now + 1e-9:
                stop_running(j, now)
                j.phase, j.finished_s, j.placement = Phase.DONE, now, None
                done += 1
            elif j.phase is Phase.STOPPING and stop_at[j.id] <= now + 1e-9:
                result.busy_cpu_s += j.demand.cpus * stop_s
                j.phase, j.placement = Phase.QUEUED, None
                j.extra["queued_since_s"] = now
        while a < len(arrivals) and arrivals[a].submit_s <= now + 1e-9:
            known.append(jobs[arrivals[a].id])
            jobs[arrivals[a].id].extra["queued_since_s"] = now
            a += 1
        known = [j for j in known if j.phase is not Phase.DONE]
        for act in decide(known, nodes, policy, now, min_run_s):
            j = jobs[act.job_id]
            if isinstance(act, Start):
                if j.first_started_s is None:
                    j.first_started_s = now
                    result.starts.append(j.id)
                else:
                    remaining[j.id] += resume_s
                j.phase, j.started_s, j.placement = Phase.RUNNING, now, act.placement
            elif isinstance(act, Preempt):
                stop_running(j, now)
                j.phase, j.preemptions = Phase.STOPPING, j.preemptions + 1
                stop_at[j.id] = now + stop_s
        now = _next_event(now, known, arrivals, a, remaining, stop_at, policy, tick_s)
    return result


def _next_event(now, known, arrivals, a, remaining, stop_at, policy, tick_s) -> float:
    times = []
    if a < len(arrivals):
        times.append(arrivals[a].submit_s)
    waiting = False
    for j in known:
        if j.phase is Phase.RUNNING:
            times.append(j.started_s + remaining[j.id])
            if isinstance(policy, LeastAttainedService):  # a running job crossing a threshold may be preempted
                for t in policy.thresholds:
                    if j.attained < t:
                        times.append(j.started_s + (t - j.attained) / j.width)
                        break
        elif j.phase is Phase.STOPPING:
            times.append(stop_at[j.id])
        elif j.phase is Phase.QUEUED:
            waiting = True
            if j.not_before_s > now:
                times.append(j.not_before_s)
    if waiting:
        times.append(now + tick_s)
    later = [t for t in times if t > now + 1e-9]
    return min(later) if later else now + tick_s
