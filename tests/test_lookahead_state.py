"""The state of look-ahead momentum (server/lookahead.py): checkpointed and restored bit for bit, into
the same or another layout, handed to a backup, dropped for workers that leave, refused when malformed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from downpour.config import parse_job
from downpour.errors import DataError, ProtocolError
from downpour.layout import Layout, make_layout
from downpour.server.consistency import AsyncPolicy
from downpour.server.lookahead import make_lookahead
from downpour.server.optim import make_rule
from downpour.server.replica import load_state
from downpour.server.scaling import Hyperparams
from downpour.server.snapshot import OldParams, load_shard_file, restore_store
from downpour.server.store import ShardStore
from tests.checkpoint_helpers import SHAPES, by_param, checkpoint_of, layout_of
from tests.test_snapshot import shard_bytes as snapshot_shard_bytes

WORKERS = ["worker-0", "worker-1", "worker-2"]


def async_job(scaling: str = "auto"):
    return parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "scaling": scaling},
                      "training": {"consistency": "async"}, "cluster": {"num_workers": len(WORKERS)}})


def servers(layout: Layout, scaling: str = "auto", init: bool = True) -> list[ShardStore]:
    """The shard stores of ``layout``'s servers, built as a server builds them (rule, hyperparameters, look-ahead)."""
    j = async_job(scaling)
    flat = torch.linspace(-1.0, 1.0, layout.numel)
    stores = []
    for r in range(layout.num_servers):
        st = ShardStore(layout.server_slices(r), lambda n: make_rule(j.optimizer, j.effective_lr(), n))
        st.hyper = Hyperparams(j, None)
        st.lookahead = make_lookahead(j, st)
        if init:
            st.init_keys(st.all, torch.cat([flat[s.start : s.stop] for s in layout.server_slices(r)]))
        stores.append(st)
    return stores


def rounds(stores: list[ShardStore], layout: Layout, n: int, seed: int, workers=WORKERS) -> list[torch.Tensor]:
    """Each worker in turn pushes a gradient of the whole model; the replies it gets, gathered by ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    replies = []
    for _ in range(n):
        for w in workers:
            g = torch.randn(layout.numel, generator=gen)
            reply = torch.zeros(layout.numel)
            for st in stores:
                st.lookahead.apply(w, st.all, torch.cat([g[layout.slices[k].start : layout.slices[k].stop] for k in st.keys]))
                sent = st.lookahead.values(st.all, w)
                scatter(reply, st, layout, st.read(st.all) if sent is None else sent)
            replies.append(reply)
    return replies


def scatter(out: torch.Tensor, st: ShardStore, layout: Layout, src: torch.Tensor) -> None:
    for i, key in enumerate(st.keys):
        s = layout.slices[key]
        out[s.start : s.stop] = src[st.offsets[i] : st.offsets[i + 1]]


def gathered(stores: list[ShardStore], layout: Layout, of: str | None = None) -> torch.Tensor:
    """The values, one worker's buffer (``of``) or the buffers' sum (``of="sum"``) as one vector of ``layout``."""
    out = torch.zeros(layout.numel)
    for st in stores:
        la = st.lookahead
        scatter(out, st, layout, st.data if of is None else la.total if of == "sum" else la.buffers[of])
    return out


def test_a_resumed_server_holds_every_workers_momentum_bit_for_bit_and_answers_as_if_never_stopped(url):
    layout = layout_of(2)
    stores = servers(layout)
    rounds(stores, layout, 4, seed=1)
    store, manifest = checkpoint_of(stores, url)
    fresh = servers(layout, init=False)
    old = OldParams(store, manifest, layout)
    for st in fresh:
        restore_store(st, layout, old, full=True)
    for a, b in zip(stores, fresh):
        assert set(b.lookahead.buffers) == set(WORKERS)
        assert all(torch.equal(a.lookahead.buffers[w], b.lookahead.buffers[w]) for w in WORKERS)
        assert torch.equal(a.lookahead.total, b.lookahead.total) and torch.equal(a.data, b.data)
    # The same pushes after the resume get the same replies and leave the same parameters.
    assert all(torch.equal(x, y) for x, y in zip(rounds(stores, layout, 3, seed=2), rounds(fresh, layout, 3, seed=2)))
    assert torch.equal(gathered(stores, layout), gathered(fresh, layout))


@pytest.mark.parametrize("num_servers", [1, 3])
def test_the_momentum_of_each_worker_restores_into_another_number_of_servers(url, num_servers):
    layout = layout_of(2)
    stores = servers(layout)
    rounds(stores, layout, 4, seed=1)
    store, manifest = checkpoint_of(stores, url)
    other = make_layout(SHAPES, num_servers, "f32", "bytes", 16)
    fresh = servers(other, init=False)
    old = OldParams(store, manifest, layout)
    for st in fresh:
        restore_store(st, other, old, full=True)
    for of in [*WORKERS, "sum"]:
        want, got = by_param(gathered(stores, layout, of), layout), by_param(gathered(fresh, other, of), other)
        assert all(torch.equal(want[n], got[n]) for n in want), of
    # The replies are element-wise, so they do not depend on the layout either.
    want, got = rounds(stores, layout, 2, seed=2), rounds(fresh, other, 2, seed=2)
    assert all(torch.equal(by_param(x, layout)[n], by_param(y, other)[n]) for x, y in zip(want, got) for n in by_param(x, layout))


def test_a_job_without_lookahead_ignores_the_buffers_and_one_with_it_starts_from_zero_on_an_older_checkpoint(url):
    layout = layout_of(2)
    stores = servers(layout)
    rounds(stores, layout, 2, seed=1)
    store, manifest = checkpoint_of(stores, url)
    plain = servers(layout, scaling="none", init=False)
    assert plain[0].lookahead is None
    for st in plain:
        restore_store(st, layout, OldParams(store, manifest, layout), full=True)
    assert torch.equal(gathered(plain, layout), gathered(stores, layout))
    # A checkpoint written without look-ahead momentum (scaling none): every worker starts at zero.
    store, manifest = checkpoint_of(plain, url + "-older")
    fresh = servers(layout, init=False)
    for st in fresh:
        restore_store(st, layout, OldParams(store, manifest, layout), full=True)
    assert all(st.lookahead.buffers == {} and not st.lookahead.total.any() for st in fresh)


def test_a_lookahead_server_keeps_and_saves_no_momentum_of_its_rule_and_resumes_a_checkpoint_that_has_it(url):
    layout = layout_of(2)
    stores = servers(layout)
    assert all(st.rule.state() == {} for st in stores)  # the look-ahead owns the momentum
    rounds(stores, layout, 2, seed=1)
    store, manifest = checkpoint_of(stores, url)
    assert "momentum_buffer" not in OldParams(store, manifest, layout).state
    for st in stores:  # as an older version kept the rule's buffer, unused: zeros, and saved them
        st.rule.buf = torch.zeros(st.numel)
    store, manifest = checkpoint_of(stores, url + "-older")
    old = OldParams(store, manifest, layout)
    assert "momentum_buffer" in old.state
    fresh = servers(layout, init=False)
    for st in fresh:
        restore_store(st, layout, old, full=True)
    assert all(st.rule.state() == {} for st in fresh)
    for of in [None, *WORKERS, "sum"]:
        assert torch.equal(gathered(fresh, layout, of), gathered(stores, layout, of)), of


def test_an_export_does_not_load_the_buffers(url):
    layout = layout_of(2)
    stores = servers(layout)
    rounds(stores, layout, 1, seed=1)
    store, manifest = checkpoint_of(stores, url)
    assert set(OldParams(store, manifest, layout).lookahead) == set(WORKERS)
    assert OldParams(store, manifest, layout, lookahead=False).lookahead == {}


def test_a_worker_that_leaves_has_its_momentum_dropped_and_the_sum_is_taken_again_exactly():
    layout = layout_of(1)
    (st,) = servers(layout)
    policy = AsyncPolicy(st, st.hyper.observe, async_job().training)
    policy.set_workers(set(WORKERS))
    rounds([st], layout, 5, seed=1)
    policy.set_workers({"worker-0", "worker-1"})
    la = st.lookahead
    assert set(la.buffers) == {"worker-0", "worker-1"}
    assert torch.equal(la.total, torch.zeros(st.numel).add_(la.buffers["worker-0"]).add_(la.buffers["worker-1"]))
    c = 0.1 * 0.9
    assert torch.equal(la.values(st.all, "worker-0"), torch.add(st.data, la.total, alpha=-c).add_(la.buffers["worker-0"], alpha=c))
    # Its replacement joins under another name and starts from zero, like any new worker.
    policy.set_workers({"worker-0", "worker-1", "worker-2.1"})
    rounds([st], layout, 1, seed=2, workers=["worker-2.1"])
    assert set(la.buffers) == {"worker-0", "worker-1", "worker-2.1"}


def test_a_checkpoints_buffer_of_a_worker_not_in_the_resumed_job_goes_at_its_first_membership(url):
    layout = layout_of(1)
    stores = servers(layout)
    rounds(stores, layout, 2, seed=1, workers=["worker-0", "worker-2.1"])  # worker-2.1: a replacement in the old job
    store, manifest = checkpoint_of(stores, url)
    (st,) = servers(layout, init=False)
    restore_store(st, layout, OldParams(store, manifest, layout), full=True)
    assert set(st.lookahead.buffers) == {"worker-0", "worker-2.1"}
    AsyncPolicy(st, st.hyper.observe, async_job().training).set_workers({"worker-0", "worker-1", "worker-2"})
    assert set(st.lookahead.buffers) == {"worker-0"}
    assert torch.equal(st.lookahead.total, torch.zeros(st.numel).add_(st.lookahead.buffers["worker-0"]))


def shard_bytes(**change) -> bytes:
    """test_snapshot's well-formed shard file with one worker's buffer and the sum instead of a rule's
    state; ``change`` replaces tensors (None: leaves one out)."""
    tensors = {"lookahead.worker-0": torch.zeros(6), "lookahead_sum": torch.zeros(6)} | change
    return snapshot_shard_bytes(**{"state.momentum_buffer": None}, **{k: t for k, t in tensors.items() if t is not None})


BAD = {
    "a buffer of another size": (shard_bytes(**{"lookahead.worker-0": torch.zeros(5)}),
                                 "the look-ahead momentum of worker-0 ('lookahead.worker-0') is torch.float32 (5,), expected float32 (6,)"),
    "a buffer of another dtype": (shard_bytes(**{"lookahead.worker-0": torch.zeros(6, dtype=torch.float64)}), "expected float32 (6,)"),
    "a sum of another size": (shard_bytes(lookahead_sum=torch.zeros(7)), "the sum of the look-ahead momentum"),
    "a sum without buffers": (shard_bytes(**{"lookahead.worker-0": None}), "'lookahead_sum' without any"),
}


@pytest.mark.parametrize(("data", "message"), BAD.values(), ids=list(BAD))
def test_a_malformed_lookahead_buffer_in_a_shard_file_is_refused_naming_the_worker(data, message):
    load_shard_file(shard_bytes(), "fine")
    with pytest.raises(DataError, match="^memory://x/server-0.safetensors: ") as err:
        load_shard_file(data, "memory://x/server-0.safetensors")
    assert message in str(err.value)


def test_a_backup_gets_the_buffers_and_their_sum_bit_for_bit_and_refuses_a_buffer_of_another_shape():
    layout = layout_of(1)
    (primary,) = servers(layout)
    rounds([primary], layout, 3, seed=1)
    (backup,) = servers(layout)
    tensors = {"data": primary.data.clone(), "versions": torch.tensor(primary.versions), "steps": torch.tensor(primary.steps),
               "init": torch.ones(len(primary.keys), dtype=torch.uint8),
               **{f"state.{k}": v for k, v in primary.rule.state().items()},
               **{f"lookahead.{w}": v for w, v in primary.lookahead.buffers.items()}, "lookahead_sum": primary.lookahead.total}
    bad = {**tensors, "lookahead.worker-1": torch.zeros(primary.numel + 1)}
    with pytest.raises(ProtocolError, match=r"lookahead.worker-1: torch.float32 \(29,\), expected float32 \(28,\)"):
        load_state(SimpleNamespace(store=backup.lookahead.store), bad, {})
    assert backup.lookahead.buffers == {}  # nothing changed
    backup.lookahead.load({w: v for w, v in primary.lookahead.buffers.items()}, primary.lookahead.total)
    assert torch.equal(backup.lookahead.total, primary.lookahead.total)
    with pytest.raises(ValueError, match="look-ahead buffer worker-0"):
        backup.lookahead.load({"worker-0": torch.zeros(3)})
