"""Security: CURVE keys per role, role checks, limits against hostile peers, and a fuzz of a live secure server.

Servers here are real: a ParameterServer behind a CURVE listener on 127.0.0.1, answered by a thread of
its own (tests/live_server.py), reached through real sockets. Every wait is bounded; every socket is
closed with linger 0, every ZAP authenticator stopped, every context terminated, every process ended.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import textwrap
import time
from datetime import timedelta

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from downpour.config import parse_job
from downpour.coordinator.state import CoordinatorState, Reply
from downpour.errors import ConfigError, RemoteError, RequestTimeout
from downpour.layout import make_layout
from downpour.models import build_model, param_shapes
from downpour.protocol import Message, Op, encode
from downpour.protocol.rpc import RpcClient
from downpour.transport import Security, create_job_keys
from downpour.worker.client import KVClient
from tests.cluster import PY, query_status, start_job, stop_job, wait_training
from tests.conftest import tiny_job
from tests.live_server import INIT, KEYS, LAYOUT, NUMEL, WAIT_S, LiveServer, Prober, RawClient, poisoned, seeds
from tests.test_codec import headers as codec_headers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = ("coordinator", "server", "worker", "client")
SHORT_S = 1.0  # how long a request that must not be answered is given


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> str:
    """The job's key folder."""
    return create_job_keys(str(tmp_path_factory.mktemp("job") / "keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> str:
    """Another job's key folder: valid CURVE keys, but not this job's."""
    return create_job_keys(str(tmp_path_factory.mktemp("other") / "keys"))


# -- slow subprocesses, started together before the first test ------------------------------------------
#
# The command-line runs, the atheris run and the real job start Python processes that import torch
# (seconds each). They are all started before this file's first test and run while the in-process tests
# run; the tests that need them, at the end of the file, collect them. Only what the selected tests need
# is started.

NEEDS: dict[str, str] = {}  # test name -> what it needs started ("cli", "atheris", "job")


def needs(what: str):
    def mark(fn):
        NEEDS[fn.__name__] = what
        return fn

    return mark


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOWNPOUR_")}
    env["PYTHONPATH"] = ROOT
    return env


CLI_COMMANDS = {
    "no-keys": ["worker", "--coordinator", "127.0.0.1:1"],
    "keys": ["keys", "{base}/jobkeys"],
    "keys-not-empty": ["keys", "{base}/full"],
    "insecure": ["worker", "--coordinator", "127.0.0.1:1", "--insecure"],
}
ATHERIS_DRIVER = textwrap.dedent("""
    import sys
    import atheris
    with atheris.instrument_imports(include=["downpour"]):
        from tests import live_server
    keys, corpus, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    live_server.atheris_main(keys, [sys.argv[0], *flags, corpus])
""")
ATHERIS_FLAGS = ["-runs=20000", "-max_total_time=3", "-len_control=0", "-max_len=4096", "-timeout=10"]


class Background:
    """Processes started for later tests; each one's stderr goes to a file (no pipe can fill up)."""

    def __init__(self, base) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        self.job: tuple[subprocess.Popen, str] | None = None
        self.atheris_skip: str | None = None

    def spawn(self, name: str, cmd: list[str]) -> None:
        self.logs[name] = str(self.base / f"{name}.stderr")
        with open(self.logs[name], "w") as err:
            self.procs[name] = subprocess.Popen(cmd, cwd=self.base, env=clean_env(), stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=err)

    def start_cli(self) -> None:
        (self.base / "full").mkdir()
        (self.base / "full" / "something").write_text("x")
        for name, args in CLI_COMMANDS.items():
            self.spawn(name, [PY, "-m", "downpour", *(a.format(base=self.base) for a in args)])

    def start_atheris(self, keys: str) -> None:
        try:
            import atheris  # noqa: F401
        except ImportError:
            self.atheris_skip = "atheris is not installed (pip install atheris)"
            return
        corpus = self.base / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i}").write_bytes(seed)
        self.spawn("atheris", [PY, "-c", ATHERIS_DRIVER, keys, str(corpus), *ATHERIS_FLAGS, f"-artifact_prefix={self.base}/"])

    def start_job(self, data: str) -> None:
        # tests/cluster.py's running_job, with its start here and its wait in the test.
        # tcp: a job over ipc sockets (the local default) needs no keys
        job = tiny_job(data, training={"epochs": 1000}, cluster={"num_servers": 1, "num_workers": 1, "transport": "tcp"})
        (self.base / "job").mkdir()
        self.job = start_job(self.base / "job", job)

    def finish(self, name: str, timeout_s: float = 90.0) -> tuple[int, str]:
        """Wait for ``name`` to exit: (exit code, stderr)."""
        proc = self.procs[name]
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{name} did not finish within {timeout_s}s: {self.stderr(name)[-3000:]}") from None
        return proc.returncode, self.stderr(name)

    def stderr(self, name: str) -> str:
        with open(self.logs[name], errors="replace") as f:
            return f.read()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if self.job is not None:
            stop_job(self.job[0])


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory, keys):
    wanted = {NEEDS.get(getattr(item, "originalname", item.name)) for item in request.session.items
              if getattr(item, "module", None) is request.module}
    bg = Background(tmp_path_factory.mktemp("background"))
    try:
        if "job" in wanted:
            bg.start_job(request.getfixturevalue("tiny_data"))
        if "atheris" in wanted:
            bg.start_atheris(keys)
        if "cli" in wanted:
            bg.start_cli()
        yield bg
    finally:
        bg.close()


# -- live servers and their clients -----------------------------------------------------------------------


@pytest.fixture
def live(keys):
    """``live(**cluster) -> LiveServer`` (with the job's server key), closed after the test."""
    servers: list[LiveServer] = []

    def start(**cluster) -> LiveServer:
        servers.append(LiveServer(keys, **cluster))
        return servers[-1]

    yield start
    errors = []
    for s in servers:
        try:
            s.close()
        except RuntimeError as err:
            errors.append(err)
    assert not errors, errors


class Net:
    """Clients in a context of their own: ``raw(...)`` DEALERs and ``kv(...)`` KVClients."""

    def __init__(self) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.raws: list[RawClient] = []
        self.rpcs: list[RpcClient] = []

    def raw(self, address: str, security: Security | None = None) -> RawClient:
        self.raws.append(RawClient(self.ctx, address, security))
        return self.raws[-1]

    def kv(self, address: str, security: Security | None, timeout_s: float = WAIT_S) -> KVClient:
        rpc = RpcClient(self.ctx, f"test-{len(self.rpcs)}", timeout_s, security=security)
        self.rpcs.append(rpc)
        rpc.connect("server-0", address, role="server")
        return KVClient(rpc, LAYOUT, {0: "server-0"})

    def close(self) -> None:
        for c in self.raws:
            c.close()
        for r in self.rpcs:
            r.close()
        self.ctx.term()  # every socket is closed: returns at once


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def pull(kv: KVClient, timeout_s: float = WAIT_S) -> torch.Tensor:
    out = torch.zeros(NUMEL)
    kv.wait(kv.pull(out), timeout_s)
    return out


def ready(live, net, keys, **cluster) -> tuple[LiveServer, KVClient]:
    """A live server initialised by a worker-key KVClient (returned, for legitimate pulls)."""
    srv = live(**cluster)
    worker = net.kv(srv.address, Security.load(keys, "worker"))
    worker.wait(worker.init(INIT), WAIT_S)
    assert torch.equal(pull(worker), INIT)
    return srv, worker


def unchanged(srv: LiveServer, worker: KVClient) -> None:
    """The parameters are the initial ones (by a legitimate pull and inside the server), no push was applied."""
    assert torch.equal(pull(worker), INIT)
    assert torch.equal(srv.values(), INIT)
    assert srv.pushes() == 0
    assert srv.alive()


def refused(fn, code: str) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()
    assert info.value.code == code, info.value
    return info.value


def foreign(theirs: Security, mine: Security, role: str) -> Security:
    """Another job's key pair, told this job's ``role`` public key (so its handshake reaches this job's ZAP handler)."""
    return dataclasses.replace(theirs, publics={**theirs.publics, role: mine.publics[role]})


# -- key files ------------------------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_job_keys_are_a_0700_folder_with_0600_secret_files(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    create_job_keys(str(folder))
    assert mode(folder) == 0o700
    assert sorted(os.listdir(folder)) == sorted([f"{r}.key" for r in ROLES] + [f"{r}.key_secret" for r in ROLES])
    for role in ROLES:
        assert mode(folder / f"{role}.key_secret") == 0o600
        assert mode(folder / f"{role}.key") & 0o022 == 0
        sec = Security.load(str(folder), role)
        assert sec.role == role and sec.publics[role] == sec.public and len(sec.secret) == 40
        assert sec.role_of(sec.public.decode()) == role
    assert len({Security.load(str(folder), r).public for r in ROLES}) == 4  # one key pair per role


def test_two_jobs_get_different_keys(keys, other_keys):
    mine, theirs = Security.load(keys, "worker"), Security.load(other_keys, "worker")
    assert not set(mine.publics.values()) & set(theirs.publics.values())
    assert mine.role_of(theirs.public.decode()) is None and mine.role_of(None) is None


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_a_secret_file_readable_by_others_is_refused_with_the_fix(tmp_path, bits):
    folder = create_job_keys(str(tmp_path / "keys"))
    secret = os.path.join(folder, "worker.key_secret")
    os.chmod(secret, bits)
    with pytest.raises(ConfigError) as info:
        Security.load(folder, "worker")
    assert secret in str(info.value) and "chmod 600" in str(info.value)
    Security.load(folder, "server")  # another role's secret file is not its business


def test_a_missing_key_folder_says_how_to_make_one(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"downpour keys {missing}"):
        Security.load(missing, "worker")


def test_an_unknown_role_and_a_missing_secret_are_config_errors(tmp_path):
    folder = create_job_keys(str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match="key role must be one of"):
        Security.load(folder, "admin")
    os.remove(os.path.join(folder, "client.key_secret"))
    with pytest.raises(ConfigError, match="cannot read the job's keys"):
        Security.load(folder, "client")


# -- a live secure server ---------------------------------------------------------------------------------


def test_a_plain_client_without_curve_can_neither_pull_nor_push(live, net, keys):
    srv, worker = ready(live, net, keys)
    plain = net.kv(srv.address, None, timeout_s=SHORT_S)
    out = torch.zeros(NUMEL)
    pulled, pushed = plain.pull(out), plain.push(torch.ones(NUMEL))  # both in flight: one timeout for both
    with pytest.raises(RequestTimeout):
        plain.wait(pulled)
    with pytest.raises(RequestTimeout):
        plain.wait(pushed)
    assert torch.equal(out, torch.zeros(NUMEL))
    unchanged(srv, worker)
    assert srv.rejected() == {}  # nothing reached the server's handler


def test_a_plain_client_that_keeps_asking_a_keyed_server_gets_an_error_in_bounded_time_never_a_hang(live, net, keys):
    # After the failed handshake ZeroMQ has no connection to send on and would hold a DEALER's send
    # for good (a worker started with --insecure against a keyed job hung in its registration).
    from downpour.errors import TransportError

    srv, _ = ready(live, net, keys)
    plain = net.kv(srv.address, None, timeout_s=SHORT_S)
    out = torch.zeros(NUMEL)
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises((RequestTimeout, TransportError)) as err:
            plain.wait(plain.pull(out))
        assert time.monotonic() - t0 < 3 * SHORT_S + 5
        if err.type is TransportError:
            assert "the peer expects keys" in str(err.value)
    assert torch.equal(out, torch.zeros(NUMEL)) and srv.rejected() == {}


def test_a_client_with_another_jobs_keys_is_refused_by_the_zap_handler(live, net, keys, other_keys):
    srv, worker = ready(live, net, keys)
    assert srv.security.refused == 0
    intruder = foreign(Security.load(other_keys, "worker"), Security.load(keys, "worker"), "server")
    kv = net.kv(srv.address, intruder, timeout_s=SHORT_S)
    out = torch.zeros(NUMEL)
    pulled, pushed = kv.pull(out), kv.push(torch.ones(NUMEL))
    with pytest.raises(RequestTimeout):
        kv.wait(pulled)
    with pytest.raises(RequestTimeout):
        kv.wait(pushed)
    assert srv.security.refused >= 1
    assert torch.equal(out, torch.zeros(NUMEL))
    unchanged(srv, worker)
    assert srv.rejected() == {}


@pytest.mark.parametrize("role", ["client", "server"])
def test_a_job_key_of_a_role_that_may_not_use_a_server_is_forbidden(live, net, keys, role):
    srv, worker = ready(live, net, keys)
    kv = net.kv(srv.address, Security.load(keys, role))
    out = torch.zeros(NUMEL)
    err = refused(lambda: kv.wait(kv.pull(out), WAIT_S), "forbidden")
    assert role in str(err)
    refused(lambda: kv.wait(kv.push(torch.ones(NUMEL)), WAIT_S), "forbidden")
    refused(lambda: kv.wait(kv.push_pull(torch.ones(NUMEL), out), WAIT_S), "forbidden")
    refused(lambda: kv.wait(kv.init(torch.zeros(NUMEL)), WAIT_S), "forbidden")
    assert torch.equal(out, torch.zeros(NUMEL))
    unchanged(srv, worker)
    assert srv.rejected() == {"forbidden": 4}


def test_the_coordinators_key_may_pull_from_a_server(live, net, keys):
    srv, _ = ready(live, net, keys)
    coordinator = net.kv(srv.address, Security.load(keys, "coordinator"))
    assert torch.equal(pull(coordinator), INIT)
    assert srv.rejected() == {}


@pytest.mark.parametrize("op", [Op.MEMBERSHIP, Op.CHECKPOINT, Op.STOP, Op.SERVER_STATS, Op.REGISTER], ids=lambda o: o.name)
def test_a_worker_sending_coordinator_commands_to_a_server_gets_bad_op(live, net, keys, op):
    srv, worker = ready(live, net, keys)
    raw = net.raw(srv.address, Security.load(keys, "worker"))
    meta = {"workers": ["intruder"], "name": "ckpt-x", "url": "file:///tmp/x", "at_version": None, "reason": "bye", "keys": KEYS}
    reply = raw.request(op, meta)
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "bad_op", reply
    assert op.name in reply.meta["error"]
    assert srv.call(lambda s: (s.members, s.snapshots.armed, s.snapshots.writes)) == (set(), None, 0)
    unchanged(srv, worker)
    assert srv.rejected() == {"bad_op": 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_nan_and_inf_gradients_from_a_legitimate_worker_are_refused_as_invalid(live, net, keys, bad):
    srv, worker = ready(live, net, keys)
    one = torch.ones(NUMEL)
    one[5] = bad
    out = torch.zeros(NUMEL)
    refused(lambda: worker.wait(worker.push(one), WAIT_S), "invalid")
    refused(lambda: worker.wait(worker.push(torch.full((NUMEL,), bad)), WAIT_S), "invalid")
    refused(lambda: worker.wait(worker.push_pull(one, out), WAIT_S), "invalid")
    refused(lambda: worker.wait(worker.push(one, keys=[KEYS[1]]), WAIT_S), "invalid")
    unchanged(srv, worker)
    assert srv.rejected() == {"invalid": 4}


def test_requests_beyond_max_requests_per_s_are_dropped_and_counted_while_the_server_keeps_serving(live, net, keys):
    srv, worker = ready(live, net, keys, max_requests_per_s=50)
    now = [0.0]  # the rate limit's clock: one window until the test moves it
    srv.call(lambda s: setattr(s.limit, "clock", lambda: now[0]))
    flood = net.raw(srv.address, Security.load(keys, "worker"))
    pulls = srv.call(lambda s: s.counts["pull"])
    sent = 200
    for i in range(sent):
        flood.send(encode(Message(Op.PULL, i + 1, {"keys": KEYS})))
    assert torch.equal(pull(worker), INIT)  # another peer is served during the flood
    deadline = time.monotonic() + WAIT_S
    while srv.call(lambda s: s.counts["pull"] + s.rejected["rate_limited"]) < pulls + 1 + sent:  # all handled
        assert time.monotonic() < deadline, "the server did not handle the flood"
        time.sleep(0.01)
    answered = srv.call(lambda s: s.counts["pull"]) - pulls - 1
    for _ in range(answered):
        reply = flood.recv(WAIT_S)
        assert reply is not None and reply.op == Op.OK and torch.equal(reply.tensors[0], INIT)
    assert flood.recv(0.05) is None  # the others were dropped unanswered
    assert answered == 50, answered  # one window: exactly max_requests_per_s answered
    assert srv.rejected() == {"rate_limited": sent - answered}
    now[0] = 1.0  # a new window
    again = flood.request(Op.PULL, {"keys": KEYS})
    assert again is not None and again.op == Op.OK and torch.equal(again.tensors[0], INIT)
    unchanged(srv, worker)


def test_a_request_naming_more_keys_than_max_keys_per_request_is_refused(live, net, keys):
    srv, worker = ready(live, net, keys, max_keys_per_request=2)
    raw = net.raw(srv.address, Security.load(keys, "worker"))
    ok = raw.request(Op.PULL, {"keys": KEYS[2:]})
    assert ok.op == Op.OK and torch.equal(ok.tensors[0], INIT[8:])
    for msg in (Message(Op.PULL, 0, {"keys": KEYS[1:]}),
                Message(Op.PUSH, 0, {"keys": KEYS[:3], "version": 0}, [torch.ones(12)]),
                Message(Op.PUSHPULL, 0, {"keys": [KEYS[2], KEYS[1], KEYS[0]], "version": 0}, [torch.ones(12)])):
        reply = raw.request(msg.op, msg.meta, msg.tensors)
        assert reply.op == Op.ERROR and reply.meta["code"] == "invalid", reply
        assert "3 keys in one request; the limit is 2" in reply.meta["error"]
    unchanged(srv, worker)
    assert srv.rejected() == {"invalid": 3}


def test_the_default_key_limit_refuses_a_pull_of_70000_keys(live, net, keys):
    srv, worker = ready(live, net, keys)
    raw = net.raw(srv.address, Security.load(keys, "worker"))
    reply = raw.request(Op.PULL, {"keys": list(range(70_000))})
    assert reply.op == Op.ERROR and reply.meta["code"] == "invalid"
    assert "70000 keys in one request; the limit is 65536" in reply.meta["error"]
    unchanged(srv, worker)


# -- the coordinator's role checks ------------------------------------------------------------------------

COORD_JOB = parse_job({
    "name": "tiny",
    "model": {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}},
    "data": {"shard_size": 4},
    "cluster": {"num_servers": 2, "num_workers": 2, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0},
})
COORD_LAYOUT = make_layout(param_shapes(build_model(COORD_JOB.model, 0)), 2)


class Coord:
    """A CoordinatorState on a fake clock; every request names the role of the key that sent it."""

    def __init__(self) -> None:
        self.state = CoordinatorState(COORD_JOB, COORD_LAYOUT, 10, 0.0)
        self.req = 0

    def send(self, key_role: str, op: Op, ident: bytes = b"id", **meta) -> Message | None:
        self.req += 1
        actions = self.state.handle(ident, Message(op, self.req, meta), 1.0, role=key_role)
        replies = [a.msg for a in actions if isinstance(a, Reply) and a.to == ident]
        assert len(replies) <= 1
        return replies[0] if replies else None

    def register(self, key_role: str, as_role: str, ident: bytes = b"id") -> Message | None:
        address = "tcp://127.0.0.1:6000" if as_role == "server" else None
        return self.send(key_role, Op.REGISTER, ident, role=as_role, rank=0, address=address, host="h", pid=1)


def forbidden(reply: Message | None) -> bool:
    return reply is not None and reply.op == Op.ERROR and reply.meta.get("code") == "forbidden"


@pytest.mark.parametrize(("key", "as_role"), [("worker", "server"), ("server", "worker"), ("client", "worker"),
                                              ("client", "server"), ("coordinator", "server")])
def test_a_key_may_register_only_as_its_own_role(key, as_role):
    c = Coord()
    assert forbidden(c.register(key, as_role))
    assert c.state.nodes == {} and c.state.rejected == {"forbidden": 1}


def test_the_servers_key_registers_a_server_and_acts_for_it():
    c = Coord()
    reply = c.register("server", "server", ident=b"s0")
    assert reply.op == Op.OK and reply.meta["node"] == "server-0"
    assert c.send("server", Op.HEARTBEAT, b"s0", node="server-0", progress={"pushes": 1}).op == Op.OK
    assert c.state.nodes["server-0"].progress == {"pushes": 1}
    assert c.state.rejected == {}


def test_a_key_may_not_act_for_a_node_of_another_role():
    c = Coord()
    c.register("server", "server", ident=b"s0")
    assert c.register("worker", "worker", ident=b"w0") is None  # parked until the cluster is complete
    assert forbidden(c.send("worker", Op.HEARTBEAT, b"w0", node="server-0", progress={"pushes": 999}))
    assert forbidden(c.send("worker", Op.REPORT, b"w0", node="server-0", kind="error", data={"error": "forged"}))
    assert forbidden(c.send("worker", Op.REPORT, b"w0", node="server-0", kind="server", data={"pushes": 1}))
    assert forbidden(c.send("client", Op.HEARTBEAT, b"c", node="server-0"))
    assert forbidden(c.send("client", Op.REPORT, b"c", node="worker-0", kind="error", data={"error": "forged"}))
    assert forbidden(c.send("server", Op.NEXT_SHARD, b"s0", node="worker-0"))
    server = c.state.nodes["server-0"]
    assert server.progress == {} and server.state == "alive" and server.stats is None
    assert c.state.nodes["worker-0"].state == "alive"
    assert c.state.phase == "registering" and c.state.error is None and c.state.failures == []
    assert c.state.rejected == {"forbidden": 6}
    # The server's own key still may.
    assert c.send("server", Op.HEARTBEAT, b"s0", node="server-0", progress={"pushes": 2}).op == Op.OK
    assert server.progress == {"pushes": 2}


def test_any_job_key_may_ask_for_status():
    c = Coord()
    for role in ROLES:
        assert c.send(role, Op.STATUS).op == Op.OK
    assert c.state.rejected == {}


# -- fuzzing the live secure server -----------------------------------------------------------------------

NAN = torch.full((NUMEL,), float("nan"))
# Bases for mutation: INIT (a no-op: the server is initialised before the fuzz), PULLs, and pushes of
# all-NaN gradients. Every fuzzed message is poisoned() (unless its header is surely not a push, each
# frame after the header starts with a NaN), so none is a valid push: the parameters must never change.
BASES = [[bytes(f) for f in encode(m)] for m in (
    Message(Op.INIT, 11, {"keys": KEYS}, [torch.zeros(NUMEL)]),
    Message(Op.PULL, 12, {"keys": KEYS}),
    Message(Op.PULL, 13, {"keys": [KEYS[2], KEYS[0]]}),
    Message(Op.PUSH, 14, {"keys": KEYS, "version": 0, "weight": 1.0}, [NAN]),
    Message(Op.PUSHPULL, 15, {"keys": KEYS[1:3], "version": 3, "pos": [0, 0, 1]}, [NAN[:8]]),
)]

header_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 8)),
)
# At most one edit per tensor frame: drop it, send it twice, cut it to a prefix, or extend it.
tensor_edit = st.one_of(
    st.just(("keep",)), st.just(("drop",)), st.just(("twice",)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=2048)),
)


def edit_header(head: bytes, edits) -> bytes:
    b = bytearray(head)
    for kind, at, arg in edits:
        at %= len(b) + 1
        if kind == "flip" and b:
            b[at % len(b)] = arg
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at : at + arg]
    return bytes(b)


def edit_tensor(frame: bytes, edit) -> list[bytes]:
    kind = edit[0]
    if kind == "drop":
        return []
    if kind == "twice":
        return [frame, frame]
    if kind == "cut":
        return [frame[: edit[1] % (len(frame) + 1)]]
    if kind == "extend":
        return [frame + edit[1]]
    return [frame]


@st.composite
def mutated(draw) -> list[bytes]:
    head, *tensors = draw(st.sampled_from(BASES))
    out = [edit_header(head, draw(st.lists(header_edit, max_size=4)))]
    for t in tensors:
        out += edit_tensor(t, draw(tensor_edit))
    if draw(st.booleans()):
        out += draw(st.lists(st.binary(max_size=64), max_size=2))
    return poisoned(out)  # a dropped tensor and an added frame of the right size would otherwise make a valid push


fuzz_messages = st.one_of(
    st.lists(st.binary(max_size=4096), min_size=1, max_size=5).map(poisoned),  # a ZeroMQ message has at least one frame
    st.builds(lambda head, rest: poisoned([head, *rest]), codec_headers, st.lists(st.binary(max_size=256), max_size=4)),
    mutated(),
)


def test_fuzzing_a_live_secure_server_never_changes_a_parameter_and_counts_every_refusal(live, net, keys):
    srv, worker = ready(live, net, keys)
    prober = Prober(net.raw(srv.address, Security.load(keys, "worker")))
    tally = {"sent": 0, "errors": 0, "dropped": 0, "ok": 0, "counted": 0}
    start = time.monotonic()

    @settings(max_examples=200, deadline=timedelta(seconds=3), database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(frames=fuzz_messages)
    def one(frames: list[bytes]) -> None:
        replies, probe = prober.exchange(frames, timeout_s=2.0)  # bounded: a hang fails here
        assert srv.alive(), "the server thread died"
        assert torch.equal(probe.tensors[0], INIT), f"parameters changed after {frames!r:.400}"
        rejected = not replies or replies[0].op == Op.ERROR
        tally["sent"] += 1
        tally["dropped" if not replies else "errors" if rejected else "ok"] += 1
        before, tally["counted"] = tally["counted"], sum(srv.rejected().values())
        assert tally["counted"] - before == rejected, (frames, replies, srv.rejected())

    one()
    assert tally["sent"] >= 100, tally
    assert sum(srv.rejected().values()) == tally["errors"] + tally["dropped"], (tally, srv.rejected())
    assert tally["errors"] and tally["dropped"] and tally["ok"], tally  # the fuzz reached every outcome
    unchanged(srv, worker)
    assert time.monotonic() - start < 60, "the fuzz took far too long"


# -- the tests of the background processes (started before the first test) --------------------------------


@needs("cli")
def test_a_worker_without_keys_exits_2_naming_keys_and_insecure(background):
    code, err = background.finish("no-keys")
    assert code == 2, err
    assert "--keys" in err and "--insecure" in err and "downpour keys" in err


@needs("cli")
def test_downpour_keys_makes_a_job_key_folder(background):
    code, err = background.finish("keys")
    assert code == 0, err
    folder = background.base / "jobkeys"
    assert mode(folder) == 0o700
    for role in ROLES:
        assert mode(folder / f"{role}.key_secret") == 0o600
        assert Security.load(str(folder), role).role == role


@needs("cli")
def test_downpour_keys_refuses_a_folder_that_is_not_empty(background):
    code, err = background.finish("keys-not-empty")
    assert code == 2 and "not empty" in err, err
    assert os.listdir(background.base / "full") == ["something"]


@needs("cli")
def test_an_insecure_worker_warns_loudly_on_stderr(background):
    proc = background.procs["insecure"]
    deadline = time.monotonic() + 30  # it warns as it starts, then tries to reach a coordinator that is not there
    while "WARNING" not in background.stderr("insecure") and time.monotonic() < deadline:
        assert proc.poll() is None, background.stderr("insecure")
        time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    err = background.stderr("insecure")
    assert "WARNING: --insecure" in err and "without authentication or encryption" in err, err


@needs("atheris")
def test_atheris_fuzzes_the_live_secure_server(background):
    """Coverage-guided fuzzing (libFuzzer, through atheris where installed) of a live secure server, with the
    fuzz test's checks after every input (tests/live_server.py: atheris_main)."""
    if background.atheris_skip:
        pytest.skip(background.atheris_skip)
    code, err = background.finish("atheris")
    assert code == 0, err[-5000:]
    assert "Done " in err and "runs in" in err, err[-3000:]


def coordinator_rpc(ctx: zmq.Context, address: str, security: Security | None) -> RpcClient:
    rpc = RpcClient(ctx, f"intruder-{os.getpid()}", SHORT_S, security=security)
    rpc.connect("coordinator", address, role="coordinator")
    return rpc


@needs("job")
def test_a_real_secure_jobs_coordinator_refuses_foreign_keys_and_role_forgery(background, other_keys):
    proc, run_dir = background.job
    try:
        wait_training(run_dir)
        with open(os.path.join(run_dir, "coordinator.addr")) as f:
            address = f.read().strip()
        assert address.startswith("tcp://127.0.0.1:")
        mine = Security.load(os.path.join(run_dir, "keys"), "worker")
        intruder = foreign(Security.load(other_keys, "worker"), mine, "coordinator")
        register = {"role": "server", "rank": 0, "address": "tcp://127.0.0.1:9", "host": "evil", "pid": 1}
        ctx = zmq.Context(io_threads=1)
        rpcs = []
        try:
            rpcs = [coordinator_rpc(ctx, address, s) for s in (mine, None, intruder)]
            forger, plain, stranger = rpcs
            # Three requests in flight at once: the two that get no answer share one timeout.
            futures = [forger.request("coordinator", Message(Op.REGISTER, meta=register), timeout_s=WAIT_S),
                       plain.request("coordinator", Message(Op.STATUS)), stranger.request("coordinator", Message(Op.STATUS))]
            with pytest.raises(RemoteError) as info:
                futures[0].result()
            assert info.value.code == "forbidden" and "worker key cannot register as 'server'" in str(info.value)
            for fut in futures[1:]:
                with pytest.raises(RequestTimeout):
                    fut.result()
        finally:
            for rpc in rpcs:
                rpc.close()
            ctx.term()
        status = query_status(run_dir)  # the job's client key still may; the job goes on unharmed
        assert status is not None and status["phase"] == "training" and status["error"] is None
        assert [n["name"] for n in status["nodes"] if n["role"] == "server"] == ["server-0"]
        assert all(n["host"] != "evil" for n in status["nodes"])
    finally:
        stop_job(proc)
