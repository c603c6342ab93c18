"""Resuming and warm-starting (coordinator/restore.py): the checks made before a job resumes or
warm-starts, and the coordinator's checkpoint names after a resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from downpour.config import parse_job
from downpour.coordinator.checkpointing import JOB_STATE
from downpour.coordinator.restore import plan_resume, plan_warm_start
from downpour.coordinator.shards import ShardLedger
from downpour.coordinator.state import CoordinatorState, Reply
from downpour.errors import ConfigError, DataError
from downpour.layout import Layout, make_layout
from downpour.models import mlp, param_shapes
from downpour.protocol import Message, Op
from downpour.server.snapshot import OldParams, restore_store
from downpour.server.store import ShardStore
from downpour.storage import CheckpointStore, Manifest
from tests.checkpoint_helpers import (
    alter,
    by_param,
    commit_checkpoint,
    commit_reports,
    gather,
    handed,
    initialised,
    overwrite,
    read_raw,
    snapshot,
    stores_for,
    train,
)

# -- resuming and warm-starting --------------------------------------------------------------


def mlp_layout(hidden: list[int], num_servers: int = 2) -> Layout:
    shapes = param_shapes(mlp(input_shape=[4], hidden=hidden, dropout=0.0, num_classes=3))
    return make_layout(shapes, num_servers, "f32", "bytes", 16)


def write_job_checkpoint(url: str, layout: Layout, step: int = 42) -> tuple[Manifest, dict, list[ShardStore]]:
    """What a job leaves: each server's file, then job.json, then the manifest."""
    stores = initialised(layout)
    train(stores, 3)
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "worker-0")
    ledger_state = ledger.state_at({"worker-0": [*a, 2]})
    name = CheckpointStore.name_for(step)
    reports = snapshot(stores, url, name, {"worker-0": [*a, 2]})
    job = {"layout": layout.to_dict(), "ledger": ledger_state, "step": step, "examples": 12}
    _, manifest = commit_reports(url, name, reports, step, {JOB_STATE: json.dumps(job).encode()})
    return manifest, ledger_state, stores


def test_the_same_model_resumes_with_the_ledger_step_and_a_full_restore_order(url):
    layout = mlp_layout([3])
    manifest, ledger_state, stores = write_job_checkpoint(url, layout)
    plan_ = plan_resume(url, layout)
    assert plan_["step"] == 42 and plan_["examples"] == 12 and plan_["ledger"] == ledger_state
    assert plan_["name"] == CheckpointStore(url).where(manifest.name)
    assert plan_["restore"] == {"url": url, "name": manifest.name, "layout": layout.to_dict(), "full": True}
    # what each server does with the order
    order = plan_["restore"]
    store = CheckpointStore(order["url"])
    old = OldParams(store, store.manifest(order["name"]), Layout.from_dict(order["layout"]))
    fresh = stores_for(layout)
    for st in fresh:
        restore_store(st, layout, old, order["full"])
    assert torch.equal(gather(fresh, layout), gather(stores, layout))


def test_the_same_model_on_another_number_of_servers_resumes(url):
    write_job_checkpoint(url, mlp_layout([3]))
    assert plan_resume(url, mlp_layout([3], num_servers=3))["restore"]["full"] is True


def test_a_run_folder_resumes_from_its_checkpoints_folder(tmp_path):
    run = tmp_path / "run"
    layout = mlp_layout([3])
    manifest, _, _ = write_job_checkpoint(str(run / "checkpoints"), layout)
    plan_ = plan_resume(str(run), layout)
    assert plan_["restore"]["url"] == str(run / "checkpoints") and plan_["restore"]["name"] == manifest.name


def test_resume_takes_the_newest_checkpoint_that_verifies(url):
    layout = mlp_layout([3])
    older, _, _ = write_job_checkpoint(url, layout, step=10)
    newer, _, _ = write_job_checkpoint(url, layout, step=20)
    assert plan_resume(url, layout)["step"] == 20
    where = CheckpointStore(url).where(newer.name, "server-1.safetensors")
    overwrite(where, alter(read_raw(where)))
    assert plan_resume(url, layout)["step"] == 10


def test_a_model_of_another_hidden_size_is_refused_by_resume(url):
    write_job_checkpoint(url, mlp_layout([3]))
    with pytest.raises(ConfigError, match=r"model differs.*1\.weight \[3, 4\] -> \[5, 4\].*init_from warm-starts"):
        plan_resume(url, mlp_layout([5]))


def test_a_warm_start_names_every_parameter_whose_shape_changed(url):
    write_job_checkpoint(url, mlp_layout([3]))
    with pytest.raises(ConfigError, match="parameters changed shape") as err:
        plan_warm_start(url, mlp_layout([5]))
    message = str(err.value)
    for changed in ("1.weight: [3, 4] in the checkpoint, [5, 4] now", "1.bias: [3] in the checkpoint, [5] now",
                    "3.weight: [3, 3] in the checkpoint, [3, 5] now"):
        assert changed in message
    assert "3.bias" not in message  # unchanged


def test_a_model_with_an_extra_layer_warm_starts_and_its_new_parameters_are_listed_as_new(url, caplog):
    old_layout, grown = mlp_layout([3]), mlp_layout([3, 3])  # 1.*, 3.* as before; 5.weight, 5.bias new
    manifest, _, stores = write_job_checkpoint(url, old_layout)
    with pytest.raises(ConfigError, match="5.weight new; 5.bias new"):
        plan_resume(url, grown)
    with caplog.at_level(logging.INFO, logger="downpour.coordinator.restore"):
        order = plan_warm_start(url, grown)
    assert order == {"url": url, "name": manifest.name, "layout": old_layout.to_dict(), "full": False}
    assert any("4 parameters taken, 2 new ones initialised (5.weight, 5.bias)" in r.getMessage() for r in caplog.records)
    store = CheckpointStore(url)
    old = OldParams(store, store.manifest(order["name"]), Layout.from_dict(order["layout"]))
    fresh = stores_for(grown)
    for st in fresh:
        restore_store(st, grown, old, order["full"])
    got, want = by_param(gather(fresh, grown), grown), by_param(gather(stores, old_layout), old_layout)
    assert all(torch.equal(got[n], want[n]) for n in want)
    uninitialised = {grown.describe(grown.slices[k]).split("[")[0] for st in fresh for k, ok in zip(st.keys, st.key_initialized) if not ok}
    assert uninitialised == {"5.weight", "5.bias"}


def test_resume_without_a_complete_checkpoint_says_so(url):
    layout = mlp_layout([3])
    with pytest.raises(DataError, match="no complete checkpoint under"):
        plan_resume(url, layout)
    CheckpointStore(url).write_file(CheckpointStore.name_for(5), JOB_STATE, b"{}")  # never committed
    with pytest.raises(DataError, match="no complete checkpoint under"):
        plan_warm_start(url, layout)


def test_a_job_state_without_a_layout_is_refused_naming_the_file(url):
    store = CheckpointStore(url)
    commit_checkpoint(store, 3, {JOB_STATE: b'{"ledger": {}}'})
    with pytest.raises(DataError, match=r"job\.json: not a valid job state"):
        plan_resume(url, mlp_layout([3]))


@pytest.mark.parametrize("layout", [{"params": 5}, {"params": [["w", [2], 0, 3]], "slices": [], "num_servers": 1, "dtype": "f32"}],
                         ids=["not a layout", "a layout that contradicts itself"])
def test_a_job_state_with_a_malformed_layout_is_refused_naming_the_file(url, layout):
    commit_checkpoint(CheckpointStore(url), 3, {JOB_STATE: json.dumps({"ledger": {}, "layout": layout}).encode()})
    with pytest.raises(DataError, match=r"job\.json: not a valid job state"):
        plan_resume(url, mlp_layout([3]))


# -- the coordinator after a resume ------------------------------------------------------------


def test_checkpoints_taken_after_a_resume_sort_after_the_one_resumed_from():
    """Checkpoints are ordered by name, and named by the job's step: a resumed job's step must go on
    from the checkpoint's, or its new checkpoints sort before the old one (latest() keeps returning
    the old one, and keep=K prunes the new ones first)."""
    job = parse_job({"model": {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}},
                     "data": {"shard_size": 4}, "training": {"epochs": 2},
                     "cluster": {"num_servers": 2, "num_workers": 2},
                     "checkpoint": {"every_steps": 10, "every_s": None}})
    layout = make_layout(param_shapes(mlp(input_shape=[4], hidden=[3], num_classes=2)), 2)
    old = CheckpointStore.name_for(500)
    resume = {"name": f"memory://r/{old}", "ledger": ShardLedger(10, 4, 2, job.training.seed).state_at({}), "step": 500,
              "examples": 2000, "restore": {"url": "memory://r", "name": old, "layout": layout.to_dict(), "full": True}}
    state = CoordinatorState(job, layout, 10, 0.0, "memory://r", resume)
    req = iter(range(1, 1000))

    def send(who: str, op: Op, **meta) -> list:
        if op != Op.REGISTER:
            meta.setdefault("node", who)
        return state.handle(who.encode(), Message(op, next(req), meta), 1.0)

    for rank in range(2):
        send(f"server-{rank}", Op.REGISTER, role="server", rank=rank, address=f"tcp://127.0.0.1:{7000 + rank}", host="t", pid=1)
    for rank in range(2):
        send(f"worker-{rank}", Op.REGISTER, role="worker", rank=rank, address=None, host="t", pid=1)
    for rank in range(2):
        send(f"worker-{rank}", Op.BARRIER, name="init")
        send(f"worker-{rank}", Op.HEARTBEAT, progress={"steps": 6, "examples": 24})  # 12 steps since the resume
    asked = [a.msg.meta["name"] for a in state.tick(1.5) if isinstance(a, Reply) and a.msg.op == Op.CHECKPOINT]
    assert len(asked) == 2 and state.checkpoints.pending is not None
    assert state.checkpoints.pending.step >= 500 and asked[0] > old, (
        f"after resuming from {old}, the next checkpoint is {asked[0]} (step {state.checkpoints.pending.step})")


def test_a_warm_start_from_another_models_checkpoint_that_shares_no_parameter_is_refused(url):
    """Nothing would be taken: the job would train from scratch while the user believes it warm-started."""
    write_job_checkpoint(url, mlp_layout([3]))
    other = make_layout([("embedding.weight", (50, 4)), ("head.weight", (1, 4)), ("head.bias", (1,))], 2, "f32", "bytes", 16)
    with pytest.raises(ConfigError, match=r"shares no parameter with this model: it holds 1\.weight, 1\.bias, .*"
                                          r"the model has embedding\.weight, head\.weight, head\.bias"):
        plan_warm_start(url, other)
    with pytest.raises(ConfigError, match=r"another model's checkpoint, sharing no parameter with this one"):
        plan_resume(url, other, "adagrad")  # (not "trained with optimizer 'sgd'": that is not what is wrong)


def test_a_resume_that_asks_for_another_shard_size_is_told_the_checkpoints_is_kept(url, caplog):
    from downpour.api import check_restore_points
    from downpour.config import parse_job

    write_job_checkpoint(url, mlp_layout([3]))  # its ledger's shards: 4 examples each
    model = {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 3, "dropout": 0.0}}
    with caplog.at_level(logging.INFO):
        check_restore_points(parse_job({"model": model, "data": {"shard_size": 8}, "checkpoint": {"resume_from": url}}))
    assert "data.shard_size 8 is not used: a resumed job keeps its checkpoint's shards (4 examples each)" in caplog.text
    assert "resuming from" not in caplog.text  # (the check before the start says nothing of a resume it may refuse)
