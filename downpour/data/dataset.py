"""The dataset contract every data source meets.

A :class:`Dataset` has a ``train`` and a ``test`` :class:`Split`. A split knows
its length and returns any set of examples as tensors, so a worker touches only
the examples of the shards it is assigned. ``x`` is float32 (or a tuple of tensors,
such as the Criteo reader's dense features and int64 IDs); ``y`` is what the job's
loss takes: int64 class indices for ``cross_entropy`` (IDX files), float32 0/1 for
``binary_cross_entropy`` (Criteo click labels).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from downpour.config import DataConfig
from downpour.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class Split(Protocol):
    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices`` as (x, y) tensors, in that order."""
        ...


@dataclass
class Dataset:
    """A job's data. Each split is a :class:`Split` or any map-style ``torch.utils.data.Dataset``
    (the test split may also be an ``IterableDataset``, or None: no evaluation)."""

    train: Any
    test: Any = None


class ArrayDataset:
    """A split over in-memory arrays. ``scale`` turns integer pixels into floats (x * scale)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, scale: float | None = None) -> None:
        if len(x) != len(y):
            raise DataError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y, self.scale = x, y, scale

    def __len__(self) -> int:
        return len(self.x)

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[indices]
        # IDX stores multi-byte values big-endian; torch takes native byte order only.
        x = torch.from_numpy(x.astype(np.float32) if x.dtype.itemsize > 1 else np.ascontiguousarray(x))
        x = x.to(torch.float32)
        if self.scale is not None:
            x.mul_(self.scale)
        return x, torch.from_numpy(self.y[indices].astype(np.int64))


BUILTINS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    def deco(fn):
        BUILTINS[name] = fn
        return fn

    return deco


def build_dataset(cfg: DataConfig, unreachable_wait_s: float = 0.0) -> Dataset:
    """The dataset a job names: a built-in (``data.name``) or a user factory (``data.factory``).
    ``unreachable_wait_s``: how long a built-in that reads from a service (a stream's broker)
    waits for one that does not answer (a job's nodes, which start after the job was checked).

    A factory may return a :class:`Dataset` (its splits Downpour splits or torch Datasets), a
    ``(train, test)`` pair, a ``{"train": ..., "test": ...}`` mapping, or a single torch Dataset
    (training only). Anything else is a :class:`DataError` naming the factory."""
    from downpour.data.loader import check_split
    from downpour.imports import import_object

    if cfg.factory is not None:
        where = f"data.factory {cfg.factory}"
        fn = import_object(cfg.factory, "data.factory")
        ds = as_dataset(fn(**cfg.args), where)
        check_split(ds.train, "train", where, training=True)
        if ds.test is not None:
            check_split(ds.test, "test", where, training=False)
    else:
        fn = BUILTINS.get(cfg.name or "")
        if fn is None:
            raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; known: {sorted(BUILTINS)}")
        where = f"data {cfg.name} at {cfg.path}"
        args = dict(cfg.args)
        if unreachable_wait_s and "unreachable_wait_s" in inspect.signature(fn).parameters:
            args.setdefault("unreachable_wait_s", unreachable_wait_s)  # (data.args may set it: that wins)
        ds = fn(cfg.path, **args)
    if len(ds.train) == 0:
        raise DataError(f"{where}: the training split holds no examples: nothing to train")
    try:
        empty_test = ds.test is not None and len(ds.test) == 0
    except TypeError:  # (a split whose length is unknown)
        empty_test = False
    if empty_test:
        log.warning("%s: the test split holds no examples: the job reports no test figures", where)
    return ds


def as_dataset(obj: object, where: str) -> Dataset:
    """What a data factory returned, as a :class:`Dataset` (see :func:`build_dataset`)."""
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(obj, dict) and "train" in obj:
        return Dataset(obj["train"], obj.get("test"))
    if isinstance(obj, tuple) and len(obj) == 2:
        return Dataset(obj[0], obj[1])
    if isinstance(obj, TorchDataset):
        return Dataset(obj, None)
    if hasattr(obj, "train") and hasattr(obj, "test"):
        return obj  # type: ignore[return-value]
    raise DataError(f"{where} returned {type(obj).__name__}, not a Dataset with train/test splits, a (train, test) pair, "
                    "a {'train': ..., 'test': ...} mapping or a torch.utils.data.Dataset")
