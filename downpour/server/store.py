"""One server's shard: its keys' values in one flat tensor, with a version per key.

The version of a key counts the updates applied to it. Requests name keys; the
store turns a key list into ranges of its flat tensor, merging neighbours so
that a request for all of a server's keys is one range (one kernel per
optimizer operation, however many keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from downpour.errors import ProtocolError
from downpour.layout import KeySlice
from downpour.server.optim import UpdateRule
from downpour.server.scaling import Hyperparams

if TYPE_CHECKING:
    from downpour.server.lookahead import Lookahead

_LEND_WAIT_S = 0.05  # longest wait for a zero-copy reply before copying the shard instead


class ShardStore:
    max_keys = 1 << 16  # keys one request may name (cluster.max_keys_per_request)

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
        # Job steps per key: updates workers pushed to it (a sync round of n counts n), the clock
        # of schedules and scaling. ``hyper`` (server/scaling.py) sets the rule's lr and momentum
        # for each update; None leaves the rule's own.
        self.steps = [0] * len(self.keys)
        self.hyper: Hyperparams | None = None
        # Per-worker momentum of ``async_rule: lookahead`` (server/lookahead.py); None: the rule's own.
        self.lookahead: Lookahead | None = None
        self.rule: UpdateRule = rule_factory(self.numel)
        self.key_initialized = [False] * len(self.keys)
        self.initialized = False  # every key has its initial value
        self.all = list(range(len(self.keys)))
        # (lo, hi, tracker) of sends that lent data[lo:hi] to the transport (zero-copy replies).
        self.lent: list[tuple[int, int, object]] = []  # resolve() returns this very list for "every key"

    # -- key resolution -------------------------------------------------
    def resolve(self, keys: object) -> list[int]:
        """Key list -> indices into this shard; raises ProtocolError for unknown or repeated keys."""
        if keys == self.keys and all(type(k) is int for k in keys):
            return self.all
        if not isinstance(keys, list) or not keys:
            raise ProtocolError("keys must be a non-empty list of integers")
        if len(keys) > self.max_keys:
            raise ProtocolError(f"{len(keys)} keys in one request; the limit is {self.max_keys}")
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
    def lend(self, t: torch.Tensor, tracker) -> None:
        """Record that ``t`` (a view of ``data``) is being sent without a copy until ``tracker.done``."""
        lo = (t.data_ptr() - self.data.data_ptr()) // self.data.element_size()
        self.lent.append((lo, lo + t.numel(), tracker))

    def _before_change(self, runs: list[list[int]]) -> None:
        """Before ``runs`` change: a reply still being sent from memory they overlap is waited
        for (briefly: sends to a local peer finish in microseconds); if it takes longer, the shard
        moves to a fresh copy and the old memory is left to the send (copy-on-write)."""
        if not self.lent:
            return
        pending = []
        for lo, hi, tracker in self.lent:
            if tracker.done:
                continue
            if any(lo < r[1] and r[0] < hi for r in runs):
                try:
                    tracker.wait(_LEND_WAIT_S)
                    continue
                except Exception:  # zmq.NotDone: give the send the old memory
                    self.data = self.data.clone()
                    self.lent.clear()
                    return
            pending.append((lo, hi, tracker))
        self.lent = pending

    def write(self, idx: list[int], values: torch.Tensor) -> None:
        self._before_change(self._runs(idx, by_version=False))
        for lo, hi, at, _ in self._runs(idx, by_version=False):
            self.data[lo:hi].copy_(values[at : at + hi - lo])

    def init_keys(self, idx: list[int], values: torch.Tensor) -> int:
        """Write initial values of the keys not initialized yet; returns how many keys were written."""
        fresh, at = [], 0
        for i in idx:
            n = self.lengths[i]
            if not self.key_initialized[i]:
                fresh.append((i, at))
            at += n
        if fresh:
            self._before_change([[self.offsets[i], self.offsets[i + 1]] for i, _ in fresh])
        for i, pos in fresh:
            self.data[self.offsets[i] : self.offsets[i + 1]].copy_(values[pos : pos + self.lengths[i]])
            self.key_initialized[i] = True
        self.initialized = all(self.key_initialized)
        return len(fresh)

    def read(self, idx: list[int], snapshot: bool = True) -> torch.Tensor:
        """The keys' values, concatenated in request order. With ``snapshot=False`` a contiguous
        request returns a view of the live values: for a caller that either copies them before the
        next change or registers its send's trackers in ``lent`` (copy-on-write)."""
        runs = self._runs(idx, by_version=False)
        if len(runs) == 1:
            lo, hi, _, _ = runs[0]
            return self.data[lo:hi].clone() if snapshot else self.data[lo:hi]
        return torch.cat([self.data[lo:hi] for lo, hi, _, _ in runs])

    def apply(self, idx: list[int], grad: torch.Tensor, delta: bool = False, pushes: int = 1,
              out: torch.Tensor | None = None) -> None:
        """One optimizer step on the keys, with ``grad`` concatenated in request order (the mean
        of ``pushes`` workers' gradients in a sync round). With ``delta`` the values are added to
        the keys instead (no optimizer, no state change). ``out``: where the keys' new values go
        too, in request order (a reply's memory; it may be ``grad``'s own)."""
        runs = self._runs(idx, by_version=True)
        self._before_change(runs)
        for lo, hi, at, first in runs:
            o = None if out is None else out[at : at + hi - lo]
            if delta:
                self.data[lo:hi].add_(grad[at : at + hi - lo])
            else:
                if self.hyper is not None:
                    self.hyper.set_rule(self.rule, self.steps[first], pushes)
                if o is not None and self.rule.fuses_out:
                    self.rule.apply(self.data, grad[at : at + hi - lo], lo, hi, self.versions[first], out=o)
                    continue
                self.rule.apply(self.data, grad[at : at + hi - lo], lo, hi, self.versions[first])
            if o is not None:
                o.copy_(self.data[lo:hi])
        for i in idx:
            self.versions[i] += 1
            self.steps[i] += pushes

    def apply_mean(self, idx: list[int], grads: list[torch.Tensor], weights: list[float], outs: list[torch.Tensor],
                   pushes: int) -> None:
        """A sync round's step on the keys: :meth:`apply` with the weighted mean of ``grads`` (each
        concatenated in request order, summed in the order given) in the same pass, the new values
        also into each of ``outs`` (replies' memory, in request order; one may be a gradient's own).
        Only for a rule that ``fuses_mean``."""
        runs = self._runs(idx, by_version=True)
        self._before_change(runs)
        for lo, hi, at, first in runs:
            if self.hyper is not None:
                self.hyper.set_rule(self.rule, self.steps[first], pushes)
            n = hi - lo
            whole = at == 0 and n == grads[0].numel()  # (one run over the whole request: no views to make)
            self.rule.apply_mean(self.data, grads if whole else [g[at : at + n] for g in grads], weights, lo, hi,
                                 self.versions[first], outs if whole else [o[at : at + n] for o in outs])
        for i in idx:
            self.versions[i] += 1
            self.steps[i] += pushes

    def shares_memory(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() == self.data.untyped_storage().data_ptr()

    def version(self, idx: list[int]) -> int:
        """The newest version among the keys."""
        return max(self.versions) if idx is self.all else max(self.versions[i] for i in idx)
