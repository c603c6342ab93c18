"""Consistency policies: async applies at once; sync waits for every member, then applies the weighted mean once."""

from __future__ import annotations

import pytest
import torch

from downpour.config import SGDConfig
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.server.consistency import POLICIES, AsyncPolicy, Push, SSPPolicy, SyncPolicy
from downpour.server.optim import make_rule
from downpour.server.store import ShardStore

LR = 0.5
ALL = [0, 1]


def versions(store: ShardStore) -> list[int]:
    """Each key's version, in key order."""
    return [store.version([i]) for i in range(len(store.keys))]


def new_store() -> ShardStore:
    layout = make_layout([("w", (2, 3)), ("b", (2,))], 1)  # two keys, 8 elements
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(SGDConfig(lr=LR), LR, n))
    store.write(ALL, torch.arange(store.numel, dtype=torch.float32))
    store.initialized = True
    return store


def push(who: str, grad: torch.Tensor, version: int = 0, weight: float = 1.0, idx=None, op: Op = Op.PUSHPULL, req_id: int = 1) -> Push:
    idx = ALL if idx is None else idx
    return Push(who.encode(), Message(op, req_id, {"keys": idx}), list(idx), grad, weight, version)


def grad(value: float, n: int = 8) -> torch.Tensor:
    return torch.full((n,), value)


@pytest.fixture
def staleness() -> list[int]:
    return []


def test_policies_are_registered_by_their_config_names():
    assert POLICIES == {"async": AsyncPolicy, "sync": SyncPolicy, "ssp": SSPPolicy}


# -- async ---------------------------------------------------------------------


def test_async_applies_each_push_at_once_and_answers_with_the_new_values(staleness):
    store = new_store()
    before = store.read(ALL)
    [(to, reply)] = AsyncPolicy(store, staleness.append).push(push("w0", grad(1.0), req_id=4))
    assert to == b"w0" and reply.op == Op.OK and reply.req_id == 4
    assert reply.meta == {"version": 1}
    torch.testing.assert_close(reply.tensors[0], before - LR)
    torch.testing.assert_close(store.read(ALL), before - LR)


def test_async_records_how_many_updates_a_push_missed(staleness):
    policy = AsyncPolicy(new_store(), staleness.append)
    for _ in range(3):
        policy.push(push("w0", grad(0.1), version=0))
    policy.push(push("w1", grad(0.1), version=3))
    assert staleness == [0, 1, 2, 0]


def test_a_push_of_a_version_past_the_servers_counts_as_not_stale(staleness):
    # A server restored from a checkpoint stands behind the versions its predecessor gave the workers:
    # their next pushes name versions it never had. Not a negative staleness (the summary's schema
    # refuses one, which ended such a server at the end of the job).
    policy = AsyncPolicy(new_store(), staleness.append)
    policy.push(push("w0", grad(1.0), version=0))
    policy.push(push("w1", grad(1.0), version=9))
    assert staleness == [0, 0]


def test_an_async_push_without_pull_answers_only_the_version(staleness):
    [(_, reply)] = AsyncPolicy(new_store(), staleness.append).push(push("w0", grad(1.0), op=Op.PUSH))
    assert reply.meta == {"version": 1} and reply.tensors == []


def test_async_accepts_a_push_for_some_keys_only(staleness):
    store = new_store()
    AsyncPolicy(store, staleness.append).push(push("w0", grad(1.0, 2), idx=[1]))
    assert versions(store) == [0, 1]


# -- sync ------------------------------------------------------------------------


def test_sync_waits_for_every_member_then_applies_the_weighted_mean_once(staleness):
    store = new_store()
    before = store.read(ALL)
    policy = SyncPolicy(store, staleness.append)
    assert policy.set_workers({"w0", "w1"}) == []
    assert policy.push(push("w0", grad(1.0), weight=1.0, req_id=10)) == []
    assert torch.equal(store.read(ALL), before) and versions(store) == [0, 0]
    replies = policy.push(push("w1", grad(5.0), weight=3.0, req_id=20))
    expected = before - LR * (1.0 * 1.0 + 3.0 * 5.0) / 4.0
    torch.testing.assert_close(store.read(ALL), expected)
    assert versions(store) == [1, 1]
    assert sorted((to, r.req_id) for to, r in replies) == [(b"w0", 10), (b"w1", 20)]
    for _, r in replies:
        assert r.op == Op.OK and r.meta == {"version": 1}
        torch.testing.assert_close(r.tensors[0], expected)
    assert staleness == [0, 0]


def test_sync_answers_a_plain_push_without_values(staleness):
    policy = SyncPolicy(new_store(), staleness.append)
    policy.set_workers({"w0", "w1"})
    policy.push(push("w0", grad(1.0), op=Op.PUSH))
    replies = dict(policy.push(push("w1", grad(1.0))))
    assert replies[b"w0"].tensors == [] and len(replies[b"w1"].tensors) == 1


def test_sync_starts_the_next_round_after_one_completes(staleness):
    store = new_store()
    policy = SyncPolicy(store, staleness.append)
    policy.set_workers({"w0"})
    assert len(policy.push(push("w0", grad(1.0), version=0))) == 1
    assert len(policy.push(push("w0", grad(1.0), version=1))) == 1
    assert versions(store) == [2, 2]


def error_code(replies) -> str:
    [(_, reply)] = replies
    assert reply.op == Op.ERROR
    return reply.meta["code"]


def test_sync_rejects_a_second_push_from_the_same_worker_in_one_round(staleness):
    store = new_store()
    policy = SyncPolicy(store, staleness.append)
    policy.set_workers({"w0", "w1"})
    policy.push(push("w0", grad(1.0)))
    assert error_code(policy.push(push("w0", grad(100.0)))) == "sync_duplicate"
    policy.push(push("w1", grad(1.0)))
    torch.testing.assert_close(store.read(ALL), torch.arange(8.0) - LR)  # the duplicate never counted


@pytest.mark.parametrize("version", [1, 7])
def test_sync_rejects_a_push_for_another_round(staleness, version):
    policy = SyncPolicy(new_store(), staleness.append)
    policy.set_workers({"w0"})
    assert error_code(policy.push(push("w0", grad(1.0), version=version))) == "sync_round"
    assert policy.waiting == {}


def test_sync_rejects_a_push_for_only_some_keys(staleness):
    policy = SyncPolicy(new_store(), staleness.append)
    policy.set_workers({"w0"})
    assert error_code(policy.push(push("w0", grad(1.0, 2), idx=[1]))) == "sync_partial"
    assert policy.waiting == {}


def test_shrinking_the_membership_completes_a_round_that_waited_only_for_the_departed(staleness):
    store = new_store()
    policy = SyncPolicy(store, staleness.append)
    policy.set_workers({"w0", "w1", "w2"})
    assert policy.push(push("w0", grad(1.0))) == []
    assert policy.push(push("w1", grad(3.0))) == []
    replies = policy.set_workers({"w0", "w1"})
    assert sorted(to for to, _ in replies) == [b"w0", b"w1"]
    torch.testing.assert_close(store.read(ALL), torch.arange(8.0) - LR * 2.0)


def test_shrinking_the_membership_does_not_complete_a_round_still_missing_a_member(staleness):
    policy = SyncPolicy(new_store(), staleness.append)
    policy.set_workers({"w0", "w1", "w2"})
    policy.push(push("w0", grad(1.0)))
    assert policy.set_workers({"w0", "w1"}) == []


def test_without_a_membership_a_round_never_completes(staleness):
    store = new_store()
    policy = SyncPolicy(store, staleness.append)
    assert policy.push(push("w0", grad(1.0))) == []
    assert policy.push(push("w1", grad(1.0))) == []
    assert versions(store) == [0, 0]
    assert len(policy.set_workers({"w0", "w1"})) == 2  # once the coordinator names the members, it does


def test_a_graceful_stop_ends_the_sync_rounds_so_none_completes_without_the_worker_that_left(staleness):
    """A worker that heard of the stop late pushes a round the others left before: completing it
    with its gradient alone (the coordinator drops those that left from the membership) would
    train differently from an uninterrupted run. Frozen, its push is refused, not applied."""
    store = new_store()
    policy = SyncPolicy(store, staleness.append)
    policy.set_workers({"w0", "w1"})
    assert policy.push(push("w1", grad(1.0))) == []  # w0 left after the previous round
    assert error_code(policy.freeze()) == "stopping"
    assert policy.waiting == {}
    assert policy.set_workers({"w1"}) == []
    assert error_code(policy.push(push("w1", grad(1.0)))) == "stopping"
    assert versions(store) == [0, 0]
    torch.testing.assert_close(store.read(ALL), torch.arange(8.0))


def test_freezing_the_rounds_does_nothing_to_async_and_ssp(staleness):
    for cls in (AsyncPolicy, SSPPolicy):
        assert cls(new_store(), staleness.append).freeze() == []
