"""Checkpoints in one fsspec location: ``URL/ckpt-<step>/`` holding one file per server,
the coordinator's job state, and ``manifest.json``, written last.

A checkpoint exists only once its manifest does, so a half-written one is never
taken as the latest. The manifest records the SHA-256 and size of every file;
reading a file verifies both, and :meth:`CheckpointStore.latest` skips (and logs)
any checkpoint whose files are missing, truncated or altered, so the one before
it is used. Files hold JSON or safetensors, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from downpour.errors import DataError
from downpour.protocol.schema import SAFE_NAME

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_SAFE = re.compile(SAFE_NAME)
FORMAT = 1


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    name: str  # the checkpoint's folder, ckpt-<step>
    step: int  # optimizer steps of all workers together when it was taken
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    job: dict[str, Any] = field(default_factory=dict)  # what the coordinator adds (time, epoch, version ...)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "name": self.name, "step": self.step, "files": self.files, "job": self.job},
                          indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            d = json.loads(data)
            if type(d.get("format")) is not int or d["format"] != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
            files = {str(k): {"sha256": str(v["sha256"]), "bytes": int(v["bytes"])} for k, v in d["files"].items()}
            for name in [str(d["name"]), *files]:  # joined to paths: nothing that leaves the folder
                if not _SAFE.fullmatch(name):
                    raise ValueError(f"name {name!r:.80} is not a plain file name ({_SAFE.pattern})")
            return cls(str(d["name"]), int(d["step"]), files, dict(d.get("job") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{where}: not a valid checkpoint manifest: {err}") from None


def configured_location(run_dir: str) -> str | None:
    """The ``checkpoint.url`` the job of a run folder wrote its checkpoints to (its ``config.yaml``),
    or None: no such file, or checkpoints in the run folder."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f.read(MAX_MANIFEST_BYTES))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    cp = raw.get("checkpoint") if isinstance(raw, dict) else None
    url = cp.get("url") if isinstance(cp, dict) else None
    return url if isinstance(url, str) and url else None


def same_location(a: str, b: str) -> bool:
    """Whether two checkpoint locations (folders or URLs, as :func:`resolve_location` gives) are one."""
    norm = [x.rstrip("/") if "://" in x else os.path.abspath(x) for x in (a, b)]
    return norm[0] == norm[1]


def resolve_location(where: str) -> str:
    """A run folder means its ``checkpoints`` folder, or the ``checkpoint.url`` its job wrote to;
    anything else is taken as the store's URL."""
    if "://" not in where:
        inner = os.path.join(where, "checkpoints")
        if os.path.isdir(inner):
            return os.path.abspath(inner)
        url = configured_location(where) if os.path.isdir(where) else None
        if url is not None:
            return url if "://" in url else os.path.abspath(url)
        return os.path.abspath(where)
    return where


class CheckpointStore:
    """Checkpoints under ``url``; keeps the newest ``keep`` (older ones are deleted)."""

    def __init__(self, url: str, keep: int = 3) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:
            raise DataError(f"checkpoint storage {url!r}: {err}") from None
        self.keep = keep

    @staticmethod
    def name_for(step: int) -> str:
        return f"ckpt-{step:012d}"

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def where(self, name: str, file: str | None = None) -> str:
        """The URL of a checkpoint (or one of its files), for messages."""
        return "/".join([self.url, name, *([file] if file else [])])

    # -- writing ------------------------------------------------------------
    def write_file(self, name: str, file: str, data: bytes) -> dict[str, Any]:
        """Write one file of checkpoint ``name``; returns its manifest entry."""
        self.fs.makedirs(self._path(name), exist_ok=True)
        with self.fs.open(self._path(name, file), "wb") as f:
            f.write(data)
        return {"sha256": sha256_hex(data), "bytes": len(data)}

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest (which makes the checkpoint exist), then drop the oldest beyond ``keep``."""
        with self.fs.open(self._path(manifest.name, MANIFEST), "wb") as f:
            f.write(manifest.to_json())
        self.prune()

    def prune(self) -> None:
        """Delete the oldest checkpoints beyond ``keep``, except those a kept one still needs (the
        base and deltas of its sparse tables, listed in its manifest's ``job.needs``), and what those
        need in turn. Each server keeps its own chain, so a checkpoint kept for one server's deltas can
        name another server's base that no newer checkpoint needs; keeping it too leaves every
        checkpoint that remains restorable on its own."""
        committed = self.names()
        kept = committed[max(0, len(committed) - self.keep) :]
        needed: set[str] = set()
        todo, seen = list(kept), set(kept)
        while todo:
            name = todo.pop()
            try:
                more = {str(n) for n in self.manifest(name).job.get("needs") or []} - needed
            except (DataError, OSError) as err:  # a broken manifest protects nothing
                log.warning("checkpoint %s: %s", self.where(name), err)
                continue
            needed |= more
            todo.extend(n for n in more if n in committed and n not in seen)
            seen.update(more)
        for name in committed[: max(0, len(committed) - self.keep)]:
            if name not in needed:
                self.fs.rm(self._path(name), recursive=True)
        # Folders without a manifest older than the newest committed one are abandoned writes.
        if committed:
            for name in self._folders():
                if name < committed[-1] and name not in committed:
                    self.fs.rm(self._path(name), recursive=True)

    # -- reading ------------------------------------------------------------
    def _folders(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=False):
            base = posixpath.basename(str(entry).rstrip("/"))
            if base.startswith("ckpt-"):
                found.append(base)
        return sorted(found)

    def names(self) -> list[str]:
        """Checkpoints with a manifest, oldest first."""
        return [n for n in self._folders() if self.fs.exists(self._path(n, MANIFEST))]

    def manifest(self, name: str) -> Manifest:
        if not _SAFE.fullmatch(name):
            raise DataError(f"checkpoint name {name!r:.80} is not a plain folder name")
        self._size_at_most(self._path(name, MANIFEST), MAX_MANIFEST_BYTES, self.where(name, MANIFEST))
        with self.fs.open(self._path(name, MANIFEST), "rb") as f:
            manifest = Manifest.from_json(f.read(MAX_MANIFEST_BYTES + 1), self.where(name, MANIFEST))
        if manifest.name != name:
            raise DataError(f"{self.where(name, MANIFEST)} names another checkpoint ({manifest.name!r}): moved or altered")
        return manifest

    def read(self, manifest: Manifest, file: str) -> bytes:
        """A file of a checkpoint, verified against its manifest entry."""
        entry = manifest.files.get(file)
        if entry is None:
            raise DataError(f"{self.where(manifest.name)}: the manifest lists no file {file!r}")
        try:
            # The size before the read: a file larger than the manifest says is never read into memory.
            self._size_at_most(self._path(manifest.name, file), entry["bytes"], self.where(manifest.name, file))
            with self.fs.open(self._path(manifest.name, file), "rb") as f:
                data = f.read(entry["bytes"] + 1)
        except FileNotFoundError:
            raise DataError(f"{self.where(manifest.name, file)} is missing") from None
        if len(data) != entry["bytes"]:
            raise DataError(f"{self.where(manifest.name, file)} holds {len(data)} bytes, the manifest says {entry['bytes']} (truncated?)")
        if sha256_hex(data) != entry["sha256"]:
            raise DataError(f"{self.where(manifest.name, file)}: SHA-256 differs from the manifest (corrupt or altered)")
        return data

    def _size_at_most(self, path: str, limit: int, where: str) -> None:
        size = self.fs.size(path)
        if size is not None and size > limit:
            raise DataError(f"{where} holds {size} bytes, more than the {limit} expected (altered?)")

    def verify(self, manifest: Manifest) -> None:
        for file in manifest.files:
            self.read(manifest, file)

    def latest(self) -> Manifest | None:
        """The newest checkpoint whose files all verify; broken ones are logged and skipped."""
        for name in reversed(self.names()):
            try:
                manifest = self.manifest(name)
                self.verify(manifest)
                return manifest
            except DataError as err:
                log.warning("checkpoint %s refused, trying the one before: %s", self.where(name), err)
        return None
