"""A ParameterServer driven in-process: every bad request is refused and counted, and never touches a parameter."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from downpour.config import parse_job
from downpour.errors import ProtocolError
from downpour.layout import make_layout
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.codec import MAGIC
from downpour.server.service import ParameterServer
from downpour.server.store import ShardStore
from downpour.transport import Listener

LR = 0.1
PEER = b"worker-0"
# 16 elements in 4-element keys over two servers: server 0 holds keys 0 and 1 (elements 0..7).
LAYOUT = make_layout([("w", (4, 3)), ("b", (4,))], 2, max_slice_bytes=16)
KEYS = [s.key for s in LAYOUT.server_slices(0)]
NUMEL = LAYOUT.server_numel(0)
INIT = torch.linspace(-1.0, 1.0, NUMEL)


def versions(store: ShardStore) -> list[int]:
    """Each key's version, in key order."""
    return [store.version([i]) for i in range(len(store.keys))]


def job(consistency: str = "async"):
    return parse_job({
        "model": {"name": "mlp", "args": {"input_shape": [3], "hidden": [4], "num_classes": 2}},
        "optimizer": {"name": "sgd", "lr": LR},
        "training": {"consistency": consistency},
    })


class Harness:
    """A server whose sends are captured (decoded) instead of going out on its socket."""

    def __init__(self, server: ParameterServer) -> None:
        self.server = server
        self.sent: list[tuple[bytes, Message]] = []
        self._next = 100

    def capture(self, peer: bytes, frames, track: bool = False) -> list:
        self.sent.append((peer, decode([bytearray(f) for f in frames])))  # copied: nothing stays lent
        return []

    def frames(self, peer: bytes, frames: list) -> list[tuple[bytes, Message]]:
        start = len(self.sent)
        self.server.handle(peer, frames)
        return self.sent[start:]

    def call(self, op: Op, meta: dict | None = None, tensors: list | None = None, peer: bytes = PEER) -> Message:
        self._next += 1
        [(to, reply)] = self.frames(peer, encode(Message(op, self._next, meta or {}, tensors or [])))
        assert to == peer and reply.req_id == self._next
        return reply

    def init(self, values: torch.Tensor = INIT) -> Message:
        return self.call(Op.INIT, {"keys": KEYS}, [values])

    def pull(self) -> torch.Tensor:
        reply = self.call(Op.PULL, {"keys": KEYS})
        assert reply.op == Op.OK
        return reply.tensors[0]

    def rejected(self) -> dict[str, int]:
        return self.server.stats()["rejected"]


@pytest.fixture
def make_server(monkeypatch):
    ctx = zmq.Context()
    listeners: list[Listener] = []

    def make(consistency: str = "async") -> Harness:
        listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 30)
        listeners.append(listener)
        server = ParameterServer(ctx, job(consistency), LAYOUT, 0, listener, "server-0")
        harness = Harness(server)
        monkeypatch.setattr(server.listener, "send", harness.capture)
        return harness

    yield make
    for listener in listeners:
        listener.close()
    ctx.term()


@pytest.fixture
def srv(make_server) -> Harness:
    return make_server()


@pytest.fixture
def ready(srv) -> Harness:
    assert srv.init().meta == {"initialized": 2}  # keys written
    return srv


def is_error(reply: Message, code: str) -> bool:
    return reply.op == Op.ERROR and reply.meta.get("code") == code and bool(reply.meta.get("error"))


def grad(value: float = 1.0) -> torch.Tensor:
    return torch.full((NUMEL,), value)


# -- INIT and PULL -------------------------------------------------------------


def test_the_server_holds_its_share_of_the_layout(srv):
    assert srv.server.stats()["keys"] == len(KEYS) == 2
    assert srv.server.stats()["numel"] == NUMEL == 8


def test_pull_before_init_is_refused_as_uninitialized(srv):
    assert is_error(srv.call(Op.PULL, {"keys": KEYS}), "uninitialized")
    assert srv.rejected() == {"uninitialized": 1}


def test_push_before_init_is_refused_as_uninitialized(srv):
    assert is_error(srv.call(Op.PUSH, {"keys": KEYS, "version": 0}, [grad()]), "uninitialized")


def test_init_then_pull_returns_the_initial_values_at_version_zero(ready):
    reply = ready.call(Op.PULL, {"keys": KEYS})
    assert reply.meta == {"version": 0}
    assert torch.equal(reply.tensors[0], INIT)


def test_pull_of_one_key_returns_only_that_keys_values(ready):
    reply = ready.call(Op.PULL, {"keys": [KEYS[1]]})
    assert torch.equal(reply.tensors[0], INIT[4:])


def test_a_second_init_is_ignored(ready):
    assert ready.init(torch.zeros(NUMEL)).meta == {"initialized": 0}
    assert torch.equal(ready.pull(), INIT)


def test_an_init_may_come_in_parts_and_the_server_serves_once_every_key_has_one(srv):
    assert srv.call(Op.INIT, {"keys": [KEYS[0]]}, [INIT[:4]]).meta == {"initialized": 1}
    assert is_error(srv.call(Op.PULL, {"keys": KEYS}), "uninitialized")
    assert srv.call(Op.INIT, {"keys": KEYS}, [torch.zeros(NUMEL)]).meta == {"initialized": 1}  # only the missing key
    assert torch.equal(srv.pull(), torch.cat([INIT[:4], torch.zeros(4)]))


def test_an_init_with_nan_is_refused(srv):
    values = INIT.clone()
    values[3] = float("nan")
    assert is_error(srv.init(values), "invalid")
    assert is_error(srv.call(Op.PULL, {"keys": KEYS}), "uninitialized")


# -- PUSH ------------------------------------------------------------------------


def test_a_push_applies_sgd_and_answers_the_new_version(ready):
    reply = ready.call(Op.PUSH, {"keys": KEYS, "version": 0, "weight": 32}, [grad(2.0)])
    assert reply.op == Op.OK and reply.meta == {"version": 1} and reply.tensors == []
    torch.testing.assert_close(ready.pull(), INIT - LR * 2.0)
    stats = ready.server.stats()
    assert stats["pushes"] == 1 and stats["version"] == 1 and stats["staleness_histogram"] == {"0": 1}


def test_a_push_pull_answers_the_values_after_the_update(ready):
    reply = ready.call(Op.PUSHPULL, {"keys": KEYS, "version": 0}, [grad(1.0)])
    torch.testing.assert_close(reply.tensors[0], INIT - LR)
    assert ready.server.stats()["pulls"] == 1


def test_a_stale_push_is_applied_and_its_staleness_recorded(ready):
    for _ in range(3):
        ready.call(Op.PUSH, {"keys": KEYS, "version": 0}, [grad(0.0)])
    assert ready.server.stats()["staleness_histogram"] == {"0": 1, "1": 1, "2": 1}
    assert ready.server.stats()["staleness_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=repr)
def test_a_push_with_nan_or_inf_is_refused_counted_and_changes_nothing(ready, bad):
    g = grad(1.0)
    g[5] = bad
    assert is_error(ready.call(Op.PUSH, {"keys": KEYS, "version": 0}, [g]), "invalid")
    assert ready.rejected() == {"invalid": 1}
    assert torch.equal(ready.pull(), INIT)
    assert ready.server.stats()["pushes"] == 0 and ready.server.stats()["version"] == 0


@pytest.mark.parametrize("big", [1.01e15, -1.01e15, 3.0e38], ids=repr)
def test_a_push_with_a_value_over_the_gradient_bound_is_refused(ready, big):
    g = grad(1.0)
    g[2] = big
    assert is_error(ready.call(Op.PUSH, {"keys": KEYS, "version": 0}, [g]), "invalid")
    assert torch.equal(ready.pull(), INIT)


def test_a_push_with_large_values_within_the_bound_is_applied():
    """Values whose squares overflow float32 but which are within the bound are accepted (the check
    compares each value with the bound; no sum of squares may overflow it)."""
    from downpour.protocol.ops import MAX_GRADIENT
    from downpour.server.service import bounded

    t = torch.full((1000,), 1e-3)
    t[7], t[9] = MAX_GRADIENT, -MAX_GRADIENT  # squares of 1e30: the dot product alone would not pass it
    assert bounded("PUSH", t) is t
    assert bounded("PUSH", torch.full((5,), 1e14)) is not None  # squares 1e28 each, sum under the fast bound
    for bad in (float("nan"), float("inf"), MAX_GRADIENT * 1.001):
        u = t.clone()
        u[500] = bad
        with pytest.raises(ProtocolError):
            bounded("PUSH", u)


BAD_PUSHES = {
    "f64-values": ({"keys": KEYS, "version": 0}, [grad().double()]),
    "2-d-values": ({"keys": KEYS, "version": 0}, [grad().view(2, 4)]),
    "too-short": ({"keys": KEYS, "version": 0}, [grad()[:7]]),
    "too-long": ({"keys": KEYS, "version": 0}, [torch.ones(NUMEL + 1)]),
    "no-tensor": ({"keys": KEYS, "version": 0}, []),
    "two-tensors": ({"keys": KEYS, "version": 0}, [grad()[:4], grad()[:4]]),
    "unknown-key": ({"keys": [KEYS[0], 99], "version": 0}, [grad()]),
    "other-servers-key": ({"keys": [KEYS[0], 2], "version": 0}, [grad()]),
    "duplicate-key": ({"keys": [KEYS[0], KEYS[0]], "version": 0}, [grad()]),
    "no-keys": ({"version": 0}, [grad()]),
    "empty-keys": ({"keys": [], "version": 0}, [grad()]),
    "string-key": ({"keys": ["0", "1"], "version": 0}, [grad()]),
    "no-version": ({"keys": KEYS}, [grad()]),
    "negative-version": ({"keys": KEYS, "version": -1}, [grad()]),
    "string-version": ({"keys": KEYS, "version": "0"}, [grad()]),
    "bool-version": ({"keys": KEYS, "version": False}, [grad()]),
    "float-version": ({"keys": KEYS, "version": 0.0}, [grad()]),
    "zero-weight": ({"keys": KEYS, "version": 0, "weight": 0}, [grad()]),
    "negative-weight": ({"keys": KEYS, "version": 0, "weight": -2.0}, [grad()]),
    "nan-weight": ({"keys": KEYS, "version": 0, "weight": float("nan")}, [grad()]),
    "inf-weight": ({"keys": KEYS, "version": 0, "weight": float("inf")}, [grad()]),
    "string-weight": ({"keys": KEYS, "version": 0, "weight": "1"}, [grad()]),
    "bool-weight": ({"keys": KEYS, "version": 0, "weight": True}, [grad()]),
}


@pytest.mark.parametrize("op", [Op.PUSH, Op.PUSHPULL], ids=lambda o: o.name)
@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_a_malformed_push_is_refused_as_invalid_and_changes_nothing(ready, case, op):
    meta, tensors = BAD_PUSHES[case]
    assert is_error(ready.call(op, meta, tensors), "invalid")
    assert ready.rejected() == {"invalid": 1}
    assert torch.equal(ready.pull(), INIT)
    assert versions(ready.server.store) == [0, 0]
    assert ready.server.stats()["pushes"] == 0


@pytest.mark.parametrize("meta", [{"keys": 5}, {"keys": [99]}, {"keys": [0, 0]}, {}], ids=repr)
def test_a_malformed_pull_is_refused_as_invalid(ready, meta):
    assert is_error(ready.call(Op.PULL, meta), "invalid")


@pytest.mark.parametrize("op", [Op.REGISTER, Op.HEARTBEAT, Op.MEMBERSHIP, Op.OK, Op.ERROR], ids=lambda o: o.name)
def test_an_op_a_server_does_not_serve_is_refused_as_bad_op(ready, op):
    reply = ready.call(op, {"keys": KEYS, "version": 0}, [grad()])
    assert is_error(reply, "bad_op") and op.name in reply.meta["error"]
    assert torch.equal(ready.pull(), INIT)


# -- malformed frames --------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [[], [b""], [b"\xc1garbage"], [msgpack.packb([1, 2, 3])], [msgpack.packb([MAGIC, 31, -5, {}, []])], [b"\x00" * 64, b"x"]],
    ids=["empty", "empty-frame", "not-msgpack", "short-header", "bad-req-id", "zeros"],
)
def test_garbage_frames_are_dropped_and_counted_without_a_reply(ready, frames):
    assert ready.frames(PEER, frames) == []
    assert ready.rejected() == {"malformed": 1}
    assert torch.equal(ready.pull(), INIT)


def test_a_malformed_message_with_a_readable_header_gets_an_error_naming_its_request(ready):
    head = msgpack.packb([MAGIC, int(Op.PUSH), 77, {"keys": KEYS, "version": 0}, [["f32", [NUMEL]]]])
    [(to, reply)] = ready.frames(PEER, [head, b"\x00" * 3])
    assert to == PEER and reply.req_id == 77 and is_error(reply, "malformed")
    assert ready.rejected() == {"malformed": 1}
    assert torch.equal(ready.pull(), INIT)


def test_rejections_are_counted_by_code_and_traffic_by_bytes(ready):
    ready.call(Op.REGISTER)
    ready.call(Op.PULL, {"keys": [99]})
    ready.call(Op.PULL, {"keys": [99]})
    ready.frames(PEER, [b"junk"])
    stats = ready.server.stats()
    assert stats["rejected"] == {"bad_op": 1, "invalid": 2, "malformed": 1}
    assert stats["bytes_in"] > NUMEL * 4 and stats["bytes_out"] > 0


# -- sync mode -----------------------------------------------------------------------


def test_a_sync_server_answers_a_round_once_the_coordinator_names_its_members(make_server):
    h = make_server("sync")
    h.init()
    pushed = h.frames(b"worker-0", encode(Message(Op.PUSHPULL, 1, {"keys": KEYS, "version": 0}, [grad(1.0)])))
    assert pushed == []  # no membership yet: the round waits
    start = len(h.sent)
    h.server.on_coordinator("coordinator", Message(Op.MEMBERSHIP, meta={"workers": ["worker-0"]}))
    [(to, reply)] = h.sent[start:]
    assert to == b"worker-0" and reply.req_id == 1 and reply.meta == {"version": 1}
    torch.testing.assert_close(reply.tensors[0], INIT - LR)


@pytest.mark.parametrize("stopping", [False, True])
def test_in_a_graceful_stop_a_worker_leaving_ends_the_sync_rounds_instead_of_completing_them_without_it(make_server, stopping):
    """worker-1 pushed a round worker-0 left before (it heard of the stop late). Outside a stop the
    smaller membership completes that round with worker-1's gradient alone; in a stop the round
    is refused (``stopping``, nothing applied) and so is any push after it."""
    h = make_server("sync")
    h.init()
    h.server.on_coordinator("coordinator", Message(Op.MEMBERSHIP, meta={"workers": ["worker-0", "worker-1"]}))
    assert h.frames(b"worker-1", encode(Message(Op.PUSHPULL, 1, {"keys": KEYS, "version": 0}, [grad(1.0)]))) == []
    start = len(h.sent)
    h.server.on_coordinator("coordinator", Message(Op.MEMBERSHIP, meta={"workers": ["worker-1"], "stopping": stopping}))
    [(to, reply)] = h.sent[start:]
    assert to == b"worker-1" and reply.req_id == 1
    if not stopping:
        assert reply.meta == {"version": 1}
        return
    assert is_error(reply, "stopping")
    assert is_error(h.call(Op.PUSHPULL, {"keys": KEYS, "version": 0}, [grad(1.0)], peer=b"worker-1"), "stopping")
    assert torch.equal(h.pull(), INIT) and versions(h.server.store) == [0, 0]


# -- stream partitions: each server applies each event once -----------------------------------------


def _stream_push(h: Harness, start: int, end: int, value: float = 1.0, partition: int = 3) -> Message:
    return h.call(Op.PUSH, {"keys": KEYS, "version": 0, "pos": [0, partition, end], "from": start}, [grad(value)])


def test_a_stream_push_applies_once_skips_what_the_server_holds_and_refuses_a_gap(ready):
    assert _stream_push(ready, 0, 10).op == Op.OK  # (0, 10]: applied, the mark is 10
    assert _stream_push(ready, 10, 25).op == Op.OK
    after = ready.pull()
    torch.testing.assert_close(after, INIT - 2 * LR)
    # read again from 0 and cut at the mark: (0, 10] and (10, 25] are answered, not applied
    assert _stream_push(ready, 0, 10).op == Op.OK and _stream_push(ready, 10, 25).op == Op.OK
    assert torch.equal(ready.pull(), after) and ready.server.counts["stream_skipped"] == 2
    # a push that starts after the mark: the events (25, 30] are not here; refused, nothing changes
    reply = _stream_push(ready, 30, 40)
    assert is_error(reply, "stream_gap") and "up to offset 25" in reply.meta["error"]
    assert torch.equal(ready.pull(), after)
    # another partition has its own mark; MARKS says where each stands
    assert _stream_push(ready, 0, 7, partition=4).op == Op.OK
    marks = ready.call(Op.MARKS, {"shard": [0, 3]})
    assert marks.op == Op.OK and marks.meta == {"marks": {str(KEYS[0]): 25}, "floor": 0}
    assert ready.call(Op.MARKS, {"shard": [0, 4]}).meta["marks"] == {str(KEYS[0]): 7}
    # a push whose range is empty or reversed is refused as invalid
    now = ready.pull()
    assert is_error(_stream_push(ready, 40, 40), "invalid") and torch.equal(ready.pull(), now)


def test_stream_marks_are_saved_with_the_shard(ready, tmp_path):
    import json as _json

    from safetensors.torch import load as st_load

    assert _stream_push(ready, 0, 10).op == Op.OK
    ready.server.on_coordinator("coordinator", Message(Op.CHECKPOINT, 0, {"name": "ckpt-1", "url": str(tmp_path), "keep": 3}))
    import time as _time

    deadline = _time.monotonic() + 10
    while not (tmp_path / "ckpt-1" / "server-0.safetensors").exists() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    _time.sleep(0.2)
    data = (tmp_path / "ckpt-1" / "server-0.safetensors").read_bytes()
    st_load(data)
    header = _json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert _json.loads(header["__metadata__"]["marks"]) == {f"0:3:{KEYS[0]}": 10}
