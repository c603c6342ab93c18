"""Delayed updates and bounded staleness: the SSP policy, staleness-aware lr, delta pushes,
gradient accumulation, local SGD, their config checks, the simulated slow link, compressed
pushes and pulls on a live server, and two small end-to-end jobs."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zmq

from downpour.compress import decode_pull, decode_push
from downpour.compress.codecs import TopK
from downpour.config import SGDConfig, TrainingConfig, parse_job
from downpour.data.dataset import ArrayDataset, Dataset
from downpour.errors import ConfigError, RemoteError
from downpour.layout import make_layout
from downpour.models import build_model, param_shapes
from downpour.protocol import Message, Op, decode, encode
from downpour.protocol.rpc import RpcClient
from downpour.server.consistency import AsyncPolicy, Push, SSPPolicy, SyncPolicy
from downpour.server.optim import make_rule
from downpour.server.store import ShardStore
from downpour.transport import Listener, Poller, new_context
from downpour.worker.client import Pieces
from downpour.worker.flat import FlatModel
from downpour.worker.trainer import Trainer
from tests.cluster import QUIET, run_train
from tests.conftest import tiny_job
from tests.live_server import INIT, KEYS, LAYOUT, NUMEL, WAIT_S, LiveServer, RawClient
from tests.live_server import LR as LIVE_LR

LR = 0.5
ALL = [0, 1]


# -- helpers: a real ShardStore, pushes as the server builds them -------------------------------


def new_store(momentum: float = 0.0) -> ShardStore:
    layout = make_layout([("w", (2, 3)), ("b", (2,))], 1)  # two keys, 8 elements
    cfg = SGDConfig(lr=LR, momentum=momentum)
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(cfg, LR, n))
    store.write(ALL, torch.arange(store.numel, dtype=torch.float32))
    store.initialized = True
    return store


def versions(store: ShardStore) -> list[int]:
    return [store.version([i]) for i in range(len(store.keys))]


def push(who: str, grad: torch.Tensor, version: int = 0, clock: int | None = None, weight: float = 1.0,
         req_id: int = 1, delta: bool = False, op: Op = Op.PUSHPULL) -> Push:
    return Push(who.encode(), Message(op, req_id, {"keys": ALL}), list(ALL), grad, weight, version,
                delta=delta, clock=clock)


def full(value: float) -> torch.Tensor:
    return torch.full((8,), value)


def answered(replies) -> list[tuple[str, int]]:
    """(worker, req_id) of each OK reply, sorted."""
    assert all(r.op == Op.OK for _, r in replies), replies
    return sorted((to.decode(), r.req_id) for to, r in replies)


@pytest.fixture
def staleness() -> list[int]:
    return []


def ssp(staleness, bound: int, store: ShardStore | None = None) -> SSPPolicy:
    return SSPPolicy(store or new_store(), staleness.append, TrainingConfig(consistency="ssp", staleness_bound=bound))


# -- SSP --------------------------------------------------------------------------------------


def test_ssp_holds_a_worker_too_far_ahead_but_applies_its_push(staleness):
    store = new_store()
    policy = ssp(staleness, 1, store)
    assert policy.set_workers({"w0", "w1", "w2"}) == []
    assert answered(policy.push(push("w0", full(1.0), clock=1, req_id=1))) == [("w0", 1)]  # lead 1 <= 1
    before = store.read(ALL)
    assert policy.push(push("w0", full(1.0), version=1, clock=2, req_id=2)) == []  # lead 2 > 1: held
    torch.testing.assert_close(store.read(ALL), before - LR)  # ... though applied at once
    assert versions(store) == [2, 2]
    # w1 catches up to 1: the slowest (w2) is still at 0, so w0 stays held.
    assert answered(policy.push(push("w1", full(0.0), version=2, clock=1, req_id=3))) == [("w1", 3)]
    # The slowest catches up: its push answers itself and releases w0.
    replies = policy.push(push("w2", full(0.0), version=3, clock=1, req_id=4))
    assert answered(replies) == [("w0", 2), ("w2", 4)]
    released = dict(replies)[b"w0"]
    assert released.meta == {"version": 4}  # the values as of the release
    torch.testing.assert_close(released.tensors[0], store.read(ALL))
    assert policy.held == [] and policy.stats() == {"ssp_max_lead": 1}


def test_ssp_bound_zero_moves_in_lockstep(staleness):
    policy = ssp(staleness, 0)
    policy.set_workers({"w0", "w1", "w2"})
    for c in (1, 2, 3):
        assert policy.push(push("w0", full(0.1), clock=c, req_id=10 * c)) == []
        assert policy.push(push("w1", full(0.1), clock=c, req_id=10 * c + 1)) == []
        replies = policy.push(push("w2", full(0.1), clock=c, req_id=10 * c + 2))
        assert answered(replies) == [("w0", 10 * c), ("w1", 10 * c + 1), ("w2", 10 * c + 2)]
    assert policy.stats()["ssp_max_lead"] == 0


def test_ssp_refuses_a_push_without_a_clock_and_changes_nothing(staleness):
    store = new_store()
    policy = ssp(staleness, 1, store)
    policy.set_workers({"w0", "w1"})
    before = store.read(ALL)
    [(to, reply)] = policy.push(push("w0", full(3.0), clock=None, req_id=7))
    assert to == b"w0" and reply.op == Op.ERROR and reply.req_id == 7 and reply.meta["code"] == "ssp_clock"
    assert torch.equal(store.read(ALL), before) and versions(store) == [0, 0]
    assert policy.held == [] and policy.clocks == {} and staleness == []


def test_ssp_holds_nothing_before_the_membership_is_known(staleness):
    policy = ssp(staleness, 0)
    for c in range(1, 6):
        assert answered(policy.push(push("w0", full(0.1), clock=c, req_id=c))) == [("w0", c)]
    assert policy.held == []
    # Once the coordinator names the members, w0 (at 5) waits for w1 (at 0).
    policy.set_workers({"w0", "w1"})
    assert policy.push(push("w0", full(0.1), clock=6, req_id=6)) == []


def test_a_worker_leaving_the_membership_releases_those_waiting_for_it(staleness):
    policy = ssp(staleness, 1)
    policy.set_workers({"w0", "w1", "w2"})
    policy.push(push("w1", full(0.1), clock=1, req_id=1))
    policy.push(push("w1", full(0.1), clock=2, req_id=2))  # held: w0 and w2 at 0
    policy.push(push("w0", full(0.1), clock=1, req_id=3))
    assert [(w, c) for w, c, _ in policy.held] == [("w1", 2)]
    assert policy.set_workers({"w0", "w1", "w2"}) == []  # the same membership releases nothing
    replies = policy.set_workers({"w0", "w1"})  # w2 (never pushed) is gone: the slowest is now at 1
    assert answered(replies) == [("w1", 2)]
    assert policy.held == [] and policy.stats()["ssp_max_lead"] == 1


def test_a_worker_outside_the_membership_is_never_held(staleness):
    policy = ssp(staleness, 0)
    policy.set_workers({"w0", "w1"})
    assert answered(policy.push(push("stranger", full(0.1), clock=9, req_id=1))) == [("stranger", 1)]


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_ssp_simulation_bounds_the_lead_and_uses_the_slack(staleness, bound):
    """w0 pushes once every 2 ticks, w1 and w2 every tick; a worker pushes again only once its
    previous push was answered (as a real worker waits for its values)."""
    store = new_store()
    policy = ssp(staleness, bound, store)
    members = {"w0", "w1", "w2"}
    policy.set_workers(members)
    clock = dict.fromkeys(members, 0)
    waiting: dict[str, int | None] = dict.fromkeys(members)  # worker -> clock of its unanswered push
    req_clock: dict[int, tuple[str, int]] = {}
    leads: list[int] = []
    pushes, tick, req = 0, 0, 0
    while pushes < 200:
        tick += 1
        assert tick < 2000, "the simulation stalled"
        for w in sorted(members):
            if waiting[w] is not None or (w == "w0" and tick % 2):
                continue
            clock[w] += 1
            req += 1
            req_clock[req] = (w, clock[w])
            waiting[w] = clock[w]
            pushes += 1
            for to, reply in policy.push(push(w, full(0.001), version=store.version(ALL), clock=clock[w], req_id=req)):
                assert reply.op == Op.OK
                who, c = req_clock.pop(reply.req_id)
                assert to.decode() == who and waiting[who] == c
                lead = c - min(clock.values())
                assert lead <= bound, f"{who} answered at clock {c} with the slowest at {min(clock.values())}"
                leads.append(lead)
                waiting[who] = None
            assert policy.stats()["ssp_max_lead"] <= bound
    assert max(leads) == bound  # the fast workers did use all of their slack
    assert policy.stats()["ssp_max_lead"] == bound
    assert clock["w1"] - clock["w0"] <= bound + 1  # a waiting worker is at most one push further
    assert len(staleness) == pushes and versions(store) == [pushes, pushes]  # every push was applied


# -- staleness-aware learning rate -----------------------------------------------------------------


def test_staleness_lr_scales_a_stale_push_by_one_over_its_staleness(staleness):
    store = new_store()
    policy = AsyncPolicy(store, staleness.append, TrainingConfig(staleness_lr=True))
    g = torch.linspace(-1.0, 1.0, 8)
    before = store.read(ALL)
    policy.push(push("w0", g, version=0))  # fresh
    fresh_move = store.read(ALL) - before
    torch.testing.assert_close(fresh_move, -LR * g)
    for v in (1, 2, 3):
        policy.push(push("w0", torch.zeros(8), version=v))  # fresh as well: no move
    assert store.version(ALL) == 4
    before = store.read(ALL)
    policy.push(push("w1", g, version=0))  # 4 versions stale
    torch.testing.assert_close(store.read(ALL) - before, fresh_move / 4)
    assert staleness == [0, 0, 0, 0, 4]


def test_without_staleness_lr_a_stale_push_moves_as_much_as_a_fresh_one(staleness):
    store = new_store()
    policy = AsyncPolicy(store, staleness.append, TrainingConfig())
    for v in range(4):
        policy.push(push("w0", torch.zeros(8), version=v))
    before = store.read(ALL)
    policy.push(push("w1", full(1.0), version=0))
    torch.testing.assert_close(store.read(ALL) - before, full(-LR))


# -- delta pushes (local SGD) ----------------------------------------------------------------------


def test_a_delta_is_added_without_touching_the_optimizer_state():
    store = new_store(momentum=0.9)
    store.apply(ALL, full(1.0))  # a gradient step fills the momentum buffer
    buf = store.rule.buf.clone()
    assert buf.abs().sum() > 0
    before = store.read(ALL)
    d = torch.linspace(-2.0, 2.0, 8)
    store.apply(ALL, d, delta=True)
    torch.testing.assert_close(store.read(ALL), before + d, rtol=0, atol=0)
    assert torch.equal(store.rule.buf, buf)
    assert versions(store) == [2, 2]


def test_a_delta_for_some_keys_bumps_only_theirs():
    store = new_store(momentum=0.9)
    before = store.read(ALL)
    store.apply([1], torch.tensor([5.0, -5.0]), delta=True)
    assert versions(store) == [0, 1]
    torch.testing.assert_close(store.read(ALL), before + torch.tensor([0.0] * 6 + [5.0, -5.0]))
    assert torch.equal(store.rule.buf, torch.zeros(8))


def test_sync_rounds_of_deltas_average_the_models(staleness):
    store = new_store(momentum=0.9)
    before = store.read(ALL)
    policy = SyncPolicy(store, staleness.append)
    policy.set_workers({"w0", "w1"})
    d0, d1 = torch.linspace(0.0, 1.0, 8), torch.linspace(-3.0, 3.0, 8)
    assert policy.push(push("w0", d0.clone(), weight=3.0, delta=True, req_id=1)) == []
    replies = policy.push(push("w1", d1.clone(), weight=3.0, delta=True, req_id=2))
    assert answered(replies) == [("w0", 1), ("w1", 2)]
    torch.testing.assert_close(store.read(ALL), before + (d0 + d1) / 2)
    assert torch.equal(store.rule.buf, torch.zeros(8)) and versions(store) == [1, 1]


# -- the trainer: accumulation and local SGD against a recording client ----------------------------


class RecordingKV:
    """What Trainer uses of a KVClient: it records every push and its wait does nothing
    (so the model keeps its own values)."""

    def __init__(self, keys: int) -> None:
        self.versions = [0] * keys
        self.pushes: list[dict] = []
        self.rpc = SimpleNamespace(bytes_sent=0, bytes_received=0)
        self.bytes_sent = self.bytes_received = 0
        self.wire = {"push": {}, "pull": {}}

    def push_pull(self, grad, out, keys=None, weight=1.0, versions=None, position=None, delta=False, start=None):
        flat = grad.vector() if isinstance(grad, Pieces) else grad.clone()  # (a step's gradient comes in pieces)
        self.pushes.append({"grad": flat, "weight": weight, "delta": delta, "versions": versions, "position": position})
        return object()

    def pull(self, out, keys=None, exact=False):
        return object()

    def wait(self, handle, timeout_s=None) -> None:
        pass

    def share_values(self):
        return None  # (no servers to write into the model: it keeps its own memory)


MODEL = {"name": "mlp", "args": {"input_shape": [6], "hidden": [5], "dropout": 0.0, "num_classes": 3}}


def small_trainer(**training) -> tuple[Trainer, RecordingKV]:
    job = parse_job({"model": MODEL, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                     "training": {"batch_size": 8, **training}, "cluster": {"num_servers": 1, "num_workers": 1},
                     "monitor": {"metrics": False}})
    model = build_model(job.model, job.training.seed)
    layout = make_layout(param_shapes(model), 1)
    kv = RecordingKV(len(layout.slices))
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), kv, None, "worker-0")
    return trainer, kv


def test_a_trained_parameter_the_first_step_gives_no_gradient_is_warned_about_once(caplog):
    """The servers update it with a zero gradient (weight decay and momentum still move it), where
    torch.optim would skip it: the user is told which, and how to freeze it."""
    job = parse_job({"model": MODEL, "optimizer": {"name": "adamw", "lr": 0.1, "weight_decay": 0.5},
                     "training": {"batch_size": 8}, "cluster": {"num_servers": 1, "num_workers": 1}, "monitor": {"metrics": False}})

    class WithUnused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = torch.nn.Linear(6, 3), torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = WithUnused()
    layout = make_layout(param_shapes(model), 1)
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)), None, "worker-0")
    with caplog.at_level("WARNING", logger="downpour.worker.trainer"):
        for x, y in batches(2):
            trainer.step(x, y)
    warned = [r.message for r in caplog.records if "got no gradient" in r.message]
    assert len(warned) == 1 and "spare.weight, spare.bias" in warned[0] and "requires_grad=False" in warned[0]


def batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def reference_model() -> torch.nn.Module:
    return build_model(parse_job({"model": MODEL}).model, 0)


def direct_gradient(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of one batch made of all of ``xs``, on the initial parameters."""
    model = reference_model()
    F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_accumulating_four_batches_of_8_pushes_the_gradient_of_one_batch_of_32():
    trainer, kv = small_trainer(accumulate=4)
    data = batches(4)
    for i, (x, y) in enumerate(data):
        trainer.step(x, y)
        assert len(kv.pushes) == (1 if i == 3 else 0)
    [p] = kv.pushes
    assert p["weight"] == 32 and p["delta"] is False
    want = direct_gradient([x for x, _ in data], [y for _, y in data])
    torch.testing.assert_close(p["grad"], want, rtol=1e-6, atol=1e-6)
    assert trainer.pushes == 1 and trainer.steps == 4 and trainer.examples == 32


def test_the_trainer_flushes_a_partial_accumulation_when_it_ends():
    trainer, kv = small_trainer(accumulate=4)
    data = batches(6)
    for i, (x, y) in enumerate(data):
        trainer.step(x, y, [0, 3, 8 * (i + 1)])
    assert len(kv.pushes) == 1 and kv.pushes[0]["position"] == [0, 3, 32]
    trainer.run(lambda: None, lambda *a: None)  # no shard left: the run ends at once
    assert len(kv.pushes) == 2
    last = kv.pushes[1]
    # with the data position of its last batch: a checkpoint, a graceful stop's LEAVE and a resume know it was trained
    assert last["weight"] == 16 and last["delta"] is False and last["position"] == [0, 3, 48]
    trainer._settle()
    assert trainer.position == [0, 3, 48]
    want = direct_gradient([x for x, _ in data[4:]], [y for _, y in data[4:]])
    torch.testing.assert_close(last["grad"], want, rtol=1e-6, atol=1e-6)
    trainer.run(lambda: None, lambda *a: None)  # nothing left to push
    assert len(kv.pushes) == 2


def test_local_steps_push_the_change_of_three_local_sgd_steps_as_a_delta():
    trainer, kv = small_trainer(local_steps=3)
    trainer.start()
    data = batches(7)
    ref = reference_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    snapshots = [torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).clone()]
    for i, (x, y) in enumerate(data):
        trainer.step(x, y)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        snapshots.append(torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).clone())
        assert len(kv.pushes) == (i + 1) // 3
    assert [p["delta"] for p in kv.pushes] == [True, True]
    assert [p["weight"] for p in kv.pushes] == [3.0, 3.0]
    torch.testing.assert_close(kv.pushes[0]["grad"], snapshots[3] - snapshots[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kv.pushes[1]["grad"], snapshots[6] - snapshots[3], rtol=1e-6, atol=1e-6)
    trainer.run(lambda: None, lambda *a: None)  # the seventh step's change goes out at the end
    assert len(kv.pushes) == 3 and kv.pushes[2]["weight"] == 1.0 and kv.pushes[2]["delta"] is True
    torch.testing.assert_close(kv.pushes[2]["grad"], snapshots[7] - snapshots[6], rtol=1e-6, atol=1e-6)


# -- config validation -------------------------------------------------------------------------------


def job_with(**sections) -> dict:
    job = {"model": {"name": "mlp"}}
    job.update(sections)
    return job


def test_accumulate_and_local_steps_together_are_refused():
    with pytest.raises(ConfigError, match="accumulate and training.local_steps"):
        parse_job(job_with(training={"accumulate": 2, "local_steps": 3}))
    parse_job(job_with(training={"accumulate": 2}))
    parse_job(job_with(training={"local_steps": 3}))


def test_dgc_with_server_momentum_is_refused_naming_both():
    dgc = {"push": {"codec": "topk", "dgc": {"momentum": 0.9}}}
    with pytest.raises(ConfigError) as err:
        parse_job(job_with(compression=dgc, optimizer={"name": "sgd", "momentum": 0.5}))
    assert "dgc.momentum" in str(err.value) and "optimizer.momentum" in str(err.value)
    grouped = {"groups": [{"params": ["*.weight"], "push": {"codec": "randomk", "dgc": {}}}]}
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        parse_job(job_with(compression=grouped, optimizer={"name": "sgd", "momentum": 0.9}))
    parse_job(job_with(compression=dgc, optimizer={"name": "sgd", "momentum": 0.0}))


def test_a_slowdown_rank_outside_the_workers_is_refused():
    with pytest.raises(ConfigError, match="slowdown.rank 3"):
        parse_job(job_with(training={"slowdown": {"rank": 3, "factor": 2}}, cluster={"num_workers": 3}))
    parse_job(job_with(training={"slowdown": {"rank": 2, "factor": 2}}, cluster={"num_workers": 3}))


def test_dgc_on_a_codec_without_a_ratio_is_refused():
    with pytest.raises(ConfigError, match="dgc needs codec topk or randomk"):
        parse_job(job_with(compression={"push": {"codec": "qsgd", "dgc": {}}}))


# -- the simulated slow link ------------------------------------------------------------------------


def test_a_slow_link_delays_sends_and_replies_by_their_size():
    ctx = new_context()
    listener = Listener(ctx, "tcp://127.0.0.1:*", 1 << 24)
    rpc = RpcClient(ctx, "worker-slow", request_timeout_s=WAIT_S, link_bytes_per_s=2e6)
    poller = Poller()
    poller.register(listener)

    def serve(reply_tensors: list[torch.Tensor]) -> Message:
        assert poller.poll(WAIT_S), "the request never arrived"
        peer, frames = listener.recv()
        request = decode(frames)
        listener.send(peer, encode(request.reply({}, reply_tensors)))
        return request

    try:
        rpc.connect("server", listener.address)
        big = torch.zeros(250_000)  # 1 MB of float32
        t0 = time.monotonic()
        fut = rpc.request("server", Message(Op.PUSH, meta={"keys": [0]}, tensors=[big]))
        sent_s = time.monotonic() - t0
        assert sent_s >= 0.45, f"1 MB at 2 MB/s left in {sent_s:.3f}s"
        serve([])
        fut.result(WAIT_S)
        # A small request whose reply carries 1 MB: the reply is delivered no sooner than its bytes arrive.
        t0 = time.monotonic()
        fut = rpc.request("server", Message(Op.PULL, meta={"keys": [0]}))
        serve([big])
        reply = fut.result(WAIT_S)
        got_s = time.monotonic() - t0
        assert reply.tensors[0].numel() == 250_000
        assert got_s >= 0.45, f"1 MB at 2 MB/s arrived in {got_s:.3f}s"
    finally:
        rpc.close()
        listener.close()
        ctx.term()


# -- compressed pushes and pulls on a live server ------------------------------------------------------


# What the live server's job configures: pushes may use topk, pulls int8 in blocks of 4.
COMPRESSED = {"compression": {"push": {"codec": "topk", "ratio": 0.5}, "pull": "int8", "pull_block": 4}}


@pytest.fixture
def live():
    server = LiveServer(None, COMPRESSED)
    ctx = zmq.Context(io_threads=1)
    client = RawClient(ctx, server.address)
    try:
        reply = client.request(Op.INIT, {"keys": KEYS}, [INIT])
        assert reply is not None and reply.op == Op.OK
        yield server, client
    finally:
        client.close()
        ctx.term()
        server.close()


def server_versions(server: LiveServer) -> list[int]:
    return server.call(lambda s: list(s.store.versions))


def topk_push(grad: torch.Tensor, ratio: float = 0.5) -> tuple[list, list[torch.Tensor]]:
    """``grad`` encoded per key with topk, as a worker's PushCompressor sends it."""
    enc, tensors = [], []
    for s in LAYOUT.server_slices(0):
        payload = TopK(ratio).encode(grad[s.start : s.stop])
        enc.append(["topk", payload.meta, len(payload.tensors)])
        tensors.extend(payload.tensors)
    return enc, tensors


GRAD = torch.linspace(-2.0, 2.0, NUMEL) * torch.tensor([1.0, -1.0] * (NUMEL // 2))


def test_a_compressed_push_is_applied_as_its_decoded_gradient(live):
    server, client = live
    enc, tensors = topk_push(GRAD)
    sent = decode_push(enc, tensors, [s.length for s in LAYOUT.server_slices(0)])
    assert 0 < int((sent != 0).sum()) < NUMEL  # topk dropped some entries
    reply = client.request(Op.PUSHPULL, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
    assert reply is not None and reply.op == Op.OK and reply.meta["version"] == 1
    want = INIT - LIVE_LR * sent
    torch.testing.assert_close(server.values(), want)
    torch.testing.assert_close(reply.tensors[0], want)
    assert server_versions(server) == [1] * len(KEYS)


def corrupt_out_of_range(enc, tensors):
    tensors = [t.clone() for t in tensors]
    tensors[-1][0] = 4  # the last key's first index: its keys hold 4 elements (0..3)
    return enc, tensors


def corrupt_extra_tensor(enc, tensors):
    return enc, [*tensors, torch.zeros(2)]


def corrupt_missing_tensor(enc, tensors):
    return enc, tensors[:-1]


def corrupt_count(enc, tensors):
    enc = [list(e) for e in enc]
    enc[0][2] = 1
    return enc, tensors


@pytest.mark.parametrize("corrupt", [corrupt_out_of_range, corrupt_extra_tensor, corrupt_missing_tensor, corrupt_count])
@pytest.mark.parametrize("op", [Op.PUSH, Op.PUSHPULL])
def test_a_corrupt_compressed_push_is_refused_and_changes_nothing(live, corrupt, op):
    server, client = live
    enc, tensors = corrupt(*topk_push(GRAD))
    reply = client.request(op, {"keys": KEYS, "version": 0, "enc": enc}, tensors)
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "invalid", reply
    assert torch.equal(server.values(), INIT)
    assert server_versions(server) == [0] * len(KEYS)
    assert server.pushes() == 0


def test_a_pull_with_pq_int8_returns_values_within_int8_error(live):
    _, client = live
    reply = client.request(Op.PULL, {"keys": KEYS, "pq": ["int8", 4]})
    assert reply is not None and reply.op == Op.OK and "enc" in reply.meta
    assert reply.meta["enc"][0] == "int8"
    assert [t.dtype for t in reply.tensors] == [torch.int8, torch.float32]
    values = decode_pull(reply.meta["enc"], reply.tensors, NUMEL)
    step = INIT.reshape(-1, 4).abs().amax(1).repeat_interleave(4) / 127  # one int8 step per 4-element bucket
    assert bool(((values - INIT).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("pq", [["zstd", 4], ["int8", 0], ["int8"], "int8", ["int8", 1.5], ["topk", 4]])
def test_a_bad_pq_is_refused(live, pq):
    server, client = live
    reply = client.request(Op.PULL, {"keys": KEYS, "pq": pq})
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "invalid", reply
    reply = client.request(Op.PUSHPULL, {"keys": KEYS, "version": 0, "pq": pq}, [torch.ones(NUMEL)])
    assert reply is not None and reply.op == Op.ERROR and reply.meta["code"] == "invalid", reply
    assert torch.equal(server.values(), INIT)  # the push was not applied
    assert server_versions(server) == [0] * len(KEYS) and server.pushes() == 0


def test_a_bool_pq_bucket_is_refused_even_after_a_valid_pq_was_cached(live):
    server, client = live
    reply = client.request(Op.PULL, {"keys": KEYS, "pq": ["int8", True]})
    assert reply is not None and reply.op == Op.ERROR  # refused on its own
    assert client.request(Op.PULL, {"keys": KEYS, "pq": ["int8", 4]}).op == Op.OK
    reply = client.request(Op.PULL, {"keys": KEYS, "pq": ["int8", True]})
    assert reply is not None and reply.op == Op.ERROR, "the same bad pq is accepted from the cache"


# -- end to end ---------------------------------------------------------------------------------------------


def test_an_ssp_job_with_a_straggler_keeps_every_lead_within_the_bound(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"consistency": "ssp", "staleness_bound": 1, "steps": 30,
                                        "slowdown": {"rank": 0, "factor": 3}},
                   monitor=QUIET, checkpoint={"enabled": False})
    s = run_train(tmp_path, job)
    assert s["status"] == "ok" and s["consistency"] == "ssp"
    assert s["steps"] == 2 * 30  # 60 steps of 32 fit in the one epoch of 2,400 examples
    assert len(s["servers"]) == 2
    for name, srv in s["servers"].items():
        assert "ssp_max_lead" in srv, name
        assert srv["ssp_max_lead"] <= 1, (name, srv["ssp_max_lead"])


def test_a_compressed_job_pushes_and_pulls_far_fewer_bytes(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"steps": 30}, monitor=QUIET, checkpoint={"enabled": False},
                   compression={"push": {"codec": "topk", "ratio": 0.01, "error_feedback": True}, "pull": "int8"})
    s = run_train(tmp_path, job)
    assert s["status"] == "ok" and s["steps"] == 2 * 30
    numel = 784 * 32 + 32 + 32 * 10 + 10  # the tiny mlp's parameters
    dense = numel * 4  # one float32 copy of the model
    wire = s["wire"]
    assert wire["pushes"] == 2 * 30
    push, pull = wire["push"], wire["pull"]
    assert push["indices"] > 0 and pull["scales"] > 0  # what only compressed traffic has
    assert push["per_push"] * 30 <= dense, push
    # Every push is paired with a pull; the first pull at start-up adds one more per worker.
    assert dense / 4.2 <= pull["per_push"] <= dense / 3.5, pull
    assert pull["values"] == numel * (wire["pushes"] + 2), pull  # one int8 per parameter per pull


class StoppingKV(RecordingKV):
    """A client whose servers refuse push number ``refuse_at`` (1-based) with ``stopping``: a
    graceful stop ended the sync rounds (SyncPolicy.freeze) while that push waited."""

    def __init__(self, keys: int, refuse_at: int) -> None:
        super().__init__(keys)
        self.refuse_at = refuse_at

    def wait(self, handle, timeout_s=None) -> None:
        if len(self.pushes) == self.refuse_at and handle is self.last:
            raise RemoteError("the job is stopping: no more sync rounds", "server-0", "stopping")

    def push_pull(self, grad, out, keys=None, weight=1.0, versions=None, position=None, delta=False, start=None):
        super().push_pull(grad, out, keys, weight, versions, position, delta, start)
        self.last = object()
        return self.last


def test_a_push_refused_because_the_sync_rounds_ended_is_not_counted_and_the_worker_leaves_before_it():
    """Its batch was not applied: the shard must resume before it (the position the worker leaves
    with), and a shard whose last batch it was is not reported done."""
    job = parse_job({"model": MODEL, "optimizer": {"name": "sgd", "lr": 0.1}, "data": {"shard_size": 24},
                     "training": {"batch_size": 8, "consistency": "sync"}, "cluster": {"num_servers": 1, "num_workers": 1},
                     "monitor": {"metrics": False}})
    model = build_model(job.model, job.training.seed)
    layout = make_layout(param_shapes(model), 1)
    kv = StoppingKV(len(layout.slices), refuse_at=3)
    g = torch.Generator().manual_seed(5)
    data = Dataset(ArrayDataset(torch.randn(24, 6, generator=g).numpy(), torch.randint(0, 3, (24,), generator=g).numpy()))
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), kv, data, "worker-0")
    shards = iter([{"epoch": 0, "shard": 0, "start": 0, "stop": 24}, {"epoch": 0, "shard": 1, "start": 0, "stop": 24}])
    done: list = []
    trainer.run(lambda: next(shards, None), lambda *a: done.append(a))
    assert len(kv.pushes) == 3 and trainer.halted and trainer.left
    assert trainer.position == [0, 0, 16]  # after the second batch: the last push applied
    assert done == []  # the third batch ended shard 0, but was not applied: the shard is not done
    assert trainer.steps == 2 and trainer.examples == 16


def test_with_overlap_a_shard_is_reported_done_only_once_its_last_push_was_answered():
    trainer, kv = small_trainer(overlap=True, epochs=1)
    assert trainer.overlap
    data = batches(3)

    def train_shard(shard):
        for i, (x, y) in enumerate(data):
            trainer.step(x, y, [shard["epoch"], shard["shard"], 8 * (i + 1)])
        return 8 * len(data)

    trainer.train_shard = train_shard
    shards = [{"epoch": 0, "shard": 1, "start": 24, "stop": 48}, {"epoch": 0, "shard": 0, "start": 0, "stop": 24}]
    asked, done = [], []

    def next_shard():
        asked.append((trainer.inflight, trainer.position))
        return shards.pop() if shards else None

    trainer.run(next_shard, lambda *a: done.append((a, trainer.inflight, trainer.position)))
    assert len(kv.pushes) == 6
    # Each shard is reported done with no push in flight, at the position of its last batch.
    # (with the worker's steps, examples and pushes so far: 3 batches of 8 per shard)
    assert done == [((0, 0, 24, 3, 24, 3), None, [0, 0, 24]), ((0, 1, 24, 6, 48, 6), None, [0, 1, 24])]
    assert asked[1:] == [(None, [0, 0, 24]), (None, [0, 1, 24])]


def test_a_warm_up_runs_the_model_before_training_and_leaves_no_trace():
    """Trainer.warm_up (before the init barrier): forward and backward passes, then the parameters,
    the buffers (a BatchNorm's running statistics) and the random generator are as they were, no
    gradient is kept and nothing is pushed."""
    job = parse_job({"model": MODEL, "optimizer": {"name": "sgd", "lr": 0.1}, "training": {"batch_size": 8},
                     "cluster": {"num_servers": 1, "num_workers": 1}, "monitor": {"metrics": False}})
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(5, 3))
    layout = make_layout(param_shapes(model), 1)
    kv = RecordingKV(len(layout.slices))
    g = torch.Generator().manual_seed(5)
    data = Dataset(ArrayDataset(torch.randn(24, 6, generator=g).numpy(), torch.randint(0, 3, (24,), generator=g).numpy()))
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), kv, data, "worker-0")
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    trainer.warm_up()
    assert calls == [8, 8]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers)) and model[1].num_batches_tracked == 0
    assert torch.equal(torch.get_rng_state(), rng) and kv.pushes == [] and trainer.steps == 0


def test_a_metric_that_fails_at_the_end_is_reported_and_the_others_are_kept():
    from downpour.data import ArrayDataset, Dataset

    job = parse_job({"model": MODEL, "training": {"batch_size": 8, "metrics": {
        "top2": "tests.byo_factories:top2_accuracy", "bad": "tests.byo_factories:metric_not_a_number",
        "raises": "tests.byo_factories:metric_raises", "nan": "tests.byo_factories:metric_nan"}},
        "cluster": {"num_servers": 1, "num_workers": 1}, "monitor": {"metrics": False}})
    model = build_model(job.model, 0)
    layout = make_layout(param_shapes(model), 1)
    g = torch.Generator().manual_seed(0)
    test = ArrayDataset(torch.randn(40, 6, generator=g).numpy(), torch.randint(0, 3, (40,), generator=g).numpy())
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)), Dataset(test, test),
                      "worker-0")
    result = trainer.evaluate()
    assert result["test_examples"] == 40 and 0.0 <= result["test_accuracy"] <= 1.0
    assert list(result["metrics"]) == ["top2"] and result["metrics"]["top2"] >= result["test_accuracy"]
    assert "must return a number, got str" in result["metric_errors"]["bad"]
    assert result["metric_errors"]["raises"] == "ZeroDivisionError: the metric's own bug"
    assert "returned nan, not a finite number" in result["metric_errors"]["nan"]  # (the report takes finite numbers only)
    assert "test_loss_undefined" not in result
    inf_loss = job.model_copy(update={"training": job.training.model_copy(update={"loss": "tests.byo_factories:loss_infinite_in_eval"})})
    trainer = Trainer(inf_loss, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)), Dataset(test, test),
                      "worker-0")
    result = trainer.evaluate()
    assert result["test_loss"] is None and "the test loss is inf" in result["test_loss_undefined"]
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_a_binary_model_whose_outputs_are_nan_reports_no_auc_log_loss_or_loss_instead_of_numbers_no_report_takes():
    job = parse_job({"model": {"name": "mlp", "args": {"input_shape": [6], "hidden": [4], "num_classes": 1}},
                     "training": {"batch_size": 8, "loss": "binary_cross_entropy"}, "cluster": {"num_servers": 1, "num_workers": 1},
                     "monitor": {"metrics": False}})
    model = build_model(job.model, 0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # (a diverged model)
    layout = make_layout(param_shapes(model), 1)
    g = torch.Generator().manual_seed(0)
    test = ArrayDataset(torch.randn(40, 6, generator=g).numpy(), (np.arange(40) % 2).astype(np.float32))
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)), Dataset(test, test),
                      "worker-0")
    result = trainer.evaluate()
    assert result["test_auc"] is None and "not finite" in result["test_auc_undefined"]
    assert result["test_logloss"] is None and "the test log loss is nan" in result["test_logloss_undefined"]
    assert result["test_loss"] is None and "the test loss is nan" in result["test_loss_undefined"]


def test_labels_beyond_the_models_outputs_are_a_clear_error_before_training():
    from downpour.data import ArrayDataset, Dataset
    from downpour.errors import ConfigError

    job = parse_job({"model": MODEL, "training": {"batch_size": 8}, "cluster": {"num_servers": 1, "num_workers": 1},
                     "monitor": {"metrics": False}})
    model = build_model(job.model, 0)  # 3 outputs
    layout = make_layout(param_shapes(model), 1)
    x = torch.randn(40, 6).numpy()
    for top, fails in ((2, False), (4, True)):
        y = np.arange(40) % (top + 1)  # labels 0..top; the first batch holds all of them
        trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)),
                          Dataset(ArrayDataset(x, y), None), "worker-0")
        if fails:
            with pytest.raises(ConfigError, match="the training labels go up to 4, but the model has 3 outputs"):
                trainer.warm_up()
        else:
            trainer.warm_up()


@pytest.mark.parametrize("x_shape, y_shape, says", [
    ((40, 8), (40,), r"inputs \[8, 8\] float32, labels \[8\] int64\): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ((40, 6), (40, 2), r"inputs \[8, 6\] float32, labels \[8, 2\] int64\): RuntimeError"),
])
def test_data_the_model_cannot_take_is_a_clear_error_before_training(x_shape, y_shape, says):
    from downpour.data import ArrayDataset, Dataset
    from downpour.errors import ConfigError

    job = parse_job({"model": MODEL, "training": {"batch_size": 8}, "cluster": {"num_servers": 1, "num_workers": 1},
                     "monitor": {"metrics": False}})
    model = build_model(job.model, 0)  # 6 inputs, 3 outputs
    layout = make_layout(param_shapes(model), 1)
    x, y = torch.randn(*x_shape).numpy(), np.zeros(y_shape, dtype=np.int64)
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)),
                      Dataset(ArrayDataset(x, y), None), "worker-0")
    with pytest.raises(ConfigError, match=r"the model cannot train on the data.s first batch \(" + says):
        trainer.warm_up()


def test_a_worker_s_heartbeat_names_no_shard_between_shards_and_no_rate_once_training_is_over():
    """Before, a worker waiting for a shard (or done) kept reporting its last shard, and its last
    examples/s stood in status and Prometheus for the rest of the job."""
    job = parse_job({"model": MODEL, "optimizer": {"name": "sgd", "lr": 0.1}, "data": {"shard_size": 24},
                     "training": {"batch_size": 8}, "cluster": {"num_servers": 1, "num_workers": 1}, "monitor": {"metrics": False}})
    model = build_model(job.model, job.training.seed)
    layout = make_layout(param_shapes(model), 1)
    g = torch.Generator().manual_seed(5)
    data = Dataset(ArrayDataset(torch.randn(24, 6, generator=g).numpy(), torch.randint(0, 3, (24,), generator=g).numpy()))
    trainer = Trainer(job, FlatModel(model, layout, torch.device("cpu")), RecordingKV(len(layout.slices)), data, "worker-0")
    trainer.rate.window_s = 0.0  # (a rate on every read)
    seen: list = []

    def next_shard():
        seen.append(trainer.progress())  # what a heartbeat sent now would carry
        return {"epoch": 0, "shard": 0, "start": 0, "stop": 24} if len(seen) == 1 else None

    trainer.run(next_shard, lambda *a: None)
    assert "shard" not in seen[0] and "shard" not in seen[1]  # before the first, and after it was done
    assert trainer.examples == 24 and trainer.progress()["examples_per_s"] == 0.0
