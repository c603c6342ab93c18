"""Which address a listener advertises: never a wildcard, never loopback to a remote peer; the
checkpoint location every host reaches; the coordinator's checks at registration and commit."""

from __future__ import annotations

import json
import os

import pytest

from downpour.config import parse_job
from downpour.coordinator.reach import address_problem, local_path
from downpour.coordinator.state import CommitCheckpoint
from downpour.errors import AddressError
from downpour.storage import CheckpointStore
from downpour.transport import advertised, bind_address, is_local, split_url
from downpour.transport.addresses import route_to
from tests.conftest import tiny_job


def test_a_wildcard_bind_advertises_the_interface_that_routes_to_the_coordinator():
    assert advertised("tcp://0.0.0.0:5555", "tcp://127.0.0.1:7070") == "tcp://127.0.0.1:5555"
    assert route_to("127.0.0.1") == "127.0.0.1"


def test_a_concrete_bind_advertises_itself_and_ipc_passes_unchanged():
    assert advertised("tcp://127.0.0.1:5555", "tcp://127.0.0.1:7070") == "tcp://127.0.0.1:5555"
    assert advertised("ipc:///tmp/x/server.sock", "ipc:///tmp/x/coordinator.sock") == "ipc:///tmp/x/server.sock"
    assert advertised("10.1.2.3:9100", "tcp://10.1.2.4:7070", loopback_ok=True) == "10.1.2.3:9100"


def test_an_explicit_advertise_replaces_the_host_and_keeps_the_port():
    assert advertised("tcp://0.0.0.0:5555", "tcp://10.9.9.9:7070", "node-3.example") == "tcp://node-3.example:5555"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "*"])
def test_a_wildcard_advertise_is_refused_naming_it_and_the_fix(host):
    with pytest.raises(AddressError, match=r"cannot advertise .*--advertise"):
        advertised("tcp://0.0.0.0:5555", "tcp://10.9.9.9:7070", host)


def test_loopback_is_never_handed_to_a_remote_coordinators_peers():
    with pytest.raises(AddressError, match=r"127\.0\.0\.1.*loopback.*10\.9\.9\.9.*--host 0\.0\.0\.0"):
        advertised("tcp://127.0.0.1:5555", "tcp://10.9.9.9:7070")
    with pytest.raises(AddressError, match="cannot advertise 127.0.0.1"):
        advertised("tcp://0.0.0.0:5555", "tcp://10.9.9.9:7070", "127.0.0.1")
    # A metrics endpoint meant for this host only keeps its loopback address.
    assert advertised("127.0.0.1:9100", "tcp://10.9.9.9:7070", loopback_ok=True) == "127.0.0.1:9100"


def test_a_fixed_port_is_bound_as_given():
    assert bind_address("tcp", "0.0.0.0", None, "s", 7071) == "tcp://0.0.0.0:7071"
    assert bind_address("tcp", "0.0.0.0", None, "s") == "tcp://0.0.0.0:*"
    assert split_url("tcp://[::1]:7070") == ("tcp", "::1", "7070")


def test_is_local_knows_this_hosts_addresses():
    assert is_local("127.0.0.1") and not is_local("192.0.2.77")


def test_a_local_checkpoint_folder_refuses_a_server_on_another_host():
    remote = lambda host: host == "127.0.0.1"  # noqa: E731
    problem = address_problem("tcp://10.0.0.2:5000", "/runs/a/checkpoints", False, remote)
    assert problem and "/runs/a/checkpoints" in problem and "10.0.0.2" in problem and "s3://" in problem
    assert address_problem("tcp://10.0.0.2:5000", "s3://bucket/ck", False, remote) is None
    assert address_problem("tcp://10.0.0.2:5000", "/nfs/ck", True, remote) is None  # checkpoint.shared
    assert address_problem("tcp://127.0.0.1:5000", "/runs/a/checkpoints", False, remote) is None
    assert "wildcard" in address_problem("tcp://0.0.0.0:5000", None, False, remote)
    assert local_path("file:///x") and local_path("/x") and not local_path("s3://b/x")


def test_the_coordinator_refuses_such_a_server_at_registration():
    from downpour.coordinator.state import CoordinatorState
    from downpour.protocol import Message, Op
    from tests.test_coordinator_state import JOB, LAYOUT, error_code, one

    state = CoordinatorState(JOB, LAYOUT, 10, 0.0, "/runs/a/checkpoints")
    state.is_local = lambda host: host == "127.0.0.1"
    ok = state.handle(b"t", Message(Op.REGISTER, 2, {"role": "server", "rank": 0, "address": "tcp://127.0.0.1:1", "host": "a"}), 0.0)
    assert "server-0" in state.nodes and not one(ok).msg.meta.get("error")
    out = state.handle(b"s", Message(Op.REGISTER, 1, {"role": "server", "rank": 1, "address": "tcp://10.0.0.2:1", "host": "b"}), 0.0)
    assert error_code(one(out)) == "bad_address" and set(state.nodes) == {"server-0"}
    assert "checkpoint.url" in one(out).msg.meta["error"]
    # No server of that host could ever join (the job's setting, not the server's): the job fails now, saying why.
    assert state.phase == "failed" and "a server registered from another host" in state.error


@pytest.fixture
def coordinator(tmp_path, tiny_data):
    from downpour.coordinator.service import Coordinator
    from downpour.transport import new_context

    ctx = new_context()
    job = parse_job(tiny_job(tiny_data))
    os.makedirs(tmp_path / "run")
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", str(tmp_path / "run"))
    yield coord
    coord.listener.close()
    coord.store.close()
    if coord.endpoint is not None:
        coord.endpoint.close()
    ctx.term()


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_a_manifest_is_committed_only_once_every_server_file_verifies(coordinator, damage):
    store = CheckpointStore(coordinator.checkpoint_url)
    name = store.name_for(10)
    files = {f"server-{r}.safetensors": store.write_file(name, f"server-{r}.safetensors", os.urandom(64)) for r in range(2)}
    path = os.path.join(coordinator.checkpoint_url, name, "server-1.safetensors")
    if damage == "missing":
        os.remove(path)
    elif damage == "truncated":
        open(path, "wb").write(b"x")
    else:
        open(path, "wb").write(os.urandom(64))
    plan = coordinator.state.checkpoints
    plan.pending = type("P", (), {"asked": 0.0})()  # as if the checkpoint had been asked for
    failed = []
    coordinator.state.checkpoint_committed = lambda now, ok, why="": failed.append((ok, why))
    coordinator._commit_checkpoint(CommitCheckpoint(name, 10, files, {"version": 1}, False))
    assert store.names() == [] and failed and failed[0][0] is False and "server-1.safetensors" in failed[0][1]


def test_a_manifest_whose_files_verify_is_committed(coordinator):
    store = CheckpointStore(coordinator.checkpoint_url)
    name = store.name_for(10)
    files = {"server-0.safetensors": store.write_file(name, "server-0.safetensors", b"abc")}
    results = []
    coordinator.state.checkpoint_committed = lambda now, ok, why="": results.append(ok)
    coordinator._commit_checkpoint(CommitCheckpoint(name, 10, files, {"version": 1}, False))
    assert results == [True] and store.names() == [name]
    assert json.loads(store.manifest(name).to_json())["files"].keys() >= {"server-0.safetensors", "job.json"}


# -- bad input across hosts: a clear error in bounded time ------------------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_coordinator_that_does_not_answer_is_named_with_its_address_within_the_limit():
    import time

    from downpour.coordinator.client import CoordinatorClient
    from downpour.errors import RequestTimeout
    from downpour.transport import new_context

    ctx = new_context()
    url = f"tcp://127.0.0.1:{_closed_port()}"
    client = CoordinatorClient(ctx, url, "worker-x", attempt_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimeout, match=rf"REGISTER to the coordinator got no reply within 1.5s .*listening at {url}"):
            client.register("worker", None, None, timeout_s=1.5)
    finally:
        client.close()
        ctx.term()
    assert time.monotonic() - started < 5


def test_keys_of_another_job_get_no_answer_and_the_error_says_to_check_the_keys(tmp_path):
    import time

    from downpour.coordinator.client import CoordinatorClient
    from downpour.errors import RequestTimeout
    from downpour.transport import Listener, Security, create_job_keys, new_context

    ours, theirs = create_job_keys(str(tmp_path / "a")), create_job_keys(str(tmp_path / "b"))
    ctx = new_context()
    server_keys, client_keys = Security.load(ours, "coordinator"), Security.load(theirs, "worker")
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 20, server_keys)
    client = CoordinatorClient(ctx, listener.address, "worker-x", security=client_keys, attempt_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimeout, match="do this node's keys belong to the job"):
            client.register("worker", None, None, timeout_s=1.5)
        assert time.monotonic() - started < 5
    finally:
        client.close()
        listener.close()
        server_keys.close()
        client_keys.close()
        ctx.term()
