"""Consistency per parameter group: each key follows its group's policy, and a request gets one reply."""

from __future__ import annotations

import pytest
import torch

from downpour.compress import decode_pull, pull_codec
from downpour.config import SGDConfig, TrainingConfig, parse_job
from downpour.errors import ConfigError
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.server.consistency import Push
from downpour.server.grouped import GroupedPolicy, key_modes
from downpour.server.optim import make_rule
from downpour.server.store import ShardStore
from tests.cluster import QUIET, run_train
from tests.conftest import tiny_job

LR = 0.5
# Keys in store order: w (6 elements), b (2 elements), v (3 elements), all on server 0.
LAYOUT = make_layout([("w", (2, 3)), ("b", (2,)), ("v", (3,))], 1)
TRAINING = TrainingConfig(consistency="async", consistency_groups=[{"params": ["w"], "consistency": "sync"}])
ALL = [0, 1, 2]


def new_policy(training: TrainingConfig = TRAINING) -> tuple[GroupedPolicy, ShardStore, list[int]]:
    store = ShardStore(LAYOUT.server_slices(0), lambda n: make_rule(SGDConfig(lr=LR), LR, n))
    store.write(ALL, torch.arange(store.numel, dtype=torch.float32))
    store.initialized = True
    seen: list[int] = []
    return GroupedPolicy(store, seen.append, training, key_modes(training, LAYOUT, 0)), store, seen


def push(who: str, grad: torch.Tensor, kv: list[int], req_id: int = 1, op: Op = Op.PUSHPULL, pull=None) -> Push:
    return Push(who.encode(), Message(op, req_id, {"keys": ALL}), list(ALL), grad, 1.0, max(kv), pull, key_versions=kv)


def test_each_key_follows_the_first_group_matching_its_parameter_and_the_job_default_otherwise():
    training = TrainingConfig(consistency="ssp", consistency_groups=[
        {"params": ["w", "b"], "consistency": "sync"}, {"params": ["b", "v"], "consistency": "async"}])
    assert key_modes(training, LAYOUT, 0) == ["sync", "sync", "async"]
    assert key_modes(TrainingConfig(consistency="ssp"), LAYOUT, 0) == ["ssp", "ssp", "ssp"]


def test_async_keys_change_at_once_while_sync_keys_wait_for_the_round_and_one_reply_comes_when_both_are_done():
    policy, store, _ = new_policy()
    policy.set_workers({"w0", "w1"})
    before = store.read(ALL)
    assert policy.push(push("w0", torch.ones(11), [0, 0, 0], req_id=7)) == []  # the sync part waits for w1
    now = store.read(ALL)
    torch.testing.assert_close(now[:6], before[:6])  # w: sync, unchanged
    torch.testing.assert_close(now[6:], before[6:] - LR)  # b, v: async, applied
    replies = policy.push(push("w1", torch.full((11,), 3.0), [0, 1, 1], req_id=9))
    assert sorted((to, m.req_id) for to, m in replies) == [(b"w0", 7), (b"w1", 9)]
    after = store.read(ALL)
    torch.testing.assert_close(after[:6], before[:6] - LR * 2.0)  # the mean of 1 and 3, once
    torch.testing.assert_close(after[6:], before[6:] - LR * 4.0)  # 1 then 3
    got = {to: reply for to, reply in replies}
    assert all(reply.op == Op.OK for reply in got.values())
    # Each key carries its own version: the sync round, and the async count when that part was answered
    # (w0's async part was answered at once, before w1's push).
    assert got[b"w0"].meta["kv"] == [1, 1, 1] and got[b"w1"].meta["kv"] == [1, 2, 2]
    torch.testing.assert_close(got[b"w1"].tensors[0], after)  # values in request order
    torch.testing.assert_close(got[b"w0"].tensors[0], torch.cat([after[:6], before[6:] - LR]))


def test_a_push_whose_sync_part_is_refused_changes_nothing_at_all():
    policy, store, seen = new_policy()
    policy.set_workers({"w0", "w1"})
    before = store.read(ALL)
    [(to, reply)] = policy.push(push("w0", torch.ones(11), [5, 0, 0]))  # a sync round the server is not at
    assert to == b"w0" and reply.op == Op.ERROR and reply.meta["code"] == "sync_round"
    torch.testing.assert_close(store.read(ALL), before)
    assert seen == [] and policy.pending == {}


def test_a_round_waiting_only_for_a_departed_worker_completes_and_answers_whole_requests():
    policy, store, _ = new_policy()
    policy.set_workers({"w0", "w1"})
    assert policy.push(push("w0", torch.ones(11), [0, 0, 0], req_id=3)) == []
    [(to, reply)] = policy.set_workers({"w0"})
    assert (to, reply.req_id, reply.op) == (b"w0", 3, Op.OK)
    assert reply.meta["kv"] == [1, 1, 1]


def test_the_merged_reply_is_encoded_with_the_pull_codec_the_request_asked_for():
    policy, store, _ = new_policy()
    policy.set_workers({"w0"})
    [(_, reply)] = policy.push(push("w0", torch.ones(11), [0, 0, 0], pull=pull_codec(["int8", 4])))
    assert "enc" in reply.meta and reply.meta["kv"] == [1, 1, 1]
    values = decode_pull(reply.meta["enc"], reply.tensors, 11)
    torch.testing.assert_close(values, store.read(ALL), atol=0.1, rtol=0)


def test_an_unknown_group_consistency_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="consistency_groups"):
        parse_job({"model": {"name": "mlp"}, "training": {"consistency_groups": [{"params": ["*"], "consistency": "bsp"}]}})


def test_a_job_with_sync_dense_and_async_output_layers_trains(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"steps": 20, "consistency_groups": [{"params": ["0.*"], "consistency": "sync"}]},
                   monitor=QUIET, checkpoint={"enabled": False})
    s = run_train(tmp_path, job)
    assert s["status"] == "ok" and s["steps"] == 2 * 20
    # Half of the pushes' keys are sync (staleness 0), the rest async: both policies ran.
    assert s["staleness"]["pushes"] > 0
    assert s["test_accuracy"] > 0.3
