"""Scheduling policies: in which order queued jobs start, and whom a job may preempt.

A policy only *ranks*; :func:`downpour.scheduler.decide.decide` places gangs and picks victims.
Each policy is a small class registered by name (:func:`make_policy`):

* ``fifo``: submission order; strict (nothing overtakes a job that does not fit) unless ``backfill``.
* ``priority``: strict priority with aging: a job's effective priority is its priority plus
  ``aging_per_s`` for every second since it was submitted, so a job submitted ``Δ = (P_max -
  P_min + margin) / aging_per_s`` seconds before another always ranks first; a job preempts only
  jobs whose effective priority is lower by more than ``margin``. No backfilling: while the
  first job cannot be placed, nothing after it starts (a wide job is never overtaken forever).
* ``drf``: weighted fair share across queues, then users within a queue, by Dominant Resource
  Fairness: the next job is the oldest one of the user of least weighted dominant share in the
  queue of least weighted dominant share. A job may preempt other queues' (or, in its own queue,
  other users') jobs only if its side's share rises and every victim's side keeps, after losing
  all its victims, a share strictly above the job's side's share before: the *swap rule* of
  :mod:`downpour.scheduler.drf`, where what it guarantees with whole jobs is stated and proved.
  A job that preempted starts first once its victims have stopped (it *claims* what they free).
* ``las``: least attained service, Tiresias-style (Gu et al., NSDI 2019): attained service is
  tasks x seconds run; ``thresholds`` cut it into discrete queues; a lower queue goes first, FIFO
  within a queue; a job preempts jobs in higher queues. With ``promote_factor`` set, a job that has
  waited that many times its last run is moved back to the first queue (Tiresias' starvation guard).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from downpour.errors import ConfigError
from downpour.scheduler.drf import Holdings, choose_victims, swap_allowed
from downpour.scheduler.model import Job
from downpour.scheduler.resources import Resources


class Policy:
    name = ""
    preemptive = False
    backfill = True   # may a job start while one ranked before it cannot be placed?
    rerank = False    # does the order change when a job starts (``decide`` then asks for it again)?
    max_swaps = math.inf   # jobs that may preempt others in one round
    keeps_claims = False   # does a job that preempted start first until it starts (``decide``)?

    def order(self, queued: Sequence[Job], holding: Sequence[Job], capacity: Resources, now: float) -> list[Job]:
        """Queued jobs, first to start first."""
        raise NotImplementedError

    def context(self, holding: Sequence[Job], capacity: Resources, now: float, queued: Sequence[Job] = ()) -> Any:
        """What ``may_preempt`` and ``victim_key`` need to know about the jobs holding resources (and
        those waiting), computed once per change of them (DRF: the shares)."""
        return None

    def may_preempt(self, job: Job, victim: Job, ctx: Any, now: float) -> bool:
        """Whether ``job`` (queued) may take ``victim``'s (running) resources."""
        return False

    def victim_key(self, victim: Job, ctx: Any, now: float) -> tuple:
        """Victims are taken in ascending order of this key (the least deserving first)."""
        return (-(victim.started_s or 0.0),)

    def choose_victims(self, job: Job, candidates: Sequence[Job], ctx: Any, now: float,
                       fits: Callable[[list[Job]], bool]) -> list[Job]:
        """Running jobs whose stop lets ``job`` fit (``fits(victims)`` says whether it does), or []:
        by default those ``may_preempt`` allows, in ``victim_key`` order, until the job fits."""
        chosen: list[Job] = []
        for v in sorted((v for v in candidates if self.may_preempt(job, v, ctx, now)), key=lambda v: self.victim_key(v, ctx, now)):
            chosen.append(v)
            if fits(chosen):
                return chosen
        return []

    def search_group(self, job: Job) -> Hashable:
        """Jobs of one group stop looking for victims in a round once one of them found none."""
        return job.id

    def describe(self, job: Job, now: float) -> str:
        """What this policy ranks the job by, for ``downpour jobs``."""
        return ""


class Fifo(Policy):
    name = "fifo"

    def __init__(self, backfill: bool = False) -> None:
        self.backfill = bool(backfill)

    def order(self, queued, holding, capacity, now):
        return sorted(queued, key=lambda j: (j.submitted_s, j.id))


class PriorityAging(Policy):
    name = "priority"
    backfill = False

    def __init__(self, aging_per_s: float = 1 / 600, margin: float = 1.0, preempt: bool = True) -> None:
        if aging_per_s < 0 or margin < 0:
            raise ConfigError(f"priority policy: aging_per_s ({aging_per_s}) and margin ({margin}) must be >= 0")
        self.aging_per_s, self.margin, self.preemptive = float(aging_per_s), float(margin), bool(preempt)

    def effective(self, job: Job, now: float) -> float:
        return job.priority + self.aging_per_s * max(0.0, now - job.submitted_s)

    def order(self, queued, holding, capacity, now):
        return sorted(queued, key=lambda j: (-self.effective(j, now), j.submitted_s, j.id))

    def may_preempt(self, job, victim, ctx, now):
        return self.effective(job, now) > self.effective(victim, now) + self.margin

    def victim_key(self, victim, ctx, now):
        return (self.effective(victim, now), -(victim.started_s or 0.0))

    def describe(self, job, now):
        return f"priority {self.effective(job, now):.2f}"


class DominantResourceFairness(Policy):
    name = "drf"
    rerank = True
    # One swap per round: the no-livelock argument counts a swap's job as started, which holds only
    # if no second swap is judged on shares that count jobs merely reserved in this round.
    max_swaps = 1
    # A swap's job starts before anyone else may take what its victims free: the no-livelock
    # argument counts it as started from the swap on.
    keeps_claims = True

    def __init__(self, weights: Mapping[str, float] | None = None, preempt: bool = True) -> None:
        self.weights = dict(weights or {})
        bad = {k: w for k, w in self.weights.items() if not w > 0}
        if bad:
            raise ConfigError(f"drf policy: weights must be > 0, got {bad}")
        self.preemptive = bool(preempt)

    def order(self, queued, holding, capacity, now):
        # The least-served queue, then user, first, by the shares of what runs now; ``decide`` ranks
        # again after every start (``rerank``), so whole jobs are handed out by progressive filling,
        # and a job that cannot start leaves the others' order as it was.
        h = Holdings.of(holding, capacity, self.weights)
        queues, users = h.shares("queue"), h.shares("user")
        return sorted(queued, key=lambda j: (queues.get(j.queue, 0.0), users.get(j.entity("user"), 0.0), j.submitted_s, j.id))

    def context(self, holding, capacity, now, queued=()):
        return Holdings.of(holding, capacity, self.weights, queued)

    def may_preempt(self, job, victim, ctx, now):
        return swap_allowed(ctx, job, [victim])

    def choose_victims(self, job, candidates, ctx, now, fits):
        # The swap rule is about the whole set of victims (each one allowed alone is not enough).
        return choose_victims(ctx, job, candidates, fits)

    def search_group(self, job):
        return job.entity("user")


class LeastAttainedService(Policy):
    name = "las"

    def __init__(self, thresholds: Sequence[float] = (600.0, 3600.0), promote_factor: float | None = None,
                 preempt: bool = True) -> None:
        thresholds = [float(t) for t in thresholds]
        if any(t <= 0 for t in thresholds) or thresholds != sorted(thresholds):
            raise ConfigError(f"las policy: thresholds must be positive and increasing, got {thresholds}")
        if promote_factor is not None and promote_factor <= 0:
            raise ConfigError(f"las policy: promote_factor must be > 0, got {promote_factor}")
        self.thresholds, self.promote_factor, self.preemptive = thresholds, promote_factor, bool(preempt)

    def level(self, job: Job, now: float) -> int:
        """The job's discrete queue: 0 until its attained service reaches thresholds[0], and so on."""
        if self.promote_factor is not None and job.extra.get("last_run_s"):
            waited = now - job.extra.get("queued_since_s", now)
            if waited >= self.promote_factor * job.extra["last_run_s"]:
                return 0
        attained = job.attained_at(now)
        return sum(1 for t in self.thresholds if attained >= t)

    def order(self, queued, holding, capacity, now):
        return sorted(queued, key=lambda j: (self.level(j, now), j.submitted_s, j.id))

    def may_preempt(self, job, victim, ctx, now):
        return self.level(victim, now) > self.level(job, now)

    def victim_key(self, victim, ctx, now):
        return (-self.level(victim, now), -victim.attained_at(now))

    def describe(self, job, now):
        return f"queue {self.level(job, now)}, {job.attained_at(now):.0f} task-s"


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Fifo, PriorityAging, DominantResourceFairness, LeastAttainedService)}


def make_policy(name: str, **options) -> Policy:
    """The policy registered as ``name``, built with ``options``; unknown names and options say what exists."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown scheduling policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"{name} policy: {err}") from None
