"""KVClient over RpcClient against real parameter servers serving on 127.0.0.1 in background threads
(tests/live_server.py)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
import torch
import zmq

from downpour.config import parse_job
from downpour.errors import ConfigError, RemoteError, RequestTimeout
from downpour.layout import Layout, make_layout
from downpour.protocol.rpc import RpcClient
from downpour.worker.client import KVClient, Pieces
from tests.live_server import LiveServer

SHAPES = [("w", (6, 5)), ("b", (6,)), ("v", (4, 3))]  # 48 elements
WAIT_S = 5.0  # every wait in this file is bounded by this


def job(lr: float = 0.1, momentum: float = 0.0):
    return parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum}})


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # every socket was already closed by its owner; this only guards against a hang


@pytest.fixture(params=["socket", "shm"])
def cluster(ctx, request):
    """``start(layout, job) -> KVClient`` against ``layout.num_servers`` servers named server-0, server-1, ...
    (tests/live_server.py, each in a thread of its own; ``cluster.servers``: the last start's).
    Each test runs twice: values through the TCP socket, and through shared memory beside ipc sockets."""
    servers: list[LiveServer] = []
    clients: list[RpcClient] = []
    kvs: list[KVClient] = []
    folder = tempfile.mkdtemp(prefix="dp-kv-") if request.param == "shm" else None  # short: ipc paths are limited

    def start(layout: Layout, server_job=None, request_timeout_s: float = WAIT_S, request_bytes: int | None = None) -> KVClient:
        rpc = RpcClient(ctx, "worker-0", request_timeout_s)
        clients.append(rpc)
        kv = KVClient(rpc, layout, {rank: f"server-{rank}" for rank in range(layout.num_servers)}, request_bytes=request_bytes)
        kvs.append(kv)
        start.servers = []
        for rank in range(layout.num_servers):
            bind = f"ipc://{folder}/server-{rank}.sock" if folder else "tcp://127.0.0.1:*"
            srv = LiveServer(None, job=server_job or job(), layout=layout, rank=rank, bind=bind, max_bytes=1 << 30)
            servers.append(srv)
            start.servers.append(srv)
            rpc.connect(f"server-{rank}", srv.address)
            assert kv.set_address(f"server-{rank}", srv.address) == (folder is not None)
        return kv

    yield start
    try:
        if folder is not None:  # shared memory was used, and every slot file goes with its client
            assert all(kv.shm_requests > 0 for kv in kvs if kv.wire["push"] or kv.wire["pull"])
        for kv in kvs:
            kv.close()
        if folder is not None:
            assert not [f for f in os.listdir(folder) if f.startswith("shm-")]
    finally:
        for rpc in clients:
            rpc.close()
        errors = []
        for srv in servers:
            try:
                srv.close()  # raises if its thread failed or did not stop
            except RuntimeError as err:
                errors.append(err)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    assert not errors, errors


def initial(layout: Layout) -> torch.Tensor:
    return torch.linspace(-2.0, 2.0, layout.numel)


def gradient(layout: Layout, seed: int) -> torch.Tensor:
    return torch.randn(layout.numel, generator=torch.Generator().manual_seed(seed))


def ready(kv: KVClient) -> torch.Tensor:
    values = initial(kv.layout)
    kv.wait(kv.init(values), WAIT_S)
    return values


BYTES = make_layout(SHAPES, 2, max_slice_bytes=40)  # 10-element keys, each server one contiguous range
GREEDY = make_layout(SHAPES, 2, partitioner="greedy", max_slice_bytes=32)  # 8-element keys, interleaved


def test_the_greedy_layout_really_interleaves_the_servers_keys():
    owners = [s.server for s in GREEDY.slices]
    assert owners != sorted(owners)


@pytest.mark.parametrize("layout", [BYTES, GREEDY], ids=["bytes", "greedy"])
def test_pull_after_init_returns_the_initial_values(cluster, layout):
    kv = cluster(layout)
    values = ready(kv)
    out = torch.full((layout.numel,), float("nan"))
    kv.wait(kv.pull(out), WAIT_S)
    assert torch.equal(out, values)
    assert kv.versions == [0] * len(layout.slices)  # one version per key


def test_a_second_init_does_not_change_the_values(cluster):
    kv = cluster(BYTES)
    values = ready(kv)
    kv.wait(kv.init(torch.zeros(BYTES.numel)), WAIT_S)
    out = torch.empty(BYTES.numel)
    kv.wait(kv.pull(out), WAIT_S)
    assert torch.equal(out, values)


@pytest.mark.parametrize("layout", [BYTES, GREEDY], ids=["bytes", "greedy"])
def test_push_pull_applies_sgd_and_returns_the_updated_values(cluster, layout):
    kv = cluster(layout, job(lr=0.1))
    values = ready(kv)
    grad = gradient(layout, 1)
    out = torch.empty(layout.numel)
    kv.wait(kv.push_pull(grad, out), WAIT_S)
    torch.testing.assert_close(out, values - 0.1 * grad)
    assert kv.versions == [1] * len(layout.slices)


def test_push_then_pull_sees_the_update(cluster):
    kv = cluster(BYTES, job(lr=0.5))
    values = ready(kv)
    grad = gradient(BYTES, 2)
    kv.wait(kv.push(grad, weight=32.0), WAIT_S)
    out = torch.empty(BYTES.numel)
    kv.wait(kv.pull(out), WAIT_S)
    torch.testing.assert_close(out, values - 0.5 * grad)


def test_several_steps_with_momentum_match_torch_sgd(cluster):
    kv = cluster(GREEDY, job(lr=0.05, momentum=0.9))
    param = torch.nn.Parameter(ready(kv).clone())
    opt = torch.optim.SGD([param], lr=0.05, momentum=0.9)
    out = torch.empty(GREEDY.numel)
    for step in range(5):
        grad = gradient(GREEDY, 10 + step)
        kv.wait(kv.push_pull(grad, out), WAIT_S)
        param.grad = grad
        opt.step()
    torch.testing.assert_close(out, param.detach(), rtol=1e-5, atol=1e-5)
    assert kv.versions == [5] * len(GREEDY.slices)


def test_requests_to_both_servers_may_be_in_flight_at_once(cluster):
    kv = cluster(BYTES, job(lr=1.0))
    values = ready(kv)
    # Each server holds the first push it gets until the other server has one too: were the
    # client to wait for one server's answer before asking the other, neither push would return.
    both = threading.Barrier(2, timeout=WAIT_S)
    held: list[int] = []

    def gate(srv: LiveServer):
        handle = srv.server.handle

        def first_waits(peer, frames):
            if srv.rank not in held:
                held.append(srv.rank)
                both.wait()
            handle(peer, frames)
        return first_waits

    for srv in cluster.servers:
        srv.call(lambda s, srv=srv: setattr(s, "handle", gate(srv)))
    handles = [kv.push(torch.ones(BYTES.numel)) for _ in range(3)]
    for h in handles:
        kv.wait(h, WAIT_S)
    assert sorted(held) == [0, 1] and not both.broken
    out = torch.empty(BYTES.numel)
    kv.wait(kv.pull(out), WAIT_S)
    torch.testing.assert_close(out, values - 3.0)


def flat_mask(layout: Layout, keys: list[int]) -> torch.Tensor:
    mask = torch.zeros(layout.numel, dtype=torch.bool)
    for k in keys:
        s = layout.slices[k]
        mask[s.start : s.stop] = True
    return mask


@pytest.mark.parametrize("layout", [BYTES, GREEDY], ids=["bytes", "greedy"])
def test_a_gradient_in_pieces_is_pushed_as_the_same_vector_would_be(cluster, layout):
    kv = cluster(layout, job(lr=0.1))
    values = ready(kv)
    grad = gradient(layout, 4)
    cuts = [0, 3, 17, layout.numel // 2 + 1, layout.numel]  # pieces that straddle keys and servers
    pieces = Pieces([grad[a:b].clone() for a, b in zip(cuts, cuts[1:])])
    out = torch.empty(layout.numel)
    kv.wait(kv.push_pull(pieces, out), WAIT_S)
    torch.testing.assert_close(out, values - 0.1 * grad)
    with pytest.raises(ConfigError):
        kv.push_pull(Pieces([grad[1:]]), out)


def test_a_non_contiguous_key_subset_is_gathered_and_scattered_correctly(cluster):
    kv = cluster(GREEDY, job(lr=0.25))
    values = ready(kv)
    keys = [k for k in range(len(GREEDY.slices)) if k % 2 == 0][::-1]  # every other key, in any order
    assert len({GREEDY.slices[k].server for k in keys}) == 2
    mask = flat_mask(GREEDY, keys)
    grad = gradient(GREEDY, 3)
    out = torch.full((GREEDY.numel,), -99.0)
    kv.wait(kv.push_pull(grad, out, keys=keys), WAIT_S)
    expected = torch.where(mask, values - 0.25 * grad, torch.tensor(-99.0))
    torch.testing.assert_close(out, expected)  # only the keys asked for were written
    everything = torch.empty(GREEDY.numel)
    kv.wait(kv.pull(everything), WAIT_S)
    torch.testing.assert_close(everything, torch.where(mask, values - 0.25 * grad, values))  # only they were updated


def test_pulling_some_keys_leaves_the_rest_of_out_untouched(cluster):
    kv = cluster(GREEDY)
    values = ready(kv)
    keys = [len(GREEDY.slices) - 1, 1]
    out = torch.zeros(GREEDY.numel)
    kv.wait(kv.pull(out, keys=keys), WAIT_S)
    mask = flat_mask(GREEDY, keys)
    assert torch.equal(out, torch.where(mask, values, torch.tensor(0.0)))


def test_a_pull_before_init_raises_the_servers_refusal(cluster):
    kv = cluster(BYTES)
    with pytest.raises(RemoteError, match="server-0 refused PULL") as info:
        kv.wait(kv.pull(torch.empty(BYTES.numel)), WAIT_S)
    assert info.value.code == "uninitialized" and info.value.peer == "server-0"


@pytest.mark.parametrize(
    "bad", [torch.zeros(3), torch.zeros(BYTES.numel, dtype=torch.float64), torch.zeros(1, BYTES.numel)], ids=["short", "f64", "2-d"]
)
def test_a_tensor_that_does_not_match_the_layout_is_refused_before_sending(cluster, bad):
    kv = cluster(BYTES)
    with pytest.raises(ConfigError, match=f"{BYTES.numel} elements"):
        kv.init(bad)


@pytest.mark.parametrize("key", [-1, len(BYTES.slices), "0"], ids=repr)
def test_a_key_outside_the_layout_is_refused_before_sending(cluster, key):
    kv = cluster(BYTES)
    with pytest.raises(ConfigError, match="not in the layout"):
        kv.pull(torch.empty(BYTES.numel), keys=[key])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_request_to_a_server_nobody_runs_times_out_naming_it(ctx):
    layout = make_layout(SHAPES, 1)
    rpc = RpcClient(ctx, "worker-0", request_timeout_s=0.5)
    try:
        rpc.connect("server-0", f"tcp://127.0.0.1:{free_port()}")
        kv = KVClient(rpc, layout, {0: "server-0"})
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="server-0") as info:
            kv.wait(kv.pull(torch.empty(layout.numel)))
        assert time.monotonic() - started < WAIT_S  # the 0.5 s request timeout, not a hang
        assert info.value.peer == "server-0"
    finally:
        rpc.close()


def test_a_servers_keys_can_travel_in_several_requests(cluster):
    kv = cluster(BYTES, job(lr=0.1), request_bytes=80)  # at most two 10-element keys per request
    assert len(kv._all) > BYTES.num_servers
    assert all(part.numel <= 20 for part in kv._all)
    values = ready(kv)
    grad = gradient(BYTES, 3)
    out = torch.empty(BYTES.numel)
    kv.wait(kv.push_pull(grad, out), WAIT_S)
    torch.testing.assert_close(out, values - 0.1 * grad)
    assert kv.versions == [1] * len(BYTES.slices)
