"""Gang placement, one scheduling round, and the policies' promises, on random instances and by example."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.scheduler import Job, Phase, Preempt, Resources, Start, decide, make_policy
from downpour.scheduler.placement import place_gang
from downpour.scheduler.sim import TraceJob, simulate

resources = st.builds(Resources, cpus=st.integers(0, 8), gpus=st.integers(0, 2), memory_mb=st.integers(0, 4096))
clusters = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), resources, min_size=1, max_size=4)
gangs = st.lists(st.builds(Resources, cpus=st.integers(1, 4), gpus=st.integers(0, 1), memory_mb=st.integers(0, 2048)),
                 min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(gangs, clusters)
def test_a_gang_is_placed_whole_within_every_node_or_not_at_all(tasks, free):
    where = place_gang(tasks, free)
    if where is None:
        total = Resources()
        for t in tasks:
            total = total + t
        # Refusing is right at least when the gang cannot fit even pooled (and never wrong for a single task).
        if len(tasks) == 1:
            assert not any(tasks[0].fits_in(r) for r in free.values())
        return
    assert len(where) == len(tasks)
    for node in free:
        used = Resources()
        for t, n in zip(tasks, where):
            if n == node:
                used = used + t
        assert used.fits_in(free[node])


def _job(i, width=1, t=0.0, **kw):
    return Job(i, tuple(Resources(cpus=1) for _ in range(width)), t, **kw)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=12),
       st.sampled_from(["fifo", "priority", "drf", "las"]), st.integers(0, 3))
def test_a_round_never_places_part_of_a_gang_or_overcommits(specs, policy, running):
    nodes = {"n0": Resources(cpus=4), "n1": Resources(cpus=3)}
    jobs = []
    for i, (width, prio, user) in enumerate(specs):
        jobs.append(_job(i, width, float(i), priority=prio, user=f"u{user}"))
    for j in jobs[:running]:  # some already run where they fit
        where = place_gang(j.tasks, {n: r for n, r in _free(nodes, jobs).items()})
        if where is not None:
            j.phase, j.placement, j.started_s = Phase.RUNNING, where, 0.0
    actions = decide(jobs, nodes, make_policy(policy), now=100.0)
    for a in actions:
        if isinstance(a, Start):
            j = jobs[a.job_id]
            assert j.phase is Phase.QUEUED and len(a.placement) == len(j.tasks)
            j.phase, j.placement = Phase.RUNNING, a.placement
        else:
            assert jobs[a.job_id].phase is Phase.RUNNING
    assert all(r.cpus >= 0 for r in _free(nodes, jobs).values())


def _free(nodes, jobs):
    from downpour.scheduler.decide import free_resources

    return free_resources(nodes, jobs)


@st.composite
def priority_traces(draw):
    n = draw(st.integers(2, 25))
    jobs = []
    t = 0.0
    for i in range(n):
        t += draw(st.floats(0.0, 50.0))
        jobs.append(TraceJob(i, t, draw(st.floats(1.0, 100.0)), tuple(Resources(cpus=1) for _ in range(draw(st.integers(1, 4)))),
                             priority=draw(st.integers(0, 5))))
    return jobs


@settings(max_examples=80, deadline=None)
@given(priority_traces())
def test_priority_with_aging_never_lets_a_much_later_job_overtake(trace):
    """No starvation: a job submitted more than Δ = (P_max - P_min + margin) / aging after J neither
    starts before J nor preempts it, so J waits at most for the jobs submitted before J + Δ."""
    aging, margin = 0.5, 1.0
    policy = make_policy("priority", aging_per_s=aging, margin=margin)
    result = simulate(trace, {"n": Resources(cpus=4)}, policy, stop_s=1.0, resume_s=1.0, tick_s=5.0)
    delta = (5 - 0 + margin) / aging
    order = {jid: k for k, jid in enumerate(result.starts)}
    by_id = {j.id: j for j in result.jobs}
    for a in trace:
        for b in trace:
            if b.submit_s > a.submit_s + delta:
                assert order[a.id] < order[b.id]
                assert by_id[b.id].first_started_s >= by_id[a.id].first_started_s
    assert all(j.phase is Phase.DONE for j in result.jobs)


def test_without_aging_a_stream_of_important_jobs_starves_a_low_one():
    """The property above is not vacuous: with aging off, the low-priority job waits for all 40 others."""
    trace = [TraceJob(0, 0.5, 10.0, (Resources(cpus=4),), priority=0)]
    trace += [TraceJob(i, float(i - 1) * 9, 10.0, (Resources(cpus=4),), priority=5) for i in range(1, 41)]
    starved = simulate(trace, {"n": Resources(cpus=4)}, make_policy("priority", aging_per_s=0.0), tick_s=5.0)
    aged = simulate(trace, {"n": Resources(cpus=4)}, make_policy("priority", aging_per_s=0.5), tick_s=5.0)
    assert starved.starts[-1] == 0
    assert aged.starts.index(0) < 5


def test_fifo_is_strict_and_backfill_lets_small_jobs_through():
    nodes = {"n": Resources(cpus=4)}
    running = _job(0, 3, 0.0, phase=Phase.RUNNING, placement=("n",) * 3, started_s=0.0)
    wide, small = _job(1, 4, 1.0), _job(2, 1, 2.0)
    assert decide([running, wide, small], nodes, make_policy("fifo"), 10.0) == []
    assert decide([running, wide, small], nodes, make_policy("fifo", backfill=True), 10.0) == [Start(2, ("n",))]


def test_las_runs_the_least_served_first_and_preempts_a_job_past_its_threshold():
    nodes = {"n": Resources(cpus=2)}
    policy = make_policy("las", thresholds=[100.0])
    old = _job(0, 2, 0.0, phase=Phase.RUNNING, placement=("n", "n"), started_s=0.0)  # 2 tasks x 60 s = 120 task-s
    new = _job(1, 1, 50.0)
    assert decide([old, new], nodes, policy, now=40.0) == []           # 80 task-s: same queue as the new job
    assert decide([old, new], nodes, policy, now=60.0) == [Preempt(0, 1)]
    assert decide([old, new], nodes, policy, now=60.0, min_run_s=120.0) == []


def test_a_job_queued_again_after_its_attempt_failed_preempts_nobody():
    """A job failing at every attempt stopped a healthy lower-priority job at each of them (three
    preemptions for nothing): retrying, it waits for free resources like any job that does not rank."""
    nodes = {"n": Resources(cpus=2)}
    policy = make_policy("priority")
    healthy = _job(0, 2, 0.0, phase=Phase.RUNNING, placement=("n", "n"), started_s=0.0, priority=0)
    assert decide([healthy, _job(1, 1, 5.0, priority=3)], nodes, policy, now=20.0) == [Preempt(0, 1)]
    assert decide([healthy, _job(1, 1, 5.0, priority=3, retrying=True)], nodes, policy, now=20.0) == []
    idle = {"n": Resources(cpus=3)}  # free resources: it starts as any job
    assert decide([healthy, _job(1, 1, 5.0, priority=3, retrying=True)], idle, policy, now=20.0) == [Start(1, ("n",))]


def test_a_job_waits_for_a_stopping_job_instead_of_preempting_another():
    nodes = {"n": Resources(cpus=2)}
    policy = make_policy("las", thresholds=[10.0])
    stopping = _job(0, 1, 0.0, phase=Phase.STOPPING, placement=("n",), started_s=0.0, attained=50.0)
    running = _job(1, 1, 0.0, phase=Phase.RUNNING, placement=("n",), started_s=0.0, attained=50.0)
    new, newer = _job(2, 1, 5.0), _job(3, 1, 6.0)
    assert decide([stopping, running, new], nodes, policy, now=20.0) == []
    assert decide([stopping, running, new, newer], nodes, policy, now=20.0) == [Preempt(1, 3)]


def test_drf_serves_the_user_of_least_dominant_share_and_preempts_only_when_the_victims_stay_above():
    nodes = {"n": Resources(cpus=4, memory_mb=4000)}
    policy = make_policy("drf")
    hog = [_job(i, 1, 0.0, user="a", phase=Phase.RUNNING, placement=("n",), started_s=0.0) for i in range(4)]
    b1 = _job(10, 1, 1.0, user="b")
    a5 = _job(11, 1, 0.5, user="a")
    acts = decide([*hog, a5, b1], nodes, policy, now=5.0)
    assert len(acts) == 1 and acts[0].for_job == 10 and acts[0].job_id in range(4)  # b (share 0) first; a keeps 3/4 > b's 0
    b_run = [_job(20 + i, 1, 0.0, user="b", phase=Phase.RUNNING, placement=("n",), started_s=0.0) for i in range(2)]
    a_run = [_job(30 + i, 1, 0.0, user="a", phase=Phase.RUNNING, placement=("n",), started_s=0.0) for i in range(2)]
    assert decide([*a_run, *b_run, _job(40, 1, 1.0, user="b")], nodes, policy, now=5.0) == []  # a would keep 1/4, not above b's 1/2


def test_drf_weights_queues():
    nodes = {"n": Resources(cpus=4)}
    policy = make_policy("drf", weights={"gold": 3.0})
    running = [_job(0, 2, 0.0, queue="gold", phase=Phase.RUNNING, placement=("n", "n"), started_s=0.0),
               _job(1, 1, 0.0, queue="std", phase=Phase.RUNNING, placement=("n",), started_s=0.0)]
    gold, std = _job(2, 1, 2.0, queue="gold"), _job(3, 1, 1.0, queue="std")
    assert decide([*running, std, gold], nodes, policy, now=5.0) == [Start(2, ("n",))]  # 2/4 / 3 < 1/4


def test_unknown_policy_and_bad_options_are_named():
    import pytest

    from downpour.errors import ConfigError

    with pytest.raises(ConfigError, match="known: drf, fifo, las, priority"):
        make_policy("srtf")
    with pytest.raises(ConfigError, match="thresholds"):
        make_policy("las", thresholds=[10, 5])
    with pytest.raises(ConfigError, match="las policy"):
        make_policy("las", quantum=3)


def test_the_philly_trace_draws_the_published_run_times_per_width():
    """sim.philly_trace: widths 1/2/4/8 only; each bucket's run times follow PHILLY_RUN_MIN (its points
    exactly, its median within sampling error), cut at 10^4 minutes; the same seed, the same trace."""
    from downpour.scheduler.sim import PHILLY_RUN_MIN, philly_bucket, philly_run_s, philly_trace

    for bucket, width in (("1", 1), ("2-4", 4), ("5-8", 8)):
        for q, minutes in PHILLY_RUN_MIN[bucket]:
            assert philly_run_s(width, q) == pytest.approx(60.0 * minutes)
        assert philly_run_s(width, 0.0) == pytest.approx(6.0)
        assert philly_run_s(width, 0.9999) == pytest.approx(600_000.0)
    trace = philly_trace(2000, seed=1, load=2.0)
    assert trace == philly_trace(2000, seed=1, load=2.0)
    assert {len(j.tasks) for j in trace} == {1, 2, 4, 8}
    ones = sorted(j.duration_s for j in trace if philly_bucket(len(j.tasks)) == "1")
    median = dict(PHILLY_RUN_MIN["1"])[0.5] * 60.0
    assert 0.7 * median < ones[len(ones) // 2] < 1.4 * median
