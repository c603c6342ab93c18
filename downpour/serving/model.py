"""The model a serving process answers with, and the follower that keeps it fresh.

:class:`ServedState` is one version: the dense parameters (float32, as exported) and each
sparse table's rows (keys sorted). Applying a delta builds a new state; the old one stays
untouched until the new one replaces it in one assignment, so a request in flight always
sees one whole version. :class:`Follower` polls the export for versions after the current
one: a snapshot replaces the state, a delta applies on its parent only; a version whose
file is missing, truncated or altered (SHA-256) is refused and counted, and serving stays
on the last good version (it tries again later, since a later snapshot may be good).
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from downpour.config import ModelConfig
from downpour.errors import DataError
from downpour.hashing import mix
from downpour.models import build_model
from downpour.nn import attach
from downpour.serving.export import MANIFEST, MODEL_FILE, list_versions, version_dir
from downpour.serving.precision import decode
from downpour.storage.checkpoints import sha256_hex

log = logging.getLogger(__name__)


@dataclass
class ServedState:
    version: int
    manifest: dict[str, Any]
    dense: dict[str, np.ndarray]  # flat float32 per parameter
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # keys (sorted), rows
    model: torch.nn.Module | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def event_time(self) -> float | None:
        return self.manifest.get("event_time")


def _apply(base: ServedState | None, manifest: dict[str, Any], data: bytes, where: str) -> ServedState:
    """The state of ``manifest``'s version: a snapshot alone, or a delta on ``base``."""
    try:
        t = st_load(data)
    except (SafetensorError, ValueError) as err:
        raise DataError(f"{where}: not a readable export file: {err}") from None
    prec, size = manifest["precision"], int(manifest["slice_size"])
    snapshot = manifest["kind"] == "snapshot"
    dense = {}
    for name, numel in manifest["dense"].items():
        n_slices = -(-int(numel) // size)
        flat = np.zeros(n_slices * size, np.float32)
        if not snapshot:
            flat[: int(numel)] = base.dense[name]
        idx = t.get(f"d/{name}/idx")
        if idx is None or idx.dtype != np.int64 or (len(idx) and (idx.min() < 0 or idx.max() >= n_slices)):
            raise DataError(f"{where}: parameter {name!r}: slice indices missing or out of range")
        parts = {k: t[f"d/{name}/{k}"] for k in ("val", "scale") if f"d/{name}/{k}" in t}
        rows = decode(parts, prec, size, f"{where} {name!r}")
        if len(rows) != len(idx):
            raise DataError(f"{where}: parameter {name!r}: {len(idx)} slice indices but {len(rows)} slices")
        flat.reshape(n_slices, size)[idx] = rows
        dense[name] = flat[: int(numel)]
    tables = {}
    for name, info in manifest["tables"].items():
        keys = t.get(f"s/{name}/keys")
        gone = t.get(f"s/{name}/evicted")
        if keys is None or keys.dtype != np.int64 or gone is None or gone.dtype != np.int64:
            raise DataError(f"{where}: table {name!r}: keys or evicted missing")
        parts = {k: t[f"s/{name}/{k}"] for k in ("val", "scale") if f"s/{name}/{k}" in t}
        rows = decode(parts, prec, int(info["dim"]), f"{where} {name!r}")
        if len(rows) != len(keys):
            raise DataError(f"{where}: table {name!r}: {len(keys)} keys but {len(rows)} rows")
        if snapshot:
            bk, bv = np.zeros(0, np.int64), np.zeros((0, int(info["dim"])), np.float32)
        else:
            bk, bv = base.tables[name]
        keep = ~np.isin(bk, np.concatenate([keys, gone]))
        k = np.concatenate([bk[keep], keys])
        v = np.concatenate([bv[keep], rows])
        order = np.argsort(k, kind="stable")
        tables[name] = (k[order], v[order])
    state = ServedState(int(manifest["version"]), manifest, dense, tables)
    state.model = _build(state)
    return state


class _Rows:
    """The row source of a served model: a table's exported rows; an ID without one reads as
    training's evaluation reads it (the seeded initial row, or zeros)."""

    def __init__(self, state: ServedState) -> None:
        self.state = state

    def rows(self, table: str, keys: torch.Tensor, dim: int, train: bool) -> torch.Tensor:
        k = keys.numpy()
        tk, tv = self.state.tables[table]
        info = self.state.manifest["tables"][table]
        out = np.zeros((len(k), dim), np.float32)
        at = np.minimum(np.searchsorted(tk, k), max(len(tk) - 1, 0))
        found = (tk[at] == k) if len(tk) else np.zeros(len(k), bool)
        out[found] = tv[at[found]]
        miss = np.flatnonzero(~found)
        if len(miss) and info["init"] == "seeded":
            out[miss] = _initial(k[miss], dim, int(self.state.manifest["seed"]), float(info["init_scale"]))
        return torch.from_numpy(out)


def _initial(keys: np.ndarray, dim: int, seed: int, scale: float) -> np.ndarray:
    """SparseTable.initial: a row's seeded initial value depends only on (seed, ID, column)."""
    cols = np.arange(dim, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix(mix(keys.view(np.uint64) ^ np.uint64(seed))[:, None] + cols[None, :])
    return ((h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) * 2 - 1) * np.float32(scale)


def _build(state: ServedState) -> torch.nn.Module:
    model = build_model(ModelConfig(**state.manifest["model"]), int(state.manifest["seed"]))
    params = dict(model.named_parameters())
    for name, flat in state.dense.items():
        p = params.get(name)
        if p is None or p.numel() != len(flat):
            raise DataError(f"export version {state.version}: parameter {name!r} does not fit the model")
        with torch.no_grad():
            p.copy_(torch.from_numpy(flat).view(p.shape))
    attach(model, _Rows(state))
    model.eval()
    _check_answers_criteo(model, state)
    return model


def _check_answers_criteo(model: torch.nn.Module, state: ServedState) -> None:
    """Serving answers click-through-rate requests (Criteo instances: dense features and feature IDs,
    :mod:`downpour.serving.app`): a model that cannot take one such instance is refused here, when its
    version is loaded, rather than failing every request."""
    from downpour.stream.api import RawEvent
    from downpour.stream.events import parse_events

    batch = parse_events([RawEvent(1, {"json": json.dumps({"label": 0})})], "a serving check", 0)
    try:
        with torch.no_grad():
            out = model(batch.dense, batch.ids)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise TypeError(f"one instance gave {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, not one logit")
    except Exception as err:  # noqa: BLE001  (any model: whatever it raises)
        name = state.manifest["model"].get("name") or state.manifest["model"].get("factory")
        raise DataError(f"export version {state.version}: its model ({name}) does not answer a Criteo instance (dense "
                        f"features and feature IDs, one click logit each): downpour serve serves click-through-rate "
                        f"models ({type(err).__name__}: {err})") from None


class Follower:
    """Loads the newest good version of an export and follows the ones after it."""

    def __init__(self, url: str, poll_s: float = 0.5) -> None:
        self.url, self.poll_s = url, poll_s
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.state: ServedState | None = None
        self.refused = 0
        self.refused_versions: set[int] = set()
        self.applied = 0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, version: int) -> tuple[dict[str, Any], bytes]:
        folder = posixpath.join(self.root, version_dir(version))
        where = f"{self.url.rstrip('/')}/{version_dir(version)}"
        try:
            with self.fs.open(posixpath.join(folder, MANIFEST), "rb") as f:
                manifest = json.loads(f.read())
            entry = manifest["files"][MODEL_FILE]
            with self.fs.open(posixpath.join(folder, MODEL_FILE), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(where) from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{where}: unreadable manifest: {err}") from None
        if len(data) != int(entry["bytes"]) or sha256_hex(data) != entry["sha256"]:
            raise DataError(f"{where}/{MODEL_FILE}: size or SHA-256 differs from its manifest (partial or altered)")
        return manifest, data

    def poll(self) -> bool:
        """Move to the newest version reachable from the current one; True if it moved."""
        versions = [v for v in list_versions(self.fs, self.root) if self.state is None or v > self.state.version]
        moved = False
        # The newest snapshot beats replaying deltas from far behind (and is the only way on from a refused delta).
        for v in versions:
            try:
                manifest, data = self._read(v)
            except FileNotFoundError:  # being written (no manifest yet): later
                break
            except DataError as err:
                self._refuse(v, err)
                continue
            kind, parent = manifest.get("kind"), manifest.get("parent")
            if kind == "delta" and (self.state is None or parent != self.state.version):
                continue  # not on what is served: wait for the next snapshot
            try:
                new = _apply(self.state if kind == "delta" else None, manifest, data, f"{self.url}/{version_dir(v)}")
            except (DataError, KeyError, TypeError, ValueError) as err:
                self._refuse(v, err)
                continue
            self.state = new  # one assignment: requests see the old or the new version, whole
            self.applied += 1
            moved = True
        return moved

    def _refuse(self, version: int, err: Exception) -> None:
        if version not in self.refused_versions:
            self.refused_versions.add(version)
            self.refused += 1
            log.warning("serve: refused export version %d (staying on %s): %s", version,
                        self.state.version if self.state else "none", err)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="export-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.poll()
            except Exception as err:  # storage trouble: keep serving, try again
                log.warning("serve: polling %s failed: %s", self.url, err)

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
