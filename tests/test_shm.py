"""Shared-memory slots beside ipc sockets (transport/shm.py): what a listener maps, what a
server refuses, and what a client does with the slot of a request that got no answer.
(The KVClient tests of tests/test_rpc_kvclient.py run through slots as well as sockets.)"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
import zmq

from downpour.config import parse_job
from downpour.errors import RequestTimeout, TransportError
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient
from downpour.transport import Slot, SlotMaps, slot_folder
from downpour.worker.client import KVClient
from tests.live_server import LiveServer, RawClient

WAIT_S = 5.0
LAYOUT = make_layout([("w", (4, 3)), ("b", (4,))], 1)
NUMEL = LAYOUT.numel
INIT = torch.linspace(-1.0, 1.0, NUMEL)
KEYS = [s.key for s in LAYOUT.server_slices(0)]


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="dp-shm-")  # short: ipc paths are limited to about 100 characters
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_slot_folder_is_the_ipc_sockets_folder_and_none_for_tcp():
    assert slot_folder("ipc:///run/job/sock/server-0.sock") == "/run/job/sock"
    assert slot_folder("tcp://127.0.0.1:5555") is None


def test_what_a_requester_writes_in_a_slot_the_listener_reads_and_the_other_way(folder):
    slot = Slot(folder, "worker-0/../x", 64)
    assert os.path.dirname(slot.path) == folder and "/" not in slot.name  # the owner cannot steer the path
    assert oct(os.stat(slot.path).st_mode & 0o777) == "0o600"
    mine = torch.frombuffer(slot.buffer, dtype=torch.float32)
    mine.copy_(torch.arange(16.0))
    theirs = torch.frombuffer(SlotMaps(folder).map(slot.name), dtype=torch.float32)
    assert torch.equal(theirs, torch.arange(16.0))
    theirs.mul_(2)
    assert torch.equal(mine, torch.arange(16.0) * 2)
    slot.close()
    assert not os.path.exists(slot.path)


def test_a_listener_maps_only_regular_files_of_its_own_folder(folder, tmp_path):
    maps = SlotMaps(folder)
    outside = tmp_path / "shm-secret"
    outside.write_bytes(b"\0" * 64)
    os.symlink(outside, os.path.join(folder, "shm-link"))
    os.mkdir(os.path.join(folder, "shm-dir"))
    os.mkfifo(os.path.join(folder, "shm-fifo"))
    open(os.path.join(folder, "shm-empty"), "wb").close()
    for name, why in [("../shm-secret", "bad shared-memory slot name"), (f"{outside}", "bad shared-memory slot name"),
                      ("secret", "bad shared-memory slot name"), (7, "bad shared-memory slot name"),
                      ("shm-" + "a" * 300, "bad shared-memory slot name"), ("shm-missing", "cannot open"),
                      ("shm-link", "cannot open"), ("shm-dir", "Is a directory"), ("shm-fifo", "not a regular file"),
                      ("shm-empty", "holds 0 bytes")]:
        with pytest.raises(TransportError, match=why):
            maps.map(name)


def test_a_listener_keeps_a_bounded_number_of_slots_mapped(folder):
    maps = SlotMaps(folder)
    slots = [Slot(folder, "w", 8) for _ in range(70)]
    for s in slots:
        maps.map(s.name)
    assert len(maps._maps) == 64 and slots[0].name not in maps._maps and slots[-1].name in maps._maps
    for s in slots:
        s.close()


class OneServer:
    """A live server (tests/live_server.py) on an ipc (or tcp) listener, and a raw DEALER named ``w``."""

    def __init__(self, ctx: zmq.Context, bind: str, shared_memory: bool = True) -> None:
        job = parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.5},
                         "cluster": {"num_servers": 1, "shared_memory": shared_memory}, "monitor": {"metrics": False}})
        self.live = LiveServer(None, job=job, layout=LAYOUT, bind=bind)
        self.client = RawClient(ctx, self.live.address, identity=b"w")

    def ask(self, op: Op, meta: dict, tensors: list | None = None) -> Message:
        reply = self.client.request(op, dict(meta, keys=KEYS), tensors, timeout_s=WAIT_S)
        assert reply is not None, "no reply"
        return reply

    def values(self) -> torch.Tensor:
        return self.live.values()

    def close(self) -> None:
        self.client.close()
        self.live.close()


def test_bad_slot_requests_are_refused_and_change_nothing(ctx, folder, tmp_path):
    s = OneServer(ctx, f"ipc://{folder}/server-0.sock")
    try:
        assert s.ask(Op.INIT, {}, [INIT.clone()]).op == Op.OK
        slot = Slot(folder, "w", NUMEL * 4)
        grad = torch.frombuffer(slot.buffer, dtype=torch.float32)
        grad.fill_(1.0)
        small = Slot(folder, "w", 8)
        outside = tmp_path / "shm-x"
        outside.write_bytes(b"\0" * NUMEL * 4)
        os.symlink(outside, os.path.join(folder, "shm-elsewhere"))
        push = {"version": 0, "weight": 1.0}
        cases = [
            ({**push, "shm": ["../shm-x", NUMEL]}, [], "bad shared-memory slot name"),
            ({**push, "shm": ["shm-elsewhere", NUMEL]}, [], "cannot open"),
            ({**push, "shm": ["shm-nobody", NUMEL]}, [], "cannot open"),
            ({**push, "shm": [small.name, NUMEL]}, [], "holds 2 values"),
            ({**push, "shm": [slot.name, 0]}, [], "meta.shm"),
            ({**push, "shm": [slot.name, True]}, [], "meta.shm"),
            ({**push, "shm": slot.name}, [], "meta.shm"),
            ({**push, "shm": [slot.name, NUMEL]}, [torch.ones(NUMEL)], "cannot use shared memory"),
            ({**push, "shm": [slot.name, NUMEL - 1]}, [], f"the keys need {NUMEL}"),
        ]
        before = s.values()
        for meta, tensors, why in cases:
            reply = s.ask(Op.PUSHPULL, meta, tensors)
            assert reply.op == Op.ERROR and why in reply.meta["error"], (meta, reply.meta)
            assert torch.equal(s.values(), before)
        grad[3] = float("nan")
        reply = s.ask(Op.PUSHPULL, {**push, "shm": [slot.name, NUMEL]})
        assert reply.op == Op.ERROR and "NaN" in reply.meta["error"] and torch.equal(s.values(), before)
        # A good one: the update is applied and the new values come back in the slot, not in a frame.
        grad.fill_(1.0)
        reply = s.ask(Op.PUSHPULL, {**push, "shm": [slot.name, NUMEL]})
        assert reply.op == Op.OK and reply.meta["shm"] is True and reply.tensors == []
        assert torch.equal(grad, INIT - 0.5) and torch.equal(s.values(), INIT - 0.5)
        slot.close()
        small.close()
    finally:
        s.close()


def test_a_reply_goes_into_the_range_meta_into_names_and_bad_ranges_change_nothing(ctx, folder, tmp_path):
    """``meta.into`` ([slot, first value, values]): the reply's values are written there (a worker's
    parameters), not into the request's slot; a range the server may not write is refused first."""
    s = OneServer(ctx, f"ipc://{folder}/server-0.sock")
    try:
        assert s.ask(Op.INIT, {}, [INIT.clone()]).op == Op.OK
        slot = Slot(folder, "w", NUMEL * 4)
        grad = torch.frombuffer(slot.buffer, dtype=torch.float32)
        params = Slot(folder, "w-values", (NUMEL + 5) * 4)  # the request's values start at value 5 of it
        values = torch.frombuffer(params.buffer, dtype=torch.float32)
        values.fill_(7.0)
        outside = tmp_path / "shm-x"
        outside.write_bytes(b"\0" * NUMEL * 4)
        os.symlink(outside, os.path.join(folder, "shm-elsewhere"))
        push = {"version": 0, "weight": 1.0, "shm": [slot.name, NUMEL]}
        cases = [
            (Op.PUSHPULL, {**push, "into": ["../shm-x", 0, NUMEL]}, "bad shared-memory slot name"),
            (Op.PUSHPULL, {**push, "into": ["shm-elsewhere", 0, NUMEL]}, "cannot open"),
            (Op.PUSHPULL, {**push, "into": [params.name, 6, NUMEL]}, f"holds {NUMEL + 5} values, not 6 + {NUMEL}"),
            (Op.PUSHPULL, {**push, "into": [params.name, -1, NUMEL]}, "meta.into"),
            (Op.PUSHPULL, {**push, "into": [params.name, 5]}, "meta.into"),
            (Op.PUSHPULL, {**push, "into": [params.name, 5, NUMEL - 1]}, f"meta.into holds {NUMEL - 1} values"),
            (Op.PUSH, {**push, "into": [params.name, 5, NUMEL]}, "meta.into is for PULL and PUSHPULL"),
        ]
        grad.fill_(1.0)
        before = s.values()
        for op, meta, why in cases:
            reply = s.ask(op, meta)
            assert reply.op == Op.ERROR and why in reply.meta["error"], (meta, reply.meta)
            assert torch.equal(s.values(), before) and torch.equal(values, torch.full_like(values, 7.0))
        reply = s.ask(Op.PUSHPULL, {**push, "into": [params.name, 5, NUMEL]})
        assert reply.op == Op.OK and reply.meta["shm"] is True and reply.tensors == []
        assert torch.equal(values[5:], INIT - 0.5) and torch.equal(values[:5], torch.full((5,), 7.0))
        assert torch.equal(grad, torch.ones(NUMEL))  # the gradient's slot is left as it was
        values.zero_()
        reply = s.ask(Op.PULL, {"into": [params.name, 5, NUMEL]})  # a pull needs no slot of its own
        assert reply.op == Op.OK and reply.meta["shm"] is True and torch.equal(values[5:], INIT - 0.5)
        slot.close()
        params.close()
    finally:
        s.close()


TWO = make_layout([("w", (6, 5)), ("b", (6,)), ("v", (4, 3))], 2, max_slice_bytes=40)  # 10-value keys, 2 servers


@pytest.fixture
def two_servers(ctx, folder):
    """``start(request_bytes=None) -> (KVClient, sent)`` against two live servers of TWO on ipc sockets in
    ``folder``, with shared memory; ``sent``: every request the client sends from then on."""
    job = parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.1}, "cluster": {"num_servers": 2},
                     "monitor": {"metrics": False}})
    servers = [LiveServer(None, job=job, layout=TWO, rank=r, bind=f"ipc://{folder}/server-{r}.sock") for r in range(2)]
    rpc = RpcClient(ctx, "worker-0", WAIT_S)

    def start(request_bytes: int | None = None) -> tuple[KVClient, list[Message]]:
        kv = KVClient(rpc, TWO, {0: "server-0", 1: "server-1"}, request_bytes=request_bytes)
        for r, srv in enumerate(servers):
            rpc.connect(f"server-{r}", srv.address)
            assert kv.set_address(f"server-{r}", srv.address)
        sent: list[Message] = []
        request = rpc.request
        rpc.request = lambda peer, msg: sent.append(msg) or request(peer, msg)
        return kv, sent

    yield start
    rpc.close()
    for srv in servers:
        srv.close()


def test_a_worker_whose_values_live_in_shared_memory_gets_every_reply_in_place(two_servers, folder, monkeypatch):
    """KVClient.share_values: pulls and push+pulls into that vector name each server's range of it
    (``meta.into``) and are not copied out of a slot; into any other tensor they are, as before."""
    from downpour.worker import client as client_module

    kv, sent = two_servers()
    values = kv.share_values()
    assert values is not None and values.numel() == TWO.numel and kv.share_values() is values
    init = torch.linspace(-2.0, 2.0, TWO.numel)
    kv.wait(kv.init(init), WAIT_S)
    del sent[:]
    scattered = []
    scatter = client_module._Part.scatter
    monkeypatch.setattr(client_module._Part, "scatter", lambda part, v, out: scattered.append(part.server) or scatter(part, v, out))
    kv.wait(kv.pull(values), WAIT_S)
    assert torch.equal(values, init)
    assert [m.meta["into"][1:] for m in sent] == [[lo, hi - lo] for part in kv._all for lo, hi in part.ranges]
    assert all("shm" not in m.meta for m in sent) and scattered == []
    grad = torch.randn(TWO.numel, generator=torch.Generator().manual_seed(1))
    sent0, received0 = kv.shm_sent, kv.shm_received
    kv.wait(kv.push_pull(grad, values), WAIT_S)
    torch.testing.assert_close(values, init - 0.1 * grad)
    # the values moved through shared memory count as bytes sent and received, as the servers count them
    assert (kv.shm_sent - sent0, kv.shm_received - received0) == (4 * TWO.numel, 4 * TWO.numel)
    assert kv.bytes_sent == kv.rpc.bytes_sent + kv.shm_sent and kv.bytes_received == kv.rpc.bytes_received + kv.shm_received
    assert all("shm" in m.meta and "into" in m.meta for m in sent[2:]) and scattered == []
    other = torch.empty(TWO.numel)  # not the shared vector: through the request's slot and copied
    kv.wait(kv.pull(other), WAIT_S)
    assert torch.equal(other, values) and all("into" not in m.meta for m in sent[4:]) and sorted(scattered) == [0, 1]
    kv.close()
    assert [f for f in os.listdir(folder) if f.startswith("shm-")] == []
    assert torch.equal(values, other)  # still mapped while the caller holds it


def test_a_part_that_finds_every_slot_in_use_sends_its_values_in_frames_and_gets_them_back_so(two_servers, monkeypatch):
    """Requests of one key each (``request_bytes``), and one slot per server: a part without a slot
    pushes in a frame and names no range (``meta.into``), and its reply's values are copied in."""
    from downpour.worker import client as client_module

    monkeypatch.setattr(client_module._Slots, "LIMIT", 1)
    kv, sent = two_servers(request_bytes=40)
    values = kv.share_values()
    init = torch.linspace(-2.0, 2.0, TWO.numel)
    kv.wait(kv.init(init), WAIT_S)
    del sent[:]
    grad = torch.randn(TWO.numel, generator=torch.Generator().manual_seed(2))
    kv.wait(kv.push_pull(grad, values), WAIT_S)
    torch.testing.assert_close(values, init - 0.1 * grad)
    framed = [m for m in sent if m.tensors]
    assert len(sent) == len(TWO.slices) and framed and all("into" not in m.meta and "shm" not in m.meta for m in framed)
    assert all("into" in m.meta and "shm" in m.meta for m in sent if not m.tensors)
    kv.close()


def test_values_are_not_shared_with_servers_on_tcp(ctx):
    rpc = RpcClient(ctx, "worker-0", WAIT_S)
    try:
        kv = KVClient(rpc, LAYOUT, {0: "server-0"})
        assert not kv.set_address("server-0", "tcp://127.0.0.1:5555")
        assert kv.share_values() is None
    finally:
        rpc.close()


def test_a_server_that_listens_on_tcp_or_was_told_not_to_refuses_shared_memory(ctx, folder):
    slot = Slot(folder, "w", NUMEL * 4)
    for server in (OneServer(ctx, "tcp://127.0.0.1:*"), OneServer(ctx, f"ipc://{folder}/s.sock", shared_memory=False)):
        try:
            assert server.ask(Op.INIT, {}, [INIT.clone()]).op == Op.OK
            reply = server.ask(Op.PULL, {"shm": [slot.name, NUMEL]})
            assert reply.op == Op.ERROR and "takes no shared memory" in reply.meta["error"]
        finally:
            server.close()
    slot.close()


def test_the_slot_of_a_request_that_got_no_answer_is_never_reused(ctx, folder):
    rpc = RpcClient(ctx, "worker-0", request_timeout_s=0.3)
    try:
        address = f"ipc://{folder}/nobody.sock"
        rpc.connect("server-0", address)
        kv = KVClient(rpc, LAYOUT, {0: "server-0"})
        assert kv.set_address("server-0", address)
        for _ in range(2):
            with pytest.raises(RequestTimeout, match="server-0"):
                kv.wait(kv.pull(torch.empty(NUMEL)))
            # (an answer may still come and write into it): the file is gone, nothing is kept for reuse
            assert [f for f in os.listdir(folder) if f.startswith("shm-")] == []
            pool = kv._slots[0]
            assert pool.used == 0 and pool.free == []
        assert kv.shm_requests == 2
        kv.close()
    finally:
        rpc.close()


@pytest.mark.parametrize("scaling", ["auto", "none"])
def test_replies_written_straight_into_the_slot_equal_those_sent_over_the_socket(ctx, folder, scaling):
    """An async server writes a reply's values into the request's slot in the same pass as the update
    (server/kernels.py): under look-ahead (``scaling: auto``) they differ from the stored values, under
    ``none`` they are the new stored values; either way the very values a socket gets."""
    job = parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "scaling": scaling},
                     "training": {"consistency": "async"}, "cluster": {"num_servers": 1, "num_workers": 2},
                     "monitor": {"metrics": False}})
    shm = LiveServer(None, job=job, layout=LAYOUT, bind=f"ipc://{folder}/la.sock")
    tcp = LiveServer(None, job=job, layout=LAYOUT, bind="tcp://127.0.0.1:*")
    names = [b"worker-0", b"worker-1"]
    clients = {(srv, n): RawClient(ctx, srv.address, identity=n) for srv in (shm, tcp) for n in names}
    slots = {n: Slot(folder, n.decode(), NUMEL * 4) for n in names}
    try:
        def ask(srv, name, op, meta, tensors=None):
            reply = clients[(srv, name)].request(op, dict(meta, keys=KEYS), tensors, timeout_s=WAIT_S)
            assert reply is not None and reply.op == Op.OK, reply and reply.meta
            return reply
        for srv in (shm, tcp):
            ask(srv, names[0], Op.INIT, {}, [INIT.clone()])
        gen = torch.Generator().manual_seed(0)
        for t in range(6):
            name, g = names[t % 2], torch.randn(NUMEL, generator=gen)
            slot = torch.frombuffer(slots[name].buffer, dtype=torch.float32, count=NUMEL)
            slot.copy_(g)
            via_slot = ask(shm, name, Op.PUSHPULL, {"version": t, "weight": 1.0, "shm": [slots[name].name, NUMEL]})
            via_socket = ask(tcp, name, Op.PUSHPULL, {"version": t, "weight": 1.0}, [g.clone()])
            assert via_slot.meta["shm"] is True and via_slot.tensors == []
            assert torch.equal(slot, via_socket.tensors[0]), t
            # from the second push on, the other worker's momentum is pending: not the stored values
            assert torch.equal(slot, shm.values()) == (scaling == "none" or t == 0), t
        assert torch.equal(shm.values(), tcp.values())
    finally:
        for c in clients.values():
            c.close()
        for s in slots.values():
            s.close()
        shm.close()
        tcp.close()
