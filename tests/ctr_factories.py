"""A tiny CTR-like dataset for sparse-table tests (workers import it by name).

Each example has ``num_dense`` dense features and ``num_fields`` categorical IDs (field f's IDs
are ``f * 2**33 + value``, as the Criteo reader makes them); the label is drawn from a logistic
model with a hidden weight per ID, so a model that learns the IDs' weights beats chance clearly.
"""

from __future__ import annotations

import numpy as np
import torch

from downpour.data import Dataset


class CTRSplit:
    def __init__(self, dense: np.ndarray, ids: np.ndarray, y: np.ndarray) -> None:
        self.dense, self.ids, self.y = dense, ids, y

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: np.ndarray):
        return (torch.from_numpy(self.dense[indices]), torch.from_numpy(self.ids[indices])), torch.from_numpy(self.y[indices])


def make_ctr(n: int, seed: int, num_fields: int = 4, num_dense: int = 3, vocab: int = 50, data_seed: int = 7):
    """``n`` examples; the hidden weights depend on ``data_seed`` only, the draws on ``seed``."""
    truth = np.random.default_rng(data_seed)
    weights = truth.normal(0.0, 1.0, size=(num_fields, vocab)).astype(np.float32)
    dense_w = truth.normal(0.0, 0.5, size=num_dense).astype(np.float32)
    rng = np.random.default_rng(seed)
    values = rng.integers(0, vocab, size=(n, num_fields))
    dense = rng.normal(size=(n, num_dense)).astype(np.float32)
    logit = weights[np.arange(num_fields), values].sum(1) + dense @ dense_w - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    ids = (np.arange(num_fields, dtype=np.int64) << 33) + values.astype(np.int64)
    return dense, ids, y


def tiny_ctr(n_train: int = 4000, n_test: int = 1000, num_fields: int = 4, num_dense: int = 3) -> Dataset:
    train = CTRSplit(*make_ctr(n_train, 1, num_fields, num_dense))
    test = CTRSplit(*make_ctr(n_test, 2, num_fields, num_dense))
    return Dataset(train, test)


class CountingWideDeep(torch.nn.Module):
    """Wide & Deep plus a table ``count`` (dim 1) read from the same IDs, whose gradient is -1 per
    occurrence: with sparse SGD at lr 1 from rows of 0, a row holds how many of its ID's
    occurrences were trained (every push applied exactly once: epochs × occurrences)."""

    def __init__(self, **args) -> None:
        super().__init__()
        from downpour.models import WideDeep
        from downpour.nn import SparseEmbedding

        self.model = WideDeep(**args)
        self.count = SparseEmbedding("count", 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(dense, ids)
        c = self.count(ids)  # [B, fields, 1]
        if c.requires_grad:
            c.register_hook(lambda g: torch.full_like(g, -1.0))
        return out + (c - c.detach()).sum((1, 2))


def counting_wide_deep(**args) -> torch.nn.Module:
    return CountingWideDeep(**args)
