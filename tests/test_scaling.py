"""Effective hyperparameters on the servers: schedules, sync scaling with warm-up, async
staleness compensation, and `scaling: none` as today's behaviour, on simulated servers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from downpour.config import parse_job
from downpour.errors import ConfigError
from downpour.layout import make_layout
from downpour.protocol import Message, Op
from downpour.server.consistency import AsyncPolicy, Push, SSPPolicy, SyncPolicy
from downpour.server.lookahead import make_lookahead
from downpour.server.optim import make_rule
from downpour.server.scaling import Hyperparams, async_compensation, check_hyperparameters, resolve, sync_factor
from downpour.server.schedule import check_schedule, make_schedule
from downpour.server.store import ShardStore

TOL = {"rtol": 1e-5, "atol": 1e-5}


def job(optimizer: dict | None = None, training: dict | None = None, cluster: dict | None = None):
    sgd = (optimizer or {}).get("name", "sgd") == "sgd"
    return parse_job({"model": {"name": "mlp"}, "optimizer": {"name": "sgd", **({"lr": 0.01, "momentum": 0.9} if sgd else {}),
                                                            **(optimizer or {})},
                      "training": training or {}, "cluster": cluster or {}})


def new_store(j, numel: int = 12, planned: int | None = None, seed: int = 0) -> ShardStore:
    layout = make_layout([("w", (numel,))], 1)
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(j.optimizer, j.effective_lr(), n))
    store.write(store.all, torch.randn(numel, generator=torch.Generator().manual_seed(seed)))
    store.initialized = True
    store.hyper = Hyperparams(j, planned)
    store.lookahead = make_lookahead(j, store)  # as a server builds it
    return store


def push(who: str, grad: torch.Tensor, version: int, weight: float = 1.0, clock: int | None = None) -> Push:
    return Push(who.encode(), Message(Op.PUSHPULL, 1, {"keys": [0]}), [0], grad, weight, version, clock=clock)


def old_sgd(param, buf, grad, step, lr, momentum, nesterov=False):
    """The SGD update as the servers applied it before effective hyperparameters existed."""
    if step == 0:
        buf.copy_(grad)
    else:
        torch.add(grad, buf, alpha=momentum, out=buf)
    param.add_(grad.add(buf, alpha=momentum) if nesterov else buf, alpha=-lr)


# -- scaling: none is today's behaviour ---------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_scaling_none_reproduces_todays_async_updates_bit_for_bit(mode, nesterov):
    j = job({"scaling": "none", "nesterov": nesterov}, {"consistency": mode})
    store = new_store(j)
    policy = (AsyncPolicy if mode == "async" else SSPPolicy)(store, store.hyper.observe, j.training)
    want, buf = store.read(store.all), torch.zeros(store.numel)
    gen = torch.Generator().manual_seed(1)
    for t in range(30):
        g = torch.randn(store.numel, generator=gen)
        stale = t % 5  # stale pushes: the compensation would act if scaling were auto
        policy.push(push(f"w{t % 4}", g, max(0, t - stale), clock=t + 1))
        old_sgd(want, buf, g, t, 0.01, 0.9, nesterov)
    assert torch.equal(store.read(store.all), want)


def test_scaling_none_reproduces_todays_sync_rounds_bit_for_bit():
    j = job({"scaling": "none"}, {"consistency": "sync"}, {"num_workers": 3})
    store = new_store(j)
    policy = SyncPolicy(store, store.hyper.observe, j.training)
    policy.set_workers({"a", "b", "c"})
    want, buf = store.read(store.all), torch.zeros(store.numel)
    gen = torch.Generator().manual_seed(2)
    for r in range(10):
        grads = [torch.randn(store.numel, generator=gen) for _ in range(3)]
        for who, g in zip("abc", grads):
            policy.push(push(who, g, r, weight=32.0))
        acc = grads[0].mul(32.0)
        acc.add_(grads[1], alpha=32.0).add_(grads[2], alpha=32.0)
        old_sgd(want, buf, acc.div_(96.0), r, 0.01, 0.9)
    assert torch.equal(store.read(store.all), want)


@pytest.mark.parametrize("rule", ["lookahead", "momentum"])
def test_auto_with_one_worker_and_no_staleness_changes_nothing(rule):
    j = job({"scaling_options": {"async_rule": rule}}, {"consistency": "async"}, {"num_workers": 1})
    store = new_store(j)
    policy = AsyncPolicy(store, store.hyper.observe, j.training)
    want, buf = store.read(store.all), torch.zeros(store.numel)
    for t in range(20):
        g = torch.full((store.numel,), 0.1 * (t + 1))
        (_, reply), = policy.push(push("w", g, t))
        old_sgd(want, buf, g, t, 0.01, 0.9)
        assert torch.equal(reply.tensors[0], want)  # the worker is sent the values themselves
    assert torch.equal(store.read(store.all), want)
    assert store.hyper.progress()["lr"] == 0.01 and store.hyper.progress()["momentum"] == 0.9


# -- schedules --------------------------------------------------------------------------------


def _torch_lrs(make, steps: int, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


SCHEDULES = {
    "step": ({"name": "step", "step_size": 7, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
    "multistep": ({"name": "multistep", "milestones": [30, 10], "gamma": 0.3},
                  lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [10, 30], 0.3)),
    "exponential": ({"name": "exponential", "gamma": 0.97}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.97)),
    "cosine": ({"name": "cosine", "t_max": 40, "eta_min": 0.001},
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 40, 0.001)),
    "torch-onecycle": ({"name": "torch", "scheduler": "OneCycleLR", "args": {"max_lr": 0.5, "total_steps": 60}},
                       lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=60)),
    "torch-import-path": ({"name": "torch", "scheduler": "torch.optim.lr_scheduler:CosineAnnealingWarmRestarts",
                           "args": {"T_0": 9}}, lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 9)),
    "lambda": ({"name": "lambda", "function": "tests.test_scaling:halving"},
               lambda o: torch.optim.lr_scheduler.LambdaLR(o, halving)),
}


def halving(step: int) -> float:
    return 0.5 ** (step // 10)


def nan_after_five(step: int) -> float:
    return float("nan") if step >= 5 else 1.0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_schedule_gives_torchs_lr_at_every_step(name):
    cfg, make = SCHEDULES[name]
    j = job({"lr": 0.1, "schedule": cfg})
    schedule = make_schedule(j.optimizer.schedule, 0.1)
    want = _torch_lrs(make, 60)
    got = [0.1 * schedule.factor(t) for t in range(60)]
    assert got == pytest.approx(want, rel=1e-7, abs=1e-12)
    assert 0.1 * schedule.factor(3) == pytest.approx(want[3], rel=1e-7)  # going back costs nothing and agrees


def _single_sync_worker(schedule_cfg: dict, make_sched, steps: int = 25, adam: str | None = None):
    """One sync worker through the simulated server against torch.optim with the scheduler (SGD with
    momentum, or ``adam``: "adam" or "adamw")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref.load_state_dict(model.state_dict())
    j = job({"lr": 0.2, "momentum": 0.9, "schedule": schedule_cfg} if adam is None else
            {"name": adam, "lr": 0.01, "weight_decay": 0.01, "schedule": schedule_cfg}, {"consistency": "sync"}, {"num_workers": 1})
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    store = new_store(j, flat.numel(), planned=steps)
    store.write(store.all, flat)
    policy = SyncPolicy(store, store.hyper.observe, j.training)
    policy.set_workers({"w"})
    opt = (torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9) if adam is None else
           {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[adam](ref.parameters(), lr=0.01, weight_decay=0.01))
    sched = make_sched(opt)
    gen = torch.Generator().manual_seed(3)
    for r in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        torch.nn.utils.vector_to_parameters(store.read(store.all), model.parameters())
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        policy.push(push("w", torch.cat([p.grad.reshape(-1) for p in model.parameters()]), r, weight=16.0))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        sched.step()
    return store.read(store.all), torch.cat([p.detach().reshape(-1) for p in ref.parameters()])


ONECYCLE = {"name": "torch", "scheduler": "OneCycleLR", "args": {"max_lr": 0.5, "total_steps": 25}}


@pytest.mark.parametrize("name", ["step", "cosine", "onecycle"])
def test_one_sync_worker_with_a_schedule_matches_torch(name):
    """OneCycleLR also cycles SGD's momentum (cycle_momentum, on by default): the servers follow it."""
    cfg = {"step": {"name": "step", "step_size": 6, "gamma": 0.3}, "cosine": {"name": "cosine", "t_max": 20},
           "onecycle": ONECYCLE}[name]
    make = {"step": lambda o: torch.optim.lr_scheduler.StepLR(o, 6, 0.3),
            "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20),
            "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=25)}[name]
    got, want = _single_sync_worker(cfg, make)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("adam", ["adam", "adamw"])
def test_one_sync_adam_worker_with_a_one_cycle_schedule_matches_torch_its_beta1_cycled_too(adam):
    cfg = {"name": "torch", "scheduler": "OneCycleLR", "args": {"max_lr": 0.05, "total_steps": 25}}
    got, want = _single_sync_worker(cfg, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=25), adam=adam)
    torch.testing.assert_close(got, want, **TOL)


def test_a_schedule_that_cycles_the_momentum_of_a_job_without_sgd_momentum_is_refused():
    for optimizer in ({"name": "adagrad", "lr": 0.01}, {"name": "sgd", "lr": 0.01, "momentum": 0.0}):  # (no momentum to cycle)
        j = job({**optimizer, "schedule": ONECYCLE})
        with pytest.raises(ConfigError, match=r"OneCycleLR changes the momentum .*set optimizer.schedule.args.cycle_momentum: false"):
            check_hyperparameters(j, 32 * 25)
        check_hyperparameters(job({**optimizer, "schedule": {**ONECYCLE, "args": {**ONECYCLE["args"], "cycle_momentum": False}}}),
                              32 * 25)
    check_hyperparameters(job({"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": ONECYCLE}), 32 * 25)
    check_hyperparameters(job({"name": "adamw", "lr": 0.01, "schedule": ONECYCLE}), 32 * 25)  # (beta1 cycles)
    check_hyperparameters(job({"name": "adam", "lr": 0.01, "schedule": {"name": "torch", "scheduler": "CosineAnnealingWarmRestarts",
                                                                          "args": {"T_0": 9}}}), 32 * 25)


def test_a_schedule_that_yields_nan_is_a_config_error_naming_it():
    j = job({"schedule": {"name": "lambda", "function": "tests.test_scaling:nan_after_five"}})
    with pytest.raises(ConfigError, match=r"optimizer.schedule: .*nan at step 5"):
        check_schedule(j.optimizer.schedule, 0.01, 100)
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        check_hyperparameters(j, 32 * 100)


@pytest.mark.parametrize(("schedule", "match"), [
    ({"name": "torch", "scheduler": "NoSuchLR"}, r"optimizer.schedule.scheduler: 'NoSuchLR' is not .*StepLR"),
    ({"name": "torch", "scheduler": "ReduceLROnPlateau"}, "needs a metric"),
    ({"name": "torch", "scheduler": "StepLR", "args": {"bogus": 1}}, r"optimizer.schedule: cannot build StepLR"),
    ({"name": "lambda", "function": "tests.test_scaling:no_such_fn"}, r"optimizer.schedule.function"),
])
def test_a_bad_schedule_is_a_config_error_naming_the_field(schedule, match):
    j = job({"schedule": schedule})
    with pytest.raises(ConfigError, match=match):
        check_hyperparameters(j, 3200)


def test_a_schedule_function_may_be_given_as_a_callable_and_becomes_its_import_path():
    j = job({"schedule": {"name": "lambda", "function": halving}})
    assert j.optimizer.schedule.function == "tests.test_scaling:halving"


# -- sync: linear scaling with warm-up ----------------------------------------------------------


@pytest.mark.parametrize(("k", "warmup"), [(4, 12), (3, 0)])
def test_k_sync_workers_match_one_process_with_k_times_the_batch_and_the_scaled_lr_through_warmup(k, warmup):
    """k workers with batch b each = one process with batch k·b and lr × (1 + (k-1)·min(1, t/T)),
    t = k·round the job step (T job steps of warm-up), to 1e-5."""
    b, rounds = 8, 10
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 4))
    ref.load_state_dict(model.state_dict())
    j = job({"lr": 0.05, "momentum": 0.9, "scaling_options": {"warmup_steps": warmup}}, {"consistency": "sync"},
            {"num_workers": k})
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    store = new_store(j, flat.numel(), planned=rounds * k)
    store.write(store.all, flat)
    policy = SyncPolicy(store, store.hyper.observe, j.training)
    workers = [f"w{i}" for i in range(k)]
    policy.set_workers(set(workers))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda r: sync_factor("linear", k, r * k, warmup))
    gen = torch.Generator().manual_seed(4)
    for r in range(rounds):
        x, y = torch.randn(k * b, 5, generator=gen), torch.randint(0, 4, (k * b,), generator=gen)
        torch.nn.utils.vector_to_parameters(store.read(store.all), model.parameters())
        for i, who in enumerate(workers):
            model.zero_grad()
            F.cross_entropy(model(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b]).backward()
            policy.push(push(who, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), r, weight=float(b)))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        sched.step()
        if r == 0:
            assert store.hyper.lr == pytest.approx(0.05 if warmup else 0.05 * k)
    assert store.hyper.lr == pytest.approx(0.05 * k)  # warm-up over: the full linear factor
    torch.testing.assert_close(store.read(store.all), torch.cat([p.detach().reshape(-1) for p in ref.parameters()]), **TOL)


def test_the_sync_factor_follows_the_live_workers():
    j = job({"scaling_options": {"warmup_steps": 0}}, {"consistency": "sync"}, {"num_workers": 3})
    store = new_store(j)
    policy = SyncPolicy(store, store.hyper.observe, j.training)
    policy.set_workers({"a", "b", "c"})
    for who in "abc":
        policy.push(push(who, torch.ones(store.numel), 0))
    assert store.hyper.lr == pytest.approx(0.03)
    policy.set_workers({"a", "b"})  # c left (done, dead): rounds average two gradients now
    for who in "ab":
        policy.push(push(who, torch.ones(store.numel), 1))
    assert store.hyper.lr == pytest.approx(0.02)
    assert store.steps == [5]  # job steps: 3 + 2 pushes


def test_default_warmup_is_five_percent_of_the_planned_steps_and_adaptive_rules_scale_by_sqrt():
    assert resolve(job({}, {"consistency": "sync"}), 2000).warmup_steps == 100
    for rule in ("adam", "adagrad"):
        plan = resolve(parse_job({"model": {"name": "mlp"}, "optimizer": {"name": rule}}), 100)
        assert (plan.sync_lr, plan.async_rule) == ("sqrt", "none")
    assert sync_factor("sqrt", 4, 10, 0) == 2.0


# -- async and ssp: staleness compensation ------------------------------------------------------


@pytest.mark.parametrize("stale", [0, 1, 3, 7, 12])
def test_async_compensation_gives_the_stated_momentum_and_lr_for_a_known_staleness(stale):
    """A simulated server whose pushes are all ``stale`` versions old: explicit momentum
    max(0, 1 - 0.1·(1 + s)), lr 0.01·(1 - momentum) / (0.1·sqrt(1 + s)) (0.01·sqrt(1 + s) up to s = 9);
    each update uses exactly those."""
    j = job({"scaling_options": {"async_rule": "momentum"}}, {"consistency": "async"}, {"num_workers": stale + 1})
    store = new_store(j)
    policy = AsyncPolicy(store, store.hyper.observe, j.training)
    want, buf = store.read(store.all), torch.zeros(store.numel)
    mu = max(0.0, 1 - 0.1 * (1 + stale))
    lr = 0.01 * math.sqrt(1 + stale) if stale <= 9 else 0.01 * 10 / math.sqrt(1 + stale)
    for t in range(40):
        g = torch.full((store.numel,), 0.5) + t
        policy.push(push("w", g, max(0, t - stale)))
        # the running mean of staleness: exact from the first push at this staleness
        s = sum(min(i, stale) for i in range(t + 1)) / (t + 1)
        m, f = async_compensation(0.9, s)
        old_sgd(want, buf, g, t, 0.01 * f, m)
    torch.testing.assert_close(store.read(store.all), want, rtol=1e-6, atol=1e-6)
    # After the first ``stale`` pushes every push is ``stale`` old: the mean converges to it.
    for t in range(40, 2000):
        policy.push(push("w", torch.zeros(store.numel), t - stale))
    eff = store.hyper.progress()
    assert eff["momentum"] == pytest.approx(mu, abs=1e-3)
    assert eff["lr"] == pytest.approx(lr, rel=1e-3)
    assert eff["momentum_total"] == pytest.approx(0.9 if stale <= 9 else 1 - 1 / (1 + stale), abs=1e-3)


def test_the_compensation_follows_staleness_as_it_changes():
    j = job({"scaling_options": {"staleness_window": 50, "async_rule": "momentum"}}, {"consistency": "ssp"})
    store = new_store(j)
    policy = AsyncPolicy(store, store.hyper.observe, j.training)
    for t in range(400):  # 8 workers' worth of staleness
        policy.push(push("w", torch.zeros(store.numel), max(0, t - 7)))
    assert store.hyper.progress()["momentum"] == pytest.approx(0.2, abs=1e-3)
    for t in range(400, 800):  # then the others left: fresh pushes
        policy.push(push("w", torch.zeros(store.numel), t))
    assert store.hyper.progress()["momentum"] == pytest.approx(0.9, abs=1e-2)  # what is left of 7 after 400 fresh pushes
    assert store.hyper.progress()["lr"] == pytest.approx(0.01, rel=1e-2)


def test_effective_values_over_time_are_kept_for_the_summary():
    j = job({"scaling_options": {"async_rule": "momentum"}}, {"consistency": "async"})
    store = new_store(j, planned=400)
    policy = AsyncPolicy(store, store.hyper.observe, j.training)
    for t in range(400):
        policy.push(push("w", torch.zeros(store.numel), max(0, t - 3)))
    report = store.hyper.report()
    assert report["plan"] == {"sync_lr": "linear", "warmup_steps": 20, "async_rule": "momentum", "staleness_window": 200}
    assert len(report["trace"]) == 201  # every 2 job steps, and the last
    first, last = report["trace"][0], report["trace"][-1]
    assert first[:3] == [0, 0.01, 0.9] and last[0] == 399 and last[2] < 0.7


# -- async and ssp: look-ahead momentum ---------------------------------------------------------


def lookahead_by_hand(n: int, rounds: int, mode: str, lr: float = 0.01, mu: float = 0.9):
    """n workers pushing in turn (each push n - 1 versions stale once all have pushed), through a
    simulated server and by hand: per-worker momentum v_i = mu v_i + g, θ -= lr v_i, and worker i
    sent θ - lr mu Σ_{j≠i} v_j."""
    j = job({}, {"consistency": mode}, {"num_workers": n})
    store = new_store(j)
    policy = (AsyncPolicy if mode == "async" else SSPPolicy)(store, store.hyper.observe, j.training)
    workers = [f"worker-{i}" for i in range(n)]
    policy.set_workers(set(workers))
    theta, v = store.read(store.all), {w: torch.zeros(store.numel) for w in workers}
    pulled = dict.fromkeys(workers, 0)
    gen = torch.Generator().manual_seed(3)
    for t in range(rounds * n):
        w = workers[t % n]
        g = torch.randn(store.numel, generator=gen)
        replies = policy.push(push(w, g, pulled[w], clock=t // n + 1))
        v[w] = g + mu * v[w]
        theta -= lr * v[w]
        sent = theta - lr * mu * sum(v[o] for o in workers if o != w)
        (_, reply), = [r for r in replies if r[0] == w.encode()]
        torch.testing.assert_close(reply.tensors[0], sent, rtol=1e-6, atol=1e-6)
        pulled[w] = reply.meta["version"]
    torch.testing.assert_close(store.read(store.all), theta, rtol=1e-6, atol=1e-6)
    return store, policy


@pytest.mark.parametrize("mode", ["async", "ssp"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_lookahead_keeps_a_momentum_per_worker_and_sends_where_the_others_will_have_moved(n, mode):
    store, _ = lookahead_by_hand(n, rounds=12, mode=mode)
    eff = store.hyper.progress()
    assert eff["staleness_recent"] > 0  # the pushes were stale: n - 1 once every worker pushed
    # The job's lr and momentum, whatever the staleness: the look-ahead compensates it, not the values.
    assert (eff["lr"], eff["momentum"], eff["momentum_total"]) == (0.01, 0.9, 0.9)
    assert store.hyper.report()["plan"]["async_rule"] == "lookahead"


def test_lookahead_forgets_a_worker_that_left():
    store, policy = lookahead_by_hand(3, rounds=5, mode="async")
    la = store.lookahead
    gone = la.buffers["worker-2"].clone()
    policy.set_workers({"worker-0", "worker-1"})
    assert set(la.buffers) == {"worker-0", "worker-1"}
    torch.testing.assert_close(la.total, la.buffers["worker-0"] + la.buffers["worker-1"])
    sent = la.values(store.all, "worker-0")
    torch.testing.assert_close(sent, store.read(store.all) - 0.01 * 0.9 * la.buffers["worker-1"])
    assert not torch.allclose(gone, torch.zeros_like(gone))


def test_lookahead_state_moves_to_a_backup():
    store, _ = lookahead_by_hand(3, rounds=4, mode="async")
    other = new_store(job({}, {"consistency": "async"}, {"num_workers": 3}))
    other.lookahead.load(store.lookahead.state())
    torch.testing.assert_close(other.lookahead.total, store.lookahead.total)


@pytest.mark.parametrize(("optimizer", "training"), [
    ({"scaling": "none"}, {"consistency": "async"}),  # none: the rule's own momentum, as today
    ({}, {"consistency": "sync"}),  # sync rounds have no staleness to look ahead over
    ({"scaling_options": {"async_rule": "momentum"}}, {"consistency": "async"}),
    ({"name": "adam", "lr": 0.001}, {"consistency": "async"}),  # adaptive rules: no async rule
])
def test_lookahead_is_built_only_for_async_or_ssp_sgd_with_momentum(optimizer, training):
    assert new_store(job(optimizer, training)).lookahead is None


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "training", "match"), [
    ({"name": "adagrad", "scaling_options": {"async_rule": "momentum"}}, {},
     r"optimizer.scaling_options.async_rule: momentum needs an update rule with momentum; optimizer adagrad"),
    ({"momentum": 0.0, "scaling_options": {"async_rule": "momentum"}}, {}, r"async_rule: momentum .* momentum 0"),
    ({"momentum": 0.0, "scaling_options": {"async_rule": "lookahead"}}, {}, r"async_rule: lookahead .* momentum 0"),
    ({"scaling_options": {"sync_lr": "linear"}}, {"local_steps": 4}, r"optimizer.scaling_options: training.local_steps"),
    ({"scaling_options": {"warmup_steps": 50}}, {"consistency": "async"}, r"warmup_steps: warm-up applies to sync rounds"),
    ({"scaling_options": {"warmup_steps": 500}}, {"consistency": "sync", "steps": 100},
     r"optimizer.scaling_options.warmup_steps \(500\) is longer than the job \(300 job steps"),
    ({"scaling": "none", "scaling_options": {"sync_lr": "sqrt"}}, {}, r"optimizer.scaling_options is set but optimizer.scaling is none"),
    ({"scale_lr_with_workers": True}, {}, r"optimizer.scale_lr_with_workers .* needs optimizer.scaling: none"),
    ({}, {"staleness_lr": True}, r"training.staleness_lr .* needs optimizer.scaling: none"),
])
def test_a_scaling_option_that_cannot_apply_is_refused_naming_the_field(optimizer, training, match):
    with pytest.raises(ConfigError, match=match):
        job(optimizer, training)


def test_a_warmup_longer_than_the_data_allows_is_refused_before_anything_starts():
    j = job({"scaling_options": {"warmup_steps": 2000}}, {"consistency": "sync", "batch_size": 32})
    with pytest.raises(ConfigError, match=r"warmup_steps \(2000\) is longer than the job \(1875 job steps"):
        check_hyperparameters(j, 60000)
    check_hyperparameters(j, 70000)  # 2188 job steps: fits
