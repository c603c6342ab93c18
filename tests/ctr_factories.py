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


def tiny_ctr(n_train: int = 4000, n_test: int = 1000, num_fields: int = 4, num_dense: int = 3,
             test_label: float | None = None) -> Dataset:
    """``test_label``: every test example's label is this one (a test split of one class)."""
    train = CTRSplit(*make_ctr(n_train, 1, num_fields, num_dense))
    dense, ids, y = make_ctr(n_test, 2, num_fields, num_dense)
    test = CTRSplit(dense, ids, y if test_label is None else np.full_like(y, test_label))
    return Dataset(train, test)


class _Tail(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.occurrences = torch.nn.Parameter(torch.zeros(n))


class CountingWideDeep(torch.nn.Module):
    """Wide & Deep plus a table ``count`` (dim 1) read from the same IDs, whose gradient is -1 per
    occurrence: with sparse SGD at lr 1 from rows of 0, a row holds how many of its ID's
    occurrences were trained (every push applied exactly once: epochs × occurrences).

    With ``dense_count`` s > 0, also two dense parameters ``head`` (the model's first) and
    ``tail.occurrences`` (its last: with two servers, one on each) of ``count_servers`` elements:
    element i's gradient is -s per occurrence of an ID that the sparse tables keep on server i
    (of ``count_servers``). With dense SGD at lr 1/s (a power of two, so the sums are exact) each
    holds, per server, how many occurrences' dense updates reached it: what that server's
    ``count`` rows add up to when rows and dense values hold the same pushes."""

    def __init__(self, dense_count: float = 0.0, count_servers: int = 1, **args) -> None:
        super().__init__()
        from downpour.layout import make_layout
        from downpour.models import WideDeep
        from downpour.nn import SparseEmbedding

        self.dense_count = float(dense_count)
        self.servers = make_layout([("x", (1,))], count_servers, tables=[("count", 1)]) if dense_count else None
        if self.dense_count:
            self.head = torch.nn.Parameter(torch.zeros(count_servers))
        self.model = WideDeep(**args)
        self.count = SparseEmbedding("count", 1)
        if self.dense_count:
            self.tail = _Tail(count_servers)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(dense, ids)
        c = self.count(ids)  # [B, fields, 1]
        if c.requires_grad:
            c.register_hook(lambda g: torch.full_like(g, -1.0))
        out = out + (c - c.detach()).sum((1, 2))
        if self.servers is not None:
            n = self.servers.num_servers
            where = torch.from_numpy(self.servers.sparse_servers(ids.reshape(-1).numpy())).reshape(ids.shape)
            per_server = torch.nn.functional.one_hot(where, n).sum(1).float()  # [B, n]: occurrences by server
            for p in (self.head, self.tail.occurrences):
                d = p.expand(len(ids), n)
                if d.requires_grad:
                    d.register_hook(lambda g, k=per_server: -self.dense_count * k)
                out = out + (d - d.detach()).sum(1)
        return out


def counting_wide_deep(**args) -> torch.nn.Module:
    return CountingWideDeep(**args)
