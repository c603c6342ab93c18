"""Structure-aware fuzzing of a live server and a live coordinator with valid job keys.

Each fuzzed message starts as a valid request (a template per op) and gets one to three mutations:
a meta field set to a hostile value (wrong type, bool for int, NaN, Inf, 1e39, huge, negative,
long, nested), removed or added; keys duplicated, out of range or of the wrong type; a compressed
push's codec header changed (name, bits, bucket, tensor count); tensors dropped, added, of another
dtype, truncated or filled with NaN/Inf/huge values; the op swapped; the header frame cut. Messages
go out in batches followed by a probe; after every batch the fuzzer checks that the node lives,
that its parameters are finite (and unchanged unless a push of the batch was accepted), and that
every refusal was counted. ``tests/test_fuzz.py`` runs it briefly; ``benchmarks/fuzz.py`` long.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

from downpour.compress.codecs import QSGD
from downpour.protocol import Message, Op, encode
from downpour.transport import Poller, Security
from tests.live_server import INIT, KEYS, LAYOUT, NUMEL, LiveServer, RawClient

HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 7, 8.0, 1.5, 2**63 - 1, 2**64 - 1, -(2**63), float("nan"), float("inf"), float("-inf"),
    1e39, -1e39, 3e38, "", "x" * 300, "worker-0", "server-0", "many", [], [1, 2, 3], [0, 0, 0], [[1], [2]], {}, {"a": 1},
    {"examples": "many"}, b"\x00\xff", [[[[[[[[1]]]]]]]], list(range(200)),
]
# Server job: pushes may be qsgd (8 bits, buckets of 4) or uncompressed, pulls int8 in blocks of 4.
SERVER_SECTIONS = {"compression": {"push": {"codec": "qsgd", "bits": 8, "bucket": 4, "min_numel": 0}, "pull": "int8",
                                   "pull_block": 4}}
OPS = [int(o) for o in Op] + [0, 99, -1, 2**40]


@dataclass
class Tally:
    messages: int = 0
    batches: int = 0
    refused: int = 0  # ERROR replies
    unanswered: int = 0
    accepted: int = 0
    counted: int = 0  # refusals the node counted
    crashes: int = 0
    seconds: float = 0.0
    codes: Counter = field(default_factory=Counter)

    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def _qsgd_push(rng: random.Random) -> tuple[dict, list[torch.Tensor]]:
    enc, tensors = [], []
    grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    for s in LAYOUT.server_slices(0):
        p = QSGD(8, 4).encode(grad[s.start : s.stop])
        enc.append(["qsgd", dict(p.meta), len(p.tensors)])
        tensors.extend(p.tensors)
    return {"keys": list(KEYS), "version": 0, "weight": 1.0, "enc": enc}, tensors


def server_template(rng: random.Random) -> Message:
    kind = rng.randrange(6)
    small = torch.randn(NUMEL) * 1e-3
    if kind == 0:
        return Message(Op.PULL, 0, {"keys": list(KEYS)})
    if kind == 1:
        return Message(Op.PULL, 0, {"keys": list(KEYS), "pq": ["int8", 4]})
    if kind == 2:
        return Message(Op.PUSH, 0, {"keys": list(KEYS), "version": 0, "weight": 1.0, "clock": 1}, [small])
    if kind == 3:
        return Message(Op.PUSHPULL, 0, {"keys": list(KEYS), "version": 0, "weight": 2.0, "pos": [0, 1, 5]}, [small])
    if kind == 4:
        meta, tensors = _qsgd_push(rng)
        return Message(Op.PUSH, 0, meta, tensors)
    return Message(Op.INIT, 0, {"keys": list(KEYS)}, [INIT.clone()])


def _hostile(rng: random.Random, more: list | None = None) -> Any:
    """A fresh copy of a hostile value (mutations edit lists in place)."""
    return copy.deepcopy(rng.choice(HOSTILE + (more or [])))


def _mutate_meta(rng: random.Random, meta: dict, fields: list[str]) -> None:
    r = rng.random()
    name = rng.choice(fields + list(meta) if meta else fields)
    if r < 0.6:
        meta[name] = _hostile(rng)
    elif r < 0.75:
        meta.pop(name, None)
    elif r < 0.85:
        meta[f"extra{rng.randrange(100)}"] = _hostile(rng)
    else:  # inside a list or mapping field
        v = meta.get(name)
        if isinstance(v, list) and v:
            v[rng.randrange(len(v))] = _hostile(rng)
        elif isinstance(v, dict) and v:
            v[rng.choice(list(v))] = _hostile(rng)
        else:
            meta[name] = _hostile(rng)


def _mutate_enc(rng: random.Random, meta: dict) -> None:
    enc = meta.get("enc")
    if not isinstance(enc, list) or not enc:
        return
    entry = enc[rng.randrange(len(enc))]
    if not isinstance(entry, list) or len(entry) != 3:
        return
    r = rng.random()
    if r < 0.3:
        entry[0] = rng.choice(["int8", "topk", "onebit", "powersgd", "none", "zstd", 5, None])
    elif r < 0.7 and isinstance(entry[1], dict):
        entry[1][rng.choice(["b", "B", "w", "k", "s", "c", "p"])] = _hostile(rng, [4, 8, 1 << 24, 0])
    else:
        entry[2] = _hostile(rng, [0, 1, 2, 3])


def _mutate_tensors(rng: random.Random, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    tensors = [t.clone() for t in tensors]
    r = rng.random()
    if r < 0.2 and tensors:
        tensors.pop(rng.randrange(len(tensors)))
    elif r < 0.35:
        tensors.append(torch.randn(rng.choice([0, 1, 4, NUMEL])))
    elif r < 0.5 and tensors:
        i = rng.randrange(len(tensors))
        t = tensors[i].reshape(-1)
        tensors[i] = t[: rng.randrange(max(1, t.numel()))]
    elif r < 0.65 and tensors:
        i = rng.randrange(len(tensors))
        raw = tensors[i].reshape(-1).view(torch.uint8)
        dtype = rng.choice([torch.int8, torch.uint8, torch.float16, torch.int32, torch.float32, torch.float64, torch.int64])
        n = raw.numel() // torch.empty((), dtype=dtype).element_size() * torch.empty((), dtype=dtype).element_size()
        tensors[i] = raw[:n].view(dtype)
    elif tensors:
        i = rng.randrange(len(tensors))
        if tensors[i].is_floating_point() and tensors[i].numel():
            tensors[i].view(-1)[rng.randrange(tensors[i].numel())] = rng.choice([math.nan, math.inf, -math.inf, 3e38, 1e20])
        elif tensors[i].numel():
            tensors[i].view(-1)[rng.randrange(tensors[i].numel())] = rng.choice([127, -128, 0, 100])
    return tensors


def mutate(rng: random.Random, msg: Message, fields: list[str], req_id: int) -> tuple[list[bytes], int]:
    """Frames of ``msg`` after up to three mutations (some stay valid: they are the baseline), and
    the op they carry."""
    meta = msgpack.unpackb(msgpack.packb(msg.meta), raw=False)  # a deep copy of plain data
    tensors = list(msg.tensors)
    op: int = int(msg.op)
    for _ in range(rng.randrange(0, 4)):
        r = rng.random()
        if r < 0.55:
            _mutate_meta(rng, meta, fields)
        elif r < 0.7:
            _mutate_enc(rng, meta)
        elif r < 0.9:
            tensors = _mutate_tensors(rng, tensors)
        else:
            op = rng.choice(OPS)
    good = Message(Op.PULL, req_id, {}, tensors)
    frames = [bytes(f) for f in encode(good)]
    head = msgpack.unpackb(frames[0], raw=False)
    head[1], head[3] = op, meta
    frames[0] = msgpack.packb(head, use_bin_type=True)
    r = rng.random()
    if r < 0.03:
        frames[0] = frames[0][: rng.randrange(len(frames[0]))]  # cut header: dropped unanswered
    elif r < 0.06:
        frames.append(bytes(rng.randrange(64)))
    elif r < 0.08 and len(frames) > 1:
        frames.pop()
    return frames, op


SERVER_FIELDS = ["keys", "version", "weight", "clock", "delta", "kv", "pos", "pq", "enc", "shm", "tables", "peek"]


Progress = Callable[[Tally], None]


def fuzz_server(keys: str, messages: int, seed: int = 0, batch: int = 64, time_limit_s: float | None = None,
                progress: Progress | None = None) -> Tally:
    """Fuzz a live CURVE server (worker key) with ``messages`` messages; raises AssertionError on a
    broken invariant. ``progress`` (if given) sees the tally after every checked batch."""
    rng = random.Random(seed)
    tally = Tally()
    live = LiveServer(keys, SERVER_SECTIONS)
    ctx = zmq.Context(io_threads=1)
    client = RawClient(ctx, live.address, Security.load(keys, "worker"))
    t0 = time.monotonic()
    try:
        assert client.request(Op.INIT, {"keys": KEYS}, [INIT]).op == Op.OK
        counted0 = sum(live.rejected().values())
        next_id = 1
        while tally.messages < messages and (time_limit_s is None or time.monotonic() - t0 < time_limit_s):
            before = live.values()
            sent: dict[int, int] = {}
            for _ in range(min(batch, messages - tally.messages)):
                next_id += 1
                frames, sent[next_id] = mutate(rng, server_template(rng), SERVER_FIELDS, next_id)
                client.send(frames)
            next_id += 1
            probe = next_id
            client.send(encode(Message(Op.PULL, probe, {"keys": KEYS})))
            answered, pushed = 0, False
            while True:
                reply = client.recv(10.0)
                if reply is None:
                    tally.crashes += 1
                    raise AssertionError(f"no answer to the probe within 10 s (server alive: {live.alive()})")
                if reply.req_id == probe:
                    assert reply.op == Op.OK, reply.meta
                    break
                answered += 1
                if reply.op == Op.ERROR:
                    tally.refused += 1
                    tally.codes[reply.meta.get("code")] += 1
                else:
                    tally.accepted += 1
                    pushed = pushed or sent.get(reply.req_id) in (Op.PUSH, Op.PUSHPULL, Op.INIT)
            tally.unanswered += len(sent) - answered
            tally.messages += len(sent)
            tally.batches += 1
            assert live.alive(), "the server thread died"
            after = live.values()
            assert bool(torch.isfinite(after).all()), "a parameter is not finite"
            if not pushed:
                assert torch.equal(after, before), "refused messages changed a parameter"
            counted = sum(live.rejected().values()) - counted0
            assert counted == tally.refused + tally.unanswered, (counted, tally)
            tally.counted = counted
            if progress is not None:
                tally.seconds = time.monotonic() - t0
                progress(tally)
    finally:
        tally.seconds = time.monotonic() - t0
        client.close()
        ctx.destroy(linger=0)
        live.close()
    return tally


# -- the coordinator -------------------------------------------------------------------------------------

COORDINATOR_FIELDS = ["node", "role", "rank", "address", "host", "pid", "hosted_by", "progress", "metrics", "name",
                      "epoch", "shard", "examples", "stats", "kind", "data", "position"]


def coordinator_template(rng: random.Random, node: str) -> Message:
    kind = rng.randrange(9)
    progress = {"steps": rng.randrange(100), "examples": rng.randrange(10_000), "loss": rng.random(), "position": [0, 0, 3]}
    if kind == 0:
        return Message(Op.HEARTBEAT, 0, {"node": node, "progress": progress, "metrics": "127.0.0.1:1"})
    if kind == 1:
        return Message(Op.NEXT_SHARD, 0, {"node": node})
    if kind == 2:
        return Message(Op.SHARD_DONE, 0, {"node": node, "epoch": 0, "shard": rng.randrange(8), "examples": 10})
    if kind == 3:
        return Message(Op.STATUS, 0, {})
    if kind == 4:
        return Message(Op.BARRIER, 0, {"node": node, "name": "init"})
    if kind == 5:
        return Message(Op.REGISTER, 0, {"role": "worker", "rank": 0, "host": "h", "pid": 1, "node": node})
    if kind == 6:
        return Message(Op.REPORT, 0, {"node": node, "kind": rng.choice(["eval", "checkpoint", "server"]),
                                      "data": {"test_accuracy": 0.5, "name": "ckpt-1"}})
    if kind == 7:
        return Message(Op.HEARTBEAT, 0, {"node": rng.choice(["worker-1", "server-0", "worker-0"]), "progress": progress})
    return Message(Op.LEAVE if rng.random() < 0.5 else Op.WORKER_DONE, 0, {"node": "worker-1", "stats": {"steps": 1}})


def fuzz_coordinator(keys: str, job, messages: int, seed: int = 0, batch: int = 64,
                     time_limit_s: float | None = None, progress: Progress | None = None) -> Tally:
    """Fuzz a live coordinator of ``job`` (two workers, one server, registered by the fuzzer) with a
    worker key, on the connection worker-0 registered on (so requests reach the handlers).
    ``progress`` (if given) sees the tally after every checked batch."""
    from downpour.coordinator.service import Coordinator
    from downpour.coordinator.state import CoordinatorState

    rng = random.Random(seed)
    tally = Tally()
    ctx = zmq.Context(io_threads=1)
    security = Security.load(keys, "coordinator")
    coord = Coordinator(ctx, job, "tcp://127.0.0.1:*", None, security)
    poller = Poller()
    poller.register(coord.listener)
    server = RawClient(ctx, coord.address, Security.load(keys, "server"), server_role="coordinator")
    worker = RawClient(ctx, coord.address, Security.load(keys, "worker"), server_role="coordinator")
    other = RawClient(ctx, coord.address, Security.load(keys, "worker"), server_role="coordinator")
    t0 = time.monotonic()

    def serve_until(client: RawClient, req_id: int, timeout_s: float = 10.0) -> list[Message]:
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            coord._serve_requests(poller, 0.01)
            coord.state.tick(time.monotonic())
            while (reply := client.recv(0.0)) is not None:
                got.append(reply)
                if reply.req_id == req_id:
                    return got
        tally.crashes += 1
        raise AssertionError(f"no answer to request {req_id} within {timeout_s} s")

    def start() -> None:
        coord.state = CoordinatorState(job, coord.layout, coord.state.num_train, time.monotonic())
        server.send(encode(Message(Op.REGISTER, 1, {"role": "server", "rank": 0, "address": "tcp://127.0.0.1:9", "node": "s"})))
        serve_until(server, 1)
        other.send(encode(Message(Op.REGISTER, 2, {"role": "worker", "rank": 1, "node": "w1"})))
        worker.send(encode(Message(Op.REGISTER, 3, {"role": "worker", "rank": 0, "node": "w0"})))
        serve_until(worker, 3)
        assert coord.state.phase == "training", coord.state.phase

    def refusals() -> int:
        return sum(coord.state.rejected.values()) + sum(coord.rejected.values())

    try:
        start()
        next_id = 10
        while tally.messages < messages and (time_limit_s is None or time.monotonic() - t0 < time_limit_s):
            me = coord.state.nodes.get("worker-0")
            if coord.state.phase != "training" or me is None or me.state != "alive":  # (a fuzzed LEAVE, say)
                start()
            counted0 = refusals()
            n = min(batch, messages - tally.messages)
            ids = set()
            for _ in range(n):
                next_id += 1
                ids.add(next_id)
                worker.send(mutate(rng, coordinator_template(rng, "worker-0"), COORDINATOR_FIELDS, next_id)[0])
            next_id += 1
            worker.send(encode(Message(Op.STATUS, next_id, {})))
            got = serve_until(worker, next_id)
            errors = [r for r in got if r.op == Op.ERROR and r.req_id in ids]
            for r in errors:
                tally.codes[r.meta.get("code")] += 1
            tally.refused += len(errors)
            tally.accepted += sum(1 for r in got if r.op == Op.OK and r.req_id in ids)
            tally.unanswered += n - sum(1 for r in got if r.req_id in ids)
            tally.messages += n
            tally.batches += 1
            counted = refusals() - counted0
            # Every ERROR answer is counted; what got none was dropped (and counted) or is held (a join).
            assert len(errors) <= counted <= len(errors) + n, (len(errors), counted)
            tally.counted += counted
            coord.state.status(time.monotonic())  # the status (dashboard, `downpour status`) still works
            coord.state.summary(time.monotonic())
            if progress is not None:
                tally.seconds = time.monotonic() - t0
                progress(tally)
    finally:
        tally.seconds = time.monotonic() - t0
        for c in (server, worker, other):
            c.close()
        coord.listener.close()
        security.close()
        ctx.destroy(linger=0)
    return tally
