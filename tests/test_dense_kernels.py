"""The dense update kernels (server/kernels.py): the compiled path gives torch's values bit for bit.

Each case runs the same step twice from the same state, once through the C kernel and once through
the torch path, over random data of lengths that leave every kind of vector tail, and compares every
array the step writes with torch.equal (no tolerance).
"""

from __future__ import annotations

import pytest
import torch

from downpour.config import parse_job
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.server import kernels
from downpour.server.consistency import AsyncPolicy, Push, SyncPolicy
from downpour.server.lookahead import make_lookahead
from downpour.server.optim import make_rule
from downpour.server.scaling import Hyperparams
from downpour.server.store import ShardStore

NATIVE_ON = kernels.NATIVE
needs_native = pytest.mark.skipif(NATIVE_ON is None, reason=f"dense kernel not in use: {kernels.KERNEL}")

LENGTHS = [1, 2, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 1000, 50_885]
VARIANTS = [  # (weight_decay, dampening, nesterov)
    (0.0, 0.0, False), (1e-4, 0.0, False), (0.0, 0.1, False), (0.0, 0.0, True), (5e-4, 0.25, True),
]


def _state(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"p": torch.randn(n, generator=gen), "b": torch.randn(n, generator=gen) * 0.1,
            "total": torch.randn(n, generator=gen) * 0.3, "g": torch.randn(n, generator=gen) * 1e-2}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: {(a[name] != b[name]).sum().item()} values differ"


@needs_native
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("momentum,first", [(0.9, False), (0.9, True), (0.0, False)])
def test_the_compiled_sgd_step_and_its_reply_equal_torchs_bit_for_bit(n, variant, momentum, first):
    wd, damp, nesterov = variant
    runs = []
    for path in (True, False):
        s = _state(n, n)
        s["out"] = torch.full((n,), float("nan"))
        kernels.sgd(s["p"], s["b"] if momentum else None, s["g"], s["out"], lr=0.037, momentum=momentum,
                    weight_decay=wd, dampening=damp, nesterov=nesterov, first=first, native=path)
        runs.append(s)
    _same(*runs)
    assert torch.equal(runs[0]["out"], runs[0]["p"])


@needs_native
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("own", [True, False])
def test_the_compiled_lookahead_step_and_its_reply_equal_torchs_bit_for_bit(n, variant, own):
    wd, damp, nesterov = variant
    lr, mu = 0.05, 0.9
    runs = []
    for path in (True, False):
        s = _state(n, 7 * n)
        s["out"] = torch.full((n,), float("nan"))
        kernels.lookahead(s["p"], s["b"], s["total"], s["g"], s["out"], lr=lr, momentum=mu, weight_decay=wd,
                          dampening=damp, nesterov=nesterov, c=lr * mu, own=own, native=path)
        runs.append(s)
    _same(*runs)


@needs_native
@pytest.mark.parametrize("which", ["sgd", "lookahead"])
def test_a_reply_written_over_its_own_gradient_is_the_same_as_one_written_elsewhere(which):
    """The shared-memory case: the request's slot holds the gradient and receives the reply."""
    n = 1001
    results = []
    for in_place in (True, False):
        s = _state(n, 3)
        out = s["g"] if in_place else torch.empty(n)
        if which == "sgd":
            kernels.sgd(s["p"], s["b"], s["g"], out, lr=0.1, momentum=0.9, weight_decay=1e-4, dampening=0.0,
                        nesterov=False, first=False)
        else:
            kernels.lookahead(s["p"], s["b"], s["total"], s["g"], out, lr=0.1, momentum=0.9, weight_decay=0.0,
                              dampening=0.0, nesterov=False, c=0.09, own=True)
        results.append((out.clone(), s["p"], s["b"], s["total"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_step_without_a_reply_changes_only_the_state():
    n = 40
    for path in (True, False):
        s = _state(n, 11)
        before = {k: v.clone() for k, v in s.items()}
        kernels.lookahead(s["p"], s["b"], s["total"], s["g"], None, lr=0.1, momentum=0.9, weight_decay=0.0,
                          dampening=0.0, nesterov=False, c=0.09, own=True, native=path)
        assert torch.equal(s["g"], before["g"])
        assert not torch.equal(s["p"], before["p"])


def test_a_non_contiguous_gradient_takes_the_torch_path_with_the_same_result():
    n = 64
    wide = torch.randn(2 * n)
    results = []
    for g in (wide[::2], wide[::2].contiguous()):
        s = _state(n, 5)
        kernels.sgd(s["p"], s["b"], g, None, lr=0.1, momentum=0.9, weight_decay=0.0, dampening=0.0,
                    nesterov=False, first=False)
        results.append(s["p"])
    assert torch.equal(*results)


def test_the_kernel_in_use_is_named():
    assert kernels.KERNEL == "compiled" or kernels.KERNEL.startswith("torch (")
    assert (kernels.NATIVE is not None) == (kernels.KERNEL == "compiled")


def _async_job(scaling: str):
    return parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "scaling": scaling},
                      "training": {"consistency": "async"}})


@needs_native
@pytest.mark.parametrize("scaling", ["auto", "none"])
@pytest.mark.parametrize("into_slot", [False, True])
def test_an_async_server_answers_and_stores_the_same_values_on_either_path(monkeypatch, scaling, into_slot):
    """Three workers pushing in turn to a policy over several keys (so several runs), once compiled and
    once in torch: the stored values, every momentum buffer and every reply agree bit for bit; with
    ``into_slot`` the reply is written over the request's own gradient, as a shared-memory slot is."""
    j = _async_job(scaling)
    layout = make_layout([("a", (37, 5)), ("b", (5,)), ("c", (301,))], 1)
    outcomes = []
    for path in (NATIVE_ON, None):
        monkeypatch.setattr(kernels, "NATIVE", path)
        store = ShardStore(layout.server_slices(0), lambda n: make_rule(j.optimizer, j.effective_lr(), n))
        store.write(store.all, torch.randn(store.numel, generator=torch.Generator().manual_seed(0)))
        store.initialized = True
        store.hyper = Hyperparams(j, None)
        store.lookahead = make_lookahead(j, store)
        assert (store.lookahead is not None) == (scaling == "auto")
        policy = AsyncPolicy(store, store.hyper.observe, j.training)
        slots: dict[tuple[bytes, int], torch.Tensor] = {}
        policy.reply_slot = (lambda peer, req: slots.get((peer, req))) if into_slot else None  # noqa: B023 (read at once)
        gen, replies = torch.Generator().manual_seed(1), []
        for t in range(12):
            who = f"worker-{t % 3}".encode()
            idx = store.all if t % 4 else [2, 0]  # some requests name a part of the keys, out of order
            g = torch.randn(store.size_of(idx), generator=gen) * 0.1
            slots.clear()
            slots[(who, t)] = g
            msg = Message(Op.PUSHPULL, t, {"keys": [store.keys[i] for i in idx]})
            [(_, reply)] = policy.push(Push(who, msg, idx, g, 1.0, max(0, t - 2)))
            replies.append(reply.tensors[0].clone())
        la = store.lookahead
        outcomes.append((store.read(store.all), replies, {} if la is None else {**la.state(), "total": la.total}))
    (data_c, replies_c, state_c), (data_t, replies_t, state_t) = outcomes
    assert torch.equal(data_c, data_t)
    assert all(torch.equal(a, b) for a, b in zip(replies_c, replies_t, strict=True))
    assert state_c.keys() == state_t.keys() and all(torch.equal(state_c[k], state_t[k]) for k in state_c)


@needs_native
@pytest.mark.parametrize("n", [1, 17, 1000, 1023, 1024, 1025, 2049, 50_885])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("momentum,first", [(0.9, False), (0.9, True), (0.0, False)])
def test_the_compiled_sync_round_equals_torchs_mean_then_step_bit_for_bit(n, variant, k, momentum, first):
    """The mean of k gradients (uneven weights), the step and the replies, compiled, against torch's
    mean then torch's step; some replies go over their own worker's gradient, as slots do."""
    wd, damp, nesterov = variant
    gen = torch.Generator().manual_seed(n + k)
    p0, b0 = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1
    grads0 = [torch.randn(n, generator=gen) * 10.0 ** -j for j in range(k)]
    weights = [32.0, 31.0, 17.5, 3.3, 1.0][:k]
    want_p, want_b = p0.clone(), b0.clone()
    kernels.sgd(want_p, want_b if momentum else None, kernels.mean([g.clone() for g in grads0], weights), None,
                lr=0.037, momentum=momentum, weight_decay=wd, dampening=damp, nesterov=nesterov, first=first,
                native=False)
    for path in (True, False):
        p, b, grads = p0.clone(), b0.clone(), [g.clone() for g in grads0]
        outs = grads[::2] + [torch.full((n,), float("nan"))]
        kernels.sgd_mean(p, b if momentum else None, grads, weights, outs, lr=0.037, momentum=momentum,
                         weight_decay=wd, dampening=damp, nesterov=nesterov, first=first, native=path)
        assert torch.equal(p, want_p) and torch.equal(b, want_b if momentum else b0)
        assert all(torch.equal(o, want_p) for o in outs)


@needs_native
@pytest.mark.parametrize("into_slot", [False, True])
def test_a_sync_server_answers_and_stores_the_same_values_on_either_path(monkeypatch, into_slot):
    """Rounds of three workers (pushes arriving out of rank order, uneven weights) over several keys,
    compiled and in torch: the stored values, the momentum buffer and every reply agree bit for bit; with
    ``into_slot`` each reply is written over its own request's gradient, as a shared-memory slot is."""
    j = parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                   "training": {"consistency": "sync"}})
    layout = make_layout([("a", (37, 5)), ("b", (5,)), ("c", (301,))], 1)
    outcomes = []
    for path in (NATIVE_ON, None):
        monkeypatch.setattr(kernels, "NATIVE", path)
        store = ShardStore(layout.server_slices(0), lambda n: make_rule(j.optimizer, j.effective_lr(), n))
        store.write(store.all, torch.randn(store.numel, generator=torch.Generator().manual_seed(0)))
        store.initialized = True
        store.hyper = Hyperparams(j, None)
        policy = SyncPolicy(store, store.hyper.observe, j.training)
        policy.set_workers({"worker-0", "worker-1", "worker-2"})
        slots: dict[tuple[bytes, int], torch.Tensor] = {}
        policy.reply_slot = (lambda peer, req: slots.get((peer, req))) if into_slot else None  # noqa: B023 (read at once)
        gen, replies = torch.Generator().manual_seed(1), []
        for r in range(4):
            for w in (2, 0, 1):
                who, req = f"worker-{w}".encode(), 10 * r + w
                g = torch.randn(store.numel, generator=gen) * 0.1
                slots[(who, req)] = g
                msg = Message(Op.PUSHPULL, req, {"keys": list(store.keys)})
                for to, reply in policy.push(Push(who, msg, store.all, g, 32.0 - w, r)):
                    assert reply.op == Op.OK
                    if into_slot:  # the values are in the slot of the request answered
                        assert reply.tensors[0].data_ptr() == slots[(to, reply.req_id)].data_ptr()
                    replies.append(reply.tensors[0].clone())
            slots.clear()
        assert len(replies) == 12
        outcomes.append((store.read(store.all), store.rule.buf.clone(), replies))
    (data_c, buf_c, replies_c), (data_t, buf_t, replies_t) = outcomes
    assert torch.equal(data_c, data_t) and torch.equal(buf_c, buf_t)
    assert all(torch.equal(a, b) for a, b in zip(replies_c, replies_t, strict=True))
    assert all(torch.equal(a, data_c) for a in replies_c[-3:])  # every worker of the last round got the new values


@needs_native
@pytest.mark.parametrize("own", [True, False])
def test_a_step_on_a_range_equals_torchs_and_leaves_the_rest_alone(own):
    """The range form (``lo``, ``hi`` of the state, ``at`` of the gradient and reply), as a request
    for some keys runs it: bit for bit torch's, and nothing outside the range is written."""
    n, lo, hi, at = 1000, 123, 700, 45
    runs = []
    for path in (True, False):
        s = _state(n, 13)
        s["out"] = torch.full((n,), -7.0)  # (not NaN: untouched values must compare equal)
        before = {k: v.clone() for k, v in s.items()}
        kernels.lookahead(s["p"], s["b"], s["total"], s["g"], s["out"], lo=lo, hi=hi, at=at, lr=0.05, momentum=0.9,
                          weight_decay=1e-4, dampening=0.0, nesterov=False, c=0.045, own=own, native=path)
        for name in ("p", "b", "total"):
            assert torch.equal(s[name][:lo], before[name][:lo]) and torch.equal(s[name][hi:], before[name][hi:])
            assert not torch.equal(s[name][lo:hi], before[name][lo:hi])
        assert (s["out"][:at] == -7.0).all() and (s["out"][at + hi - lo:] == -7.0).all()
        assert not (s["out"][at : at + hi - lo] == -7.0).any()
        runs.append(s)
    _same(*runs)


def test_the_float32_bound_is_the_largest_float32_not_above_the_limit():
    from downpour.protocol.ops import MAX_GRADIENT

    for limit in (MAX_GRADIENT, 1.0, 0.1, 3.0e38, 1e-3):
        f = kernels.float32_at_most(limit)
        assert f <= limit and float(torch.tensor(f, dtype=torch.float32)) == f
        above = torch.nextafter(torch.tensor(f, dtype=torch.float32), torch.tensor(float("inf")))
        assert float(above) > limit


@pytest.mark.parametrize("n", LENGTHS)
def test_the_bound_check_agrees_with_torch_for_every_kind_of_bad_value_anywhere(n):
    """NaN, either infinity and the next float32 past the bound are refused at the first, a middle and
    the last position (vector body and tail); the bound itself and everything below pass; on the
    compiled path (where built) as on torch's."""
    from downpour.protocol.ops import MAX_GRADIENT

    limit = kernels.float32_at_most(MAX_GRADIENT)
    past = float(torch.nextafter(torch.tensor(limit, dtype=torch.float32), torch.tensor(float("inf"))))
    g = _state(n, n)["g"]
    for path in (True, False):
        assert kernels.within(g, limit, native=path)
        assert kernels.within(g[:0], limit, native=path)
        for at in sorted({0, n // 2, n - 1}):
            for value, ok in ((float("nan"), False), (float("inf"), False), (float("-inf"), False), (past, False),
                              (-past, False), (limit, True), (-limit, True)):
                u = g.clone()
                u[at] = value
                assert kernels.within(u, limit, native=path) is ok, (path, at, value)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_a_servers_bound_check_refuses_the_same_values_on_either_path(monkeypatch, compiled):
    from downpour.errors import ProtocolError
    from downpour.protocol.ops import MAX_GRADIENT
    from downpour.server.service import bounded

    if compiled and not kernels._WITHIN:
        pytest.skip(f"the compiled check is not built: {kernels.KERNEL}")
    monkeypatch.setattr(kernels, "_WITHIN", compiled)
    t = torch.full((1000,), 1e-3)
    t[7], t[9] = MAX_GRADIENT, -MAX_GRADIENT
    assert bounded("PUSH", t) is t
    assert bounded("PUSH", t[::2]) is not None  # (not contiguous: torch's check)
    for bad in (float("nan"), float("inf"), MAX_GRADIENT * 1.001):
        u = t.clone()
        u[500] = bad
        with pytest.raises(ProtocolError, match="NaN or Inf"):
            bounded("PUSH", u)
