"""More regressions of the hostile-input review: a PowerSGD push whose factors multiply into Inf,
refused requests that must not cost a write of the coordinator's state, and connection ids a peer
cannot predict (a peer that registered first under a guessed id would lock the real node out)."""

from __future__ import annotations

import time

import torch
import zmq

from downpour.compress.codecs import PowerSGD
from downpour.config import parse_job
from downpour.coordinator.client import connection_id
from downpour.coordinator.service import Coordinator
from downpour.protocol import Message, Op, encode
from downpour.transport import Poller, Security, create_job_keys
from tests.conftest import tiny_job
from tests.live_server import INIT, KEYS, LAYOUT, LiveServer, RawClient


def test_a_powersgd_push_whose_factors_multiply_into_inf_is_refused():
    server = LiveServer(None, {"compression": {"push": {"codec": "powersgd", "rank": 1, "min_numel": 0}}})
    ctx = zmq.Context(io_threads=1)
    client = RawClient(ctx, server.address)
    try:
        assert client.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
        enc, tensors = [], []
        for s in LAYOUT.server_slices(0):
            p = PowerSGD(1).encode(torch.ones(s.stop - s.start))
            enc.append(["powersgd", dict(p.meta), 2])
            tensors += [p.tensors[0].fill_(1e30), p.tensors[1].fill_(1e30)]  # finite factors, 1e60 product
        reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
        assert reply.op == Op.ERROR and reply.meta["code"] == "invalid" and "exceed" in reply.meta["error"]
        assert torch.equal(server.values(), INIT) and server.pushes() == 0
        assert server.rejected() == {"invalid": 1}
    finally:
        client.close()
        ctx.destroy(linger=0)
        server.close()


def test_refused_requests_write_nothing_to_the_coordinators_state(tmp_path, tiny_data, monkeypatch):
    keys = create_job_keys(str(tmp_path / "keys"))
    ctx = zmq.Context(io_threads=1)
    job = parse_job(tiny_job(tiny_data, monitor={"metrics": False, "dashboard": False}, checkpoint={"enabled": False}))
    security = Security.load(keys, "coordinator")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", str(run_dir), security)
    client = RawClient(ctx, coord.address, Security.load(keys, "worker"), server_role="coordinator")
    saves: list[float] = []
    monkeypatch.setattr(coord, "_save", lambda now: saves.append(now))
    poller = Poller()
    poller.register(coord.listener)
    try:
        forged = [Message(Op.LEAVE, i, {"node": "worker-0"}) for i in range(1, 51)]  # nobody registered: refused
        forged += [Message(Op.REGISTER, 60, {"role": "server", "address": "tcp://x:1"})]  # a worker key: forbidden
        for m in forged:
            client.send(encode(m))
        answered = 0
        deadline = time.monotonic() + 10.0
        while answered < len(forged) and time.monotonic() < deadline:
            coord._serve_requests(poller, 0.05)
            while (reply := client.recv(0.0)) is not None:
                assert reply.op == Op.ERROR
                answered += 1
        assert answered == len(forged)
        assert saves == []  # before: one SQLite write per refused request
        assert coord.state.rejected == {"unknown_node": 50, "forbidden": 1}
    finally:
        client.close()
        coord.listener.close()
        if coord.store is not None:
            coord.store.close()
        security.close()
        ctx.destroy(linger=0)


def test_connection_ids_hold_128_random_bits():
    ids = {connection_id("worker", 0) for _ in range(1000)}
    assert len(ids) == 1000
    for i in list(ids)[:10]:
        assert i.startswith("worker-0-") and len(i.split("-")[-1]) == 32 and int(i.split("-")[-1], 16) >= 0


def test_pushes_of_ever_older_versions_keep_the_staleness_histogram_bounded():
    """The long fuzzing run slowed down as every push of version 0 added a staleness value."""
    server = LiveServer(None)
    try:
        def record(s):
            for v in range(100_000):
                s._record_staleness(v)
            return s.stats()

        stats = server.call(record)
        hist = {int(k): v for k, v in stats["staleness_histogram"].items()}
        assert len(hist) <= 1024 + 7 and sum(hist.values()) == 100_000
        assert hist[1023] == 1 and hist[1024] == 1024 and hist[65536] == 100_000 - 65536
        assert abs(stats["staleness_mean"] - 49_999.5) < 1e-6
    finally:
        server.close()
