"""One scheduling round as a pure function: jobs, cluster, policy and the time in; actions out.

:func:`decide` never changes a job; the simulator and the service perform its actions. A round:

1. The policy ranks the queued jobs (``Policy.order``; again after each start or reservation if
   the policy's order depends on what runs, ``Policy.rerank``).
2. Each in turn is placed as a gang on the free resources (:func:`place_gang`); placed -> ``Start``.
3. One that does not fit now but will once jobs already stopping have stopped *reserves* those
   resources (later jobs in the round cannot take them).
4. Otherwise, under a preemptive policy, the policy picks victims among the running jobs that have
   run at least ``min_run_s`` (so no job is stopped as soon as it started): ``Policy.choose_victims``,
   by default those ``may_preempt`` allows, least deserving first, until the gang fits in what they
   and the free resources hold -> a ``Preempt`` for each, and the job reserves them. Victims are
   only chosen if together they make the gang fit. Only ``SEARCHES`` searches happen per round (a
   round stays cheap with a long queue; the rest look in later rounds), and a job whose search
   group (``Policy.search_group``: the job; under ``drf`` its user) already found none does not
   search again in that round. At most ``Policy.max_swaps`` jobs preempt per round (``drf``: one,
   so the next round sees the swap's victims gone before another swap is judged). A job queued
   again after its attempt failed (``Job.retrying``) preempts nobody: it waits for free resources
   (a job failing at every attempt would otherwise stop a healthy one at each, for nothing).
5. Without backfilling, the first job that does not start ends the round.

Under a policy that ``keeps_claims`` (``drf``), a job that preempted others (``Job.claimed_s`` set by
whoever performed the ``Preempt``) is ranked first, oldest claim first, until it starts: the
resources its victims free are its own, not the first ranked job's of the next round. Without that,
the victims' side can rank first once they have stopped (other starts having lifted the preemptor's
side) and take them back, the preemptor preempting again, forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from downpour.scheduler.model import Job, Phase
from downpour.scheduler.placement import give, place_gang, take
from downpour.scheduler.policies import Policy
from downpour.scheduler.resources import Resources, total


@dataclass(frozen=True)
class Start:
    job_id: int
    placement: tuple[str, ...]


@dataclass(frozen=True)
class Preempt:
    job_id: int
    for_job: int


Action = Start | Preempt
SEARCHES = 8


def free_resources(nodes: Mapping[str, Resources], jobs: Sequence[Job]) -> dict[str, Resources]:
    """Each node's capacity less what the jobs holding resources there take."""
    free = dict(nodes)
    for j in jobs:
        if j.phase.holds_resources and j.placement is not None:
            free = take(free, j.tasks, j.placement)
    return free


def _min(a: Mapping[str, Resources], b: Mapping[str, Resources]) -> dict[str, Resources]:
    return {n: a[n].minimum(b[n]) for n in a}


def decide(jobs: Sequence[Job], nodes: Mapping[str, Resources], policy: Policy, now: float,
           min_run_s: float = 0.0) -> list[Action]:
    """The actions of one round (see the module's docstring)."""
    capacity = total(nodes.values())
    holding = [j for j in jobs if j.phase.holds_resources]
    free = free_resources(nodes, holding)
    future = dict(free)  # free once every stopping job has stopped
    for j in holding:
        if j.phase is Phase.STOPPING and j.placement is not None:
            future = give(future, j.tasks, j.placement)
    queued = [j for j in jobs if j.phase is Phase.QUEUED and not j.cancel_requested and j.not_before_s <= now
              and place_gang(j.tasks, nodes) is not None]
    victims = [j for j in holding if j.phase is Phase.RUNNING and not j.cancel_requested
               and now - (j.started_s if j.started_s is not None else now) >= min_run_s]
    # What the policy sees as holding resources: running jobs (a stopping one is as good as gone),
    # updated as the round decides.
    ranked_holding = [j for j in holding if j.phase is Phase.RUNNING]
    ctx = None
    actions: list[Action] = []
    searches = SEARCHES
    failed: set = set()   # search groups (policy.search_group) that found no victims this round
    swaps = 0             # jobs that preempted others this round (at most policy.max_swaps)
    ranking = _claims_first(policy, policy.order(queued, ranked_holding, capacity, now))
    while ranking:
        job = ranking.pop(0)
        where = place_gang(job.tasks, free)
        if where is not None:
            actions.append(Start(job.id, where))
            free, future = take(free, job.tasks, where), take(future, job.tasks, where)
            ranked_holding.append(job)
            ctx = None
            if policy.rerank:
                ranking = _claims_first(policy, policy.order(ranking, ranked_holding, capacity, now))
            continue
        where = place_gang(job.tasks, future)
        group = policy.search_group(job)
        if (where is None and policy.preemptive and searches > 0 and victims and group not in failed and swaps < policy.max_swaps
                and not job.retrying):
            searches -= 1
            ctx = policy.context(ranked_holding, capacity, now, queued) if ctx is None else ctx

            def fits(chosen: list[Job], pool: Mapping[str, Resources] = future, tasks=job.tasks) -> bool:
                for v in chosen:
                    pool = give(pool, v.tasks, v.placement)
                return place_gang(tasks, pool) is not None

            chosen = policy.choose_victims(job, victims, ctx, now, fits)
            if chosen:
                swaps += 1
                chosen = _drop_needless(job, chosen, future)
                for v in chosen:
                    future = give(future, v.tasks, v.placement)
                    victims.remove(v)
                    ranked_holding.remove(v)
                    actions.append(Preempt(v.id, job.id))
                ctx = None
                where = place_gang(job.tasks, future)
            else:
                failed.add(group)
        if where is not None:  # reserve: later jobs in this round leave these resources alone
            future = take(future, job.tasks, where)
            free = _min(free, future)
            ranked_holding.append(job)
            ctx = None
            if policy.rerank:
                ranking = _claims_first(policy, policy.order(ranking, ranked_holding, capacity, now))
        if not policy.backfill:
            break
    return actions


def _claims_first(policy: Policy, ranking: list[Job]) -> list[Job]:
    """The ranking with claimed jobs first, oldest claim first, when the policy keeps claims."""
    if not policy.keeps_claims:
        return ranking
    claimed = sorted((j for j in ranking if j.claimed_s is not None), key=lambda j: (j.claimed_s, j.id))
    return claimed + [j for j in ranking if j.claimed_s is None]


def _drop_needless(job: Job, chosen: list[Job], future: Mapping[str, Resources]) -> list[Job]:
    """The victims less any the gang fits without (earliest-chosen are dropped first)."""
    keep = list(chosen)
    for v in list(chosen):
        rest = [x for x in keep if x is not v]
        pool = dict(future)
        for x in rest:
            pool = give(pool, x.tasks, x.placement)
        if place_gang(job.tasks, pool) is not None:
            keep = rest
    return keep
