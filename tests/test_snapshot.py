"""The servers' shard files (server/snapshot.py): what each server writes and reports, restores into the
same or another layout, warm starts, sync-mode copies, malformed files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save as st_save

from downpour.errors import DataError
from downpour.layout import make_layout
from downpour.server.snapshot import OldParams, Snapshotter, load_shard_file, restore_store, shard_file
from downpour.storage import CheckpointStore
from tests.checkpoint_helpers import (
    SHAPES,
    by_param,
    checkpoint_of,
    commit_reports,
    element_versions,
    exists,
    gather,
    initialised,
    layout_of,
    read_raw,
    snapshot,
    stores_for,
    train,
    wait_reports,
)


def test_the_test_layout_cuts_parameters_into_several_keys_across_servers():
    two, three = layout_of(2), layout_of(3)
    assert len(two.slices) > len(two.params) and {s.server for s in two.slices} == {0, 1}
    assert any(two.describe(s) != p.name and "[" in two.describe(s) for s in two.slices for p in two.params)
    assert [(s.start, s.length) for s in three.slices] != [(s.start, s.length) for s in two.slices]


def test_each_server_reports_its_file_with_its_size_hash_version_and_positions(url):
    layout = layout_of(2)
    stores = initialised(layout)
    train(stores, 3)
    positions = {"worker-0": [0, 1, 2]}
    reports = snapshot(stores, url, "ckpt-a", positions)
    for rank, (report, st) in enumerate(zip(reports, stores)):
        assert report["name"] == "ckpt-a" and report["file"] == shard_file(rank) == f"server-{rank}.safetensors"
        assert report["version"] == max(st.versions) and report["positions"] == positions and report["write_s"] >= 0
        data = read_raw(CheckpointStore(url).where("ckpt-a", report["file"]))
        assert report["bytes"] == len(data)
        tensors, meta = load_shard_file(data, "here")
        assert meta["rank"] == str(rank) and meta["rule"] == "sgd" and json.loads(meta["positions"]) == positions
        assert tensors["keys"].tolist() == st.keys and tensors["versions"].tolist() == st.versions
    assert CheckpointStore(url).names() == []  # the coordinator commits, not the servers


def test_a_checkpoint_restored_into_the_same_layout_has_the_same_values_momentum_and_versions(url):
    layout = layout_of(2)
    stores = initialised(layout)
    train(stores, 5)
    store, manifest = checkpoint_of(stores, url, {"worker-0": [0, 3, 4]})
    old = OldParams(store, manifest, layout)
    assert old.positions == [{"worker-0": [0, 3, 4]}] * 2
    fresh = stores_for(layout)
    assert [restore_store(st, layout, old, full=True) for st in fresh] == [len(st.keys) for st in stores]
    assert torch.equal(gather(fresh, layout), gather(stores, layout))
    assert torch.equal(gather(fresh, layout, "momentum_buffer"), gather(stores, layout, "momentum_buffer"))
    assert [st.versions for st in fresh] == [st.versions for st in stores]
    assert all(st.initialized for st in fresh)
    # ... so training goes on exactly as if never interrupted
    train(stores, 3, seed=9)
    train(fresh, 3, seed=9)
    assert torch.equal(gather(fresh, layout), gather(stores, layout))


@pytest.mark.parametrize(("num_servers", "partitioner"), [(1, "bytes"), (3, "bytes"), (2, "greedy")])
def test_a_checkpoint_restores_into_another_layout_parameter_by_parameter(url, num_servers, partitioner):
    layout = layout_of(2)
    stores = initialised(layout)
    train(stores, 5)
    store, manifest = checkpoint_of(stores, url)
    other = make_layout(SHAPES, num_servers, "f32", partitioner, 16)
    old = OldParams(store, manifest, layout)
    fresh = stores_for(other)
    for st in fresh:
        restore_store(st, other, old, full=True)
    assert all(st.initialized for st in fresh)
    for what in (None, "momentum_buffer"):
        want, got = by_param(gather(stores, layout, what), layout), by_param(gather(fresh, other, what), other)
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    # a new key's version is the newest of the old keys it overlaps
    old_versions = element_versions(stores, layout)
    for st in fresh:
        for i, key in enumerate(st.keys):
            s = other.slices[key]
            assert st.versions[i] == int(old_versions[s.start : s.stop].max())


def test_a_warm_start_takes_values_only_and_leaves_a_new_parameter_uninitialised(url):
    layout = layout_of(2)
    stores = initialised(layout)
    train(stores, 5)
    store, manifest = checkpoint_of(stores, url)
    grown = layout_of(2, [("w", (6, 4)), ("c", (3,)), ("b", (4,))])  # a new parameter between the old ones
    fresh = stores_for(grown)
    old = OldParams(store, manifest, layout)
    filled = [restore_store(st, grown, old, full=False) for st in fresh]
    new_keys = [s for s in grown.slices if grown.describe(s).startswith("c")]
    assert sum(filled) == len(grown.slices) - len(new_keys)
    got = by_param(gather(fresh, grown), grown)
    want = by_param(gather(stores, layout), layout)
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"])
    for st in fresh:
        assert st.versions == [0] * len(st.keys)
        assert not st.rule.state()["momentum_buffer"].any()
        initialised_keys = {k for k, ok in zip(st.keys, st.key_initialized) if ok}
        assert initialised_keys == set(st.keys) - {s.key for s in new_keys}
    assert not all(st.initialized for st in fresh)


def test_a_checkpoint_missing_a_servers_file_names_the_keys_nobody_holds(url):
    layout = layout_of(2)
    stores = initialised(layout)
    reports = snapshot(stores, url, "ckpt-a")
    store, manifest = commit_reports(url, "ckpt-a", reports[:1])  # server-1's file not in the manifest
    with pytest.raises(DataError, match=r"ckpt-a: no server file holds w\[14:18\], w\[18:22\], w\[22:24\], b$"):
        OldParams(store, manifest, layout)


def test_a_checkpoint_of_another_layout_is_refused_key_by_key(url):
    layout = layout_of(2)
    store, manifest = checkpoint_of(initialised(layout), url)
    coarse = make_layout(SHAPES, 2, "f32", "bytes", 4 << 20)  # other keys for the same parameters
    with pytest.raises(DataError, match="does not fit the checkpoint's layout"):
        OldParams(store, manifest, coarse)


def test_sync_mode_copies_the_shard_exactly_when_it_reaches_the_version_asked_for(url):
    layout = layout_of(2)
    [st, _] = initialised(layout)
    train([st], 2)  # version 1 everywhere but key 0: 2
    snap = Snapshotter(st, 0, "sgd", "server-0")
    snap.request({"name": "ckpt-sync", "url": url, "keep": 3, "at_version": 4}, {"worker-0": [0, 0, 2]})
    grad = torch.full((st.numel,), 0.5)
    st.apply(st.all, grad)  # version 3
    snap.maybe_take({"worker-0": [0, 0, 3]})
    assert snap.armed is not None and snap.finished() == [] and not exists(f"{url}/ckpt-sync")
    st.apply(st.all, grad)  # version 4: the copy is taken right after this round
    want = st.data.clone()
    snap.maybe_take({"worker-0": [0, 0, 4]})
    assert snap.armed is None
    st.apply(st.all, grad)  # round 5 changes the live values, not the copy
    [report] = wait_reports([snap])
    assert report["version"] == 4 and report["positions"] == {"worker-0": [0, 0, 4]}
    tensors, meta = load_shard_file(read_raw(f"{url}/ckpt-sync/{report['file']}"), "here")
    assert torch.equal(tensors["values"], want) and meta["version"] == "4"
    assert tensors["versions"].tolist() == [4, 3, 3, 3]


def test_a_request_for_a_version_already_passed_is_reported_missed_and_writes_nothing(url):
    layout = layout_of(2)
    [st, _] = initialised(layout)
    train([st], 4)  # key 0 at version 4, the others at 2
    snap = Snapshotter(st, 0, "sgd", "server-0")
    snap.request({"name": "ckpt-late", "url": url, "keep": 3, "at_version": 3}, {})
    assert snap.finished() == [{"name": "ckpt-late", "missed": True, "version": 4}]
    assert snap.armed is None and not exists(f"{url}/ckpt-late")


def test_a_request_for_the_version_the_shard_is_at_is_taken_at_once(url):
    layout = layout_of(2)
    [st, _] = initialised(layout)
    st.apply(st.all, torch.ones(st.numel))
    want = st.data.clone()
    snap = Snapshotter(st, 0, "sgd", "server-0")
    snap.request({"name": "ckpt-now", "url": url, "keep": 3, "at_version": 1}, {})
    assert snap.armed is None
    st.apply(st.all, torch.ones(st.numel))
    [report] = wait_reports([snap])
    assert report["version"] == 1
    assert torch.equal(load_shard_file(read_raw(f"{url}/ckpt-now/{report['file']}"), "here")[0]["values"], want)


def test_a_request_replaces_one_not_yet_taken(url):
    layout = layout_of(2)
    [st, _] = initialised(layout)
    snap = Snapshotter(st, 0, "sgd", "server-0")
    snap.request({"name": "ckpt-first", "url": url, "keep": 3, "at_version": 10}, {})
    snap.request({"name": "ckpt-second", "url": url, "keep": 3, "at_version": 1}, {})
    st.apply(st.all, torch.ones(st.numel))
    snap.maybe_take({})
    [report] = wait_reports([snap])
    assert report["name"] == "ckpt-second" and snap.armed is None
    assert not exists(f"{url}/ckpt-first")


def test_a_write_that_fails_is_reported_as_an_error_and_the_server_goes_on(caplog):
    layout = layout_of(2)
    [st, _] = initialised(layout)
    snap = Snapshotter(st, 0, "sgd", "server-0")
    with caplog.at_level(logging.ERROR, logger="downpour.server.snapshot"):
        snap.request({"name": "ckpt-x", "url": "nosuchscheme://nowhere", "keep": 3, "at_version": None}, {})
        [report] = wait_reports([snap])
    assert report["name"] == "ckpt-x" and "nosuchscheme" in report["error"] and "sha256" not in report
    assert any("ckpt-x" in r.getMessage() for r in caplog.records)


def shard_bytes(**change) -> bytes:
    tensors = {"values": torch.arange(6, dtype=torch.float32), "versions": torch.tensor([1, 2], dtype=torch.int64),
               "keys": torch.tensor([0, 1], dtype=torch.int64), "lengths": torch.tensor([4, 2], dtype=torch.int64),
               "state.momentum_buffer": torch.zeros(6)}
    for name, t in change.items():
        if t is None:
            del tensors[name]
        else:
            tensors[name] = t
    return st_save(tensors, metadata={"rank": "0", "positions": "{}"})


def test_a_well_formed_shard_file_loads_with_its_metadata():
    tensors, meta = load_shard_file(shard_bytes(), "here")
    assert tensors["lengths"].tolist() == [4, 2] and meta == {"rank": "0", "positions": "{}"}


BAD_SHARD_FILES = {
    "not safetensors": (b"PK\x03\x04 a zip, say" * 4, "not a readable shard file"),
    "empty": (b"", "not a readable shard file"),
    "values float64": (shard_bytes(values=torch.arange(6, dtype=torch.float64)), "'values' missing or not a 1-d torch.float32"),
    "values 2-d": (shard_bytes(values=torch.zeros(2, 3)), "'values' missing or not a 1-d"),
    "keys int32": (shard_bytes(keys=torch.tensor([0, 1], dtype=torch.int32)), "'keys' missing"),
    "no versions": (shard_bytes(versions=None), "'versions' missing"),
    "lengths short of the values": (shard_bytes(lengths=torch.tensor([4, 1])), "do not add up to the 6 values"),
    "lengths past the values": (shard_bytes(lengths=torch.tensor([4, 3])), "do not add up to the 6 values"),
    "a zero length": (shard_bytes(lengths=torch.tensor([6, 0])), "do not add up"),
    "one version too many": (shard_bytes(versions=torch.tensor([1, 2, 3])), "differ in length"),
    "a state of another size": (shard_bytes(**{"state.momentum_buffer": torch.zeros(5)}), "'state.momentum_buffer'"),
    "a state of another dtype": (shard_bytes(**{"state.momentum_buffer": torch.zeros(6, dtype=torch.float16)}), "expected float32"),
}


@pytest.mark.parametrize(("data", "message"), BAD_SHARD_FILES.values(), ids=list(BAD_SHARD_FILES))
def test_a_malformed_shard_file_is_refused_naming_where_and_what(data, message):
    with pytest.raises(DataError, match="^memory://x/server-0.safetensors: ") as err:
        load_shard_file(data, "memory://x/server-0.safetensors")
    assert message in str(err.value)
