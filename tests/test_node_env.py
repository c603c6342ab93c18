"""`downpour node`: every setting from the environment, and the cluster from TF_CONFIG."""

from __future__ import annotations

import json

import pytest

from downpour.cli.node import from_tf_config, node_settings
from downpour.errors import ConfigError

# The seed's TF1 example: 2 parameter servers and 3 workers (worker 0 is the chief).
TF1 = {"ps": ["ps0.example:2222", "ps1.example:2222"], "worker": ["w0.example:2222", "w1.example:2223", "w2.example:2222"]}


def tf(cluster: dict, kind: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})


def test_a_ps_entry_is_a_server_of_that_rank_listening_on_its_port_and_advertising_its_host():
    s = from_tf_config(tf(TF1, "ps", 1))
    assert (s.role, s.rank, s.host, s.port, s.advertise) == ("server", 1, "0.0.0.0", 2222, "ps1.example")
    assert s.coordinator == "tcp://w0.example:2222" and not s.also_coordinator


def test_without_a_chief_worker_0_runs_the_coordinator_on_its_port_with_the_clusters_size():
    s = from_tf_config(tf(TF1, "worker", 0))
    assert s.role == "worker" and s.also_coordinator and s.bind == "tcp://0.0.0.0:2222"
    assert s.overrides == ["cluster.num_servers=2", "cluster.num_workers=3"]
    other = from_tf_config(tf(TF1, "worker", 2))
    assert not other.also_coordinator and other.rank == 2 and other.port is None


@pytest.mark.parametrize("chief", ["chief", "master"])
def test_a_chief_is_the_coordinator(chief):
    cluster = {**TF1, chief: ["c.example:3000"]}
    s = from_tf_config(tf(cluster, chief, 0))
    assert s.role == "coordinator" and s.bind == "tcp://0.0.0.0:3000" and s.advertise == "c.example"
    assert s.overrides == ["cluster.num_servers=2", "cluster.num_workers=3"]
    assert from_tf_config(tf(cluster, "worker", 0)).coordinator == "tcp://c.example:3000"
    assert not from_tf_config(tf(cluster, "worker", 0)).also_coordinator


def test_explicit_downpour_variables_win_over_tf_config():
    env = {"TF_CONFIG": tf(TF1, "ps", 0), "DOWNPOUR_HOST": "127.0.0.1", "DOWNPOUR_PORT": "9000", "DOWNPOUR_ADVERTISE": "10.0.0.5",
           "DOWNPOUR_RANK": "1", "DOWNPOUR_KEYS": "/keys"}
    s = node_settings(env)
    assert (s.host, s.port, s.advertise, s.rank, s.keys) == ("127.0.0.1", 9000, "10.0.0.5", 1, "/keys")


def test_every_flag_has_its_variable():
    s = node_settings({"DOWNPOUR_ROLE": "coordinator", "DOWNPOUR_JOB": "job.yaml", "DOWNPOUR_RUN_DIR": "/run", "DOWNPOUR_RECOVER": "1",
                       "DOWNPOUR_PORT": "7071", "DOWNPOUR_ADVERTISE": "a.example", "DOWNPOUR_METRICS_HOST": "0.0.0.0",
                       "DOWNPOUR_INSECURE": "1"})
    assert (s.run_dir, s.recover, s.bind, s.advertise, s.metrics_host, s.insecure) == (
        "/run", True, "tcp://127.0.0.1:7071", "a.example", "0.0.0.0", True)


@pytest.mark.parametrize(("env", "match"), [
    ({}, "DOWNPOUR_ROLE must be"),
    ({"DOWNPOUR_ROLE": "ps"}, "DOWNPOUR_ROLE must be"),
    ({"DOWNPOUR_ROLE": "worker"}, "DOWNPOUR_COORDINATOR"),
    ({"DOWNPOUR_ROLE": "coordinator"}, "DOWNPOUR_JOB"),
    ({"DOWNPOUR_ROLE": "server", "DOWNPOUR_COORDINATOR": "a:1", "DOWNPOUR_PORT": "70000"}, "DOWNPOUR_PORT"),
    ({"TF_CONFIG": "{not json"}, "not valid JSON"),
    ({"TF_CONFIG": tf({"worker": ["a:1"]}, "worker", 0)}, "cluster.ps"),
    ({"TF_CONFIG": tf(TF1, "evaluator", 0)}, "task.type 'evaluator'"),
    ({"TF_CONFIG": tf(TF1, "ps", 2)}, r"task.index 2 is not an entry of cluster.ps"),
    ({"TF_CONFIG": tf({**TF1, "ps": ["nohost"]}, "ps", 0)}, r"cluster.ps\[0\] must be HOST:PORT"),
    ({"TF_CONFIG": tf(TF1, "ps", 0), "DOWNPOUR_ROLE": "worker"}, "TF_CONFIG's task is a server"),
    ({"DOWNPOUR_ROLE": "worker", "DOWNPOUR_COORDINATOR": "a:1", "DOWNPOUR_INSECURE": "sure"}, "DOWNPOUR_INSECURE must be 1 or 0"),
])
def test_bad_settings_are_config_errors_naming_the_variable(env, match):
    with pytest.raises(ConfigError, match=match):
        node_settings(env)


def test_a_yes_or_no_variable_takes_the_usual_spellings():
    for yes in ("1", "true", "YES", "on"):
        assert node_settings({"DOWNPOUR_ROLE": "worker", "DOWNPOUR_COORDINATOR": "a:1", "DOWNPOUR_INSECURE": yes}).insecure
    for no in ("", "0", "false", "No", "off"):
        assert not node_settings({"DOWNPOUR_ROLE": "worker", "DOWNPOUR_COORDINATOR": "a:1", "DOWNPOUR_INSECURE": no}).insecure


def test_a_malformed_number_in_the_environment_or_a_port_out_of_range_is_a_one_line_refusal(monkeypatch, capsys):
    """Exit 2 (refused before it started), as multi-host.md says; a traceback's exit 1 reads as a
    failure a replacement may mend, and a restart policy would loop on it."""
    from downpour.cli.main import main

    monkeypatch.setenv("DOWNPOUR_ROLE", "worker")
    monkeypatch.setenv("DOWNPOUR_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("DOWNPOUR_RANK", "abc")
    assert main(["node"]) == 2
    assert "DOWNPOUR_RANK must be an integer, got 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("DOWNPOUR_RANK")
    with pytest.raises(SystemExit) as refused:
        main(["serve", "/nonexistent", "--port", "99999"])
    assert refused.value.code == 2 and "99999 is not a port number" in capsys.readouterr().err
