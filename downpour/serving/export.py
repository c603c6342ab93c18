"""Exports for serving, written from checkpoints: a full snapshot, then deltas.

``EXPORT_URL/v-<version>/`` (any fsspec URL) holds ``model.safetensors`` and, written last,
``manifest.json``: the version, ``kind`` (``snapshot`` or ``delta``), the version it applies
on (``parent``), the precision, the SHA-256 and size of the file, the checkpoint it came
from, the stream's partition offsets and the newest event time they include, the model's
config and its sparse tables. A version exists once its manifest does.

The file holds, per dense parameter, the changed slices (``slice_size`` elements each;
a snapshot: all of them) as ``d/<name>/idx`` and the encoded rows ``d/<name>/val``
(and ``/scale`` for int8), and per sparse table the changed rows: ``s/<table>/keys``,
``s/<table>/val`` (``/scale``), and ``s/<table>/evicted`` (rows gone). A delta holds only
what differs from the version before, so its size is about rows touched × row bytes.

:class:`Exporter` keeps the last exported state (float32) to diff against; a new exporter
(after a restart) starts with a snapshot, numbered after the versions already there.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
import time

import fsspec
import numpy as np
import torch
from safetensors.torch import save as st_save

from downpour.config import parse_job
from downpour.coordinator.checkpointing import JOB_STATE
from downpour.errors import DataError
from downpour.layout import Layout
from downpour.server.snapshot import OldParams
from downpour.server.sparse import make_table, read_chain
from downpour.serving.precision import PRECISIONS, encode
from downpour.storage import CheckpointStore, Manifest
from downpour.storage.checkpoints import sha256_hex
from downpour.stream.api import MAX_OFFSET

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"


def version_dir(version: int) -> str:
    return f"v-{version:012d}"


def list_versions(fs, root: str) -> list[int]:
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith("v-") and n[2:].isdigit():
            out.append(int(n[2:]))
    return sorted(out)


def event_time(data_url: str | None, offsets: dict | None) -> float | None:
    """The newest event time a set of Redis offsets include (an ID's milliseconds), else None."""
    if not data_url or not offsets or not data_url.startswith(("redis://", "rediss://")):
        return None
    ms = [int(o) >> 16 for o in offsets.values() if isinstance(o, int) and 0 < o < MAX_OFFSET]
    return max(ms) / 1000.0 if ms else None


class CheckpointState:
    """A checkpoint's whole model: dense parameters (flat float32 by name) and sparse tables
    (keys sorted, float32 rows), with the job it belongs to."""

    def __init__(self, store: CheckpointStore, manifest: Manifest) -> None:
        state = json.loads(store.read(manifest, JOB_STATE))
        self.job = parse_job(state["job"], source=store.where(manifest.name, JOB_STATE))
        self.layout = Layout.from_dict(state["layout"])
        old = OldParams(store, manifest, self.layout, lookahead=False)
        self.dense = {p.name: old.values[p.offset : p.offset + p.numel].numpy().copy() for p in self.layout.params}
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t.name: [] for t in self.layout.tables}
        for file in sorted(f for f in manifest.files if f.startswith("sparse-server-")):
            chain = read_chain(store, manifest, file)
            for t in self.layout.tables:
                replay = make_table(self.job.sparse.table(t.name), t.dim, self.job.training.seed)
                replay.restore([{k[len(t.name) + 1 :]: v for k, v in snap.items() if k.startswith(t.name + "/")} for snap in chain])
                snap = replay.snapshot(True)
                parts[t.name].append((snap["keys"], snap["values"]))
        self.tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t in self.layout.tables:
            keys = np.concatenate([k for k, _ in parts[t.name]]) if parts[t.name] else np.zeros(0, np.int64)
            vals = np.concatenate([v for _, v in parts[t.name]]) if parts[t.name] else np.zeros((0, t.dim), np.float32)
            order = np.argsort(keys, kind="stable")
            self.tables[t.name] = (keys[order], vals[order])
        self.manifest = manifest


def _changed_rows(prev: tuple[np.ndarray, np.ndarray] | None, new: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``new``'s rows that are new or differ from ``prev``, and ``prev``'s keys now gone."""
    keys, vals = new
    if prev is None or not len(prev[0]):
        return np.arange(len(keys)), np.zeros(0, np.int64)
    pk, pv = prev
    at = np.minimum(np.searchsorted(pk, keys), len(pk) - 1)
    found = pk[at] == keys
    changed = ~found
    changed[found] = (pv[at[found]] != vals[found]).any(axis=1)
    gone = pk[~np.isin(pk, keys, assume_unique=True)]
    return np.flatnonzero(changed), gone


class Exporter:
    """Writes a version for each checkpoint it is given: a snapshot first (and every
    ``full_every`` versions), deltas between."""

    def __init__(self, url: str, precision: str = "float32", full_every: int = 20, slice_size: int = 256,
                 data_url: str | None = None) -> None:
        if precision not in PRECISIONS:
            raise DataError(f"export.precision: {precision!r} is not one of {PRECISIONS}")
        self.url, self.precision, self.full_every, self.slice_size = url, precision, full_every, slice_size
        self.data_url = data_url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)
        done = list_versions(self.fs, self.root)
        self.version = done[-1] if done else 0
        self.prev: CheckpointState | None = None  # what the last version holds (float32)
        self.since_full = 0
        self.last_bytes = 0
        self.last_rows = 0

    def export(self, state: CheckpointState) -> int:
        """Write the next version from ``state``; returns its number."""
        full = self.prev is None or self.since_full + 1 >= self.full_every
        tensors: dict[str, torch.Tensor] = {}
        rows = 0
        for name, flat in state.dense.items():
            n_slices = -(-len(flat) // self.slice_size)
            padded = np.zeros(n_slices * self.slice_size, np.float32)
            padded[: len(flat)] = flat
            sl = padded.reshape(n_slices, self.slice_size)
            if full:
                idx = np.arange(n_slices)
            else:
                old = np.zeros_like(padded)
                old[: len(flat)] = self.prev.dense[name]
                idx = np.flatnonzero((old.reshape(n_slices, self.slice_size) != sl).any(axis=1))
            rows += len(idx)
            tensors[f"d/{name}/idx"] = torch.from_numpy(idx.astype(np.int64))
            for k, v in encode(sl[idx], self.precision).items():
                tensors[f"d/{name}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        for name, (keys, vals) in state.tables.items():
            idx, gone = _changed_rows(None if full else self.prev.tables.get(name), (keys, vals))
            rows += len(idx)
            tensors[f"s/{name}/keys"] = torch.from_numpy(np.ascontiguousarray(keys[idx]))
            tensors[f"s/{name}/evicted"] = torch.from_numpy(np.ascontiguousarray(gone.astype(np.int64)))
            for k, v in encode(vals[idx], self.precision).items():
                tensors[f"s/{name}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        data = st_save(tensors)
        version = self.version + 1
        folder = posixpath.join(self.root, version_dir(version))
        self.fs.makedirs(folder, exist_ok=True)
        with self.fs.open(posixpath.join(folder, MODEL_FILE), "wb") as f:
            f.write(data)
        offsets = state.manifest.job.get("stream")
        job = state.job
        manifest = {
            "format": FORMAT, "version": version, "kind": "snapshot" if full else "delta",
            "parent": None if full else self.version, "precision": self.precision, "slice_size": self.slice_size,
            "files": {MODEL_FILE: {"sha256": sha256_hex(data), "bytes": len(data)}},
            "checkpoint": state.manifest.name, "checkpoint_time": state.manifest.job.get("time"), "stream": offsets,
            "event_time": event_time(self.data_url, offsets), "exported_at": time.time(), "rows": rows,
            "model": job.model.model_dump(mode="json"), "seed": job.training.seed,
            "tables": {t.name: {"dim": t.dim, "init": _init_kind(job, t.name), "init_scale": job.sparse.table(t.name).init_scale}
                       for t in state.layout.tables},
            "dense": {name: len(flat) for name, flat in state.dense.items()},
        }
        # Last, and whole: written under another name and renamed, so that a follower polling
        # meanwhile finds no manifest (later) rather than a partial one (which it would refuse).
        part = posixpath.join(folder, MANIFEST + ".part")
        with self.fs.open(part, "wb") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        self.fs.mv(part, posixpath.join(folder, MANIFEST))  # the version exists from now on
        self.version, self.prev = version, state
        self.since_full = 0 if full else self.since_full + 1
        self.last_bytes, self.last_rows = len(data), rows
        return version


def _init_kind(job, table: str) -> str:
    """How serving reads an ID without a row: as training's evaluation does (``peek``)."""
    cfg = job.sparse.table(table)
    if cfg.admit_after != 1 or cfg.admit_probability != 1 or cfg.optimizer.name == "ftrl":
        return "zeros"
    return "seeded"


class ExportThread:
    """Exports each committed checkpoint on a thread of its own (the coordinator's loop never
    waits for it); a newer checkpoint replaces one not yet started."""

    def __init__(self, exporter: Exporter, checkpoint_url: str) -> None:
        self.exporter, self.checkpoint_url = exporter, checkpoint_url
        self._want: str | None = None
        self._busy = False
        self._cv = threading.Condition()
        self.errors = 0
        threading.Thread(target=self._run, name="export", daemon=True).start()

    def committed(self, name: str) -> None:
        with self._cv:
            self._want = name
            self._cv.notify_all()

    def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._want is not None or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)

    def _run(self) -> None:
        store = CheckpointStore(self.checkpoint_url)
        while True:
            with self._cv:
                while self._want is None:
                    self._cv.wait()
                name, self._want, self._busy = self._want, None, True
            try:
                v = self.exporter.export(CheckpointState(store, store.manifest(name)))
                log.info("coordinator: exported %s as version %d (%d rows, %d bytes)", name, v, self.exporter.last_rows,
                         self.exporter.last_bytes)
            except Exception as err:  # a storage error: the next checkpoint exports again
                self.errors += 1
                log.warning("coordinator: exporting %s failed: %s", name, err)
            with self._cv:
                self._busy = False
                self._cv.notify_all()


def exported_through(export_url: str) -> str | None:
    """The checkpoint the newest version under ``export_url`` was made from (None: no version, or
    its manifest is unreadable)."""
    try:
        fs, root = fsspec.core.url_to_fs(export_url)
        versions = list_versions(fs, root)
        if not versions:
            return None
        with fs.open(posixpath.join(root, version_dir(versions[-1]), MANIFEST), "rb") as f:
            name = json.loads(f.read()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def export_all(checkpoint_url: str, export_url: str, precision: str = "float32", full_every: int = 20) -> list[int]:
    """Export every committed checkpoint under ``checkpoint_url`` in order (``downpour export``); those
    up to the one the export's newest version was made from are there already and are skipped."""
    store = CheckpointStore(checkpoint_url)
    names = store.names()
    if not names:
        there = "" if "://" in checkpoint_url or os.path.isdir(checkpoint_url) else " (no such folder)"
        raise DataError(f"{checkpoint_url}{there}: no committed checkpoint to export (a run folder of a job with "
                        "checkpoint.enabled, or its checkpoint.url)")
    ex = None
    out = []
    done = exported_through(export_url)
    for name in names:
        if done is not None and name <= done:  # (names sort by step)
            continue
        try:
            m = store.manifest(name)
        except (OSError, DataError):
            continue
        state = CheckpointState(store, m)
        if ex is None:
            ex = Exporter(export_url, precision, full_every, data_url=state.job.data.url)
        out.append(ex.export(state))
    return out
