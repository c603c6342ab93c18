"""Files a hostile or broken peer may have written: checkpoint manifests that name paths, files
larger than their manifest says, layouts that would size huge allocations, NaN in restored values;
and the run folder and state file are the user's only."""

from __future__ import annotations

import json
import os
import stat

import pytest

from downpour.coordinator.persist import STATE_FILE, StateStore
from downpour.errors import DataError
from downpour.layout import Layout
from downpour.server.snapshot import OldParams
from downpour.storage import CheckpointStore, Manifest
from tests.checkpoint_helpers import checkpoint_of, commit_checkpoint, initialised, layout_of, overwrite, read_raw


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "a/b", ".hidden", "x" * 200, ""])
def test_a_manifest_naming_a_path_is_refused(tmp_path, name):
    store = CheckpointStore(str(tmp_path))
    manifest = commit_checkpoint(store, 1)
    raw = json.loads(read_raw(store.where(manifest.name, "manifest.json")))
    raw["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    overwrite(store.where(manifest.name, "manifest.json"), json.dumps(raw).encode())
    with pytest.raises(DataError, match="not a plain file name"):
        store.manifest(manifest.name)
    with pytest.raises(DataError, match="plain folder name"):
        store.manifest("../" + manifest.name)


def test_a_file_larger_than_its_manifest_says_is_refused_before_it_is_read(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path))
    manifest = commit_checkpoint(store, 1)
    overwrite(store.where(manifest.name, "server-0.safetensors"), b"x" * 10_000)
    reads = []
    real_open = store.fs.open

    def spy(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        real_read = f.read
        f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(store.fs, "open", spy)
    with pytest.raises(DataError, match="holds 10000 bytes, more than"):
        store.read(manifest, "server-0.safetensors")
    assert reads == []


def test_a_layout_larger_than_the_checkpoints_files_is_refused_before_allocating(tmp_path):
    layout = layout_of(2)
    store, manifest = checkpoint_of(initialised(layout), str(tmp_path))
    with pytest.raises(DataError, match="the layout has"):
        OldParams(store, manifest, _claiming_2_to_the_36_values(layout))


def _claiming_2_to_the_36_values(like: Layout) -> Layout:
    """A layout whose size says 2^36 values (256 GiB), as an altered job.json could describe."""

    class Big:
        params = like.params
        slices = like.slices
        numel = 1 << 36

    return Big()  # type: ignore[return-value]


def test_restored_values_with_nan_are_refused(tmp_path):
    layout = layout_of(2)
    stores = initialised(layout)
    stores[0].data[0] = float("nan")
    store, manifest = checkpoint_of(stores, str(tmp_path))
    with pytest.raises(DataError, match="NaN or Inf"):
        OldParams(store, manifest, layout)


def test_the_state_file_is_readable_by_its_user_only(tmp_path):
    os.umask(0o022)
    StateStore(str(tmp_path / STATE_FILE)).close()
    assert stat.S_IMODE(os.stat(tmp_path / STATE_FILE).st_mode) == 0o600


def test_manifest_json_round_trip_is_unchanged_for_plain_names():
    m = Manifest("ckpt-000000000010", 10, {"server-0.safetensors": {"sha256": "a" * 64, "bytes": 3}})
    assert Manifest.from_json(m.to_json(), "here") == m
