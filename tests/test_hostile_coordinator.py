"""Hostile and malformed requests from peers that hold a job key, against the coordinator's state
machine and its request loop: each is refused with a code, counted, and changes nothing.

Each test here failed on the code before the typed schemas (the state machine raised, or accepted).
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import torch
import zmq

from downpour.config import parse_job
from downpour.coordinator.persist import export_state
from downpour.coordinator.service import Coordinator
from downpour.protocol import Message, Op, encode
from downpour.protocol.ops import REQUESTS, Code
from downpour.protocol.schema import Num, SchemaError
from downpour.protocol.throttle import LogOnce, RateLimit
from downpour.transport import Security, create_job_keys
from tests.conftest import tiny_job
from tests.live_server import RawClient
from tests.test_coordinator_restart import restarted
from tests.test_coordinator_state import WORKERS, Sim, error_code, ident, ok, one

BAD_NODES = [["worker-0"], {"a": 1}, 7, 1.5, True, b"worker-0", "x" * 100]


@pytest.mark.parametrize("node", BAD_NODES, ids=repr)
@pytest.mark.parametrize("op", [Op.HEARTBEAT, Op.NEXT_SHARD, Op.LEAVE, Op.REPORT, Op.WORKER_DONE])
def test_a_node_field_that_is_not_a_short_string_is_refused_as_invalid(op, node):
    sim = Sim()
    sim.start()
    meta = {"node": node, "kind": "error"} if op == Op.REPORT else {"node": node}
    before = sim.state.status(sim.now)
    reply = one(sim.state.handle(ident("x"), Message(op, 1, meta), sim.now, "client"))
    assert error_code(reply) == "invalid" and "meta.node" in reply.msg.meta["error"]
    assert sim.state.rejected == {"invalid": 1}
    assert sim.state.status(sim.now)["nodes"] == before["nodes"]


@pytest.mark.parametrize("progress", [{"examples": "many"}, {"steps": 1.5}, {"loss": float("nan")}, {"loss": 1e39},
                                      {"examples": -1}, {"position": [0, 0]}, {"steps": True}, "fast", [1]], ids=repr)
def test_a_heartbeat_with_malformed_progress_is_refused_and_status_still_works(progress):
    sim = Sim()
    sim.start()
    reply = one(sim.send(WORKERS[0], Op.HEARTBEAT, progress=progress))
    assert error_code(reply) == "invalid" and "meta.progress" in reply.msg.meta["error"]
    assert sim.state.nodes[WORKERS[0]].progress == {}
    sim.state.status(sim.now)  # raised ValueError before: every status sample crashed
    ok(one(sim.send(WORKERS[0], Op.HEARTBEAT, progress={"examples": 12, "steps": 3, "loss": 0.5})))
    assert sim.state.status(sim.now)["examples"] == 12


def test_poisoned_progress_saved_by_an_older_coordinator_is_dropped_on_recover(tmp_path):
    sim = Sim()
    sim.start()
    ok(one(sim.send(WORKERS[0], Op.HEARTBEAT, progress={"examples": 5})))
    sim.state.nodes[WORKERS[1]].progress = {"examples": "many"}  # as the old code stored it, unchecked
    sim.state.nodes[WORKERS[2]].stats = {"examples": [1]}
    again = restarted(sim, tmp_path, 10.0)  # raised ValueError in the status below before
    assert again.state.nodes[WORKERS[0]].progress == {"examples": 5}
    assert again.state.nodes[WORKERS[1]].progress == {} and again.state.nodes[WORKERS[2]].stats is None
    assert again.state.status(again.now)["examples"] == 5
    again.state.summary(again.now)


def test_a_saved_node_of_the_wrong_shape_is_a_config_error_naming_the_field(tmp_path):
    from downpour.coordinator.persist import STATE_FILE
    from downpour.errors import ConfigError

    sim = Sim()
    sim.start()
    restarted(sim, tmp_path, 1.0)
    db = sqlite3.connect(str(tmp_path / STATE_FILE))
    nodes = json.loads(db.execute("SELECT value FROM state WHERE part='nodes'").fetchone()[0])
    nodes[0]["rank"] = "zero"
    db.execute("UPDATE state SET value=? WHERE part='nodes'", (json.dumps(nodes),))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"rank"):
        _adopt(tmp_path)


def _adopt(tmp_path):
    from downpour.coordinator.persist import adopt_state, open_store
    from downpour.coordinator.state import CoordinatorState
    from tests.test_coordinator_state import JOB, LAYOUT, NUM_TRAIN

    store, parts = open_store(str(tmp_path), recover=True)
    try:
        adopt_state(CoordinatorState(JOB, LAYOUT, NUM_TRAIN, 0.0), parts, 0.0)
    finally:
        store.close()


@pytest.mark.parametrize("op", [Op.LEAVE, Op.WORKER_DONE, Op.HEARTBEAT, Op.NEXT_SHARD])
def test_a_worker_cannot_act_for_another_worker(op):
    sim = Sim()
    sim.start()
    for w in WORKERS:
        sim.send(w, Op.BARRIER, name="init")
    state = (sim.state.nodes[WORKERS[1]].state, dict(sim.state.ledger.assigned))
    reply = one(sim.state.handle(ident(WORKERS[0]), Message(op, 99, {"node": WORKERS[1]}), sim.now, "worker"))
    assert error_code(reply) == "forbidden" and "another connection" in reply.msg.meta["error"]
    assert (sim.state.nodes[WORKERS[1]].state, dict(sim.state.ledger.assigned)) == state


def test_a_report_error_for_another_worker_does_not_kill_it():
    sim = Sim()
    sim.start()
    msg = Message(Op.REPORT, 5, {"node": WORKERS[1], "kind": "error", "data": {"error": "forged"}})
    assert error_code(one(sim.state.handle(ident(WORKERS[0]), msg, sim.now, "worker"))) == "forbidden"
    assert sim.state.nodes[WORKERS[1]].state == "alive" and not sim.state.failures


def test_the_heartbeat_connection_of_a_node_may_act_for_it():
    sim = Sim()
    sim.start()
    msg = Message(Op.HEARTBEAT, 5, {"node": WORKERS[1], "progress": {"steps": 1}})
    ok(one(sim.state.handle(ident(WORKERS[1]) + b".hb", msg, sim.now, "worker")))


def test_only_the_evaluator_may_report_test_metrics():
    sim = Sim()
    sim.train()  # worker-0 evaluates
    forged = one(sim.send(WORKERS[1], Op.REPORT, kind="eval", data={"test_accuracy": 1.0, "test_loss": 0.0}))
    assert error_code(forged) == "forbidden"
    assert sim.state.phase == "evaluating" and sim.state.evaluation is None
    ok(one(sim.send(WORKERS[0], Op.REPORT, kind="eval", data={"test_accuracy": 0.5, "test_loss": 1.0})))
    assert sim.state.phase == "stopping"


@pytest.mark.parametrize("data", [{"test_accuracy": "1"}, {"test_accuracy": 2.0}, {"test_loss": float("inf")}, [1]], ids=repr)
def test_malformed_test_metrics_are_refused(data):
    sim = Sim()
    sim.train()
    assert error_code(one(sim.send(WORKERS[0], Op.REPORT, kind="eval", data=data))) == "invalid"
    assert sim.state.phase == "evaluating"


def test_every_op_the_coordinator_serves_has_a_schema():
    from downpour.coordinator.state import _HANDLERS

    assert set(_HANDLERS) <= set(REQUESTS)


def test_numbers_are_exact_types_and_finite():
    weight = REQUESTS[Op.PUSH].fields["weight"]
    for bad in (True, float("nan"), float("inf"), 1e39, 0, -1.0, "1"):
        with pytest.raises(SchemaError, match="weight"):
            weight(bad, "meta.weight")
    assert weight(2.0) == 2.0 and weight(3) == 3
    with pytest.raises(SchemaError):
        Num(f32=True)(1e39)


def test_a_rate_limit_keeps_its_windows_when_many_new_identities_arrive():
    t = [0.0]
    limit = RateLimit(3, max_peers=100, clock=lambda: t[0])
    assert [limit.over(b"a") for _ in range(4)] == [False, False, False, True]
    for i in range(10_000):  # before: more than 10,000 ids cleared every window
        limit.over(f"id-{i}".encode())
    assert limit.over(b"a")  # still over in the same second
    t[0] = 1.5
    assert not limit.over(b"a")


def test_log_once_per_peer_per_interval():
    t = [0.0]
    once = LogOnce(10.0, clock=lambda: t[0])
    assert once.first(b"a") and not once.first(b"a") and once.first(b"b")
    t[0] = 11.0
    assert once.first(b"a")


# -- the request loop: fail closed, the same checks after the job finished ---------------------------------


@pytest.fixture
def coordinator(tmp_path, tiny_data):
    keys = create_job_keys(str(tmp_path / "keys"))
    ctx = zmq.Context(io_threads=1)
    job = parse_job(tiny_job(tiny_data, monitor={"metrics": False, "dashboard": False}, checkpoint={"enabled": False},
                             cluster={"max_message_bytes": 4096}))
    security = Security.load(keys, "coordinator")
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", None, security)
    clients = []

    def client(role: str) -> RawClient:
        c = RawClient(ctx, coord.address, Security.load(keys, role), server_role="coordinator")
        clients.append(c)
        return c

    try:
        yield coord, client
    finally:
        for c in clients:
            c.close()
        coord.listener.close()
        security.close()
        ctx.destroy(linger=0)


def _exchange(coord, client: RawClient, frames: list, finished: bool, timeout_s: float = 5.0) -> Message | None:
    from downpour.transport import Poller

    poller = Poller()
    poller.register(coord.listener)
    client.send(frames)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        coord._serve_requests(poller, 0.05, finished=finished)
        reply = client.recv(0.0)
        if reply is not None:
            return reply
    return None


def _saved_state(coord) -> dict:
    """Everything the coordinator would save of its state (times relative to the job's start)."""
    parts = export_state(coord.state, coord.state.started)
    parts["job"].pop("wall")
    return parts


@pytest.mark.parametrize("finished", [False, True], ids=["serving", "after the job finished"])
def test_the_request_loop_checks_roles_and_sizes_also_after_the_job_finished(coordinator, finished):
    coord, client = coordinator
    worker = client("worker")
    before = _saved_state(coord)
    forged = encode(Message(Op.REGISTER, 1, {"role": "server", "address": "tcp://x:1", "node": "w"}))
    reply = _exchange(coord, worker, forged, finished)
    assert reply is not None and reply.meta["code"] == "forbidden"
    big = encode(Message(Op.STATUS, 2, {}, [torch.zeros(750), torch.zeros(750)]))  # frames within, message over
    assert _exchange(coord, worker, big, finished, timeout_s=1.0) is None  # over cluster.max_message_bytes
    assert coord.rejected.get("malformed") == 1
    assert _saved_state(coord) == before  # refused: no node registered, nothing else changed
    status = _exchange(coord, client("client"), encode(Message(Op.STATUS, 3)), finished)
    assert status is not None and status.op == Op.OK


def test_a_handler_that_fails_answers_internal_and_the_loop_goes_on(coordinator, monkeypatch):
    coord, client = coordinator
    c = client("client")

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(coord.state, "status", broken)
    reply = _exchange(coord, c, encode(Message(Op.STATUS, 1)), False)
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == Code.INTERNAL
    monkeypatch.undo()
    reply = _exchange(coord, c, encode(Message(Op.STATUS, 2)), False)
    assert reply is not None and reply.op == Op.OK
    assert coord.rejected == {"internal": 1}


def test_a_client_key_only_reads_status(coordinator):
    coord, client = coordinator
    c = client("client")
    for op, meta in ((Op.REGISTER, {"role": "worker"}), (Op.HEARTBEAT, {"node": "worker-0"})):
        reply = _exchange(coord, c, encode(Message(op, 1, meta)), False)
        assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] in ("forbidden", "unknown_node")


# -- HTTP: idle connections time out, and only so many are served at once ---------------------------------


def test_an_idle_http_connection_is_closed_and_connections_are_capped(monkeypatch):
    import socket

    from downpour.monitor import http

    monkeypatch.setattr(http, "SOCKET_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    endpoint = http.HttpEndpoint("127.0.0.1", 0, {"/x": lambda: ("text/plain", b"ok")}, "test")
    # (generous client timeouts: the server's is 0.5 s, and a loaded 2-core machine may lag seconds behind it)
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=30.0) for _ in range(3)]
    try:
        assert idle[2].recv(1) == b""  # the third is closed at once: two are served at a time
        for s in idle[:2]:
            start = time.monotonic()
            assert s.recv(1) == b""  # closed by the server after its timeout (slowloris), not held forever
            assert time.monotonic() - start < 20.0
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5.0) as s:
            s.sendall(b"GET /x HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := s.recv(1 << 16):  # HTTP/1.0: the server closes after the answer
                answer += chunk
            assert answer.endswith(b"ok")  # the slots are free again
    finally:
        for s in idle:
            s.close()
        endpoint.close()


# -- --insecure workers import only what a local job file names -------------------------------------------


def test_job_factories_finds_every_factory_a_job_names(tiny_data):
    from downpour.worker.service import job_factories

    job = parse_job(tiny_job(tiny_data, model={"name": None, "factory": "tests.api_factories:small_model", "args": {}}))
    assert job_factories(job) == {"tests.api_factories:small_model"}
    assert job_factories(parse_job(tiny_job(tiny_data))) == set()


@pytest.mark.parametrize("trusted", [set(), {"tests.api_factories:small_model"}], ids=["untrusted", "trusted"])
def test_an_insecure_worker_refuses_a_factory_no_local_job_file_names(tiny_data, trusted, monkeypatch):
    import threading

    import downpour.worker.service as service
    from downpour.transport import Poller
    from downpour.worker.service import run_worker

    imported = []
    monkeypatch.setattr(service, "build_model", lambda cfg, seed: imported.append(cfg.factory) or (_ for _ in ()).throw(
        RuntimeError("stop here: the factory would be imported now")))
    ctx = zmq.Context(io_threads=1)
    job = parse_job(tiny_job(tiny_data, model={"name": None, "factory": "tests.api_factories:small_model", "args": {}},
                             checkpoint={"enabled": False},
                             monitor={"metrics": False, "dashboard": False}, cluster={"num_servers": 1, "num_workers": 1}))
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", None, None)
    server = RawClient(ctx, coord.address)
    halt = threading.Event()

    def serve() -> None:
        poller = Poller()
        poller.register(coord.listener)
        while not halt.is_set():
            coord._serve_requests(poller, 0.02)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        server.send(encode(Message(Op.REGISTER, 1, {"role": "server", "rank": 0, "address": "tcp://127.0.0.1:9"})))
        code = run_worker(ctx, coord.address, rank=0, startup_timeout_s=20.0, trusted_factories=trusted)
        assert code == 1
        assert imported == ([] if not trusted else ["tests.api_factories:small_model"])
        if not trusted:
            assert "names tests.api_factories:small_model" in str(coord.state.failures or coord.state.error or "")
    finally:
        halt.set()
        thread.join(5.0)
        server.close()
        coord.listener.close()
        ctx.destroy(linger=0)
