"""DRF's three properties (Ghodsi et al., NSDI 2011) on random instances, and the job-level ordering."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.scheduler.drf import drf_allocation

EPS = 1e-6

capacities = st.lists(st.floats(1.0, 100.0), min_size=2, max_size=3)


@st.composite
def instances(draw, weighted=False, capped=True):
    cap = draw(capacities)
    n = draw(st.integers(1, 5))
    demands = []
    for _ in range(n):
        d = draw(st.lists(st.floats(0.0, 10.0), min_size=len(cap), max_size=len(cap)))
        if max(d) < 0.05:
            d[draw(st.integers(0, len(cap) - 1))] = draw(st.floats(0.05, 10.0))
        demands.append(d)
    weights = draw(st.lists(st.floats(0.25, 4.0), min_size=n, max_size=n)) if weighted else [1.0] * n
    caps = draw(st.lists(st.one_of(st.just(math.inf), st.floats(0.5, 50.0)), min_size=n, max_size=n)) if capped else [math.inf] * n
    return cap, demands, weights, caps


def _tasks_from(alloc_resources, demand):
    """Tasks of ``demand`` that a bundle of resources runs."""
    return min((alloc_resources[r] / demand[r] for r in range(len(demand)) if demand[r] > 0), default=math.inf)


@settings(max_examples=150, deadline=None)
@given(instances(weighted=True))
def test_allocation_is_feasible_and_pareto_efficient(inst):
    cap, demands, weights, caps = inst
    x = drf_allocation(cap, demands, weights, caps)
    used = [sum(x[i] * demands[i][r] for i in range(len(x))) for r in range(len(cap))]
    assert all(u <= c * (1 + EPS) for u, c in zip(used, cap))
    full = {r for r in range(len(cap)) if used[r] >= cap[r] * (1 - 1e-6)}
    for i, d in enumerate(demands):  # nobody could get one more bit without a saturated resource
        assert x[i] >= caps[i] * (1 - EPS) or any(d[r] > 0 for r in full)


@settings(max_examples=150, deadline=None)
@given(instances(weighted=True))
def test_sharing_incentive(inst):
    """Each user gets at least what its weighted slice of every resource would run (or all it asked)."""
    cap, demands, weights, caps = inst
    x = drf_allocation(cap, demands, weights, caps)
    for i, d in enumerate(demands):
        slice_ = [c * weights[i] / sum(weights) for c in cap]
        assert x[i] >= min(caps[i], _tasks_from(slice_, d)) * (1 - EPS)


@settings(max_examples=150, deadline=None)
@given(instances(weighted=True))
def test_envy_freeness(inst):
    """No user would run more tasks with another's allocation (scaled to its own weight)."""
    cap, demands, weights, caps = inst
    x = drf_allocation(cap, demands, weights, caps)
    for i, di in enumerate(demands):
        for j, dj in enumerate(demands):
            if i != j:
                bundle = [x[j] * dj[r] * weights[i] / weights[j] for r in range(len(cap))]
                assert min(caps[i], _tasks_from(bundle, di)) <= x[i] * (1 + EPS) + EPS


@settings(max_examples=150, deadline=None)
@given(instances(weighted=True), st.data())
def test_strategy_proofness(inst, data):
    """Declaring another demand vector (or cap) never gets a user more tasks of its true demand."""
    cap, demands, weights, caps = inst
    x = drf_allocation(cap, demands, weights, caps)
    liar = data.draw(st.integers(0, len(demands) - 1))
    lie = data.draw(st.lists(st.floats(0.05, 10.0), min_size=len(cap), max_size=len(cap)))
    lie_cap = data.draw(st.one_of(st.just(math.inf), st.floats(0.5, 50.0)))
    declared = [*demands[:liar], lie, *demands[liar + 1:]]
    declared_caps = [*caps[:liar], lie_cap, *caps[liar + 1:]]
    y = drf_allocation(cap, declared, weights, declared_caps)
    got = [y[liar] * lie[r] for r in range(len(cap))]
    assert min(caps[liar], _tasks_from(got, demands[liar])) <= x[liar] * (1 + EPS) + EPS


def test_the_papers_example():
    """9 CPUs, 18 GB; A's tasks <1 CPU, 4 GB>, B's <3 CPUs, 1 GB>: A runs 3 tasks, B runs 2."""
    x = drf_allocation([9, 18], [[1, 4], [3, 1]])
    assert abs(x[0] - 3) < 1e-9 and abs(x[1] - 2) < 1e-9
