"""One key per worker (`downpour keys DIR --workers N`): each worker rank has its own CURVE key,
the coordinator and the servers bind the key to that rank, so a worker's key cannot act as
another worker (nor as a server, nor take a second slot). Also: servers take pushes only from
the current membership in every consistency mode, and a progress field set to None is kept
as absent (the long fuzzing run found that `{"steps": None}` crashed the coordinator's clock)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import zmq

from downpour.cli.main import main as cli_main
from downpour.config import parse_job
from downpour.coordinator.keys import key_refusal
from downpour.coordinator.service import Coordinator
from downpour.errors import ConfigError
from downpour.protocol import Message, Op, encode
from downpour.transport import Security, bound_name, create_job_keys
from tests.conftest import tiny_job
from tests.live_server import INIT, KEYS, NUMEL, LiveServer, RawClient
from tests.test_coordinator_state import SERVERS, WORKERS, Sim, ident, ok, one
from tests.test_hostile_coordinator import _exchange


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> str:
    return create_job_keys(str(tmp_path_factory.mktemp("job") / "keys"), workers=3)


# -- the key folder --------------------------------------------------------------------------------------


def test_keys_with_workers_make_one_key_per_rank_and_no_shared_worker_key(keys):
    names = sorted(os.listdir(keys))
    assert "worker.key" not in names and "worker.key_secret" not in names
    for n in ("coordinator", "server", "client", "worker-0", "worker-1", "worker-2"):
        assert f"{n}.key" in names and f"{n}.key_secret" in names
        assert stat.S_IMODE(os.stat(os.path.join(keys, f"{n}.key_secret")).st_mode) == 0o600
    server = Security.load(keys, "server")
    assert sorted(server.publics) == ["client", "coordinator", "server", "worker-0", "worker-1", "worker-2"]
    assert len(set(server.publics.values())) == 6


def test_a_worker_loads_its_own_key_and_a_folder_of_several_needs_its_rank(keys, tmp_path):
    w1 = Security.load(keys, "worker", rank=1)
    assert (w1.role, w1.name, w1.rank) == ("worker", "worker-1", 1)
    server = Security.load(keys, "server")
    assert server.role_of(w1.public.decode()) == "worker" and server.rank_of(w1.public.decode()) == 1
    assert server.rank_of(server.publics["server"].decode()) is None and server.rank is None
    with pytest.raises(ConfigError, match=r"several workers \(worker-0, worker-1, worker-2\).*--rank N"):
        Security.load(keys, "worker")
    with pytest.raises(ConfigError, match="no key for worker rank 7.*worker-7.key_secret"):
        Security.load(keys, "worker", rank=7)
    # A worker machine given only its own secret (and the public files) needs no rank.
    own = tmp_path / "worker-2-machine"
    own.mkdir(mode=0o700)
    for f in os.listdir(keys):
        if f.endswith(".key") or f == "worker-2.key_secret":
            (own / f).write_bytes((open(os.path.join(keys, f), "rb")).read())
            os.chmod(own / f, 0o600)
    assert Security.load(str(own), "worker").name == "worker-2"


def test_shared_worker_key_folders_are_unchanged(tmp_path):
    folder = create_job_keys(str(tmp_path / "shared"))
    w = Security.load(folder, "worker", rank=5)  # any rank: the role's key
    assert (w.name, w.rank) == ("worker", None)
    assert Security.load(folder, "server").rank_of(w.public.decode()) is None
    os.remove(os.path.join(folder, "worker.key_secret"))  # a worker machine not given the shared secret
    for rank in (5, None):
        with pytest.raises(ConfigError, match=r"no worker key in .*copy the job's worker\.key_secret") as err:
            Security.load(folder, "worker", rank=rank)
        assert "key_secret" not in str(err.value).replace("worker.key_secret", "")  # (no per-worker file named)


def test_bad_worker_counts_are_refused_naming_the_value(tmp_path):
    for bad in (-1, 5000, True):
        with pytest.raises(ConfigError, match="workers must be an integer"):
            create_job_keys(str(tmp_path / f"k{bad}"), workers=bad)


def test_downpour_keys_workers_makes_them(tmp_path, capsys):
    assert cli_main(["keys", str(tmp_path / "k"), "--workers", "2"]) == 0
    assert "worker-0 .. worker-1" in capsys.readouterr().out
    assert Security.load(str(tmp_path / "k"), "worker", rank=1).name == "worker-1"


def test_bound_names_are_the_ranks_worker_and_its_replacements():
    assert bound_name(1, "worker-1") and bound_name(1, "worker-1.2")
    assert not bound_name(1, "worker-10") and not bound_name(1, "worker-0") and not bound_name(1, "server-1")


# -- the coordinator's decisions (no network) ---------------------------------------------------------------


def _started() -> Sim:
    sim = Sim()
    sim.start()
    return sim


def test_a_workers_own_key_registers_only_its_rank():
    sim = Sim()
    for i, s in enumerate(SERVERS):
        sim.register(s, "server", i)
    reg = Message(Op.REGISTER, 1, {"role": "worker", "rank": 0})
    assert "only the worker of rank 2" in key_refusal(sim.state, 2, ident("x"), reg)
    reg = Message(Op.REGISTER, 2, {"role": "worker"})
    assert key_refusal(sim.state, 2, ident("x"), reg) is None and reg.meta["rank"] == 2
    assert sim.state.handle(ident("x"), reg, sim.now, "worker") == []  # waits for the others, as rank 2
    assert sim.state.nodes["worker-2"].identity == ident("x")
    # The same key on another connection cannot take a second slot while worker-2 lives.
    again = Message(Op.REGISTER, 3, {"role": "worker"})
    assert "worker-2 is registered on another connection" in key_refusal(sim.state, 2, ident("y"), again)
    assert "3 worker slots" in key_refusal(sim.state, 3, ident("z"), Message(Op.REGISTER, 4, {"role": "worker"}))


def test_a_workers_own_key_acts_only_for_its_rank():
    sim = _started()
    for op in (Op.HEARTBEAT, Op.LEAVE, Op.WORKER_DONE, Op.NEXT_SHARD):
        assert "cannot act for worker-0" in key_refusal(sim.state, 1, ident(WORKERS[1]), Message(op, 1, {"node": "worker-0"}))
        assert key_refusal(sim.state, 1, ident(WORKERS[1]), Message(op, 1, {"node": "worker-1"})) is None
    assert "cannot act for server-0" in key_refusal(sim.state, 1, ident("s"), Message(Op.HEARTBEAT, 1, {"node": "server-0"}))
    # Malformed names are left to the schemas (refused there as invalid).
    assert key_refusal(sim.state, 1, ident("x"), Message(Op.HEARTBEAT, 1, {"node": ["worker-0"]})) is None


def test_a_progress_field_set_to_none_is_kept_as_absent_and_the_clock_still_runs():
    sim = _started()
    ok(one(sim.send(WORKERS[0], Op.HEARTBEAT, progress={"steps": None, "examples": 4, "examples_per_s": None})))
    assert sim.state.nodes[WORKERS[0]].progress == {"examples": 4}
    sim.tick(sim.now + 1.0)  # raised TypeError in the health check (int(None)) before
    assert sim.state.status(sim.now)["examples"] == 4
    sim.send(WORKERS[1], Op.WORKER_DONE, stats={"steps": None, "examples": 2})  # (it waits for the others)
    assert sim.state.nodes[WORKERS[1]].stats == {"examples": 2}
    sim.state.summary(sim.now)


# -- the live coordinator's request loop --------------------------------------------------------------------


@pytest.fixture
def live_coordinator(tmp_path, tiny_data, keys):
    ctx = zmq.Context(io_threads=1)
    job = parse_job(tiny_job(tiny_data, monitor={"metrics": False, "dashboard": False}, checkpoint={"enabled": False},
                             cluster={"num_workers": 3, "coordinator_max_requests_per_s": 5}))
    security = Security.load(keys, "coordinator")
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", None, security)
    clients = []

    def client(rank: int, identity: bytes | None = None) -> RawClient:
        c = RawClient(ctx, coord.address, Security.load(keys, "worker", rank=rank), "coordinator", identity)
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


def test_the_coordinator_binds_a_workers_key_to_its_rank(live_coordinator):
    coord, client = live_coordinator
    w1 = client(1)
    forged = encode(Message(Op.REGISTER, 1, {"role": "worker", "rank": 0, "node": "w"}))
    reply = _exchange(coord, w1, forged, False)
    assert reply is not None and reply.meta["code"] == "forbidden" and "rank 1" in reply.meta["error"]
    assert coord.rejected == {"forbidden": 1} and not coord.state.nodes
    w1.send(encode(Message(Op.REGISTER, 2, {"role": "worker", "node": "w"})))
    deadline_reply = _exchange(coord, w1, encode(Message(Op.STATUS, 3)), False)
    assert deadline_reply is not None and deadline_reply.req_id in (2, 3)
    assert coord.state.nodes["worker-1"].rank == 1  # registered (waiting for the rest of the job) as rank 1


def test_the_coordinators_rate_limit_is_per_key_across_connections(live_coordinator):
    coord, client = live_coordinator  # 5 requests per second per peer
    coord.limit.clock = lambda: 0.0  # every request in one window, however slowly the test runs
    conns = [client(2, f"conn-{i}".encode()) for i in range(4)]
    answered = 0
    for i, c in enumerate(conns * 2):  # 8 requests from 4 connections of one key within a second
        answered += _exchange(coord, c, encode(Message(Op.STATUS, 10 + i)), False, timeout_s=0.3) is not None
    assert answered == 5 and coord.rejected.get("rate_limited") == 3


# -- a live server ------------------------------------------------------------------------------------------


@pytest.fixture
def secure_server(keys):
    server = LiveServer(keys)
    ctx = zmq.Context(io_threads=1)
    clients = []

    def client(rank: int, identity: bytes) -> RawClient:
        c = RawClient(ctx, server.address, Security.load(keys, "worker", rank=rank), identity=identity)
        clients.append(c)
        return c

    try:
        yield server, client
    finally:
        for c in clients:
            c.close()
        ctx.destroy(linger=0)
        server.close()


def test_a_server_takes_a_workers_key_only_under_that_workers_name(secure_server):
    server, client = secure_server
    own = client(1, b"worker-1")
    assert own.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
    server.call(lambda s: s.set_workers(["worker-0", "worker-1"]))
    forger = client(1, b"worker-0")  # worker-1's key, worker-0's name
    for op, meta, tensors in ((Op.PUSH, {"keys": KEYS, "version": 0, "weight": 1.0}, [torch.ones(NUMEL)]),
                              (Op.PULL, {"keys": KEYS}, [])):
        reply = forger.request(op, meta, tensors)
        assert reply.op == Op.ERROR and reply.meta["code"] == "forbidden" and "worker-1's key" in reply.meta["error"]
    assert torch.equal(server.values(), INIT) and server.rejected() == {"forbidden": 2}
    reply = own.request(Op.PUSH, {"keys": KEYS, "version": 0, "weight": 1.0}, [torch.ones(NUMEL) * 1e-3])
    assert reply.op == Op.OK and server.pushes() == 1


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_every_mode_refuses_pushes_from_outside_the_membership(mode):
    training = {"consistency": mode, **({"staleness_bound": 2} if mode == "ssp" else {})}
    server = LiveServer(None, {"training": training})
    ctx = zmq.Context(io_threads=1)
    outsider = RawClient(ctx, server.address, identity=b"worker-9")
    member = RawClient(ctx, server.address, identity=b"worker-0")
    try:
        assert member.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
        push = {"keys": KEYS, "version": 0, "weight": 1.0, "clock": 1}
        # Before the coordinator named the members, pushes are taken (the job's first moments).
        assert outsider.request(Op.PUSH, push, [torch.zeros(NUMEL)]).op == Op.OK
        server.call(lambda s: s.set_workers(["worker-0"]))
        before = server.values()
        reply = outsider.request(Op.PUSH, push, [torch.ones(NUMEL)])
        assert reply.op == Op.ERROR and reply.meta["code"] == "not_member"
        assert torch.equal(server.values(), before) and server.rejected() == {"not_member": 1}
        assert member.request(Op.PUSH, {**push, "clock": 2}, [torch.ones(NUMEL) * 1e-3]).op == Op.OK
    finally:
        outsider.close()
        member.close()
        ctx.destroy(linger=0)
        server.close()
