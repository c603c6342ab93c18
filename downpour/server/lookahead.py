"""Look-ahead momentum for async and ssp: ``optimizer.scaling_options.async_rule: lookahead``.

DANA (Hakimi et al., "Taming Momentum in a Distributed Asynchronous Environment", 2019). The
server keeps one momentum buffer per worker instead of one for all, and answers a worker's push
with the parameters it will have once the other workers' momentum has been applied once more,
which happens before that worker's next push arrives:

    on a push g from worker i:   v_i ← μ v_i + g        θ ← θ − lr v_i
    the values sent to worker i: θ − lr μ Σ_{j≠i} v_j

With n workers each buffer is updated once a round, so the n buffers together move the
parameters like the one momentum buffer of a sync job under the linear scaling rule (lr × n on
the mean gradient, momentum μ per round), and a worker's next gradient is taken about where it
will be applied: only the fresh gradients pushed in between are stale, not the momentum that
dominates the motion. With a look-ahead over every buffer, the worker's own included, this is
DANA-Zero, and one worker trains with Nesterov momentum; without its own, one worker trains
exactly as the job states (a test checks it bit for bit). The rule's lr and momentum are the
job's (and its schedule); nothing depends on the measured staleness.

Cost: n buffers of the shard's size per server (n the workers that pushed to it; the SGD rule's
own buffer is then not kept), and the values of each reply (they differ from the stored ones),
computed in the same pass over memory as the update (server/kernels.py: compiled where built,
one pass instead of six, and written straight into a shared-memory slot where the request came
through one). A worker that leaves the membership has its buffer dropped: its momentum will
never be applied, so it no longer counts in the look-ahead (docs/scaling.md says why dropping,
not folding it into the values). The buffers, keyed by worker name, go to a backup with the
server's state and into checkpoints (``lookahead.<worker>`` in the shard file, server/snapshot.py),
so a resumed job's workers go on with their momentum.
"""

from __future__ import annotations

import torch

from downpour.config import JobConfig
from downpour.server import kernels
from downpour.server.store import ShardStore


def make_lookahead(job: JobConfig, store: ShardStore) -> Lookahead | None:
    """The look-ahead for ``store`` when ``job`` resolves to ``async_rule: lookahead`` and has keys
    in async or ssp (a sync round needs none); None otherwise. ``store.hyper`` must be set. Where
    every key is async or ssp the rule's own momentum buffer is freed (never used, never saved: a
    checkpoint of an older version that holds it as zeros still loads, the zeros unread)."""
    t = job.training
    modes = {t.consistency, *(g.consistency for g in t.consistency_groups)}
    if store.hyper is None or store.hyper.plan.async_rule != "lookahead" or not modes & {"async", "ssp"}:
        return None
    opt = job.optimizer
    if modes <= {"async", "ssp"}:  # (a sync group's keys still take the rule's momentum)
        store.rule.yield_momentum()
    return Lookahead(store, opt.weight_decay, opt.dampening, opt.nesterov)


class Lookahead:
    """One server's per-worker momentum buffers (keyed by worker name: the pushing peer's routing id). The
    store's ``hyper`` sets :attr:`lr` and :attr:`momentum` before each update, as for a rule; the
    update itself is the SGD rule's (weight decay, dampening, nesterov), on the worker's buffer."""

    def __init__(self, store: ShardStore, weight_decay: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False) -> None:
        self.store = store
        self.weight_decay, self.dampening, self.nesterov = weight_decay, dampening, nesterov
        self.lr, self.momentum = 0.0, 0.0
        self.buffers: dict[str, torch.Tensor] = {}
        self.total = torch.zeros(store.numel)  # Σ_j v_j

    def apply(self, who: str, idx: list[int], grad: torch.Tensor) -> None:
        """Worker ``who``'s gradient on keys ``idx`` (concatenated in request order): one update,
        counted in the keys' versions and job steps as the store counts its own."""
        self.step(who, idx, grad)

    def step(self, who: str, idx: list[int], grad: torch.Tensor, reply: bool = False,
             into: torch.Tensor | None = None) -> torch.Tensor | None:
        """:meth:`apply`, and with ``reply`` the values ``who`` is then sent, in the same pass over
        memory (server/kernels.py): written into ``into`` when given (a request's shared-memory
        slot; it may be ``grad``'s own memory), else into a fresh tensor. Returns them, or None
        where they are the stored values (no other worker's momentum is pending) and no ``into``
        was given, as :meth:`values` does."""
        store = self.store
        if store.hyper is not None:
            store.hyper.set_rule(self, store.steps[idx[0]])
        v = self.buffers.get(who)
        if v is None:
            v = self.buffers[who] = torch.zeros(store.numel)
        own = len(self.buffers) > 1  # a look-ahead over the others' momentum (else: the stored values)
        out = into if into is not None or not (reply and own) else torch.empty(store.size_of(idx))
        mu, c = self.momentum, self.lr * self.momentum
        runs = store._runs(idx, by_version=False)
        store._before_change(runs)
        for lo, hi, at, _ in runs:
            kernels.lookahead(store.data, v, self.total, grad, out if reply else None, lo=lo, hi=hi, at=at, lr=self.lr,
                              momentum=mu, weight_decay=self.weight_decay, dampening=self.dampening,
                              nesterov=self.nesterov, c=c, own=own)
        for i in idx:
            store.versions[i] += 1
            store.steps[i] += 1
        return out if reply else None

    def values(self, idx: list[int], who: str) -> torch.Tensor | None:
        """The keys' values worker ``who`` is sent, in request order: θ − lr μ Σ_{j≠who} v_j
        (None: no other worker's momentum is pending, the stored values are sent)."""
        own = self.buffers.get(who)
        if not self.buffers or (own is not None and len(self.buffers) == 1):
            return None
        data, c = self.store.data, self.lr * self.momentum
        parts = []
        for lo, hi, _, _ in self.store._runs(idx, by_version=False):
            x = torch.add(data[lo:hi], self.total[lo:hi], alpha=-c)
            parts.append(x if own is None else x.add_(own[lo:hi], alpha=c))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def keep(self, workers: set[str]) -> None:
        """Drop the buffers of workers not in ``workers`` (they left, died, or are not in this job:
        a resumed checkpoint's), and sum the rest again: Σ v_j is then exact, not carried with the
        rounding of every update since the last change."""
        gone = [w for w in self.buffers if w not in workers]
        for who in gone:
            del self.buffers[who]
        if gone:
            self._sum()

    def state(self) -> dict[str, torch.Tensor]:
        """The buffers by worker name (the live tensors: a caller that keeps them copies them)."""
        return dict(self.buffers)

    def load(self, buffers: dict[str, torch.Tensor], total: torch.Tensor | None = None) -> None:
        """Replace the buffers (a backup taking its primary's state, a server resuming a
        checkpoint), and their sum when given (so the replies continue bit for bit; without it
        it is summed again). Each must be float32 of the shard's size: callers check their input
        first and name it; this raises ValueError."""
        for who, v in [*buffers.items(), *([("(their sum)", total)] if total is not None else [])]:
            if v.dtype != torch.float32 or tuple(v.shape) != (self.store.numel,):
                raise ValueError(f"look-ahead buffer {who}: {v.dtype} {tuple(v.shape)}, expected float32 ({self.store.numel},)")
        self.buffers = {w: v.clone() for w, v in buffers.items()}
        if total is not None and self.buffers:
            self.total = total.clone()
        else:
            self._sum()

    def _sum(self) -> None:
        self.total = torch.zeros(self.store.numel)
        for v in self.buffers.values():
            self.total.add_(v)
