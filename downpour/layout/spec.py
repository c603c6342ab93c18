"""The key layout: which slice of which parameter is stored under which key, on which server.

A model's parameters are laid end to end in one flat vector (in
``named_parameters`` order); ``ParamSpec.offset`` is where each starts. A key is a
contiguous range ``[start, start + length)`` of that flat vector, held by one
server. Every element belongs to exactly one key (checked by :meth:`Layout.validate`).

Sparse embedding tables (``downpour.nn.SparseEmbedding``) are listed by name and row width;
every server holds a part of every table, the rows whose feature ID hashes to it
(:meth:`Layout.sparse_servers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour.errors import ConfigError
from downpour.hashing import mix

# Salt of the hash that places a feature ID on a server: independent of the hash that places
# it in a server's index (the same hash would leave each server only its own residue of slots).
SERVER_SALT = 0x9E3779B97F4A7C15
_SERVER_SALT = np.uint64(SERVER_SALT)


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the flat vector
    numel: int


@dataclass(frozen=True, slots=True)
class KeySlice:
    key: int
    server: int
    start: int  # first element in the flat vector
    length: int  # elements

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    dim: int  # floats per row


@dataclass(frozen=True)
class Layout:
    params: tuple[ParamSpec, ...]
    slices: tuple[KeySlice, ...]  # ordered by key
    num_servers: int
    dtype: str  # wire dtype name of every parameter, e.g. "f32"
    tables: tuple[TableSpec, ...] = ()  # sparse embedding tables, by name

    def table(self, name: str) -> TableSpec | None:
        return next((t for t in self.tables if t.name == name), None)

    def sparse_servers(self, keys: np.ndarray) -> np.ndarray:
        """The server holding each feature ID (int64 array in, int64 array out)."""
        return (mix(keys.view(np.uint64) ^ _SERVER_SALT) >> np.uint64(33)).astype(np.int64) % self.num_servers

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def server_slices(self, server: int) -> list[KeySlice]:
        """The keys one server holds, in key order (the order of its flat shard)."""
        return [s for s in self.slices if s.server == server]

    def describe(self, s: KeySlice) -> str:
        """A key as people read it: the parameter and the element range it covers, e.g. ``0.weight[0:50176]``."""
        for p in self.params:
            if p.offset <= s.start < p.offset + p.numel:
                lo = s.start - p.offset
                whole = lo == 0 and s.length == p.numel
                return p.name if whole else f"{p.name}[{lo}:{lo + s.length}]"
        return f"key {s.key}"

    def server_numel(self, server: int) -> int:
        return sum(s.length for s in self.slices if s.server == server)

    def validate(self) -> None:
        offset = 0
        for p in self.params:
            numel = 1
            for d in p.shape:
                numel *= d
            if p.offset != offset or p.numel != numel or numel <= 0:
                raise ConfigError(f"layout parameter {p.name}: offset {p.offset} / numel {p.numel} contradict shape {p.shape}")
            offset += numel
        covered = sorted((s.start, s.stop) for s in self.slices)
        pos = 0
        for start, stop in covered:
            if start != pos or stop <= start:
                raise ConfigError(f"layout does not tile the parameters: gap or overlap at element {pos}")
            pos = stop
        if pos != self.numel:
            raise ConfigError(f"layout covers {pos} of {self.numel} elements")
        if [s.key for s in self.slices] != list(range(len(self.slices))):
            raise ConfigError("layout keys must be 0..n-1 in order")
        if any(not 0 <= s.server < self.num_servers for s in self.slices):
            raise ConfigError("layout names a server outside 0..num_servers-1")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names) or any(not n or t.dim < 1 for n, t in zip(names, self.tables)):
            raise ConfigError(f"layout tables must have distinct names and a positive dim: {self.tables}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": [[p.name, list(p.shape), p.offset, p.numel] for p in self.params],
            "slices": [[s.key, s.server, s.start, s.length] for s in self.slices],
            "num_servers": self.num_servers,
            "dtype": self.dtype,
            "tables": [[t.name, t.dim] for t in self.tables],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        try:
            layout = cls(
                params=tuple(ParamSpec(str(n), tuple(int(x) for x in shape), int(o), int(k)) for n, shape, o, k in d["params"]),
                slices=tuple(KeySlice(int(k), int(srv), int(st), int(ln)) for k, srv, st, ln in d["slices"]),
                num_servers=int(d["num_servers"]),
                dtype=str(d["dtype"]),
                tables=tuple(TableSpec(str(n), int(dim)) for n, dim in d.get("tables", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"malformed layout: {err}") from None
        layout.validate()
        return layout
