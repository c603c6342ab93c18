"""The dataset contract every data source meets.

A :class:`Dataset` has a ``train`` and a ``test`` :class:`Split`. A split knows
its length and returns any set of examples as tensors (``x`` float32, ``y``
int64), so a worker touches only the examples of the shards it is assigned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from downpour.config import DataConfig
from downpour.errors import ConfigError, DataError


class Split(Protocol):
    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices`` as (x, y) tensors, in that order."""
        ...


@dataclass
class Dataset:
    train: Split
    test: Split


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


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset a job names: a built-in (``data.name``) or a user factory (``data.factory``)."""
    from downpour.imports import import_object

    if cfg.factory is not None:
        fn = import_object(cfg.factory, "data.factory")
        ds = fn(**cfg.args)
        if not (hasattr(ds, "train") and hasattr(ds, "test")):
            raise DataError(f"data.factory {cfg.factory} returned {type(ds).__name__}, not a Dataset with train/test splits")
        return ds
    fn = BUILTINS.get(cfg.name or "")
    if fn is None:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; known: {sorted(BUILTINS)}")
    return fn(cfg.path, **cfg.args)
