"""Server update rules, applied through a ShardStore, match torch.optim step for step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from downpour.config import AdagradConfig, AdamConfig, SGDConfig
from downpour.errors import ConfigError
from downpour.layout import make_layout
from downpour.server.optim import RULES, make_rule
from downpour.server.store import ShardStore

STEPS = 20
TOL = {"rtol": 1e-5, "atol": 1e-5}
SHAPES = [("w", (4, 5)), ("b", (5,)), ("v", (7,))]  # three keys, 32 elements

CASES = {
    "sgd": (SGDConfig(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-momentum": (SGDConfig(lr=0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "sgd-nesterov": (
        SGDConfig(lr=0.05, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    ),
    "sgd-decay-dampening": (
        SGDConfig(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    ),
    "adagrad": (
        AdagradConfig(name="adagrad", lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01),
    ),
    "adam": (
        AdamConfig(name="adam", lr=0.01, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    ),
    "adam-betas": (
        AdamConfig(name="adam", lr=0.02, betas=(0.8, 0.99), eps=1e-6),
        lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    ),
}


def versions(store: ShardStore) -> list[int]:
    """Each key's version, in key order."""
    return [store.version([i]) for i in range(len(store.keys))]


def new_store(cfg, seed: int = 0) -> ShardStore:
    layout = make_layout(SHAPES, 1)
    store = ShardStore(layout.server_slices(0), lambda n: make_rule(cfg, cfg.lr, n))
    store.write(list(range(len(store.keys))), torch.randn(store.numel, generator=torch.Generator().manual_seed(seed)))
    return store


def key_params(store: ShardStore) -> list[torch.nn.Parameter]:
    """One torch parameter per key, holding the store's current values."""
    return [torch.nn.Parameter(store.read([i])) for i in range(len(store.keys))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_updates_of_every_key_match_torch_optim(case):
    cfg, torch_opt = CASES[case]
    store = new_store(cfg)
    param = torch.nn.Parameter(store.read(list(range(len(store.keys)))))
    opt = torch_opt([param])
    g = torch.Generator().manual_seed(1)
    everything = list(range(len(store.keys)))
    for _ in range(STEPS):
        grad = torch.randn(store.numel, generator=g)
        store.apply(everything, grad)
        param.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(store.read(everything), param.detach(), **TOL)
    assert versions(store) == [STEPS] * len(store.keys)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_given_in_any_order_and_in_random_subsets_step_like_their_own_optimizers(case):
    cfg, torch_opt = CASES[case]
    store = new_store(cfg)
    params = key_params(store)
    opts = [torch_opt([p]) for p in params]
    g = torch.Generator().manual_seed(2)
    steps = [0] * len(params)
    for _ in range(STEPS):
        idx = torch.randperm(len(params), generator=g)[: int(torch.randint(1, len(params) + 1, (), generator=g))].tolist()
        grads = [torch.randn(params[i].numel(), generator=g) for i in idx]
        store.apply(idx, torch.cat(grads))  # concatenated in request order
        for i, grad in zip(idx, grads, strict=True):
            params[i].grad = grad
            opts[i].step()
            steps[i] += 1
    for i, p in enumerate(params):
        torch.testing.assert_close(store.read([i]), p.detach(), **TOL)
    assert versions(store) == steps
    assert len(set(steps)) > 1  # the keys really did step at different rates


def test_applying_to_a_subset_updates_only_those_keys_and_bumps_only_their_versions():
    store = new_store(SGDConfig(lr=0.5))
    before = [store.read([i]) for i in range(3)]
    store.apply([2, 0], torch.ones(store.size_of([2, 0])))
    assert versions(store) == [1, 0, 1]
    assert torch.equal(store.read([1]), before[1])
    torch.testing.assert_close(store.read([0]), before[0] - 0.5)
    torch.testing.assert_close(store.read([2]), before[2] - 0.5)
    assert store.version([1]) == 0 and store.version([0, 1]) == 1


def test_read_returns_a_copy_in_request_order():
    store = new_store(SGDConfig())
    values = store.read([2, 0])
    assert torch.equal(values, torch.cat([store.read([2]), store.read([0])]))
    values.zero_()
    assert not torch.equal(store.read([2, 0]), values)


def test_every_shipped_rule_is_registered():
    assert {"sgd", "adagrad", "adam"} <= set(RULES)


def test_make_rule_with_an_unknown_name_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="rmsprop") as info:
        make_rule(SimpleNamespace(name="rmsprop"), 0.1, 10)
    assert all(name in str(info.value) for name in ("sgd", "adagrad", "adam"))
