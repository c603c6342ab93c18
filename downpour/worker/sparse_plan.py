"""A batch's feature IDs as the sparse client moves them: made unique once, grouped by server.

A :class:`Plan` is made once per batch and input (two tables read from the same IDs, like Wide &
Deep's ``embedding`` and ``wide``, share it), with the split of its IDs by server. ``grouped``
plans order their unique IDs by the server that holds them (ascending within a server), so that
server ``s``'s IDs, the rows it returns and the gradients pushed back to it are each one
contiguous slice ``[bounds[s], bounds[s + 1])``: the rows of every reply are copied into the
batch's row buffer as whole blocks, and the pushes are views of the gradient, not gathers.
Other plans keep ``torch.unique``'s sorted order (server ``s``'s IDs are ``keys[order[...]]``):
autograd then sums each row's gradient in the same order as one process training alone, bit
for bit (a permuted row order changes the order of those float sums).

An :class:`Ahead` is the pull of one batch's rows sent before that batch's step (the
pipeline of ``sparse.prefetch``, see :class:`downpour.worker.sparse.SparseClient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements in the same memory, unchanged in place since (their
    shared version counter). A plan holds its tensor, so that memory cannot be handed to another
    batch while the plan lives."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.stride() == b.stride() and a._version == b._version)


def as_tensors(x: Inputs | None) -> tuple[torch.Tensor, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


@dataclass(eq=False)
class Plan:
    ids: torch.Tensor  # the flat IDs it was made from (any device)
    version: int
    keys: torch.Tensor  # unique IDs (CPU int64), grouped by server
    inverse: torch.Tensor  # ids == keys[inverse] (CPU int64)
    bounds: np.ndarray  # server s holds keys[bounds[s]:bounds[s + 1]] (of order, if not None)
    order: np.ndarray | None  # None: the keys are grouped by server
    source: int | None  # which input of its batch the IDs are, flattened (None: derived from one)

    def made_from(self, ids: torch.Tensor) -> bool:
        return same_tensor(self.ids, ids)

    def part(self, server: int) -> slice | np.ndarray:
        """Where server ``server``'s keys (and rows, and gradients) are: a slice if grouped."""
        a, b = int(self.bounds[server]), int(self.bounds[server + 1])
        return slice(a, b) if self.order is None else self.order[a:b]

    def size(self, server: int) -> int:
        return int(self.bounds[server + 1] - self.bounds[server])


def make_plan(ids: torch.Tensor, num_servers: int, server_of, grouped: bool, source: int | None = None) -> Plan:
    """The plan of flat int64 ``ids``; ``server_of(keys)`` gives each key's server (numpy)."""
    # numpy's unique: the same sorted keys and inverse as torch.unique, in about half its time
    # on a batch's ~13k IDs (one thread; it is the largest piece of a plan)
    k, inv = np.unique(ids.cpu().numpy().reshape(-1), return_inverse=True)
    k, inv = k.astype(np.int64, copy=False), inv.reshape(-1).astype(np.int64, copy=False)
    uniq, inverse = torch.from_numpy(k), torch.from_numpy(inv)
    if num_servers == 1:
        return Plan(ids, ids._version, uniq, inverse, np.array([0, len(uniq)]), None, source)
    srv = server_of(k)
    order = np.argsort(srv, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(srv, minlength=num_servers))])
    if not grouped:
        return Plan(ids, ids._version, uniq, inverse, bounds, order, source)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return Plan(ids, ids._version, torch.from_numpy(k[order]), torch.from_numpy(rank)[inverse], bounds, None, source)


@dataclass(eq=False)
class Ahead:
    """The rows of one batch pulled before its step: per table, the plan whose keys were pulled;
    per server, the request (future, table -> index of its rows in the reply) until answered, then
    the reply. ``pulls[s]`` is what the request asked of server ``s`` (to ask again after a failure)."""

    tables: dict[str, tuple[int, Plan]]  # table -> (dim, plan)
    requests: dict[int, tuple] = field(default_factory=dict)  # server -> (future, {table: at})
    pulls: dict[int, dict[str, tuple[int, np.ndarray]]] = field(default_factory=dict)
    replies: dict[int, tuple] = field(default_factory=dict)  # server -> (Message, {table: at})

    def serves(self, table: str, keys: torch.Tensor) -> bool:
        entry = self.tables.get(table)
        return entry is not None and entry[1].keys is keys

    def of(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Was pulled for the batch ``inputs`` (each plan's IDs are its input ``source``)?"""
        for _, plan in self.tables.values():
            i = plan.source
            if i is None or i >= len(inputs) or not plan.made_from(inputs[i].reshape(-1)):
                return False
        return True
