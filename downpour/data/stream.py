"""The ``stream`` dataset: a live event stream as the ledger sees it.

Partition p is data shard p (``data.shard_size`` is set to ``STREAM_SPAN``, more than any
offset), so the coordinator's ledger hands partitions to workers, puts a dead worker's
partition back with the position of its last acknowledged push, and a checkpoint's job
state records each partition's offset as the shard's ``skip``. The splits exist for the
ledger's sake only: a worker reads events through :attr:`StreamDataset.source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from downpour.config import STREAM_SPAN
from downpour.data.dataset import register_dataset
from downpour.errors import DataError


class _Unbounded:
    """The train split of a stream: ``partitions × STREAM_SPAN`` positions, none readable by index."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def __len__(self) -> int:
        return self.partitions * STREAM_SPAN

    def take(self, indices: np.ndarray) -> tuple[Any, torch.Tensor]:
        if len(indices) <= 1:  # the worker's start-up touch: nothing to load
            return (torch.zeros(len(indices), 13), torch.zeros(len(indices), 26, dtype=torch.int64)), torch.zeros(len(indices))
        raise DataError("a stream is read through its source, not by index")


class _Empty:
    def __len__(self) -> int:
        return 0

    def take(self, indices: np.ndarray) -> tuple[Any, torch.Tensor]:
        raise DataError("a stream has no test split: its quality is measured prequentially")


@dataclass
class StreamDataset:
    train: _Unbounded
    test: _Empty
    source: Any  # downpour.stream.StreamSource
    # How a worker reads: wait at most wait_s for a batch to fill (a partial batch trains then);
    # stop after max_seconds of training (None: until stopped or the stream's end marker).
    wait_s: float = 0.05
    max_seconds: float | None = None
    optimum = None
    test_truth = None


@register_dataset("stream")
def load_stream_dataset(url: str, wait_s: float = 0.05, max_seconds: float | None = None, check: bool = True,
                        unreachable_wait_s: float = 0.0, **args: Any) -> StreamDataset:
    """``unreachable_wait_s``: how long a broker that does not answer is waited for (a job's
    nodes; ``downpour train``'s own check before the start waits for nothing)."""
    from downpour.stream import open_source

    if not (isinstance(wait_s, (int, float)) and 0 < wait_s <= 10):
        raise DataError(f"data.args.wait_s: {wait_s!r} is not a number of seconds in (0, 10]")
    if isinstance(unreachable_wait_s, bool) or not (isinstance(unreachable_wait_s, (int, float)) and 0 <= unreachable_wait_s <= 86400):
        raise DataError(f"data.args.unreachable_wait_s: {unreachable_wait_s!r} is not a number of seconds in [0, 86400]")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise DataError(f"data.args.max_seconds: {max_seconds!r} is not a positive number of seconds")
    source = open_source(url, args)
    if check:
        source.check(unreachable_wait_s=unreachable_wait_s)
    return StreamDataset(_Unbounded(source.spec.partitions), _Empty(), source, float(wait_s), max_seconds)
