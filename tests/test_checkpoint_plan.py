"""The coordinator's checkpoint plan (coordinator/checkpointing.py): when a checkpoint is due, how
reports complete or expire it, names and the summary."""

from __future__ import annotations

from downpour.config import CheckpointConfig
from downpour.coordinator.checkpointing import CheckpointPlan
from downpour.storage import CheckpointStore

# -- the coordinator's checkpoint plan -------------------------------------------------------


def plan(now: float = 0.0, url: str | None = "memory://plan", num_servers: int = 2, **cfg) -> CheckpointPlan:
    """A plan of periodic checkpoints (the one at step 0 only where a test asks for it)."""
    cfg.setdefault("at_start", False)
    return CheckpointPlan(CheckpointConfig(**cfg), url, sync=False, num_servers=num_servers, now=now)


def test_the_first_checkpoint_is_due_as_soon_as_training_starts_then_periodic_ones():
    p = plan(now=10.0, every_s=60.0, at_start=True)
    assert p.due(10.0, 0)  # step 0, before any period passed
    p.begin(10.0, 0, None)
    complete(p, 11.0)
    assert not p.due(69.9, 5) and p.due(70.0, 5)
    assert not plan(at_start=True, enabled=False).due(0.0, 0)
    assert not plan(at_start=True, url=None).due(0.0, 0)


def report(name: str, **extra) -> dict:
    return {"name": name, "file": "server-x.safetensors", "sha256": "0" * 64, "bytes": 1, "version": 1, "write_s": 0.1, **extra}


def complete(p: CheckpointPlan, now: float, write_s: float = 1.0) -> None:
    name = p.pending.name
    verdicts = [p.on_report(f"server-{i}", report(name)) for i in range(p.num_servers)]
    assert verdicts[-1] == "complete"
    p.committed_now(now, write_s)


def test_no_periodic_checkpoint_repeats_the_last_one_where_nothing_was_pushed_since():
    """Workers gone (and waited for), or stalled: each period wrote the same state again (119
    checkpoints at one step in a sweep)."""
    p = plan(every_s=1.0)
    p.begin(0.0, 10, None)
    complete(p, 0.5)
    assert not p.due(100.0, 10)
    assert p.due(100.0, 11)


def test_a_checkpoint_is_due_every_so_many_steps():
    p = plan(every_steps=100, every_s=None)
    assert not p.due(1e6, 99)  # time alone does not count
    assert p.due(1.0, 100)
    p.begin(1.0, 100, None)
    assert not p.due(2.0, 10_000)  # not while one is pending
    complete(p, 3.0)
    assert not p.due(4.0, 199) and p.due(4.0, 200)


def test_a_checkpoint_is_due_every_so_many_seconds_on_the_coordinators_clock():
    p = plan(now=10.0, every_s=60.0)
    assert not p.due(69.9, 10**9)
    assert p.due(70.0, 0)
    p.begin(70.0, 5, None)
    complete(p, 75.0)
    assert not p.due(129.9, 0) and p.due(130.0, 0)


def test_a_checkpoint_is_never_due_when_disabled_without_a_url_or_without_a_schedule():
    assert not plan(enabled=False, every_steps=1, every_s=1.0).due(1e6, 10**9)
    no_url = plan(url=None, every_steps=1, every_s=1.0)
    assert not no_url.enabled and not no_url.due(1e6, 10**9) and no_url.summary()["enabled"] is False
    assert not plan(every_steps=None, every_s=None).due(1e6, 10**9)


def test_checkpoint_names_sort_by_step_and_never_collide():
    p = plan(every_steps=1)
    first = p.begin(0.0, 7, None).name
    second = p.begin(0.0, 7, None).name  # replaces the first, at the same step
    assert first != second and p.pending.name == second
    assert first.startswith(CheckpointStore.name_for(7)) and sorted([second, first]) == [first, second]
    assert p.begin(0.0, 12, None).name > second


def test_reports_are_judged_against_the_pending_checkpoint():
    p = plan(num_servers=3)
    assert p.on_report("server-0", report("ckpt-none")) == "stale"  # nothing pending
    name = p.begin(0.0, 1, 5).name
    assert p.on_report("server-0", report("ckpt-older")) == "stale"
    assert p.on_report("server-0", {"name": name, "missed": True, "version": 9}) == "missed"
    assert p.on_report("server-0", {"name": name, "error": "OSError: disk full"}) == "failed"
    assert p.on_report("server-0", report(name)) == "wait"
    assert p.on_report("server-0", report(name)) == "wait"  # the same server twice is still one server
    assert p.on_report("server-2", report(name)) == "wait"
    assert p.on_report("server-1", report(name)) == "complete"
    assert set(p.pending.reports) == {"server-0", "server-1", "server-2"}


def test_a_checkpoint_not_complete_in_time_expires_and_is_abandoned():
    p = plan(timeout_s=30.0)
    assert not p.expired(1e6)  # nothing pending
    name = p.begin(10.0, 1, None).name
    p.on_report("server-0", report(name))
    assert not p.expired(40.0) and p.expired(40.01)
    p.abandon(40.01, "not complete after 30s")
    assert p.pending is None and p.on_report("server-1", report(name)) == "stale"
    assert p.summary()["abandoned"] == 1 and p.summary()["count"] == 0


def test_the_summary_counts_checkpoints_and_their_mean_write_time():
    p = plan(url="memory://run", every_steps=10)
    assert p.summary() == {"enabled": True, "url": "memory://run", "count": 0, "last_step": None, "last": None,
                           "mean_write_s": None, "abandoned": 0, "replaced": 0}
    p.begin(0.0, 10, None)
    complete(p, 1.0, write_s=2.0)
    p.begin(2.0, 20, None)
    p.abandon(3.0, "a server failed")
    last = p.begin(4.0, 30, None, final=True).name
    complete(p, 5.0, write_s=4.0)
    s = p.summary()
    assert (s["count"], s["last_step"], s["last"], s["mean_write_s"], s["abandoned"]) == (2, 30, last, 3.0, 1)
    assert p.committed[-1]["final"] is True
    p.begin(6.0, 40, None)
    newer = p.begin(7.0, 50, None).name  # (the one begun at step 40 never completed: replaced, not lost)
    assert p.summary()["replaced"] == 1 and newer.endswith("-0005")  # 2 committed + 1 abandoned + 1 replaced + this one
