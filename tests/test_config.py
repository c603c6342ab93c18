"""Job configuration: the example loads, --set overrides apply, and every error names its field."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from downpour.config import apply_overrides, job_to_dict, load_job, parse_job
from downpour.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist.yaml"
MINIMAL = {"model": {"name": "mlp"}}


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job(raw)
    return str(info.value)


def with_section(section: str, **values) -> dict:
    return {**MINIMAL, section: values}


# -- loading -----------------------------------------------------------------------


def test_the_example_job_file_loads():
    job = load_job(EXAMPLE)
    assert job.name == "mnist"
    assert job.model.name == "mlp" and job.model.args["hidden"] == [128]
    assert job.optimizer.name == "sgd" and job.optimizer.lr == 0.01 and job.optimizer.momentum == 0.9
    assert job.training.consistency == "async" and job.training.batch_size == 32
    assert job.cluster.num_servers == 2 and job.cluster.num_workers == 3


def test_a_minimal_job_gets_the_documented_defaults():
    job = parse_job(MINIMAL)
    assert job.optimizer.name == "sgd" and job.training.consistency == "async" and job.training.epochs == 1
    assert job.data.name == "idx" and job.cluster.partitioner == "bytes"


def test_a_job_survives_job_to_dict_and_parse_job():
    job = load_job(EXAMPLE, ["optimizer={name: adam, lr: 0.002}", "consistency=sync"])
    assert parse_job(job_to_dict(job)) == job


def test_a_job_is_frozen():
    job = parse_job(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        job.training.epochs = 5


@pytest.mark.parametrize(("scale", "lr"), [(False, 0.01), (True, 0.03)])
def test_the_effective_lr_follows_the_linear_scaling_rule_only_when_asked(scale, lr):
    job = load_job(EXAMPLE, [f"optimizer.scale_lr_with_workers={str(scale).lower()}", "optimizer.scaling=none"])
    assert job.effective_lr() == pytest.approx(lr)


# -- overrides ------------------------------------------------------------------------


def test_a_bare_training_key_is_a_shortcut_for_its_training_field():
    assert apply_overrides(MINIMAL, ["epochs=3"])["training"] == {"epochs": 3}
    assert load_job(EXAMPLE, ["epochs=3"]).training.epochs == 3


def test_nested_overrides_reach_into_sections_and_create_missing_ones():
    raw = apply_overrides(MINIMAL, ["cluster.num_servers=4", "model.args.hidden=[64, 32]", "optimizer.lr=0.5", "name=run-7"])
    assert raw["cluster"] == {"num_servers": 4}
    assert raw["model"] == {"name": "mlp", "args": {"hidden": [64, 32]}}
    assert raw["optimizer"] == {"lr": 0.5} and raw["name"] == "run-7"


def test_override_values_are_parsed_as_yaml_scalars():
    raw = apply_overrides({}, ["a=true", "b=0.1", "c=hello", "d=null", "e='3'"])
    assert raw == {"a": True, "b": 0.1, "c": "hello", "d": None, "e": "3"}


def test_null_sets_an_optional_field_to_null_and_restores_the_default_of_any_other():
    base = load_job(EXAMPLE)
    job = load_job(EXAMPLE, ["optimizer.momentum=null", "epochs=5", "epochs=null", "training.clip_grad_norm=1.0",
                             "training.clip_grad_norm=null", "cluster.num_workers=null", "checkpoint.every_s=null"])
    assert base.optimizer.momentum == 0.9 and job.optimizer.momentum == 0.0  # SGD's default, not the file's
    assert job.optimizer.lr == base.optimizer.lr and job.optimizer.name == "sgd"
    assert job.training.epochs == type(job.training)().epochs
    assert job.training.clip_grad_norm is None and job.checkpoint.every_s is None  # optional: null is its value
    assert job.cluster.num_workers == type(job.cluster)().num_workers
    with pytest.raises(ConfigError, match="model"):  # a required field has no default to restore
        load_job(EXAMPLE, ["model=null"])


def test_overrides_apply_in_order_and_leave_the_input_untouched():
    raw = {"model": {"name": "mlp", "args": {"hidden": [8]}}}
    out = apply_overrides(raw, ["model.args.hidden=[16]", "model.args.hidden=[32]"])
    assert out["model"]["args"]["hidden"] == [32]
    assert raw == {"model": {"name": "mlp", "args": {"hidden": [8]}}}


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ConfigError, match="training.epochs"):
        load_job(EXAMPLE, ["epochs=0"])


@pytest.mark.parametrize(
    ("item", "match"),
    [("epochs", "key=value"), ("=3", "key=value"), ("...=3", "key=value"), ("epochs=[1", "cannot parse"),
     ("training.epochs.deep=1", "'epochs' is not a section")],
)
def test_a_malformed_override_is_a_config_error(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"training": {"epochs": 1}}, [item])


# -- validation errors ---------------------------------------------------------------------


def test_an_unknown_top_level_field_is_named():
    msg = config_error({**MINIMAL, "bananas": 3})
    assert "bananas" in msg and "unknown field" in msg


def test_an_unknown_field_in_a_section_is_named_with_its_path():
    assert "cluster.num_severs: unknown field" in config_error(with_section("cluster", num_severs=2))


def test_an_unknown_consistency_lists_the_allowed_values():
    msg = config_error(with_section("training", consistency="banana"))
    assert "training.consistency" in msg and "'async'" in msg and "'sync'" in msg and "banana" in msg


def test_an_unknown_optimizer_lists_the_known_ones():
    msg = config_error(with_section("optimizer", name="rmsprop"))
    assert "optimizer" in msg and "rmsprop" in msg
    assert all(name in msg for name in ("'sgd'", "'adagrad'", "'adam'"))


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_a_negative_learning_rate_is_refused_for_every_optimizer(name):
    msg = config_error(with_section("optimizer", name=name, lr=-0.1))
    assert "lr" in msg and "-0.1" in msg


@pytest.mark.parametrize("field", ["num_workers", "num_servers"])
def test_a_cluster_without_nodes_is_refused(field):
    msg = config_error(with_section("cluster", **{field: 0}))
    assert f"cluster.{field}" in msg and "greater than or equal to 1" in msg


def test_a_model_with_both_a_name_and_a_factory_is_refused():
    msg = config_error({"model": {"name": "mlp", "factory": "pkg.mod:fn"}})
    assert "model" in msg and "exactly one" in msg


def test_a_model_with_neither_a_name_nor_a_factory_is_refused():
    assert "exactly one" in config_error({"model": {}})


def test_a_missing_model_is_named():
    assert "model: Field required" in config_error({})


def test_nesterov_without_momentum_is_refused():
    assert "nesterov" in config_error(with_section("optimizer", name="sgd", nesterov=True))
    assert parse_job(with_section("optimizer", name="sgd", nesterov=True, momentum=0.9)).optimizer.nesterov


def test_adam_betas_outside_zero_to_one_are_refused():
    assert "betas" in config_error(with_section("optimizer", name="adam", betas=[0.9, 1.0]))


def test_a_heartbeat_timeout_not_above_its_interval_is_refused():
    assert "heartbeat_timeout_s" in config_error(with_section("cluster", heartbeat_interval_s=2.0, heartbeat_timeout_s=1.0))


@pytest.mark.parametrize("raw", [[1, 2], "job", None, 3], ids=repr)
def test_a_job_that_is_not_a_mapping_is_refused(raw):
    assert "expected a mapping" in config_error(raw)


# -- job files -----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_a_job_file_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_job(write(tmp_path, "- model\n- data\n"))


def test_a_job_file_that_is_not_yaml_is_refused_naming_the_file(tmp_path):
    path = write(tmp_path, "model: {name: mlp\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    # PyYAML keeps the last one silently: a section written twice would lose the first's settings.
    path = write(tmp_path, "model: {name: mlp}\ntraining: {epochs: 3}\ntraining: {batch_size: 8}\n")
    with pytest.raises(ConfigError, match="found the key 'training' twice"):
        load_job(path)
    with pytest.raises(ConfigError, match="found the key 'lr' twice"):
        load_job(write(tmp_path, "model: {name: mlp}\noptimizer: {name: sgd, lr: 0.1, lr: 0.2}\n"))


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_no_setting_is_infinite_or_nan(value):
    with pytest.raises(ConfigError, match="optimizer.lr: Input should be a finite number"):
        parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": float(value.lstrip("."))}})
    with pytest.raises(ConfigError, match="checkpoint.every_s: Input should be a finite number"):
        parse_job({"model": {"name": "mlp"}, "checkpoint": {"every_s": float(value.lstrip("."))}})


def test_an_empty_job_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is empty"):
        load_job(write(tmp_path, "# nothing here\n"))


def test_a_missing_job_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read job file") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_errors_from_a_job_file_name_the_file_and_the_field(tmp_path):
    path = write(tmp_path, "model: {name: mlp}\ntraining: {consistency: banana}\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(path) in str(info.value) and "training.consistency" in str(info.value)


def test_an_optimizer_section_without_a_name_means_sgd_or_says_which_names_are_allowed():
    try:
        job = parse_job({**MINIMAL, "optimizer": {"lr": 0.5}})
    except ConfigError as err:
        assert "optimizer.name" in str(err) and "'sgd'" in str(err)
    else:
        assert job.optimizer.name == "sgd" and job.optimizer.lr == 0.5


def test_a_misspelt_optimizer_is_named_unknown_rather_than_its_fields():
    with pytest.raises(ConfigError) as info:
        parse_job({**MINIMAL, "optimizer": {"name": "adamm", "lr": 0.01, "momentum": 0.9}})
    text = str(info.value)
    assert "optimizer: unknown 'adamm'" in text and "'adamw'" in text
    assert "unknown field" not in text and "registered" not in text and "Value error" not in text


def test_another_rules_field_says_what_the_rule_takes_and_how_to_switch():
    with pytest.raises(ConfigError, match=r"optimizer.momentum: unknown field for optimizer adam \(it takes .*betas.*optimizer=\{name"):
        parse_job({**MINIMAL, "optimizer": {"name": "adam", "lr": 0.001, "momentum": 0.9}})
    # The same for a sparse table's row optimizer, in the section that named it (the job's, or one table's).
    with pytest.raises(ConfigError, match=r"  sparse.optimizer.lr: unknown field for optimizer ftrl \(it takes name, alpha.*"
                                          r"--set 'sparse.optimizer=\{name: ftrl, ...\}'\) \(got 0.05\)"):
        parse_job({**MINIMAL, "sparse": {"optimizer": {"name": "ftrl", "lr": 0.05}}})
    with pytest.raises(ConfigError, match=r"  sparse.tables.wide.optimizer.lr: unknown field for optimizer ftrl .*"
                                          r"--set 'sparse.tables.wide.optimizer=\{name: ftrl"):
        parse_job({**MINIMAL, "sparse": {"tables": {"wide": {"optimizer": {"name": "ftrl", "lr": 0.05}}}}})
