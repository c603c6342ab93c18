"""The checkpoint store (downpour/storage): a checkpoint exists once its manifest is committed,
ordering and pruning, damaged files and manifests, locations."""

from __future__ import annotations

import json
import logging
import os

import pytest

from downpour.coordinator.checkpointing import JOB_STATE
from downpour.errors import ConfigError, DataError
from downpour.storage import CheckpointStore, Manifest, resolve_location
from tests.checkpoint_helpers import (
    alter,
    commit_checkpoint,
    delete,
    exists,
    overwrite,
    read_raw,
    truncate,
)

# -- the store ------------------------------------------------------------------------


def test_a_checkpoint_exists_only_once_its_manifest_is_committed(location):
    store = CheckpointStore(location)
    name = store.name_for(10)
    entry = store.write_file(name, "server-0.safetensors", b"abc")
    assert entry["bytes"] == 3 and len(entry["sha256"]) == 64
    assert store.names() == [] and store.latest() is None  # a folder without a manifest is not a checkpoint
    store.commit(Manifest(name, 10, {"server-0.safetensors": entry}))
    assert store.names() == [name]
    latest = store.latest()
    assert latest is not None and latest.name == name and latest.step == 10
    assert store.read(latest, "server-0.safetensors") == b"abc"


def test_the_manifest_round_trips_through_json(location):
    store = CheckpointStore(location)
    manifest = commit_checkpoint(store, 7)
    assert store.manifest(manifest.name) == manifest


def test_checkpoints_sort_by_step_and_keep_prunes_the_oldest(location):
    store = CheckpointStore(location, keep=2)
    for step in (5, 40, 300, 2000):
        commit_checkpoint(store, step)
    assert store.names() == [store.name_for(300), store.name_for(2000)]
    assert not exists(store.where(store.name_for(5))) and not exists(store.where(store.name_for(40)))
    assert store.latest().step == 2000


def test_the_latest_checkpoint_is_the_one_of_the_highest_step_whatever_order_they_were_committed_in(location):
    store = CheckpointStore(location, keep=2)
    commit_checkpoint(store, 500)
    commit_checkpoint(store, 12)
    commit_checkpoint(store, 30)
    assert store.latest().step == 500 and store.names() == [store.name_for(30), store.name_for(500)]


def _commit_needing(store: CheckpointStore, step: int, needs: list[int]) -> None:
    name = store.name_for(step)
    entry = store.write_file(name, "sparse-server-0.safetensors", b"rows at %d" % step)
    store.commit(Manifest(name, step, {"sparse-server-0.safetensors": entry},
                          {"needs": [store.name_for(n) for n in needs]}))


def test_pruning_keeps_what_a_kept_checkpoint_needs_and_what_that_one_needs_in_turn(location):
    # Each server keeps its own chain of sparse deltas; they diverge when a checkpoint that only one
    # server wrote for is abandoned. Both take a base at 10; server-0 writes for 40 and 40 is
    # abandoned; at 30 server-0 is a delta on 10 ([10, 30]) and server-1 (who wrote for an abandoned
    # 20) a new base ([30]); at 50 server-0, whose last write was the abandoned 40, a new base, and
    # server-1 a delta ([30, 50]); at 60 both deltas. So 30 needs 10, 50 needs 30, 60 needs 30 and 50.
    # Keeping the two newest keeps 30 for them, and 30 is not restorable without 10.
    store = CheckpointStore(location, keep=2)
    _commit_needing(store, 10, [])
    _commit_needing(store, 30, [10])
    _commit_needing(store, 50, [30])
    _commit_needing(store, 60, [30, 50])
    names = store.names()
    assert names == [store.name_for(s) for s in (10, 30, 50, 60)]
    assert all(set(store.manifest(n).job["needs"]) <= set(names) for n in names)
    _commit_needing(store, 70, [])  # a new base on both: only the two newest stay
    _commit_needing(store, 80, [70])
    assert store.names() == [store.name_for(70), store.name_for(80)]


def test_pruning_removes_abandoned_writes_older_than_the_newest_checkpoint_but_not_one_in_progress(location):
    store = CheckpointStore(location, keep=3)
    commit_checkpoint(store, 1)
    store.write_file(store.name_for(2), "server-0.safetensors", b"abandoned")  # never committed
    store.write_file(store.name_for(9), "server-0.safetensors", b"being written")  # newer: in progress
    commit_checkpoint(store, 3)
    assert not exists(store.where(store.name_for(2)))
    assert exists(store.where(store.name_for(9), "server-0.safetensors"))
    assert store.names() == [store.name_for(1), store.name_for(3)]


DAMAGE = {"truncated": truncate, "altered": alter, "deleted": None}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("file", ["server-0.safetensors", JOB_STATE])
def test_latest_skips_a_checkpoint_with_a_damaged_file_and_names_it_in_a_warning(location, damage, file, caplog):
    store = CheckpointStore(location)
    good = commit_checkpoint(store, 100)
    bad = commit_checkpoint(store, 200)
    where = store.where(bad.name, file)
    if DAMAGE[damage] is None:
        delete(where)
    else:
        overwrite(where, DAMAGE[damage](read_raw(where)))
    with caplog.at_level(logging.WARNING, logger="downpour.storage.checkpoints"):
        assert store.latest() == good
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert store.where(bad.name) in record.getMessage()
    with pytest.raises(DataError, match=file):
        store.read(bad, file)
    assert store.names() == [good.name, bad.name]  # skipped, not deleted


def test_latest_is_none_when_every_checkpoint_is_broken(location):
    store = CheckpointStore(location)
    only = commit_checkpoint(store, 1)
    delete(store.where(only.name, JOB_STATE))
    assert store.latest() is None


CORRUPT_MANIFESTS = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe\x00",
    "a list": b"[1, 2]",
    "format 2": json.dumps({"format": 2, "name": "x", "step": 1, "files": {}}).encode(),
    "no format": json.dumps({"name": "x", "step": 1, "files": {}}).encode(),
    "no files": json.dumps({"format": 1, "name": "x", "step": 1}).encode(),
    "an entry without sha256": json.dumps({"format": 1, "name": "x", "step": 1, "files": {"a": {"bytes": 1}}}).encode(),
    "files a list": json.dumps({"format": 1, "name": "x", "step": 1, "files": ["a"]}).encode(),
    "a step not a number": json.dumps({"format": 1, "name": "x", "step": "late", "files": {}}).encode(),
}


@pytest.mark.parametrize("content", CORRUPT_MANIFESTS.values(), ids=list(CORRUPT_MANIFESTS))
def test_a_corrupt_manifest_is_refused_with_data_error_and_skipped_by_latest(location, content, caplog):
    store = CheckpointStore(location)
    good = commit_checkpoint(store, 1)
    bad = commit_checkpoint(store, 2)
    overwrite(store.where(bad.name, "manifest.json"), content)
    with pytest.raises(DataError, match="not a valid checkpoint manifest"):
        store.manifest(bad.name)
    with caplog.at_level(logging.WARNING, logger="downpour.storage.checkpoints"):
        assert store.latest() == good
    assert any(store.where(bad.name) in r.getMessage() for r in caplog.records)


def test_reading_a_file_the_manifest_does_not_list_is_refused(location):
    store = CheckpointStore(location)
    manifest = commit_checkpoint(store, 1)
    store.write_file(manifest.name, "extra.bin", b"not in the manifest")
    with pytest.raises(DataError, match="lists no file 'extra.bin'"):
        store.read(manifest, "extra.bin")


def test_a_url_no_filesystem_knows_is_a_data_error():
    with pytest.raises(DataError, match="nosuchscheme"):
        CheckpointStore("nosuchscheme://bucket/x")


def test_a_run_folder_with_a_checkpoints_folder_means_that_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert resolve_location(str(run)) == str(run / "checkpoints")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_location(str(plain)) == str(plain)
    assert resolve_location(os.path.relpath(run, os.getcwd())) == str(run / "checkpoints")  # made absolute


@pytest.mark.parametrize("where", ["memory://t-x/run", "s3://bucket/run/checkpoints", "file:///tmp/run"])
def test_a_url_is_taken_as_it_is(where):
    assert resolve_location(where) == where


def test_a_run_folder_whose_job_wrote_to_a_checkpoint_url_means_that_url(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\ncheckpoint:\n  url: s3://bucket/x/ckpts\n")
    assert resolve_location(str(run)) == "s3://bucket/x/ckpts"
    (run / "config.yaml").write_text(f"name: x\ncheckpoint:\n  url: {tmp_path / 'elsewhere'}\n")
    assert resolve_location(str(run)) == str(tmp_path / "elsewhere")
    (run / "config.yaml").write_text("name: x\ncheckpoint: {url: null}\n")
    assert resolve_location(str(run)) == str(run)  # checkpoints in the run folder (none yet)
    (run / "config.yaml").write_text("name: [x\n")  # not YAML: as if absent
    assert resolve_location(str(run)) == str(run)


def test_the_scheduler_resumes_from_the_checkpoint_url_a_preempted_run_wrote_to(tmp_path):
    from downpour.scheduler.runner import resume_source, run_folder

    url = tmp_path / "bucket"
    run0 = run_folder(str(tmp_path / "root"), 7, 0)
    os.makedirs(run0)
    with open(os.path.join(run0, "config.yaml"), "w") as f:
        f.write(f"name: x\ncheckpoint:\n  url: {url}\n")
    assert resume_source(str(tmp_path / "root"), 7, 1) is None  # nothing committed there yet
    commit_checkpoint(CheckpointStore(str(url)), 12)
    assert resume_source(str(tmp_path / "root"), 7, 1) == run0


def test_one_checkpoint_named_by_its_folder_is_taken_instead_of_the_latest(tmp_path):
    """--resume and init_from take a run folder, its checkpoints folder, or one checkpoint's folder
    (an older one than the latest: before a change that went wrong, say)."""
    from downpour.api import check_run_dir
    from downpour.config import parse_job
    from downpour.coordinator.restore import latest_checkpoint
    from tests.checkpoint_helpers import layout_of

    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    for step in (10, 20, 30):
        commit_checkpoint(store, step, {JOB_STATE: json.dumps({"step": step, "layout": layout_of(1).to_dict()}).encode()})
    assert latest_checkpoint(str(tmp_path / "run"))[1].step == 30
    older = str(tmp_path / "run" / "checkpoints" / store.name_for(20))
    _, manifest, state = latest_checkpoint(older)
    assert manifest.step == 20 and state["step"] == 20
    with pytest.raises(DataError, match="cannot be used"):
        latest_checkpoint(str(tmp_path / "run" / "checkpoints" / store.name_for(25)))
    # Resumed in its own run folder, the newer checkpoints there would be taken by a later --resume: refused.
    job = parse_job({"model": {"name": "mlp"}, "checkpoint": {"resume_from": older}})
    with pytest.raises(ConfigError, match="would leave the newer checkpoints there beside this job's: give this job a new --run-dir"):
        check_run_dir(job, str(tmp_path / "run"))
    check_run_dir(job, str(tmp_path / "elsewhere"))
