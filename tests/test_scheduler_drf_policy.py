"""The ``drf`` policy as it runs (through ``decide``), against what it promises with whole jobs
(``downpour/scheduler/drf.py``): no livelock (within and across queues), sharing incentive up to one job per user,
envy-freeness up to one job; and where it stops: strategy-proofness with whole jobs. Each instance is one node, users
whose jobs are alike (a gang of identical tasks), settled round by round to a fixed point, a
preempted job stopping at once."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from downpour.scheduler import Job, Phase, Resources, Start, decide, make_policy
from downpour.scheduler.decide import SEARCHES
from downpour.scheduler.sim import TraceJob, simulate

EPS = 1e-9
NODE = "n"


@dataclass(frozen=True)
class User:
    name: str
    job: Resources     # one job's demand: ``width`` tasks of ``task``
    task: Resources
    width: int
    jobs: int
    weight: float
    queue: str = "default"

    @property
    def entity(self) -> str:
        return f"{self.queue}/{self.name}"


def settle(capacity: Resources, users: list[User], order: list[int], policy, max_rounds: int = 400) -> dict[str, int]:
    """Jobs submitted in ``order`` (indices into ``users``) on an empty node, rounds of ``decide`` until
    one has no action; the jobs each user then runs. Fails if a state comes back (a livelock)."""
    jobs = [Job(k, (users[u].task,) * users[u].width, float(k), user=users[u].name, queue=users[u].queue)
            for k, u in enumerate(order)]
    seen = set()
    for r in range(max_rounds):
        actions = decide(jobs, {NODE: capacity}, policy, now=10.0 + r)
        if not actions:
            break
        for a in actions:
            j = jobs[a.job_id]
            if isinstance(a, Start):
                assert j.phase is Phase.QUEUED
                j.phase, j.placement, j.started_s, j.claimed_s = Phase.RUNNING, a.placement, 10.0 + r, None
            else:
                assert j.phase is Phase.RUNNING
                j.phase, j.placement = Phase.QUEUED, None
                jobs[a.for_job].claimed_s = jobs[a.for_job].claimed_s or 10.0 + r
        state = tuple(j.phase for j in jobs)
        assert state not in seen, f"livelock: the state of round {r} came back"
        seen.add(state)
    else:
        raise AssertionError(f"no fixed point in {max_rounds} rounds")
    running = {u.name: 0 for u in users}
    for j in jobs:
        if j.phase is Phase.RUNNING:
            running[j.user] += 1
    return running


def jobs_in(bundle: Resources, job: Resources) -> float:
    """How many of ``job`` fit in ``bundle`` (Leontief: the scarcest resource decides; may be fractional)."""
    need = [(getattr(bundle, n), getattr(job, n)) for n in ("cpus", "gpus", "memory_mb")]
    return min((b / d for b, d in need if d > 0), default=float("inf"))


def scaled(r: Resources, k: float) -> tuple[float, float, float]:
    return (r.cpus * k, r.gpus * k, r.memory_mb * k)


capacities = st.builds(Resources, cpus=st.integers(3, 16), gpus=st.integers(0, 4), memory_mb=st.integers(3, 64))


def gang(draw, capacity: Resources, width: int) -> tuple[Resources, Resources]:
    """A task of ``width`` that fits ``capacity`` with a non-zero dominant share, and its job."""
    task = Resources(draw(st.integers(0, min(4, capacity.cpus // width))), draw(st.integers(0, capacity.gpus // width)),
                     draw(st.integers(0, min(16, capacity.memory_mb // width))))
    if task.dominant_share(capacity) == 0:
        task = Resources(task.cpus, task.gpus, 1)
    job = Resources(task.cpus * width, task.gpus * width, task.memory_mb * width)
    return task, job


@st.composite
def instances(draw, queues=("default",), weighted=True):
    capacity = draw(capacities)
    users = []
    for i in range(draw(st.integers(1, 5))):
        width = draw(st.integers(1, 3))
        task, job = gang(draw, capacity, width)
        weight = draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])) if weighted else 1.0
        users.append(User(f"u{i}", job, task, width, draw(st.integers(1, 8)), weight, draw(st.sampled_from(queues))))
    order = draw(st.permutations([u for u, user in enumerate(users) for _ in range(user.jobs)]))
    return capacity, users, list(order)


def drf(users: list[User], **options):
    return make_policy("drf", weights={u.entity: u.weight for u in users}, **options)


def share(user: User, running: int, capacity: Resources) -> float:
    """The user's weighted dominant share."""
    return running * user.job.dominant_share(capacity) / user.weight


def test_the_counterexample_settles_instead_of_taking_turns():
    """5 CPUs, 13 GB; a's jobs ⟨1 CPU, 1 GB⟩, b's ⟨0, 2 GB⟩. The policy this replaces let b stop two
    of a's jobs (each "allowed" alone), after which a was the less served and took them back, forever."""
    capacity = Resources(cpus=5, memory_mb=13)
    a = User("a", Resources(cpus=1, memory_mb=1), Resources(cpus=1, memory_mb=1), 1, 10, 1.0)
    b = User("b", Resources(memory_mb=2), Resources(memory_mb=2), 1, 10, 1.0)
    assert settle(capacity, [a, b], [0, 1] * 10, drf([a, b])) == {"a": 5, "b": 4}
    trace = [TraceJob(i, float(i), 1000.0, ((a, b)[i % 2].task,), user=("a", "b")[i % 2]) for i in range(20)]
    result = simulate(trace, {NODE: capacity}, drf([a, b]), stop_s=1.0, resume_s=1.0, tick_s=5.0)
    assert sum(j.preemptions for j in result.jobs) == 0


def test_a_waiting_user_takes_a_fair_share_back_even_when_its_job_needs_two_victims():
    """One resource, 10 units: b runs three jobs of 3; a's job of 5 stops two of them (b keeps 0.3 > a's 0)."""
    capacity = Resources(cpus=10)
    a = User("a", Resources(cpus=5), Resources(cpus=5), 1, 1, 1.0)
    b = User("b", Resources(cpus=3), Resources(cpus=3), 1, 3, 1.0)
    assert settle(capacity, [a, b], [1, 1, 1, 0], drf([a, b])) == {"a": 1, "b": 1}


@settings(max_examples=150, deadline=None)
@given(instances())
def test_no_livelock_among_the_users_of_a_queue(inst):
    capacity, users, order = inst
    settle(capacity, users, order, drf(users))


def test_across_queues_a_swaps_job_keeps_what_its_victims_free():
    """The cycle random tests found across queues, before claims: u1's job (q1) stopped u0's second
    job (q0); q1 then rose above q0 by another start, u0's job ranked first and took the CPU back
    before u1's job could start, u1's job preempted it again, and so on. Now u1's job claims what
    its victim frees, and the rounds reach a fixed point."""
    capacity = Resources(cpus=5, memory_mb=32)
    users = [User("u0", Resources(cpus=1, memory_mb=10), Resources(cpus=1, memory_mb=10), 1, 2, 0.5, "q0"),
             User("u1", Resources(cpus=4), Resources(cpus=2), 2, 1, 0.5, "q1"),
             User("u2", Resources(cpus=2, memory_mb=1), Resources(cpus=2, memory_mb=1), 1, 1, 0.5, "q1"),
             User("u3", Resources(memory_mb=4), Resources(memory_mb=4), 1, 3, 0.5, "q1")]
    assert settle(capacity, users, [0, 0, 1, 2, 3, 3, 3], drf(users)) == {"u0": 2, "u1": 0, "u2": 1, "u3": 2}


@settings(max_examples=300, deadline=None)
@given(instances(queues=("q0", "q1", "q2")))
def test_no_livelock_across_queues(inst):
    capacity, users, order = inst
    settle(capacity, users, order, drf(users))


@settings(max_examples=150, deadline=None)
@given(instances())
def test_sharing_incentive_up_to_one_job_per_user(inst):
    """A user with a job waiting holds W·s_u > 1 - Σσ: its weighted slice less one job of each user."""
    capacity, users, order = inst
    assume(len(users) <= SEARCHES)
    running = settle(capacity, users, order, drf(users))
    total_w = sum(u.weight for u in users)
    slack = sum(u.job.dominant_share(capacity) for u in users)
    for u in users:
        if running[u.name] < u.jobs:
            assert total_w * share(u, running[u.name], capacity) > 1 - slack - EPS


@settings(max_examples=150, deadline=None)
@given(instances())
def test_envy_freeness_up_to_one_job(inst):
    """A user with a job waiting would not run one more job with another's bundle less one job,
    scaled by min(1, w_u / w_v)."""
    capacity, users, order = inst
    assume(len(users) <= SEARCHES)
    running = settle(capacity, users, order, drf(users))
    for u in users:
        if running[u.name] == u.jobs:
            continue
        for v in users:
            if v is not u and running[v.name] > 1:
                k = min(1.0, u.weight / v.weight) * (running[v.name] - 1)
                bundle = scaled(v.job, k)
                need = (u.job.cpus, u.job.gpus, u.job.memory_mb)
                fit = min((b / d for b, d in zip(bundle, need, strict=True) if d > 0), default=float("inf"))
                assert fit < running[u.name] + 1 - EPS, (u, v, running)


def test_whole_jobs_are_not_strategy_proof_a_larger_demand_can_block_another_user():
    """The limit of the guarantees: 4 GPUs; a asks for one job of 3 GPUs, b for two of 1 GPU. Truthful,
    b runs one job and a its one; declaring 2 GPUs per job, b leaves too little for a's job and runs
    two (a's share, 0, is not strictly below b's after a swap, so a cannot take them back)."""
    capacity = Resources(gpus=4, cpus=1, memory_mb=1)
    a = User("a", Resources(gpus=3), Resources(gpus=1), 3, 1, 1.0)
    b = User("b", Resources(gpus=1), Resources(gpus=1), 1, 2, 1.0)
    b_lies = User("b", Resources(gpus=2), Resources(gpus=2), 1, 2, 1.0)
    assert settle(capacity, [a, b], [1, 0, 1], drf([a, b])) == {"a": 1, "b": 1}
    assert settle(capacity, [a, b_lies], [1, 0, 1], drf([a, b_lies])) == {"a": 0, "b": 2}


@st.composite
def alike_jobs(draw):
    """One queue, users of any weights whose jobs are all the same gang; one of them, the liar, may
    declare a larger task (every component at least the true one)."""
    capacity = draw(capacities)
    width = draw(st.integers(1, 3))
    task, job = gang(draw, capacity, width)
    users = [User(f"u{i}", job, task, width, draw(st.integers(1, 8)), draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])))
             for i in range(draw(st.integers(2, 5)))]
    order = draw(st.permutations([u for u, user in enumerate(users) for _ in range(user.jobs)]))
    liar = draw(st.integers(0, len(users) - 1))
    lie = Resources(draw(st.integers(task.cpus, max(task.cpus, capacity.cpus // width))),
                    draw(st.integers(task.gpus, max(task.gpus, capacity.gpus // width))),
                    draw(st.integers(task.memory_mb, max(task.memory_mb, capacity.memory_mb // width))))
    return capacity, users, list(order), liar, lie


@settings(max_examples=150, deadline=None)
@given(alike_jobs())
def test_strategy_proofness_when_every_job_is_alike(inst):
    """Where strategy-proofness holds with whole jobs (tested, not proved): every user's jobs are the
    same gang. Declaring larger tasks never runs more of the liar's jobs."""
    capacity, users, order, liar, lie = inst
    truthful = settle(capacity, users, order, drf(users))
    u = users[liar]
    declared = Resources(lie.cpus * u.width, lie.gpus * u.width, lie.memory_mb * u.width)
    lying = [*users[:liar], User(u.name, declared, lie, u.width, u.jobs, u.weight), *users[liar + 1:]]
    assert settle(capacity, lying, order, drf(lying))[u.name] <= truthful[u.name]
