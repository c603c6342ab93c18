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

:func:`philly_trace` draws its run times from the Philly trace's published distribution instead:
``PHILLY_RUN_MIN`` holds, per GPU-count bucket, quantiles of job run time read from "Job Runtimes
(Figure 2)" of the trace's analysis notebook (github.com/msr-fiddle/philly-traces, the CDFs of the
ATC paper's Figure 2, computed on the released trace; ``benchmarks/philly_fit.py`` derives them).
Job widths follow the GPU-count mix that Gavel's simulator draws "from the Philly distribution"
(Narayanan et al., OSDI 2020; github.com/stanford-futuredata/gavel, ``scheduler/utils.py``
``_generate_scale_factor``): 1, 2, 4, 8 tasks with probabilities .70, .10, .15, .05 (second-hand:
neither the paper nor the notebook shows the mix).
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
    drawn = []
    for _ in range(n_jobs):
        width = rng.choices(sizes, probs)[0]
        if rng.random() < tail_fraction:
            duration = median_s * math.exp(2.33 * sigma) * rng.paretovariate(tail_alpha)
        else:
            duration = rng.lognormvariate(math.log(median_s), sigma)
        drawn.append((width, min(max_s, max(1.0, duration))))
    return _arrivals(drawn, rng, load, cluster_cpus, users, queues)


def _arrivals(drawn: list[tuple[int, float]], rng: random.Random, load: float, cluster_cpus: int, users: int,
              queues: int) -> list[TraceJob]:
    """Jobs of the drawn (width, run time) pairs arriving as a Poisson process of offered load ``load``
    (task-seconds asked per second, over ``cluster_cpus``); users Zipf-ish (user 0 submits most)."""
    user_w = [1.0 / (k + 1) for k in range(users)]
    # Arrival rate from the drawn work itself, so that the offered load is ``load`` whatever the tail gave.
    work = sum(w * d for w, d in drawn)
    rate = len(drawn) * load * cluster_cpus / work
    jobs, t = [], 0.0
    for i, (width, duration) in enumerate(drawn):
        t += rng.expovariate(rate)
        u = rng.choices(range(users), user_w)[0]
        jobs.append(TraceJob(i, t, duration, tuple(Resources(cpus=1, memory_mb=1024) for _ in range(width)),
                             user=f"u{u}", queue=f"q{u % queues}", priority=rng.choice((0, 0, 0, 1, 2))))
    return jobs


# Philly's run times, per GPU-count bucket: (cumulative fraction, minutes), read by
# benchmarks/philly_fit.py from the trace notebook's Figure 2 (x axis 0.1 to 10^4 minutes; the last
# point is the CDF at the axis' right edge: the jobs beyond it run 10^4 minutes here).
PHILLY_RUN_MIN: dict[str, tuple[tuple[float, float], ...]] = {
    "1": ((0.02, 0.369), (0.05, 0.709), (0.1, 0.966), (0.2, 1.23), (0.3, 3.82), (0.4, 10.3), (0.5, 19.2),
          (0.6, 32.2), (0.7, 45.4), (0.8, 93.4), (0.9, 236), (0.991, 1e4)),
    "2-4": ((0.02, 0.162), (0.05, 0.228), (0.1, 0.311), (0.2, 0.597), (0.3, 3.11), (0.4, 13.2), (0.5, 29),
            (0.6, 213), (0.7, 618), (0.8, 1.51e3), (0.9, 3.45e3), (0.965, 1e4)),
    "5-8": ((0.02, 0.311), (0.05, 0.618), (0.1, 1.41), (0.2, 7.86), (0.3, 21.3), (0.4, 66.2), (0.5, 206),
            (0.6, 438), (0.7, 1.27e3), (0.8, 2.8e3), (0.9, 5.97e3), (0.945, 1e4)),
    ">8": ((0.02, 0.382), (0.05, 0.64), (0.1, 0.842), (0.2, 4.38), (0.3, 16.7), (0.4, 40.9), (0.5, 136),
           (0.6, 290), (0.7, 709), (0.8, 1.23e3), (0.9, 3.11e3), (0.972, 1e4)),
}
PHILLY_WIDTHS = ((1, 0.70), (2, 0.10), (4, 0.15), (8, 0.05))   # after Gavel's generator (module docstring)


def philly_bucket(width: int) -> str:
    return "1" if width == 1 else "2-4" if width <= 4 else "5-8" if width <= 8 else ">8"


def philly_run_s(width: int, u: float) -> float:
    """The run time (s) at quantile ``u`` of Philly's run times for jobs of ``width`` GPUs: log-linear
    between the points of ``PHILLY_RUN_MIN``, from 0.1 minute (the figure's left edge) at 0."""
    pts = ((0.0, 0.1), *PHILLY_RUN_MIN[philly_bucket(width)])
    if u >= pts[-1][0]:
        return 60.0 * pts[-1][1]
    k = next(i for i in range(1, len(pts)) if u < pts[i][0])
    (q0, m0), (q1, m1) = pts[k - 1], pts[k]
    return 60.0 * m0 * (m1 / m0) ** ((u - q0) / (q1 - q0))


def philly_trace(n_jobs: int = 400, seed: int = 0, load: float = 1.2, cluster_cpus: int = 64,
                 widths: tuple[tuple[int, float], ...] = PHILLY_WIDTHS, users: int = 8, queues: int = 2) -> list[TraceJob]:
    """``n_jobs`` jobs with Philly's run times per width (:func:`philly_run_s`), widths from ``widths``,
    arriving and assigned to users as in :func:`synthetic_trace`."""
    rng = random.Random(seed)
    sizes, probs = zip(*widths)
    drawn = []
    for _ in range(n_jobs):
        width = rng.choices(sizes, probs)[0]
        drawn.append((width, philly_run_s(width, rng.random())))
    return _arrivals(drawn, rng, load, cluster_cpus, users, queues)


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
                j.phase, j.started_s, j.placement, j.claimed_s = Phase.RUNNING, now, act.placement, None
            elif isinstance(act, Preempt):
                if jobs[act.for_job].claimed_s is None:
                    jobs[act.for_job].claimed_s = now
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
