"""One server's shard: its keys' values in one flat tensor, with a version per key.

The version of a key counts the updates applied to it. Requests name keys; the
store turns a key list into ranges of its flat tensor, merging neighbours so
that a request for all of a server's keys is one range (one kernel per
optimizer operation, however many keys).
"""

from __future__ import annotations

import torch

from downpour.errors import ProtocolError
from downpour.layout import KeySlice
from downpour.server.optim import UpdateRule


class ShardStore:
    def __init__(self, slices: list[KeySlice], rule_factory) -> None:
        self.keys = [s.key for s in slices]
        self.lengths = [s.length for s in slices]
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.numel = self.offsets[-1]
        self.data = torch.zeros(self.numel)
        self.versions = [0] * len(self.keys)
        self.rule: UpdateRule = rule_factory(self.numel)
        self.initialized = False
        self.all = list(range(len(self.keys)))  # resolve() returns this very list for "every key"

    # -- key resolution -------------------------------------------------
    def resolve(self, keys: object) -> list[int]:
        """Key list -> indices into this shard; raises ProtocolError for unknown or repeated keys."""
        if keys == self.keys and all(type(k) is int for k in keys):
            return self.all
        if not isinstance(keys, list) or not keys:
            raise ProtocolError("keys must be a non-empty list of integers")
        idx = []
        for k in keys:
            i = self.index.get(k) if type(k) is int else None
            if i is None:
                raise ProtocolError(f"key {k!r} is not held by this server")
            idx.append(i)
        if len(set(idx)) != len(idx):
            raise ProtocolError("a key appears twice in one request")
        return idx

    def size_of(self, idx: list[int]) -> int:
        return self.numel if idx is self.all else sum(self.lengths[i] for i in idx)

    def _runs(self, idx: list[int], by_version: bool) -> list[list[int]]:
        """[shard_lo, shard_hi, msg_lo, first_index] runs of adjacent keys (with equal versions)."""
        runs: list[list[int]] = []
        pos = 0
        for i in idx:
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if runs:
                r = runs[-1]
                if r[1] == lo and (not by_version or self.versions[r[3]] == self.versions[i]):
                    r[1] = hi
                    pos += hi - lo
                    continue
            runs.append([lo, hi, pos, i])
            pos += hi - lo
        return runs

    # -- operations -----------------------------------------------------
    def write(self, idx: list[int], values: torch.Tensor) -> None:
        for lo, hi, at, _ in self._runs(idx, by_version=False):
            self.data[lo:hi].copy_(values[at : at + hi - lo])

    def read(self, idx: list[int], snapshot: bool = True) -> torch.Tensor:
        """The keys' values, concatenated in request order. With ``snapshot=False`` a contiguous
        request returns a view of the live values: only for a caller that copies them before the
        next update (a send that copies, see ``downpour.transport.send_copies``)."""
        runs = self._runs(idx, by_version=False)
        if len(runs) == 1:
            lo, hi, _, _ = runs[0]
            return self.data[lo:hi].clone() if snapshot else self.data[lo:hi]
        return torch.cat([self.data[lo:hi] for lo, hi, _, _ in runs])

    def apply(self, idx: list[int], grad: torch.Tensor) -> None:
        """One optimizer step on the keys, with ``grad`` concatenated in request order."""
        for lo, hi, at, first in self._runs(idx, by_version=True):
            self.rule.apply(self.data, grad[at : at + hi - lo], lo, hi, self.versions[first])
        for i in idx:
            self.versions[i] += 1

    def version(self, idx: list[int]) -> int:
        """The newest version among the keys."""
        return max(self.versions[i] for i in idx)
