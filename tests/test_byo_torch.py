"""Bring your own PyTorch: torch Datasets through a DataLoader, custom loss and metrics, clipping,
AdamW, buffers in model.pt, non-float32 parameters and autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downpour.api import check_data, resolve_job
from downpour.config import parse_job
from downpour.coordinator.shards import shard_size_for
from downpour.data import build_dataset
from downpour.data.loader import Batches
from downpour.errors import ConfigError, DataError
from tests.byo_factories import bn_cnn, collate_scaled, image_splits
from tests.conftest import FAST_CLUSTER, write_idx

QUIET = {"metrics": False, "dashboard": False, "tensorboard": False}


def byo_job(**sections) -> dict:
    job = {
        "name": "byo",
        "model": {"factory": "tests.byo_factories:bn_cnn"},
        "data": {"factory": "tests.byo_factories:image_splits",
                 "loader": {"num_workers": 2, "collate_fn": "tests.byo_factories:collate_scaled", "prefetch_factor": 2}},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "training": {"consistency": "sync", "epochs": 2, "batch_size": 32, "seed": 0, "loss": "tests.byo_factories:smoothed_ce",
                     "metrics": {"top2": "tests.byo_factories:top2_accuracy"}, "clip_grad_norm": 5.0},
        "cluster": {"num_servers": 1, "num_workers": 2, **FAST_CLUSTER},
        "monitor": QUIET,
        "checkpoint": {"enabled": False},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


def test_a_factory_of_torch_datasets_is_accepted_in_every_shape():
    for factory in ("tests.byo_factories:image_splits", "tests.byo_factories:only_train"):
        ds = build_dataset(parse_job(byo_job(data={"factory": factory})).data)
        assert len(ds.train) > 0
    assert build_dataset(parse_job(byo_job(data={"factory": "tests.byo_factories:only_train"})).data).test is None


def test_a_factory_returning_the_wrong_type_names_itself():
    with pytest.raises(DataError, match="data.factory tests.byo_factories:not_a_dataset returned list"):
        build_dataset(parse_job(byo_job(data={"factory": "tests.byo_factories:not_a_dataset"})).data)


def test_an_iterable_training_set_is_refused_because_exactly_once_could_not_hold():
    with pytest.raises(DataError, match="IterableDataset.*exactly-once"):
        build_dataset(parse_job(byo_job(data={"factory": "tests.byo_factories:stream_data"})).data)


@pytest.mark.parametrize("field,value,needle", [
    ("loss", "tests.byo_factories:no_such_loss", "training.loss"),
    ("loss", "mse", "training.loss"),
    ("metrics", {"f1": "nowhere.at_all:f1"}, "training.metrics.f1"),
])
def test_a_bad_import_path_is_refused_before_anything_starts(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        check_data(resolve_job(byo_job(training={field: value})))


def test_a_bad_collate_path_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="data.loader.collate_fn"):
        check_data(resolve_job(byo_job(data={"loader": {"collate_fn": "tests.byo_factories:nope"}})))


def test_the_loader_draws_exactly_the_shards_indices_in_order_with_two_loader_processes():
    train, _ = image_splits(200, 50)
    job = parse_job(byo_job())
    batches = Batches(train, 32, job.data.loader)
    order = torch.randperm(200).numpy()[:70]
    got = list(batches(order))
    assert [len(y) for _, y in got] == [32, 32, 6]
    assert torch.equal(torch.cat([y for _, y in got]), train.y[order])
    assert torch.allclose(got[0][0], collate_scaled([train[int(i)] for i in order[:32]])[0])
    again = torch.cat([y for _, y in batches(order[::-1].copy())])  # the next shard: same loader, new indices
    assert torch.equal(again, train.y[order[::-1].copy()])


def test_the_default_shard_size_gives_every_worker_several_shards_and_an_explicit_one_wins():
    assert shard_size_for(None, 1400, 2, 32) == 175  # 8 shards: 4 per worker
    assert shard_size_for(None, 60000, 3, 32) == 2048
    assert shard_size_for(None, 50, 4, 32) == 32  # never less than a batch
    assert shard_size_for(None, 60000, 3, 4096) == 4096  # a batch above the cap: one batch a shard, not a cut batch
    assert shard_size_for(500, 1400, 2, 32) == 500


def test_adamw_on_the_servers_matches_torch_optim_adamw():
    from downpour.config import AdamWConfig
    from downpour.server.optim import make_rule

    torch.manual_seed(0)
    cfg = AdamWConfig(name="adamw", lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-7)
    p0 = torch.randn(1000)
    ours = p0.clone()
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-7)
    rule = make_rule(cfg, cfg.lr, 1000)
    for step in range(50):
        g = torch.randn(1000)
        rule.apply(ours, g, 0, 1000, step)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(ours, ref.detach(), atol=1e-6, rtol=0)


def test_a_registered_rule_is_selectable_by_name_with_its_module():
    job = parse_job({**byo_job(), "optimizer": {"name": "signsgd", "module": "tests.byo_rules", "lr": 0.1, "args": {"scale": 2.0}}})
    from downpour.server.optim import make_rule

    rule = make_rule(job.optimizer, 0.1, 3)
    p = torch.zeros(3)
    rule.apply(p, torch.tensor([1.0, -2.0, 0.0]), 0, 3, 0)
    assert torch.equal(p, torch.tensor([-0.2, 0.2, 0.0]))
    with pytest.raises(ConfigError, match="unknown 'nosuchrule'"):
        parse_job({**byo_job(), "optimizer": {"name": "nosuchrule", "lr": 0.1}})


def test_a_bf16_model_trains_through_a_float32_flat_vector():
    from downpour.layout import Layout  # noqa: F401
    from downpour.models import param_shapes

    model = bn_cnn().to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert param_shapes(model)  # accepted: the servers keep float32 masters


def test_a_loss_that_is_not_a_scalar_is_a_clear_error():
    from downpour.extensions import checked_loss

    out, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    from tests.byo_factories import per_example_loss, smoothed_ce

    assert checked_loss("tests.byo_factories:smoothed_ce", smoothed_ce(out, y)).dim() == 0
    with pytest.raises(ConfigError, match=r"training.loss 'tests.byo_factories:per_example_loss' must return a scalar.*\(4,\)"):
        checked_loss("tests.byo_factories:per_example_loss", per_example_loss(out, y))
    with pytest.raises(ConfigError, match=r"got a torch.int64 tensor of shape \(\)"):  # a scalar, but not a float
        checked_loss("an integer loss", torch.tensor(3))


def _evaluate(model, test, batch_size=1000):
    model.eval()
    xs = collate_scaled([test[i] for i in range(len(test))])
    with torch.no_grad():
        out = torch.cat([model(xs[0][b : b + batch_size]) for b in range(0, len(test), batch_size)])
    return float((out.argmax(1) == xs[1]).float().mean())


@pytest.mark.slow
def test_a_batchnorm_dropout_model_through_a_dataloader_loads_strictly_from_model_pt_and_evaluates_as_reported(tmp_path):
    from downpour.launch import LocalLauncher

    result = LocalLauncher(resolve_job(byo_job()), str(tmp_path / "run")).run()
    s = result.summary
    assert s["status"] == "ok", s.get("error")
    assert s["test_accuracy"] > 0.6 and 0.0 < s["test_metrics"]["top2"] <= 1.0
    assert s["test_metrics"]["top2"] >= s["test_accuracy"]
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    model = bn_cnn()
    model.load_state_dict(state, strict=True)
    bn = model[1]
    assert bn.num_batches_tracked > 0 and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    _, test = image_splits()
    assert _evaluate(model, test) == pytest.approx(s["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_a_model_that_returns_a_dict_trains_with_a_loss_that_takes_it_apart(tmp_path):
    # The output goes to the loss as it is; the test loss is reported, accuracy and tensor metrics
    # are not (they would need a tensor), and say why.
    from downpour.launch import LocalLauncher

    job = byo_job(model={"factory": "tests.byo_factories:dict_out"},
                  training={"loss": "tests.byo_factories:dict_loss", "consistency": "async", "epochs": 1})
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok", s.get("error")
    assert s["test_accuracy"] is None and 0.0 < s["test_loss"] < 2.3  # below chance's log(10)
    assert "is a dict, not a tensor" in s["test_metric_errors"]["top2"]


def test_tied_parameters_are_no_buffers_and_model_pt_holds_every_name_with_the_servers_values(tmp_path):
    # b.weight is a.weight: the servers keep it once (a.weight); the workers' copies of it must not be
    # merged as a buffer (a strict load would then put the workers' average over the trained value).
    from downpour.coordinator.saving import write_model
    from downpour.layout import make_layout
    from downpour.models import param_shapes
    from downpour.models.buffers import aliases, model_buffers
    from tests.byo_factories import tied

    model = tied()
    shapes = param_shapes(model)
    trained = {name for name, _ in shapes}
    assert "b.weight" not in trained and aliases(model, trained) == {"b.weight": "a.weight"}
    assert set(model_buffers(model, trained)) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    layout = make_layout(shapes, 1)
    flat = torch.arange(float(layout.numel))
    path = str(tmp_path / "model.pt")
    write_model(path, layout, flat, model_buffers(model, trained), aliases(model, trained))
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["a.weight"], state["b.weight"])
    fresh = tied()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.b.weight.detach(), state["a.weight"])


def test_buffers_merge_by_policy_and_their_names_pass_the_worker_done_schema():
    from downpour.models.buffers import merge, pack, unpack
    from downpour.protocol import Op
    from downpour.protocol.ops import validate

    t = parse_job(byo_job(training={"buffers": "average", "buffer_policies": {"*.num_batches_tracked": "evaluator"}})).training
    a = {"1.running_mean": torch.tensor([0.0, 2.0]), "1.num_batches_tracked": torch.tensor(7)}
    b = {"1.running_mean": torch.tensor([3.0, 2.0]), "1.num_batches_tracked": torch.tensor(9)}
    merged = merge([(100.0, a), (200.0, b)], a, t)
    assert torch.allclose(merged["1.running_mean"], torch.tensor([2.0, 2.0]))  # examples-weighted
    assert int(merged["1.num_batches_tracked"]) == 7  # the evaluator's, by its pattern
    names, tensors = pack(merged)
    assert unpack(names, tensors).keys() == merged.keys()
    validate(Op.WORKER_DONE, {"node": "worker-0", "stats": {"steps": 3}, "buffers": [f"m.{i}.running_var" for i in range(3000)]})


def test_an_empty_training_split_is_a_clear_error_before_anything_starts(tmp_path):
    with pytest.raises(DataError, match="data.factory tests.byo_factories:image_splits: the training split holds no examples"):
        check_data(resolve_job(byo_job(data={"factory": "tests.byo_factories:image_splits", "args": {"train": 0}})))
    for name, array in [("train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8)), ("train-labels-idx1-ubyte", np.zeros(0, np.uint8)),
                        ("t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8)), ("t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))]:
        write_idx(str(tmp_path / name), array)  # valid IDX files; the training ones hold 0 items
    with pytest.raises(DataError, match=f"data idx at {tmp_path}: the training split holds no examples"):
        check_data(resolve_job({"model": {"name": "mlp", "args": {"hidden": [8]}}, "data": {"path": str(tmp_path)}}))


def test_storage_or_a_data_factory_failing_before_the_start_is_a_one_line_data_error(monkeypatch, tmp_path):
    """An S3 endpoint down or wrong credentials surface as the back end's own exception types
    (botocore's EndpointConnectionError is no OSError): said in one line, not as three tracebacks."""
    import downpour.api as api

    class EndpointConnectionError(Exception):
        pass

    def down(_):
        raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9/ctr-data"\nmore')

    monkeypatch.setattr(api, "build_dataset", down)
    with pytest.raises(DataError, match=r"^data: cannot read s3://ctr-data/criteo: EndpointConnectionError: Could not connect to "
                                        r"the endpoint URL: \"http://127.0.0.1:9/ctr-data\"$"):
        check_data(resolve_job({"model": {"name": "mlp", "args": {"hidden": [8]}}, "data": {"path": "s3://ctr-data/criteo"}}))
    monkeypatch.setattr(api, "build_dataset", lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(DataError, match=r"^data: loading it with tests.byo_factories:image_splits failed: RuntimeError: boom$"):
        check_data(resolve_job(byo_job(data={"factory": "tests.byo_factories:image_splits"})))


def test_a_model_factory_that_does_not_import_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="model.factory"):
        check_data(resolve_job(byo_job(model={"factory": "tests.byo_factories:no_such_model"})))


def test_the_python_api_takes_callables_for_every_field_that_takes_an_import_path():
    from downpour.api import resolve_job
    from tests import byo_factories as f

    job = resolve_job({"model": {"factory": f.bn_cnn}, "data": {"factory": f.image_splits, "loader": {"collate_fn": f.collate_scaled}},
                       "training": {"loss": f.smoothed_ce, "metrics": {"top2": f.top2_accuracy}}})
    assert job.model.factory == "tests.byo_factories:bn_cnn" and job.data.factory == "tests.byo_factories:image_splits"
    assert job.data.loader.collate_fn == "tests.byo_factories:collate_scaled"
    assert job.training.loss == "tests.byo_factories:smoothed_ce" and job.training.metrics == {"top2": "tests.byo_factories:top2_accuracy"}
    with pytest.raises(ConfigError, match="training.loss: .* cannot be found by other processes"):
        resolve_job({"training": {"loss": lambda out, y: out.sum()}})


@pytest.mark.parametrize("model, says", [
    ({"name": "mlpp"}, "model.name: unknown model 'mlpp'; known: "),
    ({"name": "mlp", "args": {"hiden": [3]}}, r"model.args: .*'hiden' \(mlp takes input_shape, hidden, dropout"),
    ({"factory": "tests.byo_factories:bn_cnn", "args": {"depth": 3}}, r"model.args: .*'depth' \(tests.byo_factories:bn_cnn takes width\)"),
])
def test_an_unknown_model_or_argument_is_refused_before_anything_starts(model, says):
    from downpour.extensions import check_extensions

    with pytest.raises(ConfigError, match=says):
        check_extensions(parse_job({"model": model}))


def test_an_embedding_that_makes_sparse_gradients_is_refused_naming_it():
    from torch import nn

    from downpour.models import param_shapes

    model = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ConfigError, match=r"module 0 \(Embedding\(sparse=True\)\) makes sparse gradients.*sparse=False"):
        param_shapes(model)
    frozen = nn.EmbeddingBag(50, 4, sparse=True)
    frozen.weight.requires_grad_(False)  # not trained: no gradient at all
    assert param_shapes(nn.Sequential(frozen, nn.Linear(4, 2))) == [("1.weight", (2, 4)), ("1.bias", (2,))]
    assert len(param_shapes(nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(16, 2)))) == 3


def test_an_empty_test_split_is_warned_about_when_the_data_set_is_built(caplog):
    with caplog.at_level("WARNING", logger="downpour.data.dataset"):
        ds = build_dataset(parse_job(byo_job(data={"factory": "tests.byo_factories:empty_test"})).data)
    assert len(ds.test) == 0 and "the test split holds no examples: the job reports no test figures" in caplog.text


def test_a_buffer_no_message_can_carry_is_refused_before_anything_starts_naming_it():
    """Before: a complex buffer trained to the end, then every worker failed to report its buffers."""
    with pytest.raises(ConfigError, match=r"model: buffer 'phase' is complex64, which the workers cannot send"):
        check_data(parse_job(byo_job(model={"factory": "tests.byo_factories:flagged", "args": {"complex_state": True}})))
    check_data(parse_job(byo_job(model={"factory": "tests.byo_factories:flagged"})))  # a bool buffer can be sent


@pytest.mark.slow
def test_a_bool_buffer_is_a_bool_in_model_pt(tmp_path):
    """(It travels as uint8; before, model.pt held it so.)"""
    from downpour.launch import LocalLauncher

    job = byo_job(model={"factory": "tests.byo_factories:flagged"}, training={"epochs": 1, "metrics": {}})
    s = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run().summary
    assert s["status"] == "ok", s.get("error")
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["mask"].dtype == torch.bool and bool(state["mask"].all())


def test_a_model_factory_that_raises_is_refused_before_anything_starts_with_its_error():
    with pytest.raises(ConfigError, match="model: building it failed: ValueError: no such width"):
        check_data(parse_job(byo_job(model={"factory": "tests.byo_factories:raising_model"})))
