"""Batches of a split's examples: Downpour's own splits, or any ``torch.utils.data.Dataset``.

The coordinator's shard ledger decides which examples a worker trains (a shard is a range
of the epoch's seeded example order). A worker turns its shard into example indices and asks
:class:`Batches` for them in batches:

* a Downpour :class:`~downpour.data.Split` (``take(indices)``) returns them in one call;
* a map-style ``torch.utils.data.Dataset`` goes through a ``DataLoader`` whose sampler is the
  shard's indices (:class:`ShardSampler`), with the job's loader options (``data.loader``:
  worker processes, ``collate_fn``, prefetch, pinned memory). The loader and its worker
  processes live as long as the worker (``persistent_workers``); only the sampler's indices change
  from shard to shard.

An ``IterableDataset`` has no indices, so the ledger cannot give each example to exactly one
worker once per epoch: it is refused as a training split (a clear :class:`DataError`), and
accepted as a test split, which the evaluator reads once, front to back.

A batch is ``(inputs, target)``: ``inputs`` a tensor or a tuple of tensors (the model is called
as ``model(*inputs)``), ``target`` a tensor with one row per example. A ``collate_fn`` must
return that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data import Dataset as TorchDataset

from downpour.config import LoaderConfig
from downpour.errors import DataError

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def is_torch_dataset(split: Any) -> bool:
    return isinstance(split, TorchDataset) and not hasattr(split, "take")


def check_split(split: Any, what: str, where: str, training: bool) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``split`` can serve as the ``what`` split."""
    if hasattr(split, "take") and hasattr(split, "__len__"):
        return
    if isinstance(split, IterableDataset):
        if training:
            raise DataError(f"{where}: the {what} split is a torch IterableDataset ({type(split).__name__}); the shard ledger "
                            "hands each worker example indices, which an IterableDataset does not have, so exactly-once "
                            "training could not hold. Give a map-style Dataset (__getitem__ and __len__)")
        return
    if isinstance(split, TorchDataset):
        try:
            len(split)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(f"{where}: the {what} split ({type(split).__name__}) has no __len__; the shard ledger needs "
                            "the number of examples") from None
        return
    raise DataError(f"{where}: the {what} split is a {type(split).__name__}, not a torch.utils.data.Dataset "
                    "or a Downpour Split (take/__len__)")


def split_len(split: Any) -> int:
    try:
        return len(split)
    except TypeError:  # an IterableDataset test split: its length is known once read
        return -1


class ShardSampler(Sampler[int]):
    """The indices of the shard being trained, in the order given; replaced per shard (:meth:`set`)."""

    def __init__(self) -> None:
        self.indices: Sequence[int] = []

    def set(self, indices: np.ndarray) -> None:
        self.indices = indices.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def as_batch(batch: Any, where: str) -> tuple[Inputs, torch.Tensor]:
    """A loader's batch as (inputs, target), or a :class:`DataError` saying what came instead."""
    if isinstance(batch, dict) and "target" in batch:
        x = batch.get("inputs", batch.get("input"))
        batch = (x, batch["target"])
    if isinstance(batch, dict):
        raise DataError(f"{where}: a batch must be (inputs, target), got a dict of {sorted(map(str, batch))[:8]}: name its "
                        "parts 'inputs' and 'target', or give data.loader.collate_fn, a function that makes the batch "
                        "(inputs, target)")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"{where}: a batch must be (inputs, target), got {type(batch).__name__}"
                        + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    if isinstance(x, list):
        x = tuple(x)
    if not isinstance(y, torch.Tensor) or not (isinstance(x, torch.Tensor) or (isinstance(x, tuple) and all(
            isinstance(t, torch.Tensor) for t in x))):
        raise DataError(f"{where}: a batch must hold tensors (inputs: a tensor or a tuple of tensors; target: a tensor), "
                        f"got ({type(x).__name__}, {type(y).__name__})")
    return x, y


class Batches:
    """``split``'s examples at given indices, batch by batch (see the module docstring)."""

    def __init__(self, split: Any, batch_size: int, cfg: LoaderConfig, pin_memory: bool = False, where: str = "data") -> None:
        self.split, self.batch_size, self.where = split, batch_size, where
        self.loader: DataLoader | None = None
        if is_torch_dataset(split):
            from downpour.imports import import_object

            collate = import_object(cfg.collate_fn, "data.loader.collate_fn") if cfg.collate_fn else None
            iterable = isinstance(split, IterableDataset)
            self.sampler = None if iterable else ShardSampler()
            workers = cfg.num_workers
            self.loader = DataLoader(
                split, batch_size=batch_size, sampler=self.sampler, collate_fn=collate, num_workers=workers,
                pin_memory=pin_memory or cfg.pin_memory, drop_last=False,
                prefetch_factor=cfg.prefetch_factor if workers else None,
                persistent_workers=workers > 0 and not iterable,
                multiprocessing_context=cfg.multiprocessing_context if workers else None)

    def __call__(self, indices: np.ndarray | None) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Batches of the examples at ``indices`` in that order (None: an iterable split, front to back)."""
        if indices is not None and len(indices) == 0:
            return
        if self.loader is None:
            x_all, y_all = self.split.take(indices)
            for b in range(0, len(y_all), self.batch_size):
                yield _rows(x_all, b, b + self.batch_size), y_all[b : b + self.batch_size]
            return
        if self.sampler is not None:
            self.sampler.set(indices if indices is not None else np.arange(len(self.split)))
        for batch in self.loader:
            yield as_batch(batch, self.where)

    def touch(self) -> None:
        """Read one example now (start-up), so that a lazily opened file is not read by the first step."""
        if self.loader is None:
            self.split.take(np.zeros(1, dtype=np.int64))
        elif self.sampler is not None and len(self.split):
            self.split[0]


def _rows(x: Inputs, lo: int, hi: int) -> Inputs:
    return x[lo:hi] if isinstance(x, torch.Tensor) else tuple(t[lo:hi] for t in x)
