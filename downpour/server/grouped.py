"""Consistency per parameter group: one policy per group of a server's keys, one reply per request.

With ``training.consistency_groups`` (for example sync for the dense layers and
async for the rest, as Persia runs dense and embedding parameters) each key of a
server follows its group's policy. A push that spans groups is split into one
sub-push per group; each policy handles its part as it would a whole push
(async applies at once, sync waits for its round, ssp holds the reply), and the
worker gets one reply once every part is answered, with each key's own version
(``meta.kv``) so that its next push names the right round for each group.

Every part is checked (``Policy.refuse``) before any part is applied, so a push
is applied whole or not at all.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from downpour.config import TrainingConfig
from downpour.layout import Layout
from downpour.protocol import Message, Op
from downpour.server.consistency import POLICIES, Policy, Push, Reply, values_reply
from downpour.server.store import ShardStore


def key_modes(training: TrainingConfig, layout: Layout, server: int) -> list[str]:
    """The consistency of each of ``server``'s keys (in store order), from the parameter groups."""
    out = []
    for s in layout.server_slices(server):
        p = next(p for p in layout.params if p.offset <= s.start < p.offset + p.numel)
        group = next((g for g in training.consistency_groups if any(fnmatch.fnmatchcase(p.name, pat) for pat in g.params)), None)
        out.append(group.consistency if group is not None else training.consistency)
    return out


@dataclass
class _Request:
    push: Push
    parts: int
    positions: list[list[int]] = field(default_factory=list)  # per part: its keys' positions in the request
    answers: dict[int, Message] = field(default_factory=dict)  # part -> its policy's reply


class GroupedPolicy(Policy):
    def __init__(self, store: ShardStore, record_staleness: Callable[[int], None], training: TrainingConfig,
                 modes: list[str]) -> None:
        super().__init__(store, record_staleness, training)
        self.mode_of = modes
        groups: dict[str, list[int]] = {}
        for i, mode in enumerate(modes):
            groups.setdefault(mode, []).append(i)
        self.policies: dict[str, Policy] = {m: POLICIES[m](store, record_staleness, training, keys) for m, keys in groups.items()}
        self.pending: dict[int, tuple[_Request, int]] = {}  # sub-push token -> (request, part)
        self._next = 1
        self._checked: tuple[Push, list] | None = None

    def _split(self, p: Push) -> list[tuple[Policy, Push, list[int]]]:
        by_mode: dict[str, list[int]] = {}
        for pos, i in enumerate(p.idx):
            by_mode.setdefault(self.mode_of[i], []).append(pos)
        offsets = [0]
        for i in p.idx:
            offsets.append(offsets[-1] + self.store.lengths[i])
        parts = []
        for mode, positions in by_mode.items():
            idx = [p.idx[pos] for pos in positions]
            if len(positions) == len(p.idx):
                grad = p.grad
            else:
                grad = torch.cat([p.grad[offsets[pos] : offsets[pos + 1]] for pos in positions])
            version = max(p.key_versions[pos] for pos in positions) if p.key_versions is not None else p.version
            token, self._next = self._next, self._next + 1
            sub = replace(p, msg=Message(p.msg.op, token, {}), idx=idx, grad=grad, version=version, pull=None, key_versions=None)
            parts.append((self.policies[mode], sub, positions))
        return parts

    def refuse(self, p: Push) -> Reply | None:
        parts = self._split(p)
        self._checked = (p, parts)  # push() reuses the split of the push just checked
        for policy, sub, _ in parts:
            refused = policy.refuse(sub)
            if refused is not None:
                return p.peer, Message(Op.ERROR, p.msg.req_id, refused[1].meta)
        return None

    def push(self, p: Push) -> list[Reply]:
        checked = self._checked
        self._checked = None
        if checked is None or checked[0] is not p:
            refused = self.refuse(p)
            if refused is not None:
                return [refused]
            checked = self._checked
            self._checked = None
        parts = checked[1]
        req = _Request(p, len(parts), [positions for _, _, positions in parts])
        out: list[Reply] = []
        for n, (policy, sub, _) in enumerate(parts):
            self.pending[sub.msg.req_id] = (req, n)
            out += self._collect(policy.push(sub))
        return out

    def set_workers(self, workers: set[str]) -> list[Reply]:
        out: list[Reply] = []
        for policy in self.policies.values():
            out += self._collect(policy.set_workers(workers))
        return out

    def restored(self) -> None:
        for policy in self.policies.values():
            policy.restored()

    def freeze(self) -> list[Reply]:
        out: list[Reply] = []
        for policy in self.policies.values():
            out += self._collect(policy.freeze())
        return out

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for policy in self.policies.values():
            out.update(policy.stats())
        return out

    def _collect(self, replies: list[Reply]) -> list[Reply]:
        """Sub-push replies in, whole-request replies out (once every part of a request answered)."""
        out: list[Reply] = []
        for _, msg in replies:
            found = self.pending.pop(msg.req_id, None)
            if found is None:
                continue
            req, n = found
            if msg.op == Op.ERROR:  # cannot happen after refuse(); answer with it and forget the rest
                out.append((req.push.peer, Message(Op.ERROR, req.push.msg.req_id, msg.meta)))
                for token in [t for t, (r, _) in self.pending.items() if r is req]:
                    del self.pending[token]
                continue
            if msg.tensors:  # a view of the live shard: keep the values of this moment
                msg.tensors = [t.clone() for t in msg.tensors]
            req.answers[n] = msg
            if len(req.answers) == req.parts:
                out.append((req.push.peer, self._merge(req)))
        return out

    def _merge(self, req: _Request) -> Message:
        p = req.push
        versions = [0] * len(p.idx)
        for n, positions in enumerate(req.positions):
            for pos in positions:
                versions[pos] = int(req.answers[n].meta["version"])
        if not p.wants_values:
            return p.msg.reply({"version": max(versions), "kv": versions})
        lengths = [self.store.lengths[i] for i in p.idx]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        values = torch.empty(offsets[-1])
        for n, positions in enumerate(req.positions):
            part, at = req.answers[n].tensors[0], 0
            for pos in positions:
                values[offsets[pos] : offsets[pos + 1]] = part[at : at + lengths[pos]]
                at += lengths[pos]
        reply = values_reply(p.msg, max(versions), values, p.pull)
        reply.meta["kv"] = versions
        return reply
