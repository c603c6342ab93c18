"""Checkpoints, part by part: the store and its manifests, the data ledger's position, the servers'
shard files, the coordinator's checkpoint plan, and the checks made before a job resumes or warm-starts."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import Counter

import fsspec
import pytest
import torch
from safetensors.torch import save as st_save

from downpour.config import CheckpointConfig, SGDConfig, parse_job
from downpour.coordinator.checkpointing import JOB_STATE, CheckpointPlan
from downpour.coordinator.restore import plan_resume, plan_warm_start
from downpour.coordinator.shards import ShardLedger
from downpour.coordinator.state import CoordinatorState, Reply
from downpour.errors import ConfigError, DataError
from downpour.layout import Layout, make_layout
from downpour.models import mlp, param_shapes
from downpour.protocol import Message, Op
from downpour.server.optim import make_rule
from downpour.server.snapshot import OldParams, Snapshotter, load_shard_file, restore_store, shard_file
from downpour.server.store import ShardStore
from downpour.storage import CheckpointStore, Manifest, resolve_location


def memory_url() -> str:
    return f"memory://t-{uuid.uuid4().hex}"


@pytest.fixture
def url():
    """A fresh memory:// location (the memory filesystem is one per process), emptied afterwards."""
    where = memory_url()
    yield where
    fs, root = fsspec.core.url_to_fs(where)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["memory", "local"])
def location(request, url, tmp_path) -> str:
    """The same tests on a memory:// URL and on a local folder."""
    return url if request.param == "memory" else str(tmp_path / "checkpoints")


def overwrite(where: str, data: bytes) -> None:
    with fsspec.open(where, "wb") as f:
        f.write(data)


def read_raw(where: str) -> bytes:
    with fsspec.open(where, "rb") as f:
        return f.read()


def delete(where: str) -> None:
    fs, path = fsspec.core.url_to_fs(where)
    fs.rm(path)


def exists(where: str) -> bool:
    fs, path = fsspec.core.url_to_fs(where)
    return fs.exists(path)


def commit_checkpoint(store: CheckpointStore, step: int, files: dict[str, bytes] | None = None) -> Manifest:
    """A checkpoint of two files (by default), committed."""
    name = store.name_for(step)
    files = files if files is not None else {"server-0.safetensors": f"values at {step}".encode(), JOB_STATE: b'{"step": %d}' % step}
    entries = {file: store.write_file(name, file, data) for file, data in files.items()}
    manifest = Manifest(name, step, entries, {"final": False})
    store.commit(manifest)
    return manifest


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


def test_pruning_removes_abandoned_writes_older_than_the_newest_checkpoint_but_not_one_in_progress(location):
    store = CheckpointStore(location, keep=3)
    commit_checkpoint(store, 1)
    store.write_file(store.name_for(2), "server-0.safetensors", b"abandoned")  # never committed
    store.write_file(store.name_for(9), "server-0.safetensors", b"being written")  # newer: in progress
    commit_checkpoint(store, 3)
    assert not exists(store.where(store.name_for(2)))
    assert exists(store.where(store.name_for(9), "server-0.safetensors"))
    assert store.names() == [store.name_for(1), store.name_for(3)]


def _truncate(data: bytes) -> bytes:
    return data[:-1]


def _alter(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])  # same length, other bytes


DAMAGE = {"truncated": _truncate, "altered": _alter, "deleted": None}


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


# -- the data ledger --------------------------------------------------------------------


def handed(ledger: ShardLedger, node: str) -> tuple[int, int]:
    shard = ledger.next(node)
    assert shard is not None
    return shard["epoch"], shard["shard"]


def resumed(state: dict) -> ShardLedger:
    """A new ledger continuing from ``state`` as a job.json holds it."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    ledger.restore(json.loads(json.dumps(state)))
    return ledger


def test_a_worker_mid_shard_resumes_it_after_the_examples_it_had_done():
    ledger = ShardLedger(40, 4, 2, seed=7)  # ten shards of four
    e, s = handed(ledger, "w0")
    state = ledger.state_at({"w0": [e, s, 3]})
    assert state["queue"][0] == [e, s, 3] and [e, s] not in state["completed"]
    again = resumed(state)
    assert again.next("w1") == {"epoch": e, "shard": s, "start": 4 * s, "stop": 4 * s + 4, "skip": 3}


def test_a_shard_fully_done_but_not_yet_reported_counts_as_completed():
    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    state = ledger.state_at({"w0": [e, s, 4]})
    assert [e, s] in state["completed"]
    assert all((q[0], q[1]) != (e, s) for q in state["queue"])


def test_a_shard_reported_done_after_the_snapshot_goes_back_with_the_examples_the_snapshot_holds():
    ledger = ShardLedger(40, 4, 2, seed=7)
    e, s = handed(ledger, "w0")
    assert ledger.done("w0", e, s)
    state = ledger.state_at({"w0": [e, s, 1]})
    assert state["queue"][0] == [e, s, 1] and [e, s] not in state["completed"]


def test_shards_handed_out_after_the_snapshot_go_back_first_in_their_hand_out_order():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w1")
    c = handed(ledger, "w0")
    d = handed(ledger, "w1")
    e = handed(ledger, "w0")
    rest = list(ledger.queue)
    assert ledger.done("w0", *a)
    state = ledger.state_at({"w0": [*a, 4], "w1": [*b, 2]})
    assert state["completed"] == [list(a)]
    assert state["queue"] == [[*b, 2], [*c, 0], [*d, 0], [*e, 0], *([*k, 0] for k in rest)]


def test_a_worker_with_no_position_gives_back_every_shard_it_was_handed():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    ledger.done("w0", *a)
    b = handed(ledger, "w0")
    c = handed(ledger, "w1")
    state = ledger.state_at({"w1": [*c, 1]})
    assert state["completed"] == []
    assert state["queue"][:3] == [[*a, 0], [*b, 0], [*c, 1]]


def test_a_position_in_a_shard_the_worker_was_not_handed_gives_back_all_its_shards():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    state = ledger.state_at({"w0": [1, 9, 2]})
    assert state["queue"][0] == [*a, 0]


def test_restore_hands_out_the_partial_shard_first_with_its_skip_and_then_the_rest():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w1")
    state = ledger.state_at({"w0": [*a, 2], "w1": [*b, 4]})
    again = resumed(state)
    first = again.next("w5")
    assert (first["epoch"], first["shard"], first["skip"]) == (*a, 2)
    second = again.next("w5")
    assert second["skip"] == 0 and (second["epoch"], second["shard"]) not in (a, b)
    assert again.done("w5", *a) and again.skips == {}


def test_earliest_takes_the_position_handed_out_first_then_the_fewest_examples():
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "w0")
    b = handed(ledger, "w0")
    assert ledger.earliest("w0", [[*b, 1], [*a, 3]]) == [*a, 3]
    assert ledger.earliest("w0", [[*a, 3], [*a, 1], [*b, 0]]) == [*a, 1]
    assert ledger.earliest("w0", [[*b, 2]]) == [*b, 2]


class SimWorker:
    """A worker of the data loop: asks for a shard (reporting the previous one done first), then
    trains it a batch at a time; each batch's push carries its position, as the trainer's do."""

    def __init__(self, name: str, ledger: ShardLedger, batch: int) -> None:
        self.name, self.ledger, self.batch = name, ledger, batch
        self.shard: dict | None = None
        self.done = 0  # examples of the shard trained, skipped ones included
        self.position: list[int] | None = None
        self.finished = False

    def act(self, trained: list[tuple[int, int, int]]) -> None:
        size = (self.shard["stop"] - self.shard["start"]) if self.shard else 0
        if self.shard is None or self.done == size:
            if self.shard is not None:
                assert self.ledger.done(self.name, self.shard["epoch"], self.shard["shard"])
            self.shard = self.ledger.next(self.name)
            self.finished = self.shard is None
            self.done = self.shard["skip"] if self.shard else 0
            return
        n = min(self.batch, size - self.done)
        trained += [(self.shard["epoch"], self.shard["shard"], i) for i in range(self.done, self.done + n)]
        self.done += n
        self.position = [self.shard["epoch"], self.shard["shard"], self.done]


def drive(workers: list[SimWorker], trained: list, rng: random.Random, actions: int | None = None) -> None:
    """Let workers act in a random order (some faster than others) until all finished or ``actions`` ran."""
    count = 0
    while actions is None or count < actions:
        active = [w for w in workers if not w.finished]
        if not active:
            return
        rng.choices(active, weights=[1 + 2 * i for i in range(len(active))])[0].act(trained)
        count += 1


LOOP = {"num_examples": 30, "shard_size": 4, "epochs": 3}  # eight shards an epoch, the last of two


def every_example() -> Counter:
    ledger = ShardLedger(seed=0, **LOOP)
    return Counter((e, s, i) for e in range(LOOP["epochs"]) for s in range(ledger.num_shards)
                   for i in range(ledger.bounds(s)[1] - ledger.bounds(s)[0]))


def interrupted(ledger: ShardLedger, trained: list, rng: random.Random, at: int, written_after: int) -> dict:
    """Train ``at`` actions, snapshot, train ``written_after`` more (the checkpoint is being written):
    the ledger's state at the snapshot, as job.json holds it; ``trained`` is cut back to the snapshot."""
    workers = [SimWorker(f"w{i}", ledger, batch=3) for i in range(3)]
    drive(workers, trained, rng, at)
    positions = {w.name: list(w.position) for w in workers if w.position is not None}
    in_snapshot = len(trained)
    drive(workers, trained, rng, written_after)
    del trained[in_snapshot:]  # lost with the job
    return json.loads(json.dumps(ledger.state_at(positions)))


def finish(state: dict, trained: list, rng: random.Random) -> None:
    ledger = ShardLedger(seed=0, **LOOP)
    ledger.restore(state)
    drive([SimWorker(f"w{i}", ledger, batch=3) for i in range(3)], trained, rng)


def test_an_uninterrupted_loop_trains_every_example_once_per_epoch():
    trained: list = []
    ledger = ShardLedger(seed=0, **LOOP)
    drive([SimWorker(f"w{i}", ledger, batch=3) for i in range(3)], trained, random.Random(1))
    assert Counter(trained) == every_example()
    assert ledger.summary()["completed_per_epoch"] == {"0": 8, "1": 8, "2": 8} and ledger.summary()["unfinished"] == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("at", [1, 9, 25, 40, 61, 90])
@pytest.mark.parametrize("written_after", [0, 4, 17])
def test_a_job_resumed_from_a_snapshot_trains_every_example_exactly_once_per_epoch(seed, at, written_after):
    rng = random.Random(seed)
    trained: list = []
    state = interrupted(ShardLedger(seed=0, **LOOP), trained, rng, at, written_after)
    finish(state, trained, rng)
    assert Counter(trained) == every_example()


def test_a_resumed_shard_finished_after_the_next_snapshot_without_its_worker_position_goes_back_with_its_skip():
    """Resume with shard P at skip 2. The next snapshot is copied before P's worker pushed anything
    (no position); P is then trained to the end and reported done before that snapshot's state is
    taken: P goes back to the queue, and the parameters still hold its examples 0 and 1."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    p = handed(ledger, "w0")
    again = resumed(ledger.state_at({"w0": [*p, 2]}))
    assert again.next("w0")["skip"] == 2
    assert again.done("w0", *p)  # examples 2 and 3 trained after the snapshot was copied
    state = again.state_at({})  # w0 had pushed nothing when the servers copied their shards
    assert [*p, 2] in state["queue"]


def test_a_resumed_shard_handed_out_after_the_next_snapshot_and_finished_goes_back_with_its_skip():
    """Resume with shards P (skip 1) and Q (skip 2). w0 trains P and is at example 2 of it when the
    next snapshot is copied; then it finishes P, takes Q, finishes it, reports both done, and only then
    is the snapshot's state taken: Q, begun after the snapshot, goes back with the skip it had."""
    ledger = ShardLedger(40, 4, 2, seed=7)
    p, q = handed(ledger, "w0"), handed(ledger, "w1")
    again = resumed(ledger.state_at({"w0": [*p, 1], "w1": [*q, 2]}))
    assert again.next("w0")["skip"] == 1
    assert again.done("w0", *p)
    assert again.next("w0")["skip"] == 2
    assert again.done("w0", *q)
    state = again.state_at({"w0": [*p, 2]})
    assert state["queue"][:2] == [[*p, 2], [*q, 2]]


TWICE = [(seed, at) for seed in range(3) for at in (3, 20, 47)]


@pytest.mark.parametrize(("seed", "at"), TWICE)
def test_a_job_resumed_twice_trains_every_example_exactly_once_per_epoch(seed, at):
    rng = random.Random(seed)
    trained: list = []
    state = interrupted(ShardLedger(seed=0, **LOOP), trained, rng, at, 6)
    second = ShardLedger(seed=0, **LOOP)
    second.restore(state)
    state = interrupted(second, trained, rng, at // 2 + 1, 6)
    finish(state, trained, rng)
    assert Counter(trained) == every_example()


# -- the servers' shard files ------------------------------------------------------------

SHAPES = [("w", (6, 4)), ("b", (4,))]  # 28 elements
MOMENTUM = SGDConfig(lr=0.1, momentum=0.9)


def layout_of(num_servers: int, shapes=SHAPES) -> Layout:
    """Keys of at most four elements: parameters are cut into several keys, some mid-row."""
    return make_layout(shapes, num_servers, "f32", "bytes", 16)


def stores_for(layout: Layout) -> list[ShardStore]:
    return [ShardStore(layout.server_slices(r), lambda n: make_rule(MOMENTUM, MOMENTUM.lr, n)) for r in range(layout.num_servers)]


def initialised(layout: Layout) -> list[ShardStore]:
    stores = stores_for(layout)
    flat = torch.linspace(-1.0, 1.0, layout.numel)
    for r, st in enumerate(stores):
        st.init_keys(st.all, torch.cat([flat[s.start : s.stop] for s in layout.server_slices(r)]))
    return stores


def train(stores: list[ShardStore], steps: int, seed: int = 0) -> None:
    """Updates with momentum; every other step only each server's first key, so versions differ by key."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for st in stores:
            idx = st.all if t % 2 == 0 else [0]
            st.apply(idx, torch.randn(st.size_of(idx), generator=gen))


def gather(stores: list[ShardStore], layout: Layout, state: str | None = None) -> torch.Tensor:
    """The servers' values (or a rule state) as one flat vector of ``layout``."""
    out = torch.zeros(layout.numel)
    for st in stores:
        src = st.data if state is None else st.rule.state()[state]
        for i, key in enumerate(st.keys):
            s = layout.slices[key]
            out[s.start : s.stop] = src[st.offsets[i] : st.offsets[i + 1]]
    return out


def element_versions(stores: list[ShardStore], layout: Layout) -> torch.Tensor:
    out = torch.zeros(layout.numel, dtype=torch.int64)
    for st in stores:
        for i, key in enumerate(st.keys):
            s = layout.slices[key]
            out[s.start : s.stop] = st.versions[i]
    return out


def by_param(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {p.name: flat[p.offset : p.offset + p.numel] for p in layout.params}


def wait_reports(snaps: list[Snapshotter], timeout_s: float = 10.0) -> list[dict]:
    """Each snapshotter's report (their writes run on threads of their own)."""
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(reports) < len(snaps):
        for i, snap in enumerate(snaps):
            for report in snap.finished():
                assert i not in reports, f"two reports from server {i}: {reports[i]}, {report}"
                reports[i] = report
        assert time.monotonic() < deadline, f"only {sorted(reports)} of {len(snaps)} servers reported"
        time.sleep(0.001)
    return [reports[i] for i in range(len(snaps))]


def snapshot(stores: list[ShardStore], url: str, name: str, positions: dict | None = None) -> list[dict]:
    snaps = [Snapshotter(st, r, "sgd", f"server-{r}") for r, st in enumerate(stores)]
    for snap in snaps:
        snap.request({"name": name, "url": url, "keep": 3, "at_version": None}, positions or {})
    return wait_reports(snaps)


def commit_reports(url: str, name: str, reports: list[dict], step: int = 1,
                   extra: dict[str, bytes] | None = None) -> tuple[CheckpointStore, Manifest]:
    store = CheckpointStore(url)
    files = {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in reports}
    files |= {file: store.write_file(name, file, data) for file, data in (extra or {}).items()}
    manifest = Manifest(name, step, files)
    store.commit(manifest)
    return store, manifest


def checkpoint_of(stores: list[ShardStore], url: str, positions: dict | None = None) -> tuple[CheckpointStore, Manifest]:
    name = CheckpointStore.name_for(1)
    return commit_reports(url, name, snapshot(stores, url, name, positions))


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


# -- the coordinator's checkpoint plan -------------------------------------------------------


def plan(now: float = 0.0, url: str | None = "memory://plan", num_servers: int = 2, **cfg) -> CheckpointPlan:
    """A plan of periodic checkpoints (the one at step 0 only where a test asks for it)."""
    cfg.setdefault("at_start", False)
    return CheckpointPlan(CheckpointConfig(**cfg), url, sync=False, num_servers=num_servers, now=now)


def test_the_first_checkpoint_is_due_as_soon_as_training_starts_then_periodic_ones():
    p = plan(now=10.0, every_s=60.0, at_start=True)
    assert p.due(10.0, 0)  # step 0, before any period passed
    p.begin(10.0, 0, None)
    complete(p, 11.0)
    assert not p.due(69.9, 5) and p.due(70.0, 5)
    assert not plan(at_start=True, enabled=False).due(0.0, 0)
    assert not plan(at_start=True, url=None).due(0.0, 0)


def report(name: str, **extra) -> dict:
    return {"name": name, "file": "server-x.safetensors", "sha256": "0" * 64, "bytes": 1, "version": 1, "write_s": 0.1, **extra}


def complete(p: CheckpointPlan, now: float, write_s: float = 1.0) -> None:
    name = p.pending.name
    verdicts = [p.on_report(f"server-{i}", report(name)) for i in range(p.num_servers)]
    assert verdicts[-1] == "complete"
    p.committed_now(now, write_s)


def test_a_checkpoint_is_due_every_so_many_steps():
    p = plan(every_steps=100, every_s=None)
    assert not p.due(1e6, 99)  # time alone does not count
    assert p.due(1.0, 100)
    p.begin(1.0, 100, None)
    assert not p.due(2.0, 10_000)  # not while one is pending
    complete(p, 3.0)
    assert not p.due(4.0, 199) and p.due(4.0, 200)


def test_a_checkpoint_is_due_every_so_many_seconds_on_the_coordinators_clock():
    p = plan(now=10.0, every_s=60.0)
    assert not p.due(69.9, 10**9)
    assert p.due(70.0, 0)
    p.begin(70.0, 5, None)
    complete(p, 75.0)
    assert not p.due(129.9, 0) and p.due(130.0, 0)


def test_a_checkpoint_is_never_due_when_disabled_without_a_url_or_without_a_schedule():
    assert not plan(enabled=False, every_steps=1, every_s=1.0).due(1e6, 10**9)
    no_url = plan(url=None, every_steps=1, every_s=1.0)
    assert not no_url.enabled and not no_url.due(1e6, 10**9) and no_url.summary()["enabled"] is False
    assert not plan(every_steps=None, every_s=None).due(1e6, 10**9)


def test_checkpoint_names_sort_by_step_and_never_collide():
    p = plan(every_steps=1)
    first = p.begin(0.0, 7, None).name
    second = p.begin(0.0, 7, None).name  # replaces the first, at the same step
    assert first != second and p.pending.name == second
    assert first.startswith(CheckpointStore.name_for(7)) and sorted([second, first]) == [first, second]
    assert p.begin(0.0, 12, None).name > second


def test_reports_are_judged_against_the_pending_checkpoint():
    p = plan(num_servers=3)
    assert p.on_report("server-0", report("ckpt-none")) == "stale"  # nothing pending
    name = p.begin(0.0, 1, 5).name
    assert p.on_report("server-0", report("ckpt-older")) == "stale"
    assert p.on_report("server-0", {"name": name, "missed": True, "version": 9}) == "missed"
    assert p.on_report("server-0", {"name": name, "error": "OSError: disk full"}) == "failed"
    assert p.on_report("server-0", report(name)) == "wait"
    assert p.on_report("server-0", report(name)) == "wait"  # the same server twice is still one server
    assert p.on_report("server-2", report(name)) == "wait"
    assert p.on_report("server-1", report(name)) == "complete"
    assert set(p.pending.reports) == {"server-0", "server-1", "server-2"}


def test_a_checkpoint_not_complete_in_time_expires_and_is_abandoned():
    p = plan(timeout_s=30.0)
    assert not p.expired(1e6)  # nothing pending
    name = p.begin(10.0, 1, None).name
    p.on_report("server-0", report(name))
    assert not p.expired(40.0) and p.expired(40.01)
    p.abandon(40.01, "not complete after 30s")
    assert p.pending is None and p.on_report("server-1", report(name)) == "stale"
    assert p.summary()["abandoned"] == 1 and p.summary()["count"] == 0


def test_the_summary_counts_checkpoints_and_their_mean_write_time():
    p = plan(url="memory://run", every_steps=10)
    assert p.summary() == {"enabled": True, "url": "memory://run", "count": 0, "last_step": None, "last": None,
                           "mean_write_s": None, "abandoned": 0}
    p.begin(0.0, 10, None)
    complete(p, 1.0, write_s=2.0)
    p.begin(2.0, 20, None)
    p.abandon(3.0, "a server failed")
    last = p.begin(4.0, 30, None, final=True).name
    complete(p, 5.0, write_s=4.0)
    s = p.summary()
    assert (s["count"], s["last_step"], s["last"], s["mean_write_s"], s["abandoned"]) == (2, 30, last, 3.0, 1)
    assert p.committed[-1]["final"] is True


# -- resuming and warm-starting --------------------------------------------------------------


def mlp_layout(hidden: list[int], num_servers: int = 2) -> Layout:
    shapes = param_shapes(mlp(input_shape=[4], hidden=hidden, dropout=0.0, num_classes=3))
    return make_layout(shapes, num_servers, "f32", "bytes", 16)


def write_job_checkpoint(url: str, layout: Layout, step: int = 42) -> tuple[Manifest, dict, list[ShardStore]]:
    """What a job leaves: each server's file, then job.json, then the manifest."""
    stores = initialised(layout)
    train(stores, 3)
    ledger = ShardLedger(40, 4, 2, seed=7)
    a = handed(ledger, "worker-0")
    ledger_state = ledger.state_at({"worker-0": [*a, 2]})
    name = CheckpointStore.name_for(step)
    reports = snapshot(stores, url, name, {"worker-0": [*a, 2]})
    job = {"layout": layout.to_dict(), "ledger": ledger_state, "step": step, "examples": 12}
    _, manifest = commit_reports(url, name, reports, step, {JOB_STATE: json.dumps(job).encode()})
    return manifest, ledger_state, stores


def test_the_same_model_resumes_with_the_ledger_step_and_a_full_restore_order(url):
    layout = mlp_layout([3])
    manifest, ledger_state, stores = write_job_checkpoint(url, layout)
    plan_ = plan_resume(url, layout)
    assert plan_["step"] == 42 and plan_["examples"] == 12 and plan_["ledger"] == ledger_state
    assert plan_["name"] == CheckpointStore(url).where(manifest.name)
    assert plan_["restore"] == {"url": url, "name": manifest.name, "layout": layout.to_dict(), "full": True}
    # what each server does with the order
    order = plan_["restore"]
    store = CheckpointStore(order["url"])
    old = OldParams(store, store.manifest(order["name"]), Layout.from_dict(order["layout"]))
    fresh = stores_for(layout)
    for st in fresh:
        restore_store(st, layout, old, order["full"])
    assert torch.equal(gather(fresh, layout), gather(stores, layout))


def test_the_same_model_on_another_number_of_servers_resumes(url):
    write_job_checkpoint(url, mlp_layout([3]))
    assert plan_resume(url, mlp_layout([3], num_servers=3))["restore"]["full"] is True


def test_a_run_folder_resumes_from_its_checkpoints_folder(tmp_path):
    run = tmp_path / "run"
    layout = mlp_layout([3])
    manifest, _, _ = write_job_checkpoint(str(run / "checkpoints"), layout)
    plan_ = plan_resume(str(run), layout)
    assert plan_["restore"]["url"] == str(run / "checkpoints") and plan_["restore"]["name"] == manifest.name


def test_resume_takes_the_newest_checkpoint_that_verifies(url):
    layout = mlp_layout([3])
    older, _, _ = write_job_checkpoint(url, layout, step=10)
    newer, _, _ = write_job_checkpoint(url, layout, step=20)
    assert plan_resume(url, layout)["step"] == 20
    where = CheckpointStore(url).where(newer.name, "server-1.safetensors")
    overwrite(where, _alter(read_raw(where)))
    assert plan_resume(url, layout)["step"] == 10


def test_a_model_of_another_hidden_size_is_refused_by_resume(url):
    write_job_checkpoint(url, mlp_layout([3]))
    with pytest.raises(ConfigError, match=r"model differs.*1\.weight \[3, 4\] -> \[5, 4\].*use init_from"):
        plan_resume(url, mlp_layout([5]))


def test_a_warm_start_names_every_parameter_whose_shape_changed(url):
    write_job_checkpoint(url, mlp_layout([3]))
    with pytest.raises(ConfigError, match="parameters changed shape") as err:
        plan_warm_start(url, mlp_layout([5]))
    message = str(err.value)
    for changed in ("1.weight: [3, 4] in the checkpoint, [5, 4] now", "1.bias: [3] in the checkpoint, [5] now",
                    "3.weight: [3, 3] in the checkpoint, [3, 5] now"):
        assert changed in message
    assert "3.bias" not in message  # unchanged


def test_a_model_with_an_extra_layer_warm_starts_and_its_new_parameters_are_listed_as_new(url, caplog):
    old_layout, grown = mlp_layout([3]), mlp_layout([3, 3])  # 1.*, 3.* as before; 5.weight, 5.bias new
    manifest, _, stores = write_job_checkpoint(url, old_layout)
    with pytest.raises(ConfigError, match="5.weight new; 5.bias new"):
        plan_resume(url, grown)
    with caplog.at_level(logging.INFO, logger="downpour.coordinator.restore"):
        order = plan_warm_start(url, grown)
    assert order == {"url": url, "name": manifest.name, "layout": old_layout.to_dict(), "full": False}
    assert any("4 parameters taken, 2 new ones initialised (5.weight, 5.bias)" in r.getMessage() for r in caplog.records)
    store = CheckpointStore(url)
    old = OldParams(store, store.manifest(order["name"]), Layout.from_dict(order["layout"]))
    fresh = stores_for(grown)
    for st in fresh:
        restore_store(st, grown, old, order["full"])
    got, want = by_param(gather(fresh, grown), grown), by_param(gather(stores, old_layout), old_layout)
    assert all(torch.equal(got[n], want[n]) for n in want)
    uninitialised = {grown.describe(grown.slices[k]).split("[")[0] for st in fresh for k, ok in zip(st.keys, st.key_initialized) if not ok}
    assert uninitialised == {"5.weight", "5.bias"}


def test_resume_without_a_complete_checkpoint_says_so(url):
    layout = mlp_layout([3])
    with pytest.raises(DataError, match="no complete checkpoint under"):
        plan_resume(url, layout)
    CheckpointStore(url).write_file(CheckpointStore.name_for(5), JOB_STATE, b"{}")  # never committed
    with pytest.raises(DataError, match="no complete checkpoint under"):
        plan_warm_start(url, layout)


def test_a_job_state_without_a_layout_is_refused_naming_the_file(url):
    store = CheckpointStore(url)
    commit_checkpoint(store, 3, {JOB_STATE: b'{"ledger": {}}'})
    with pytest.raises(DataError, match=r"job\.json: not a valid job state"):
        plan_resume(url, mlp_layout([3]))


@pytest.mark.parametrize("layout", [{"params": 5}, {"params": [["w", [2], 0, 3]], "slices": [], "num_servers": 1, "dtype": "f32"}],
                         ids=["not a layout", "a layout that contradicts itself"])
def test_a_job_state_with_a_malformed_layout_is_refused_naming_the_file(url, layout):
    commit_checkpoint(CheckpointStore(url), 3, {JOB_STATE: json.dumps({"ledger": {}, "layout": layout}).encode()})
    with pytest.raises(DataError, match=r"job\.json: not a valid job state"):
        plan_resume(url, mlp_layout([3]))


# -- the coordinator after a resume ------------------------------------------------------------


def test_checkpoints_taken_after_a_resume_sort_after_the_one_resumed_from():
    """Checkpoints are ordered by name, and named by the job's step: a resumed job's step must go on
    from the checkpoint's, or its new checkpoints sort before the old one (latest() keeps returning
    the old one, and keep=K prunes the new ones first)."""
    job = parse_job({"model": {"name": "mlp", "args": {"input_shape": [4], "hidden": [3], "num_classes": 2}},
                     "data": {"shard_size": 4}, "training": {"epochs": 2},
                     "cluster": {"num_servers": 2, "num_workers": 2},
                     "checkpoint": {"every_steps": 10, "every_s": None}})
    layout = make_layout(param_shapes(mlp(input_shape=[4], hidden=[3], num_classes=2)), 2)
    old = CheckpointStore.name_for(500)
    resume = {"name": f"memory://r/{old}", "ledger": ShardLedger(10, 4, 2, job.training.seed).state_at({}), "step": 500,
              "examples": 2000, "restore": {"url": "memory://r", "name": old, "layout": layout.to_dict(), "full": True}}
    state = CoordinatorState(job, layout, 10, 0.0, "memory://r", resume)
    req = iter(range(1, 1000))

    def send(who: str, op: Op, **meta) -> list:
        if op != Op.REGISTER:
            meta.setdefault("node", who)
        return state.handle(who.encode(), Message(op, next(req), meta), 1.0)

    for rank in range(2):
        send(f"server-{rank}", Op.REGISTER, role="server", rank=rank, address=f"tcp://127.0.0.1:{7000 + rank}", host="t", pid=1)
    for rank in range(2):
        send(f"worker-{rank}", Op.REGISTER, role="worker", rank=rank, address=None, host="t", pid=1)
    for rank in range(2):
        send(f"worker-{rank}", Op.BARRIER, name="init")
        send(f"worker-{rank}", Op.HEARTBEAT, progress={"steps": 6, "examples": 24})  # 12 steps since the resume
    asked = [a.msg.meta["name"] for a in state.tick(1.5) if isinstance(a, Reply) and a.msg.op == Op.CHECKPOINT]
    assert len(asked) == 2 and state.checkpoints.pending is not None
    assert state.checkpoints.pending.step >= 500 and asked[0] > old, (
        f"after resuming from {old}, the next checkpoint is {asked[0]} (step {state.checkpoints.pending.step})")
