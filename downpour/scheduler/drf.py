"""Dominant Resource Fairness (Ghodsi et al., NSDI 2011).

A user's *dominant share* is the largest fraction of any one resource its allocation takes.
DRF equalises weighted dominant shares by *progressive filling*: every unsatisfied user's dominant
share grows at the rate of its weight until a resource runs out (its users stop) or the user has all
the tasks it asked for. :func:`drf_allocation` computes that allocation exactly (tasks divisible, as
in the paper) and is what the property tests check sharing incentive, strategy-proofness and
envy-freeness on. The scheduler's ``drf`` policy applies the same rule to whole jobs: the next job
to start is one of the queue, then user, of lowest weighted dominant share (:func:`dominant_shares`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from downpour.scheduler.resources import Resources


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


def dominant_shares(holders: Iterable[tuple[str, Resources]], capacity: Resources, weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted dominant share of each entity from ``(entity, resources held)`` pairs."""
    held: dict[str, Resources] = {}
    for who, r in holders:
        held[who] = held.get(who, Resources()) + r
    return {who: r.dominant_share(capacity) / weights.get(who, 1.0) for who, r in held.items()}
