"""A server loading its checkpoint before it serves heartbeats marked ``restoring``: the coordinator
keeps it alive however long the restore takes (up to ``cluster.startup_timeout_s``), but does not
count it as serving; a restore hung in a live process is declared dead, saying so."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from downpour.config import parse_job
from downpour.coordinator.client import RestoringHeartbeat
from downpour.protocol import Op
from tests.cluster import QUIET
from tests.conftest import tiny_job
from tests.test_coordinator_state import FAIL_JOB, SERVERS, WORKERS, Sim, error_code, ok, one, replies
from tests.test_recovery import take, training

# -- the coordinator's state machine (fake clock) --------------------------------------------


def test_a_restoring_server_stays_alive_past_the_heartbeat_timeout_and_is_not_serving():
    sim = Sim()
    sim.register(SERVERS[0], "server")
    for t in (2.0, 4.0, 6.0, 8.0):  # the timeout is 5 s
        sim.now = t
        ok(one(sim.send(SERVERS[0], Op.HEARTBEAT, restoring=True, progress={"version": 99})))
        assert sim.tick(t + 0.1) == []
    node = sim.state.nodes[SERVERS[0]]
    assert node.state == "alive" and node.restoring_since == 2.0
    assert node.progress == {}  # nothing but being alive is read from a restoring heartbeat
    [row] = [n for n in sim.state.status(8.5)["nodes"] if n["name"] == SERVERS[0]]
    assert row["restoring_s"] == pytest.approx(6.5)
    sim.now = 9.0
    ok(one(sim.send(SERVERS[0], Op.HEARTBEAT, progress={"version": 0})))  # it serves
    assert node.restoring_since is None and "restoring_s" not in sim.state.status(9.0)["nodes"][0]


def test_a_restore_longer_than_the_startup_timeout_is_declared_dead_saying_so():
    sim = Sim()
    sim.start()
    for t in range(2, 70, 2):  # everyone heartbeats; server-1 never stops restoring
        sim.now = float(t)
        for name in [SERVERS[0], *WORKERS]:
            sim.send(name, Op.HEARTBEAT)
        sim.send(SERVERS[1], Op.HEARTBEAT, restoring=True)
        sim.tick(float(t))
        if sim.state.phase == "failed":  # (no checkpoint to replace it from: the job ends)
            break
    assert sim.state.failed_node == SERVERS[1]
    assert "still restoring its checkpoint after" in sim.state.error and "cluster.startup_timeout_s 60s" in sim.state.error
    assert sim.now == 64.0  # 60 s after its first restoring heartbeat (at 2 s), not at the heartbeat timeout


def test_a_server_silent_while_restoring_is_declared_dead_saying_it_was_restoring():
    sim = Sim()
    sim.register(SERVERS[0], "server")
    sim.now = 1.0
    sim.send(SERVERS[0], Op.HEARTBEAT, restoring=True)
    sim.tick(6.5)
    assert sim.state.failed_node == SERVERS[0] and "while restoring its checkpoint" in sim.state.error


def test_a_replacement_restoring_does_not_count_as_recovered_until_it_serves():
    sim = Sim()
    training(sim)
    take(sim, WORKERS[0])
    sim.state.checkpoints.committed.append({"name": "ckpt-000000000010-0001", "step": 10, "write_s": 0.1, "final": False})
    sim.now = 5.0
    for name in [*WORKERS, SERVERS[0]]:
        sim.send(name, Op.HEARTBEAT)
    sim.tick(6.5)  # server-1 declared dead
    [failure] = sim.state.failures
    got = sim.send("server-1-new", Op.REGISTER, role="server", rank=1, address="tcp://127.0.0.1:7999", host="test", pid=9)
    assert ok(replies(got, to="server-1-new")[0])["restore"]["name"] == "ckpt-000000000010-0001"
    for t in (8.0, 10.0, 12.0, 14.0):  # a long restore: past the heartbeat timeout
        sim.now = t
        for name in [*WORKERS, SERVERS[0]]:
            sim.send(name, Op.HEARTBEAT)
        ok(one(sim.send("server-1-new", Op.HEARTBEAT, node="server-1", restoring=True)))
        sim.tick(t)
    assert sim.state.phase == "training" and sim.state.nodes["server-1"].state == "alive"
    assert failure.recovered_after_s is None and 1 in sim.state.server_slots
    sim.now = 15.0
    sim.send("server-1-new", Op.HEARTBEAT, node="server-1")
    assert failure.recovered_after_s == pytest.approx(15.0 - 6.5) and not sim.state.server_slots


def test_restoring_is_refused_from_a_worker_and_must_be_a_boolean():
    sim = Sim()
    sim.start()
    assert error_code(one(sim.send(WORKERS[0], Op.HEARTBEAT, restoring=True))) == "invalid"
    reply = one(sim.send(SERVERS[0], Op.HEARTBEAT, restoring="yes"))
    assert error_code(reply) == "invalid" and "meta.restoring" in reply.msg.meta["error"]
    assert sim.state.nodes[SERVERS[0]].restoring_since is None


def test_a_restoring_server_in_a_failed_job_or_declared_dead_is_told_to_stop():
    sim = Sim(FAIL_JOB)
    sim.start()
    sim.send(WORKERS[1], Op.REPORT, kind="error", data={"error": "boom"})
    assert "boom" in ok(one(sim.send(SERVERS[0], Op.HEARTBEAT, restoring=True)))["stop"]
    sim.state.nodes[SERVERS[1]].state = "dead"
    assert "declared dead" in ok(one(sim.send(SERVERS[1], Op.HEARTBEAT, restoring=True)))["stop"]


# -- the server's side: RestoringHeartbeat against a live coordinator --------------------------


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class FakeCoordinator:
    """A ROUTER on 127.0.0.1 that answers every heartbeat (OK, or ``stop``) and records them."""

    def __init__(self, ctx: zmq.Context, stop: str | None = None) -> None:
        from downpour.protocol import decode, encode

        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.heard: list[tuple[bytes, dict]] = []
        self._halt = threading.Event()

        def serve() -> None:
            while not self._halt.is_set():
                if self.sock.poll(20):
                    peer, *frames = self.sock.recv_multipart()
                    msg = decode(frames, 1 << 20)
                    self.heard.append((peer, dict(msg.meta)))
                    self.sock.send_multipart([peer, *encode(msg.reply({"stop": stop} if stop else {}))])

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._halt.set()
        self.thread.join(timeout=5.0)
        self.sock.close(linger=0)


def _wait(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_restoring_heartbeats_go_out_on_the_heartbeat_connection_until_the_restore_ends(ctx):
    coord = FakeCoordinator(ctx)
    try:
        with RestoringHeartbeat(ctx, coord.address, "server-0-abc", "server-0", interval_s=0.05, limit_s=30.0) as hb:
            assert _wait(lambda: len(coord.heard) >= 3)
        count = len(coord.heard)
        assert hb.reason is None and not hb.running
        time.sleep(0.2)  # (a bounded look for stray heartbeats after the restore: none may come)
        assert len(coord.heard) == count
    finally:
        coord.close()
    assert all(peer == b"server-0-abc.hb" and meta["restoring"] is True and meta["node"] == "server-0" for peer, meta in coord.heard)


def test_restoring_heartbeats_stop_after_the_limit_though_the_restore_hangs(ctx):
    coord = FakeCoordinator(ctx)
    try:
        with RestoringHeartbeat(ctx, coord.address, "server-0-abc", "server-0", interval_s=0.05, limit_s=0.4) as hb:
            assert _wait(lambda: not hb.running)  # the restore "hangs" here, inside the block
            count = len(coord.heard)
            time.sleep(0.2)
            assert len(coord.heard) == count and count >= 2
    finally:
        coord.close()


def test_a_stop_order_ends_restoring_heartbeats_and_is_kept(ctx):
    coord = FakeCoordinator(ctx, stop="server-0 was declared dead")
    try:
        with RestoringHeartbeat(ctx, coord.address, "server-0-abc", "server-0", interval_s=0.05, limit_s=30.0) as hb:
            assert _wait(lambda: hb.reason is not None)
        assert hb.reason == "server-0 was declared dead" and len(coord.heard) == 1
    finally:
        coord.close()


# -- a real coordinator and server, the restore made slow ----------------------------------------


@pytest.mark.slow
def test_a_server_whose_restore_outlasts_the_heartbeat_timeout_is_not_declared_dead(monkeypatch, tiny_data):
    from downpour.coordinator.service import Coordinator
    from downpour.server import service as server_service

    job = parse_job(
        tiny_job(
            tiny_data,
            monitor=QUIET,
            cluster={
                "num_servers": 1,
                "num_workers": 1,
                "heartbeat_interval_s": 0.2,
                "heartbeat_timeout_s": 1.5,
                "coordinator_timeout_s": 5.0,
                "startup_timeout_s": 30.0,
            },
        )
    )
    restored = threading.Event()
    seen: list[float | None] = []

    def slow_restore(self, order, layout) -> None:  # 4.5 s: three times the heartbeat timeout
        assert order == {"fake": True}
        time.sleep(4.5)
        seen.append(coord.state.nodes[SERVERS[0]].restoring_since)  # (read across threads: a test's glance)
        restored.set()

    monkeypatch.setattr(server_service.ParameterServer, "restore", slow_restore)
    ctx = zmq.Context()
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", None)
    coord.state.restore = {"fake": True}  # what the server is told to load (the restore above ignores it)
    codes: dict[str, int] = {}
    threads = [
        threading.Thread(target=lambda: codes.setdefault("coordinator", coord.serve()), daemon=True),
        threading.Thread(
            target=lambda: codes.setdefault("server", server_service.run_server(ctx, coord.address, "127.0.0.1", rank=0)), daemon=True
        ),
    ]
    try:
        for t in threads:
            t.start()
        assert restored.wait(30.0), "the server never restored"
        assert seen[0] is not None  # the coordinator knew it was restoring
        node = coord.state.nodes[SERVERS[0]]
        assert _wait(lambda: node.restoring_since is None, 5.0)  # it serves
        assert coord.state.phase == "registering" and node.state == "alive" and not coord.state.failures
    finally:
        coord.request_stop()  # (still registering: the job ends at once, the server hears stop)
        for t in threads:
            t.join(timeout=30.0)
        ctx.destroy(linger=0)
    assert not any(t.is_alive() for t in threads)
    assert codes == {"coordinator": 1, "server": 0} and coord.state.failures[0].kind == "stopped"
