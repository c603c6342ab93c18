"""Hostile and malformed pushes from a peer that holds a worker key, against a live server: each is
refused with a code and counted, the server keeps serving, and the parameters stay finite and
unchanged. Each test here failed on the code before the typed schemas (the server died, or applied)."""

from __future__ import annotations

import pytest
import torch
import zmq

from downpour.compress.codecs import QSGD, Int8
from downpour.protocol import Message, Op, encode
from tests.live_server import INIT, KEYS, LAYOUT, NUMEL, LiveServer, RawClient

SLICES = LAYOUT.server_slices(0)


def _live(sections=None, **cluster):
    server = LiveServer(None, sections, **cluster)
    ctx = zmq.Context(io_threads=1)
    client = RawClient(ctx, server.address)
    assert client.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
    return server, ctx, client


@pytest.fixture
def qsgd_live():
    server, ctx, client = _live({"compression": {"push": {"codec": "qsgd", "bits": 8, "bucket": 4}}})
    yield server, client
    client.close()
    ctx.term()
    server.close()


def _unchanged(server: LiveServer, refused: int) -> None:
    assert server.alive()
    assert torch.equal(server.values(), INIT)
    assert server.pushes() == 0
    assert sum(server.rejected().values()) == refused


def _enc(codec, grad: torch.Tensor, edit=None) -> tuple[list, list[torch.Tensor]]:
    enc, tensors = [], []
    for s in SLICES:
        p = codec.encode(grad[s.start : s.stop])
        meta = dict(p.meta)
        if edit is not None:
            edit(meta, p.tensors)
        enc.append([codec.name, meta, len(p.tensors)])
        tensors.extend(p.tensors)
    return enc, tensors


def test_a_qsgd_push_with_float_bits_is_refused_and_the_server_lives(qsgd_live):
    server, client = qsgd_live
    enc, tensors = _enc(QSGD(8, 4), torch.ones(NUMEL), lambda m, t: m.update(b=8.0))
    reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "invalid"
    _unchanged(server, 1)


def test_a_qsgd_push_whose_decoded_values_overflow_is_refused(qsgd_live):
    server, client = qsgd_live

    def huge(meta, tensors):
        tensors[1].fill_(3e38)  # finite scales, finite levels: level x scale / 127 stays finite...

    enc, tensors = _enc(QSGD(8, 4), torch.ones(NUMEL), huge)
    reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "invalid"  # ...but exceeds the bound
    _unchanged(server, 1)


def test_a_codec_the_job_did_not_configure_is_refused(qsgd_live):
    server, client = qsgd_live
    enc, tensors = _enc(Int8(4), torch.ones(NUMEL))
    reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
    assert reply.op == Op.ERROR and "not one this job pushes with" in reply.meta["error"]
    _unchanged(server, 1)


def test_an_int8_push_that_multiplies_into_inf_is_refused():
    server, ctx, client = _live({"compression": {"push": {"codec": "int8", "bucket": 4}}})
    try:
        def inf(meta, tensors):
            tensors[0].fill_(127)
            tensors[1].fill_(3e38)  # 127 x 3e38 = Inf as float32

        enc, tensors = _enc(Int8(4), torch.ones(NUMEL), inf)
        reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
        assert reply.op == Op.ERROR and reply.meta["code"] == "invalid"
        _unchanged(server, 1)
    finally:
        client.close()
        ctx.term()
        server.close()


def test_a_huge_bucket_is_refused_or_bounded_without_a_large_allocation(qsgd_live):
    from downpour.compress.codecs import _per_element

    per = _per_element(torch.ones(1), 1 << 24, 4)  # was a 64 MiB tensor for 4 values
    assert per.numel() == 4 and per.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("meta", [
    {"delta": True},  # a gradient job: deltas are for local SGD only
    {"weight": 1e39},  # finite for Python, Inf as float32
    {"weight": True},
    {"weight": float("nan")},
    {"version": 1.0},
    {"kv": [0, 0, 0, "0"]},
    {"pos": [0, 0, -1]},
    {"pq": ["int8", 4]},  # a pull precision the job did not configure
    {"keys": [0, 0.0, 1, 2]},
], ids=repr)
def test_push_fields_outside_the_jobs_configuration_or_types_are_refused(meta):
    server, ctx, client = _live()
    try:
        reply = client.request(Op.PUSHPULL, {"keys": KEYS, "version": 0, **meta}, [torch.ones(NUMEL)])
        assert reply.op == Op.ERROR and reply.meta["code"] == "invalid", reply.meta
        _unchanged(server, 1)
    finally:
        client.close()
        ctx.term()
        server.close()


def test_two_huge_deltas_cannot_make_a_parameter_inf():
    server, ctx, client = _live({"training": {"local_steps": 2}})
    try:
        for _ in range(2):
            reply = client.request(Op.PUSHPULL, {"keys": KEYS, "version": 0, "delta": True}, [torch.full((NUMEL,), 3e38)])
            assert reply.op == Op.ERROR and reply.meta["code"] == "invalid"
        _unchanged(server, 2)
        reply = client.request(Op.PUSHPULL, {"keys": KEYS, "version": 0, "delta": True}, [torch.ones(NUMEL)])
        assert reply.op == Op.OK  # a job with local SGD takes deltas
        assert bool(torch.isfinite(server.values()).all())
    finally:
        client.close()
        ctx.term()
        server.close()


def test_a_sync_round_refuses_a_push_from_outside_the_membership():
    server, ctx, client = _live({"training": {"consistency": "sync"}})
    try:
        server.call(lambda s: s.set_workers(["worker-0", "worker-1"]))
        reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "weight": 1.0}, [torch.ones(NUMEL)])
        assert reply.op == Op.ERROR and reply.meta["code"] == "not_member"
        assert server.call(lambda s: len(s.policy.waiting)) == 0
    finally:
        client.close()
        ctx.term()
        server.close()


def test_a_handler_that_fails_answers_internal_and_the_server_goes_on(monkeypatch):
    server, ctx, client = _live()
    try:
        def broken(self, peer, msg):
            raise RuntimeError("a bug")

        from downpour.server.service import ParameterServer

        monkeypatch.setitem(ParameterServer._HANDLERS, Op.PULL, broken)
        reply = client.request(Op.PULL, {"keys": KEYS})
        assert reply.op == Op.ERROR and reply.meta["code"] == "internal"
        monkeypatch.undo()
        assert client.request(Op.PULL, {"keys": KEYS}).op == Op.OK
        assert server.rejected() == {"internal": 1}
    finally:
        client.close()
        ctx.term()
        server.close()


def test_a_push_is_refused_before_a_slot_is_mapped_when_its_meta_is_malformed():
    server, ctx, client = _live()
    try:
        reply = client.request(Op.PUSH, {"keys": KEYS, "version": 0, "shm": ["../../etc/passwd", 1.5]})
        assert reply.op == Op.ERROR and reply.meta["code"] == "invalid" and "meta.shm" in reply.meta["error"]
        _unchanged(server, 1)
    finally:
        client.close()
        ctx.term()
        server.close()


def test_encode_of_a_push_is_unchanged_by_the_schemas():
    # what a real worker sends passes: the schema of PUSH against KVClient's meta
    from downpour.protocol.ops import validate

    validate(Op.PUSHPULL, {"keys": KEYS, "version": 3, "kv": [1, 2, 3, 3], "weight": 32.0, "clock": 7, "pos": [0, 1, 64],
                           "pq": ["int8", 1024], "shm": ["slot-1", NUMEL], "delta": True,
                           "enc": [["qsgd", {"b": 8, "B": 512}, 2]]})
    assert encode(Message(Op.PUSH, 1, {"keys": KEYS, "version": 0}))


def test_a_listener_takes_the_jobs_frame_limit_after_binding():
    from downpour.transport import Listener

    ctx = zmq.Context(io_threads=1)
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 30)
    clients = []
    try:
        address = listener.address
        listener.limit(1000)
        assert listener.address == address and listener.socket.getsockopt(zmq.MAXMSGSIZE) == 1000
        clients.append(RawClient(ctx, address))
        clients[-1].send([b"x" * 10_000])  # over the limit: the connection is cut, nothing arrives
        assert not listener.socket.poll(500)
        clients.append(RawClient(ctx, address))
        clients[-1].send([b"ok" * 100])
        assert listener.socket.poll(5000)
        assert listener.recv()[1][0].bytes == b"ok" * 100
    finally:
        for c in clients:
            c.close()
        listener.close()
        ctx.destroy(linger=0)
