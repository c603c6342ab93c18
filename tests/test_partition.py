"""Key layouts: partitioners tile the reference MLP, balance it, and (de)serialize."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from downpour.errors import ConfigError
from downpour.layout import PARTITIONERS, Layout, make_layout
from downpour.models import mlp, param_shapes

SHAPES = param_shapes(mlp())  # 784 -> 128 -> 10: 101,770 parameters in four tensors
TOTAL = sum(math.prod(shape) for _, shape in SHAPES)
SERVERS = [1, 2, 3, 4]


def covered_once(layout: Layout) -> bool:
    seen = np.zeros(layout.numel, dtype=np.int64)
    for s in layout.slices:
        seen[s.start : s.stop] += 1
    return bool((seen == 1).all())


def param_of(layout: Layout, element: int):
    return next(p for p in layout.params if p.offset <= element < p.offset + p.numel)


def test_the_reference_mlp_has_the_expected_parameter_count():
    assert TOTAL == 784 * 128 + 128 + 128 * 10 + 10
    assert make_layout(SHAPES, 1).numel == TOTAL


@pytest.mark.parametrize("partitioner", sorted(PARTITIONERS))
@pytest.mark.parametrize("servers", SERVERS)
def test_every_element_is_covered_exactly_once(partitioner, servers):
    layout = make_layout(SHAPES, servers, partitioner=partitioner, max_slice_bytes=64 << 10)
    layout.validate()
    assert covered_once(layout)
    assert [s.key for s in layout.slices] == list(range(len(layout.slices)))
    assert {s.server for s in layout.slices} == set(range(servers))


@pytest.mark.parametrize("servers", SERVERS)
def test_bytes_gives_every_server_the_same_element_count_to_within_one(servers):
    layout = make_layout(SHAPES, servers)
    counts = [layout.server_numel(i) for i in range(servers)]
    assert sum(counts) == TOTAL
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("servers", SERVERS)
def test_bytes_gives_each_server_one_contiguous_flat_range(servers):
    layout = make_layout(SHAPES, servers, max_slice_bytes=32 << 10)
    for server in range(servers):
        mine = layout.server_slices(server)
        assert all(a.stop == b.start for a, b in itertools.pairwise(mine))
        assert [s.key for s in mine] == list(range(mine[0].key, mine[-1].key + 1))


@pytest.mark.parametrize("partitioner", sorted(PARTITIONERS))
@pytest.mark.parametrize("servers", SERVERS)
def test_no_slice_crosses_a_parameter_boundary(partitioner, servers):
    layout = make_layout(SHAPES, servers, partitioner=partitioner)
    for s in layout.slices:
        assert param_of(layout, s.start) is param_of(layout, s.stop - 1)


@pytest.mark.parametrize("partitioner", sorted(PARTITIONERS))
def test_max_slice_bytes_splits_large_tensors(partitioner):
    limit = 16 << 10
    layout = make_layout(SHAPES, 2, partitioner=partitioner, max_slice_bytes=limit)
    assert all(s.length * 4 <= limit for s in layout.slices)
    weight = layout.params[0]
    pieces = [s for s in layout.slices if weight.offset <= s.start < weight.offset + weight.numel]
    assert len(pieces) >= weight.numel * 4 // limit


def test_with_the_default_slice_limit_small_tensors_stay_whole_on_one_server():
    layout = make_layout(SHAPES, 1)
    assert [(s.start, s.length) for s in layout.slices] == [(p.offset, p.numel) for p in layout.params]


@pytest.mark.parametrize("servers", [2, 3, 4])
def test_greedy_is_reasonably_balanced_when_tensors_are_sliced(servers):
    limit = 16 << 10  # 4,096-element pieces: the big weight spreads over every server
    layout = make_layout(SHAPES, servers, partitioner="greedy", max_slice_bytes=limit)
    counts = [layout.server_numel(i) for i in range(servers)]
    assert max(counts) - min(counts) <= limit // 4


def test_greedy_keeps_tensors_whole_when_they_fit_in_one_slice():
    layout = make_layout(SHAPES, 2, partitioner="greedy")
    assert sorted(s.length for s in layout.slices) == sorted(p.numel for p in layout.params)
    biggest = max(layout.slices, key=lambda s: s.length)
    assert all(s.server != biggest.server for s in layout.slices if s is not biggest)


def test_an_unknown_partitioner_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="cluster.partitioner") as info:
        make_layout(SHAPES, 2, partitioner="round-robin")
    assert all(name in str(info.value) for name in ("bytes", "greedy"))


def test_a_model_without_parameters_is_a_config_error():
    with pytest.raises(ConfigError, match="no parameters"):
        make_layout([("empty", (0, 3))], 2)


@pytest.mark.parametrize("partitioner", sorted(PARTITIONERS))
def test_a_layout_survives_to_dict_and_from_dict(partitioner):
    layout = make_layout(SHAPES, 3, partitioner=partitioner, max_slice_bytes=64 << 10)
    assert Layout.from_dict(layout.to_dict()) == layout


def good_dict() -> dict:
    return make_layout([("w", (4, 3)), ("b", (4,))], 2).to_dict()


@pytest.mark.parametrize(
    "broken",
    [
        lambda d: d.pop("slices"),
        lambda d: d.update(num_servers="two"),
        lambda d: d.update(params=[["w", [4, 3], 0]]),
        lambda d: d.update(slices=[[0, 0, 0]]),
        lambda d: d.update(params=5),
    ],
    ids=["missing-slices", "non-int-servers", "short-param", "short-slice", "params-not-a-list"],
)
def test_from_dict_of_a_malformed_dict_is_a_config_error(broken):
    d = good_dict()
    broken(d)
    with pytest.raises(ConfigError, match="malformed layout"):
        Layout.from_dict(d)


@pytest.mark.parametrize("bad", [None, [], "layout"], ids=repr)
def test_from_dict_of_something_that_is_not_a_mapping_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        Layout.from_dict(bad)


def with_slices(slices: list[list[int]], num_servers: int = 2) -> dict:
    return dict(good_dict(), slices=slices, num_servers=num_servers)


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        ([[0, 0, 0, 10]], "covers 10 of 16"),  # a gap at the end
        ([[0, 0, 0, 10], [1, 1, 8, 8]], "gap or overlap"),  # overlap
        ([[0, 0, 0, 8], [1, 1, 9, 7]], "gap or overlap"),  # a hole
        ([[0, 0, 0, 16], [1, 1, 16, 0]], "gap or overlap"),  # an empty key
        ([[1, 0, 0, 8], [0, 1, 8, 8]], "keys must be 0..n-1"),
        ([[0, 0, 0, 8], [1, 2, 8, 8]], "outside 0..num_servers-1"),
    ],
    ids=["short", "overlap", "hole", "empty-key", "key-order", "server-range"],
)
def test_from_dict_of_a_layout_that_does_not_tile_is_a_config_error(slices, match):
    with pytest.raises(ConfigError, match=match):
        Layout.from_dict(with_slices(slices))


@pytest.mark.parametrize(
    "broken",
    [lambda d: d["params"][1].__setitem__(2, 11), lambda d: d["params"][1].__setitem__(1, [9])],
    ids=["overlapping-offsets", "numel-not-shape"],
)
def test_from_dict_of_params_that_contradict_themselves_is_a_config_error(broken):
    d = good_dict()
    broken(d)
    with pytest.raises(ConfigError):
        Layout.from_dict(d)
