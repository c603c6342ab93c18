"""Layers whose parameters live in the parameter servers' sparse tables.

:class:`SparseEmbedding` is an ``nn.Module`` like ``nn.Embedding`` (and, with ``mode``,
``nn.EmbeddingBag``) whose rows are not a ``Parameter`` of the model: they sit in a table
spread over the servers, keyed by 64-bit feature IDs, and only the rows a batch touches
travel. In ``forward`` the batch's IDs are made unique, their rows fetched once from the
module's :class:`RowSource`, and the output built from them; autograd then sums the
gradients of repeated IDs into one row each (the row tensor is the leaf), and the source
pushes those rows' gradients after ``backward``.

A worker attaches its client to every such module of the model (:func:`attach`);
:class:`LocalTables` is an in-process source for using a model outside a job (tests, notebooks).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from downpour.errors import ConfigError, DownpourError


class RowSource(Protocol):
    def rows(self, table: str, keys: torch.Tensor, dim: int, train: bool) -> torch.Tensor:
        """Rows of ``keys`` (unique int64 IDs), float32 [len(keys), dim]. With ``train`` the
        result is a leaf that requires grad, and the source pushes its gradient after backward."""
        ...

    # Optional: ``unique(ids) -> (keys, inverse)``, flat int64 IDs (any device) made unique in an
    # order of the source's choosing, with ``ids == keys[inverse]`` (both on the CPU). Without it,
    # ``torch.unique`` (sorted keys). The worker's client groups the keys by server and answers
    # repeated questions about the same IDs (two tables read from one input) without sorting again.


def _unique(source: RowSource, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fn = getattr(source, "unique", None)
    return fn(flat) if fn is not None else torch.unique(flat.cpu(), return_inverse=True)


class SparseEmbedding(nn.Module):
    """Rows of table ``table`` (``dim`` floats each) for int64 feature IDs of any shape.

    ``mode=None``: output shape ``ids.shape + (dim,)`` (``nn.Embedding``). ``mode="sum"`` or
    ``"mean"``: bags of IDs pooled to one row each (``nn.EmbeddingBag``): ``ids`` is [batch, bag],
    or, with ``offsets``, one flat list of IDs whose bag ``i`` starts at ``offsets[i]`` (jagged
    multi-hot features), optionally weighted by ``per_sample_weights`` (sum mode).

    ``padding_idx``: the ID that means "no feature". It reads as zeros, never gets a row on the
    servers and trains nothing; in a bag it is left out (as ``nn.EmbeddingBag``'s ``padding_idx``:
    a mean is over the other IDs, an all-padding bag is zeros).
    """

    def __init__(self, table: str, dim: int, mode: Literal["sum", "mean"] | None = None, padding_idx: int | None = None) -> None:
        super().__init__()
        if not isinstance(table, str) or not table or int(dim) < 1 or mode not in (None, "sum", "mean"):
            raise ConfigError(f"SparseEmbedding: bad table {table!r}, dim {dim!r} or mode {mode!r}")
        if padding_idx is not None and not isinstance(padding_idx, int):
            raise ConfigError(f"SparseEmbedding {table!r}: padding_idx must be an int ID, got {padding_idx!r}")
        self.table, self.dim, self.mode, self.padding_idx = table, int(dim), mode, padding_idx
        self.source: RowSource | None = None

    def extra_repr(self) -> str:
        return (f"table={self.table!r}, dim={self.dim}" + (f", mode={self.mode!r}" if self.mode else "")
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.source is None:
            raise DownpourError(f"SparseEmbedding {self.table!r} has no row source: run it in a Downpour job, "
                                "or attach(model, LocalTables(...))")
        if ids.dtype != torch.int64:
            raise ConfigError(f"SparseEmbedding {self.table!r} takes int64 feature IDs, got {ids.dtype}")
        if offsets is not None and (self.mode is None or ids.dim() != 1):
            raise ConfigError(f"SparseEmbedding {self.table!r}: offsets need mode sum or mean and 1-D ids, "
                              f"got mode={self.mode} and ids of shape {tuple(ids.shape)}")
        flat = ids.reshape(-1)
        pad = None
        if self.padding_idx is not None:
            flat = flat.cpu()
            pad = flat == self.padding_idx
            flat = flat.masked_fill(pad, 0) if pad.any() else flat
        uniq, inverse = _unique(self.source, flat[~pad] if pad is not None else flat)
        train = self.training and torch.is_grad_enabled()
        rows = self.source.rows(self.table, uniq, self.dim, train) if len(uniq) else torch.zeros(0, self.dim)
        rows = rows.to(ids.device)
        padding = None
        if pad is not None:  # padding IDs point at one extra row of zeros that is no table row
            index = torch.full(flat.shape, len(uniq), dtype=torch.int64)
            index[~pad] = inverse
            inverse, padding = index, len(uniq)
            rows = torch.cat([rows, rows.new_zeros(1, self.dim)])
        inverse = inverse.to(ids.device).view(ids.shape)
        if self.mode is None:
            return F.embedding(inverse, rows, padding_idx=padding)
        if offsets is None and ids.dim() != 2:
            raise ConfigError(f"SparseEmbedding {self.table!r} mode={self.mode}: ids must be [batch, bag] (or 1-D with "
                              f"offsets), got {tuple(ids.shape)}")
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               padding_idx=padding)


class TableEmbedding(nn.Module):
    """A sparse table frozen into plain PyTorch, for inference outside Downpour (see downpour/export.py).

    ``ids`` (sorted int64 feature IDs, a buffer) and ``weight`` (their rows) come from an export;
    ``forward`` takes the arguments of :class:`SparseEmbedding` and gives what it gave for every ID
    the table has a row for; ``padding_idx`` reads as zeros and, in a bag, is left out. An ID with
    no row reads as zeros (Downpour's own evaluation reads such an ID as the seeded initial row a
    first sighting would create, values within ``sparse.init_scale``). Only torch is needed to run it.
    """

    def __init__(self, num_rows: int, dim: int, mode: Literal["sum", "mean"] | None = None, padding_idx: int | None = None) -> None:
        super().__init__()
        self.dim, self.mode, self.padding_idx = int(dim), mode, padding_idx
        self.register_buffer("ids", torch.zeros(num_rows, dtype=torch.int64))
        self.weight = nn.Parameter(torch.zeros(num_rows, dim))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        n = len(self.ids)
        pos = torch.searchsorted(self.ids, ids).clamp(max=max(n - 1, 0))
        found = (self.ids[pos] == ids) if n else torch.zeros_like(ids, dtype=torch.bool)
        index = torch.where(found, pos, torch.full_like(pos, n))  # row n: zeros (no row for this ID)
        if self.padding_idx is not None:
            index = index.masked_fill(ids == self.padding_idx, n + 1)  # row n + 1: padding
        weight = torch.cat([self.weight, self.weight.new_zeros(2, self.dim)])
        if self.mode is None:
            return F.embedding(index, weight, padding_idx=n + 1 if self.padding_idx is not None else None)
        return F.embedding_bag(index, weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               padding_idx=n + 1 if self.padding_idx is not None else None)


def sparse_modules(model: nn.Module) -> list[SparseEmbedding]:
    return [m for m in model.modules() if isinstance(m, SparseEmbedding)]


def sparse_tables(model: nn.Module) -> list[tuple[str, int]]:
    """(name, dim) of every table the model's SparseEmbedding modules use, in first-use order.
    Two modules may share a table only with the same dim."""
    seen: dict[str, int] = {}
    for m in sparse_modules(model):
        if seen.setdefault(m.table, m.dim) != m.dim:
            raise ConfigError(f"table {m.table!r} is used with dim {seen[m.table]} and dim {m.dim}")
    return list(seen.items())


def attach(model: nn.Module, source: RowSource | None) -> None:
    """Make every SparseEmbedding of ``model`` read its rows from ``source``."""
    for m in sparse_modules(model):
        m.source = source


class LocalTables:
    """An in-process row source: one :class:`downpour.sparse.SparseTable` per table, each updated
    by its own row rule when :meth:`step` is called after ``backward`` (for use outside a job)."""

    def __init__(self, make_table) -> None:
        """``make_table(name, dim)`` returns the SparseTable for a table (called on first use)."""
        self.make_table = make_table
        self.tables: dict[str, object] = {}
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def _table(self, name: str, dim: int):
        t = self.tables.get(name)
        if t is None:
            t = self.tables[name] = self.make_table(name, dim)
        return t

    def rows(self, table: str, keys: torch.Tensor, dim: int, train: bool) -> torch.Tensor:
        t = self._table(table, dim)
        k = keys.numpy()
        out = torch.from_numpy(t.pull(k) if train else t.peek(k))
        if train:
            out.requires_grad_(True)
            self.pending.append((table, keys, out))
        return out

    def step(self) -> None:
        """Apply the gradients of the rows fetched since the last step (after ``backward``)."""
        for table, keys, rows in merge_row_grads(self.pending):
            self.tables[table].push(keys.numpy(), rows.numpy())
        self.pending = []


def merge_row_grads(fetched: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(table, unique keys, summed gradient rows) per table from the rows fetched for one batch
    (a table read by several modules, or several times, gets one entry). Rows without a
    gradient (not used by the loss) are left out."""
    by_table: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for table, keys, rows in fetched:
        if rows.grad is not None:
            by_table.setdefault(table, []).append((keys, rows.grad))
    out = []
    for table, parts in by_table.items():
        if len(parts) == 1:
            keys, grad = parts[0]
        else:
            keys, inverse = torch.unique(torch.cat([k for k, _ in parts]), return_inverse=True)
            grad = torch.zeros(len(keys), parts[0][1].shape[1]).index_add_(0, inverse, torch.cat([g for _, g in parts]))
        out.append((table, keys, grad.contiguous()))
    return out
