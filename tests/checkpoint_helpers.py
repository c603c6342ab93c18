"""Checkpoint test helpers: memory:// locations, raw file access, a committed checkpoint, a shard
handed out by the data ledger, and servers' shard stores trained, snapshotted and committed
(the ``url`` and ``location`` fixtures are in conftest.py)."""

from __future__ import annotations

import time
import uuid

import fsspec
import torch

from downpour.config import SGDConfig
from downpour.coordinator.checkpointing import JOB_STATE
from downpour.coordinator.shards import ShardLedger
from downpour.layout import Layout, make_layout
from downpour.server.optim import make_rule
from downpour.server.snapshot import Snapshotter
from downpour.server.store import ShardStore
from downpour.storage import CheckpointStore, Manifest


def memory_url() -> str:
    return f"memory://t-{uuid.uuid4().hex}"



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



def truncate(data: bytes) -> bytes:
    return data[:-1]


def alter(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])  # same length, other bytes


def handed(ledger: ShardLedger, node: str) -> tuple[int, int]:
    shard = ledger.next(node)
    assert shard is not None
    return shard["epoch"], shard["shard"]


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

