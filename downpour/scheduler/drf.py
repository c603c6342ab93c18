"""Dominant Resource Fairness (Ghodsi et al., NSDI 2011), for divisible tasks and for whole jobs.

A user's *dominant share* is the largest fraction of any one resource its allocation takes.
DRF equalises weighted dominant shares by *progressive filling*: every unsatisfied user's dominant
share grows at the rate of its weight until a resource runs out (its users stop) or the user has all
the tasks it asked for. :func:`drf_allocation` computes that allocation exactly (tasks divisible, as
in the paper); its sharing incentive, strategy-proofness and envy-freeness are tested as stated there.

The scheduler's ``drf`` policy cannot divide a job: a job is a gang, started whole or not at all.
It fills progressively over whole jobs (the next job to start is the oldest of the user, in the
queue, of lowest weighted dominant share) and takes resources back by preemption under the *swap
rule* of :func:`swap_allowed`; :func:`choose_victims` picks the victims. Write ``s_u`` for user u's
weighted dominant share (dominant share of what its running jobs hold, over its weight ``w_u``),
``W`` for the sum of the weights, ``σ_u`` for the dominant share of one job of u. The swap rule:
a queued job J of user X may stop a set V of other users' running jobs only if J raises ``s_X``
and every victim's user Y keeps ``s_Y`` (after losing all its victims) strictly above ``s_X``
*before* J: ``s_Y - (V's part of Y) > s_X``. (Across queues the same rule holds between queues'
shares; within a queue a swap may not lower the queue's share while other queues have jobs.) The job
that preempts claims what its victims free: it starts first once they have stopped.

What the policy guarantees, on one node (or wherever a gang fits if and only if its total fits,
i.e. no fragmentation), for the at most ``decide.SEARCHES`` least-served users waiting in a round
(all of them when no more wait), once the rounds reach a *fixed point* (a round with no action),
each user's jobs alike (σ_u per job):

* **No livelock.** Between arrivals and completions only finitely many preemptions happen, within
  and across queues. A job that preempts *claims* what its victims free: it ranks first in every
  round until it starts (``Job.claimed_s``, ``Policy.keeps_claims``), so count it as holding its
  demand from the swap on. Take as potential ``P`` the vector of the queues' shares sorted
  ascending, followed by each queue's (in a fixed order) users' shares sorted ascending, over the
  queues with jobs; when only one queue has jobs, its users' vector alone. Compare lexicographically.
  (1) A start lowers no share, so ``P`` does not fall. (2) A swap at the queue level
  (some victim in another queue) raises the job's queue share ``a`` and leaves every victim queue
  strictly above ``a``: the shares below ``a`` are unchanged, one value ``a`` has gone, the values
  that moved are above ``a``, so the sorted queue vector, and ``P``, rise. (3) A swap inside a
  queue leaves the queue's share at least where it was (the rule's last clause; it may fall only
  while no other queue has jobs, where ``P`` has no queue part): if it rose, (2)'s argument; if not,
  the queue vector is unchanged and the same argument on the queue's users' vector makes ``P`` rise.
  The rule judges the job's side on all it holds in the round (jobs running, started, claimed) and
  the victims' sides on their running jobs only, which is at most what they hold, so (2) and (3)
  hold of the true state; and at most one swap is judged per round. ``P`` never falls and rises at
  each swap; there are finitely many allocations. Tested on random instances with one and with
  several queues, queue and user weights. Without claims it failed across queues (a test keeps the
  instance): the victims' queue, once they had stopped, could rank first (another start having lifted
  the preemptor's queue) and take the resources back, the preemptor preempting again, forever. The
  policy before the swap rule checked each victim on its own and oscillated even within a queue:
  5 CPUs and 13 GB, tasks ⟨1 CPU, 1 GB⟩ and ⟨0, 2 GB⟩, two victims each "allowed" alone, the
  victims' user back below and retaking them.
* **Sharing incentive up to one job per user.** A user u with a job waiting holds
  ``w_u·s_u > (w_u/W)·(1 - Σ_v σ_v)`` (the sum over every user with jobs running or waiting): its
  weighted slice less at most one job of each user; divisible DRF gives ``w_u/W``. Proof: at a
  fixed point u's next job fits neither in the free resources nor after :func:`choose_victims`
  has taken every job the swap rule allows (it only stops early when the job fits), which leaves
  each other user v with ``k_v`` jobs, ``k_v·σ_v/w_v ≤ s_u + σ_v/w_v``. So on some resource r,
  ``C_r < (x_u+1)·D_ur + Σ_v k_v·D_vr ≤ C_r·(w_u·s_u + σ_u + Σ_v (w_v·s_u + σ_v))``, i.e.
  ``1 < W·s_u + Σ σ``.
* **Envy-freeness up to one job.** A user u with a job waiting would not run one more job with
  another user v's bundle less one of v's jobs, scaled by ``λ = min(1, w_u/w_v)``. Proof: say
  ``λ·(x_v-1)·D_v ≥ (x_u+1)·D_u``. Dominant shares are monotone, so ``σ_u ≤ λ·(x_v-1)·σ_v/(x_u+1)``,
  and the ``k_v`` jobs v keeps after every allowed swap satisfy ``(k_v-1)·σ_v/w_v ≤ s_u``, whence
  ``k_v - 1 ≤ x_u·(x_v-1)/(x_u+1)`` and ``x_v - k_v ≥ (x_v-1)/(x_u+1) ≥ λ·(x_v-1)/(x_u+1)``: the jobs
  of v the rule lets u take hold ``D_u``, so u's job would fit, which a fixed point rules out.
  (Divisible DRF needs no "less one job" and scales by ``w_u/w_v`` either way.)
* **Strategy-proofness only where every job is alike.** Declaring a larger demand than the jobs
  need can win jobs: the larger job leaves too little for another user's job, which then waits while
  the liar backfills, and the swap rule's strict inequality (which no-livelock needs) keeps it from
  taking the resources back. 4 GPUs, a: one job of 3, b: two of 1; truthful b runs one, declaring 2
  GPUs per job it runs two and a none (a test). The paper's proof needs divisible tasks
  (:func:`drf_allocation` has it, tested). Where every user's jobs are the same gang (one queue, any
  weights), declaring larger tasks never won a job on random instances (tested, not proved: the
  liar's larger jobs leave no room that its own true jobs, the same as everyone's, could use).

Beyond one node a gang may not fit where its total would (fragmentation); the order and the swap rule
are the same there, the bounds above need not hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from downpour.scheduler.model import Job, Phase
from downpour.scheduler.resources import Resources

EPS = 1e-12   # shares are ratios of integers: "strictly above" means by more than rounding


def drf_allocation(capacity: Sequence[float], demands: Sequence[Sequence[float]], weights: Sequence[float] | None = None,
                   caps: Sequence[float] | None = None) -> list[float]:
    """Tasks per user under weighted DRF with progressive filling.

    ``capacity[r]`` is resource r's total; ``demands[i][r]`` what one task of user i takes (some
    component positive); ``caps[i]`` the most tasks user i wants (``math.inf``: unbounded).
    """
    n, m = len(demands), len(capacity)
    weights = list(weights) if weights is not None else [1.0] * n
    caps = list(caps) if caps is not None else [math.inf] * n
    per_task = [max(d[r] / capacity[r] for r in range(m)) for d in demands]   # dominant share of one task
    if any(s <= 0 for s in per_task):
        raise ValueError("every task must take some of a resource")
    tasks = [0.0] * n
    left = list(capacity)
    active = {i for i in range(n) if caps[i] > 0}
    while active:
        # Users' dominant shares grow at their weight: user i gains w_i / s_i tasks per unit of "time".
        rate = [sum(weights[i] / per_task[i] * demands[i][r] for i in active) for r in range(m)]
        steps = [left[r] / rate[r] for r in range(m) if rate[r] > 0]
        steps += [(caps[i] - tasks[i]) * per_task[i] / weights[i] for i in active]
        dt = max(0.0, min(steps))
        for i in active:
            tasks[i] += dt * weights[i] / per_task[i]
        for r in range(m):
            left[r] -= dt * rate[r]
        full = {r for r in range(m) if left[r] <= 1e-12 * capacity[r]}
        done = {i for i in active if tasks[i] >= caps[i] * (1 - 1e-12) or any(demands[i][r] > 0 for r in full)}
        for i in done:
            tasks[i] = min(tasks[i], caps[i])
        active -= done
    return tasks


@dataclass(frozen=True)
class Holdings:
    """What each queue and each user (``Job.entity("user")``) holds, for the swap rule: all that
    the round counts as holding (``queues``, ``users``: jobs running, started or reserved), and what
    is actually running (``running_queues``, ``running_users``): a victim's side is judged on that
    alone, as a job started or reserved this round may yet not run."""

    capacity: Resources
    weights: Mapping[str, float]
    queues: Mapping[str, Resources]
    users: Mapping[str, Resources]
    running_queues: Mapping[str, Resources]
    running_users: Mapping[str, Resources]
    active_queues: frozenset[str] = frozenset()   # queues with jobs holding resources or waiting

    @classmethod
    def of(cls, holding: Iterable[Job], capacity: Resources, weights: Mapping[str, float],
           waiting: Iterable[Job] = ()) -> Holdings:
        held: list[dict[str, Resources]] = [{}, {}, {}, {}]
        for j in holding:
            for k, who in enumerate((j.queue, j.entity("user")) * (2 if j.phase is Phase.RUNNING else 1)):
                held[k][who] = held[k].get(who, Resources()) + j.demand
        return cls(capacity, weights, *held, frozenset(held[0]) | {j.queue for j in waiting})

    def share(self, who: str, held: Resources) -> float:
        """Weighted dominant share of ``who`` (a queue or a ``queue/user``) holding ``held``."""
        return held.dominant_share(self.capacity) / self.weights.get(who, 1.0)

    def shares(self, level: str) -> dict[str, float]:
        held = self.queues if level == "queue" else self.users
        return {who: self.share(who, r) for who, r in held.items()}


def _level(job: Job, victim: Job) -> str | None:
    """Where ``job`` and ``victim`` are two sides: two queues, two users of a queue, or one user (None)."""
    return "queue" if job.queue != victim.queue else "user" if job.user != victim.user else None


def swap_allowed(h: Holdings, job: Job, victims: Sequence[Job]) -> bool:
    """The swap rule (module docstring): may ``job`` start in place of ``victims``?

    Per side: the job's side must gain share, and each victim side must keep, after losing all its
    victims, a share strictly above the job's side's share before the swap.
    """
    levels = [_level(job, v) for v in victims]
    if not victims or None in levels:
        return False
    mine = {"queue": job.queue, "user": job.entity("user")}
    held = {"queue": dict(h.queues), "user": dict(h.users)}              # the job's side
    running = {"queue": dict(h.running_queues), "user": dict(h.running_users)}   # the victims' sides
    before = {lv: h.share(mine[lv], held[lv].get(mine[lv], Resources())) for lv in held}
    for lv in held:
        held[lv][mine[lv]] = held[lv].get(mine[lv], Resources()) + job.demand
    for v in victims:
        for lv in held:
            running[lv][v.entity(lv)] = running[lv][v.entity(lv)] - v.demand
            if v.entity(lv) == mine[lv]:
                held[lv][mine[lv]] = held[lv][mine[lv]] - v.demand
    after = {lv: h.share(mine[lv], held[lv][mine[lv]]) for lv in held}
    for lv in ("queue", "user"):
        sides = {v.entity(lv) for v, vl in zip(victims, levels) if vl == lv}
        if sides and not (after[lv] > before[lv] + EPS and all(h.share(y, running[lv][y]) > before[lv] + EPS for y in sides)):
            return False
    # Within a queue, freeing more than the job takes may lower the queue's share: only harmless
    # (for the no-livelock argument) while no other queue has jobs, holding or waiting.
    return after["queue"] >= before["queue"] - EPS or (h.active_queues | set(h.queues)) <= {job.queue}


def choose_victims(h: Holdings, job: Job, candidates: Sequence[Job], fits: Callable[[list[Job]], bool]) -> list[Job]:
    """Victims for ``job`` under the swap rule, or [] when no allowed set makes it fit (``fits``).

    Water-filling from the top: each step takes a job of the side (queue, then user) that holds the
    most now, among the jobs whose side would stay strictly above the job's side's share; the most
    recently started first (it loses least). It stops as soon as the job fits, then drops victims
    the job fits without (the last taken, from the least-served sides, first). Taking every
    allowed job before giving up is what the sharing-incentive proof needs.
    """
    mine = {"queue": job.queue, "user": job.entity("user")}
    floor = {lv: h.share(mine[lv], held.get(mine[lv], Resources())) for lv, held in (("queue", h.queues), ("user", h.users))}
    held = {"queue": dict(h.running_queues), "user": dict(h.running_users)}   # the victims' sides: what runs
    pool = [v for v in candidates if _level(job, v) is not None]
    chosen: list[Job] = []
    while True:
        def after(v: Job, lv: str) -> float:
            return h.share(v.entity(lv), held[lv][v.entity(lv)] - v.demand)

        options = [v for v in pool if after(v, _level(job, v)) > floor[_level(job, v)] + EPS]
        if not options:
            return []
        v = max(options, key=lambda v: (h.share(v.queue, held["queue"][v.queue]),
                                        h.share(v.entity("user"), held["user"][v.entity("user")]), v.started_s or 0.0, v.id))
        pool.remove(v)
        chosen.append(v)
        held["queue"][v.queue] = held["queue"][v.queue] - v.demand
        held["user"][v.entity("user")] = held["user"][v.entity("user")] - v.demand
        if fits(chosen):
            break
    for v in reversed(list(chosen)):
        rest = [x for x in chosen if x is not v]
        if rest and fits(rest):
            chosen = rest
    return chosen if swap_allowed(h, job, chosen) else []
