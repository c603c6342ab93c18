"""Monitoring building blocks: histograms, metric families, rates, history, diagnosis, the HTTP endpoint."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from downpour.coordinator.health import Health
from downpour.coordinator.history import History
from downpour.monitor import Buckets, HttpEndpoint, RateMeter, metrics_route, node_labels


def parse(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_buckets_are_cumulative_and_count_every_observation():
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        b.observe(v)
    assert b.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert b.sum == pytest.approx(3.65)


def test_buckets_take_a_table_of_counts():
    b = Buckets((0, 1, 4))
    b.observe_counts({0: 5, 1: 2, 3: 1, 9: 1})
    assert b.cumulative() == [("0.0", 5.0), ("1.0", 7.0), ("4.0", 8.0), ("+Inf", 9.0)]
    assert b.sum == 2 + 3 + 9


def test_a_metrics_route_speaks_prometheus_text_with_the_node_labels():
    b = Buckets()
    b.observe(0.002)

    def fill(f):
        f.counter("downpour_test_requests_total", "Requests.", 7)
        f.gauge("downpour_test_loss", "Loss.", 0.5)
        f.gauge("downpour_test_missing", "Absent value.", None)
        f.histogram("downpour_test_seconds", "Times.", b, op="PUSH")

    ctype, body = metrics_route(fill, node_labels("j", "worker", 1, "worker-1"))()
    assert ctype.startswith("text/plain")
    fams = parse(body)
    assert fams["downpour_test_requests"].type == "counter"
    [sample] = fams["downpour_test_requests"].samples
    assert sample.name == "downpour_test_requests_total" and sample.value == 7
    assert sample.labels == {"job": "j", "role": "worker", "rank": "1", "node": "worker-1"}
    assert fams["downpour_test_missing"].samples == []
    hist = {s.name: s for s in fams["downpour_test_seconds"].samples if not s.name.endswith("_bucket")}
    assert hist["downpour_test_seconds_count"].value == 1 and hist["downpour_test_seconds_count"].labels["op"] == "PUSH"


def test_a_rate_meter_measures_over_whole_windows():
    m = RateMeter(window_s=2.0)
    assert m.update(0, now=10.0) == 0.0
    assert m.update(100, now=11.0) == 0.0  # window not over yet
    assert m.update(300, now=12.0) == pytest.approx(150.0)
    assert m.update(900, now=15.0) == pytest.approx(200.0)


# -- history ----------------------------------------------------------------
def _status(nodes: list[dict], loss: float | None = None) -> dict:
    return {"nodes": nodes, "loss": loss}


def _worker(name: str, examples: int, loss: float | None = None) -> dict:
    return {"name": name, "role": "worker", "progress": {"examples": examples, "bytes_sent": 10 * examples, "loss": loss}}


def test_history_turns_counters_into_rates_aligned_on_time():
    h = History()
    h.sample(0.0, _status([_worker("worker-0", 0)]))
    h.sample(2.0, _status([_worker("worker-0", 1000, 0.9), _worker("worker-1", 0)], loss=0.9))
    h.sample(3.0, _status([_worker("worker-0", 1500, 0.8), _worker("worker-1", 300)], loss=0.7))
    d = h.to_dict()
    assert d["t"] == [0.0, 2.0, 3.0]
    assert d["series"]["worker-0"]["examples_per_s"] == [None, 500.0, 500.0]
    assert d["series"]["worker-0"]["bytes_sent_per_s"] == [None, 5000.0, 5000.0]
    assert d["series"]["worker-1"]["examples_per_s"] == [None, None, 300.0]  # joined late: padded
    assert d["series"]["job"]["examples_per_s"] == [0.0, 500.0, 800.0]
    assert d["series"]["job"]["loss"] == [None, 0.9, 0.7]


def test_history_keeps_only_its_capacity():
    h = History(capacity=3)
    for i in range(5):
        h.sample(float(i), _status([_worker("worker-0", 100 * i)]))
    d = h.to_dict()
    assert d["t"] == [2.0, 3.0, 4.0]
    assert all(len(v) == 3 for series in d["series"].values() for v in series.values())


# -- diagnosis ----------------------------------------------------------------
@dataclass
class FakeNode:
    name: str
    role: str
    state: str = "alive"
    last_seen: float = 0.0
    progress: dict[str, Any] = field(default_factory=dict)


def _affected(name: str) -> dict[str, list[str]]:
    return {"keys": ["0.weight[0:100]"]} if name.startswith("server") else {"shards": [f"epoch 0 shard {name[-1]}"]}


def test_a_node_without_heartbeats_is_reported_silent_with_what_it_holds(caplog):
    caplog.set_level(logging.INFO)
    h = Health(silent_after_s=1.5, stall_after_s=10.0, slow_fraction=0.5)
    server = FakeNode("server-1", "server", last_seen=0.0)
    h.update([server], training=True, now=1.0, affected=_affected)
    assert h.current(1.0) == []
    h.update([server], training=True, now=2.0, affected=_affected)
    [alert] = h.current(2.0)
    assert alert["node"] == "server-1" and alert["kind"] == "silent" and alert["since_s"] == 2.0
    assert alert["affected"] == {"keys": ["0.weight[0:100]"]}
    assert "server-1 sent no heartbeat" in caplog.text and "holds keys 0.weight[0:100]" in caplog.text
    server.last_seen = 2.5
    h.update([server], training=True, now=2.6, affected=_affected)
    assert h.current(2.6) == []
    assert "server-1 is no longer silent" in caplog.text


def test_a_silent_node_declared_dead_is_not_said_to_be_no_longer_silent(caplog):
    caplog.set_level(logging.INFO)
    h = Health(silent_after_s=1.5, stall_after_s=10.0, slow_fraction=0.5)
    server = FakeNode("server-1", "server", last_seen=0.0)
    h.update([server], training=True, now=2.0, affected=_affected)
    assert [a["kind"] for a in h.current(2.0)] == ["silent"]
    server.state = "dead"  # the coordinator declared it dead: its alert ends, unannounced
    h.update([server], training=True, now=2.1, affected=_affected)
    assert h.current(2.1) == [] and "no longer silent" not in caplog.text


def test_a_worker_whose_steps_do_not_move_is_stalled_since_its_last_step():
    h = Health(silent_after_s=100.0, stall_after_s=10.0, slow_fraction=0.5)
    w = FakeNode("worker-2", "worker", progress={"steps": 5})
    for t in (0.0, 3.0, 9.0):
        w.last_seen = t
        h.update([w], training=True, now=t, affected=_affected)
    assert h.current(9.0) == []
    w.last_seen = 10.5
    h.update([w], training=True, now=10.5, affected=_affected)
    [alert] = h.current(10.5)
    assert alert["kind"] == "stalled" and alert["since_s"] == 10.5 and alert["affected"] == {"shards": ["epoch 0 shard 2"]}
    w.progress = {"steps": 6}
    h.update([w], training=True, now=11.0, affected=_affected)
    assert h.current(11.0) == []


def test_no_stall_is_reported_while_workers_are_not_meant_to_train():
    h = Health(silent_after_s=100.0, stall_after_s=1.0, slow_fraction=0.5)
    w = FakeNode("worker-0", "worker", progress={"steps": 0})
    for t in range(10):
        w.last_seen = float(t)
        h.update([w], training=False, now=float(t), affected=_affected)
    assert h.current(10.0) == []


def test_a_worker_far_below_the_others_is_reported_slow_after_a_while():
    h = Health(silent_after_s=100.0, stall_after_s=5.0, slow_fraction=0.5)
    nodes = [FakeNode(f"worker-{i}", "worker", progress={"steps": 0, "examples_per_s": r}) for i, r in enumerate([1000, 1100, 300])]
    for t in range(7):
        for n in nodes:
            n.last_seen = float(t)
            n.progress = {**n.progress, "steps": t}
        h.update(nodes, training=True, now=float(t), affected=_affected)
    [alert] = h.current(6.0)
    assert alert["node"] == "worker-2" and alert["kind"] == "slow" and "300 examples/s" in alert["message"]


# -- the HTTP endpoint ----------------------------------------------------------
@pytest.fixture
def endpoint():
    ep = HttpEndpoint("127.0.0.1", 0, {"/hello": lambda: ("text/plain", b"hi"), "/boom": lambda: 1 / 0}, "test")
    yield ep
    ep.close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_the_endpoint_serves_routes_and_shipped_files_only(endpoint):
    base = f"http://{endpoint.address}"
    assert endpoint.address.startswith("127.0.0.1:")
    assert _get(base + "/hello") == (200, b"hi")
    assert _get(base + "/nothing")[0] == 404
    assert _get(base + "/static/index.html")[0] == 200
    assert _get(base + "/static/../http.py")[0] == 404
    assert _get(base + "/static/%2e%2e%2fhttp.py")[0] == 404
    assert _get(base + "/boom")[0] == 500
    assert _get(base + "/hello")[0] == 200  # a failing handler did not take the endpoint down
