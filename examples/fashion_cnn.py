"""Your own PyTorch in a Downpour job (examples/fashion_cnn.yaml): a CNN with BatchNorm, torch Datasets
read through a DataLoader with a custom collate, a custom loss and a metric. Plain PyTorch throughout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from downpour.data import load_idx_dataset


class FashionImages(Dataset):
    """One split of an IDX folder as a map-style Dataset: (uint8 image [1, 28, 28], label)."""

    def __init__(self, split, limit: int | None = None) -> None:
        import numpy as np

        n = len(split) if limit is None else min(limit, len(split))
        x, y = split.take(np.arange(n))
        self.x, self.y = (x * 255).round().to(torch.uint8).reshape(-1, 1, 28, 28), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def datasets(path: str = "/usr/share/datasets/fashion-mnist", train_limit: int | None = None):
    ds = load_idx_dataset(path)
    return FashionImages(ds.train, train_limit), FashionImages(ds.test)


def collate(batch):
    x = torch.stack([b[0] for b in batch]).float().div_(255.0)
    return x, torch.tensor([b[1] for b in batch], dtype=torch.int64)


def cnn(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 49, 10))


def smoothed_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, label_smoothing=0.1)


def top2_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean())
