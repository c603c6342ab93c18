"""The job's state as data (coordinator/model.py) and its generic persistence (coordinator/persist.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from downpour.coordinator.model import TIME, FailureRecord, JobState, Node, NodeState, Phase
from downpour.coordinator.persist import STATE_FILE, StateStore, adopt_state, export_state, open_store
from downpour.coordinator.state import CoordinatorState
from downpour.errors import ConfigError
from tests.test_coordinator_state import JOB, LAYOUT, NUM_TRAIN, Sim


def test_phases_and_node_states_are_strings_on_the_wire_and_in_json():
    assert json.dumps({"phase": Phase.TRAINING, "state": NodeState.DONE}) == '{"phase": "training", "state": "done"}'
    assert Phase.TRAINING == "training" and f"{NodeState.DEAD}" == "dead"


# What summary.json showed for each kind of failure before records were dataclasses (the same keys now).
_KEYS = {
    "worker": {"node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reason", "affected", "requeued", "replaced_by"},
    "server": {"node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reason", "affected", "restored_from",
               "version_at_failure", "replaced_by", "rolled_back_versions"},
    "evaluator": {"node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reason", "affected", "replaced_by"},
    "job": {"node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reason", "affected"},
    "coordinator": {"node", "kind", "at_s", "detected_after_s", "recovered_after_s", "reconnected_after_s", "affected",
                    "down_s", "reason"},
}


@pytest.mark.parametrize("scope", sorted(_KEYS))
def test_a_failure_record_shows_the_fields_of_its_scope(scope):
    record = FailureRecord("worker-1", "dead", 1.5, "silent", scope=scope)
    assert set(record.to_dict()) == _KEYS[scope]
    record.resharded_onto = "server-0"  # a server's rank taken over by a survivor: said only then
    assert set(record.to_dict()) == _KEYS[scope] | {"resharded_onto"}


def test_a_failure_record_refuses_an_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        FailureRecord("worker-1", "dead", 0.0, "x", scope="planet")


def test_the_summary_lists_failures_as_their_records_say():
    sim = Sim()
    sim.start()
    sim.tick(100.0)  # everyone silent: the first node declared dead fails the job (no checkpoint to restore a server)
    summary = sim.state.summary(100.0)
    assert summary["failures"] == [f.to_dict() for f in sim.state.failures] and summary["failures"]


def _every_field_changed(state: CoordinatorState) -> None:
    """Give every saved field of JobState a value unlike its default (so a field persist.py forgot shows)."""
    record = FailureRecord("worker-1", "dead", 2.0, "silent", scope="worker", requeued=[[0, 1, 2]])
    server = FailureRecord("server-1", "dead", 3.0, "silent", scope="server", restored_from="ckpt-1", version_at_failure=7)
    promoted = FailureRecord("server-0", "dead", 4.0, "silent", scope="server", rolled_back_versions=0, promoted_to="server-1",
                             promoted_after_s=0.25, failover_s=0.5, rereplicated_after_s=1.5)
    values = {
        "phase": Phase.EVALUATING, "train_started": 10.0, "train_ended": 20.0, "error": "e", "failed_node": "n",
        "stop_requested": 15.0, "final_asked": True, "leave_at": 9, "workerless_since": 12.0, "workerless_left": True, "step_offset": 4,
        "resume": {"step": 4, "name": "ckpt-0"}, "restore": {"url": "u", "name": "ckpt-0", "full": True},
        "evaluation": {"test_accuracy": 0.5, "test_loss": 1.0, "test_examples": 10}, "evaluator": "worker-0",
        "servers_gen": 2, "hosting": {1: "server-0"}, "rejected": {"invalid": 3}, "version_rate": 12.5, "restarts": 1,
        "nodes": {"worker-0": Node("worker-0", "worker", 0, b"\x01\x02", None, "h", 11, NodeState.DONE,
                                   progress={"steps": 3}, metrics="127.0.0.1:9", idle=True, heard=True)},
        "failures": [record, server, promoted], "recovering": [(11.0, record)], "server_slots": {1: (13.0, server)},
        "replica_plan": {0: ["h/12"], 1: ["h/11"]}, "replica_addresses": {0: "tcp://h:1", 1: "tcp://h:2"}, "replica_gen": 5,
    }
    names = {f.name for f in dataclasses.fields(JobState) if not f.metadata.get("transient")}
    assert set(values) == names, f"a new JobState field needs a value here: {names ^ set(values)}"
    for name, value in values.items():
        setattr(state, name, value)


def test_every_field_of_the_job_state_survives_a_restart(tmp_path):
    state = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 100.0)
    _every_field_changed(state)
    store = StateStore(str(tmp_path / STATE_FILE))
    store.save(export_state(state, 130.0), state.ledger.journal)
    store.close()
    again = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 500.0)
    _, parts = open_store(str(tmp_path), recover=True)
    adopt_state(again, parts, 530.0)
    shift = again.started - state.started  # times move with the new coordinator's clock (and the time it was down)
    for f in dataclasses.fields(JobState):
        if f.metadata.get("transient") or f.name in ("restarts", "failures", "recovering", "server_slots"):
            continue
        want, got = getattr(state, f.name), getattr(again, f.name)
        if f.metadata == TIME:
            assert got == pytest.approx(want + shift), f.name
        elif f.name == "nodes":
            assert {k: dataclasses.replace(n, last_seen=0.0) for k, n in got.items()} == want, f.name
        else:
            assert got == want and type(got) is type(want), f.name
    assert again.restarts == 2  # this restart counted
    assert again.failures[:3] == state.failures and again.failures[3].scope == "coordinator"
    assert again.recovering[0][1] is again.failures[0] and again.server_slots[1][1] is again.failures[1]
    assert again.recovering[0][0] == pytest.approx(11.0 + shift)
    assert again.by_identity == {b"\x01\x02": "worker-0"}


def test_a_saved_failure_record_that_is_not_one_is_refused(tmp_path):
    state = CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0)
    parts = export_state(state, 0.0)
    parts["failures"]["records"] = [{"node": "x", "bogus": 1}]
    with pytest.raises(ConfigError, match="corrupt"):
        adopt_state(CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0), {**parts, "journal": []}, 0.0)
    parts = export_state(state, 0.0)
    parts["job"]["phase"] = "dancing"
    with pytest.raises(ConfigError, match="corrupt"):
        adopt_state(CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0), {**parts, "journal": []}, 0.0)


def test_summary_json_is_strict_json_with_null_for_what_is_not_a_number(tmp_path):
    """(An online job whose events had no time wrote NaN, which strict JSON parsers refuse.)"""
    import json

    from downpour.coordinator.service import write_json

    path = str(tmp_path / "summary.json")
    write_json(path, {"online": {"event_to_push_s": {"p50": float("nan"), "p99": float("inf")}}, "n": [1.5, float("-inf")]})

    def refuse(name):
        raise ValueError(name)

    assert json.loads(open(path).read(), parse_constant=refuse) == {"online": {"event_to_push_s": {"p50": None, "p99": None}},
                                                                    "n": [1.5, None]}
