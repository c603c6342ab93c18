"""Module-level user code for the bring-your-own-PyTorch tests (workers import it by name)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from tests.conftest import make_images


class Images(Dataset):
    """uint8 28x28 images and labels; an example is (image [1, 28, 28] uint8, label int)."""

    def __init__(self, n: int, seed: int) -> None:
        x, y = make_images(n, seed)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y.astype("int64"))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].unsqueeze(0), int(self.y[i])


def image_splits(train: int = 1200, test: int = 300):
    return Images(train, 1), Images(test, 2)


def only_train(n: int = 600):
    return Images(n, 1)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


def stream_data():
    return Stream(), Stream()


def not_a_dataset():
    return [1, 2, 3]


def collate_scaled(batch):
    """A custom collate: stack, scale pixels to [0, 1], labels to int64."""
    x = torch.stack([b[0] for b in batch]).float().div_(255.0)
    y = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return x, y


def bn_cnn(width: int = 8) -> nn.Module:
    """A small CNN with BatchNorm and dropout (buffers: running mean/var, num_batches_tracked)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(width * 49, 10))


def smoothed_ce(out, y):
    return F.cross_entropy(out, y, label_smoothing=0.05)


def per_example_loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def top2_accuracy(outputs, targets):
    return (outputs.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean()


def metric_not_a_number(outputs, targets):
    """A metric with a bug: it returns a string (reported at the end, not fatal)."""
    return "high"


def metric_nan(outputs, targets):
    """A metric of no value on this split (an empty class): NaN, reported at the end, not fatal."""
    return torch.tensor(float("nan"))


def loss_infinite_in_eval(out, y):
    """Cross-entropy while training, +inf on the test split (the model is in eval mode then)."""
    return F.cross_entropy(out, y) if torch.is_grad_enabled() else torch.tensor(float("inf"))


def metric_raises(outputs, targets):
    raise ZeroDivisionError("the metric's own bug")


def broken_loss(out, y):
    """A loss with a bug: every worker that calls it dies the same way (the launcher's crash-loop test)."""
    raise RuntimeError("a deliberately broken loss")


class _DictOut(nn.Module):
    """A model that returns a dict (its logits and their norm), for a loss that takes it apart."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_cnn()

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "norm": logits.norm(dim=1)}


def dict_out() -> nn.Module:
    return _DictOut()


def dict_loss(out, y):
    return F.cross_entropy(out["logits"], y)


class _Tied(nn.Module):
    """Input and output embeddings tied (one parameter under two names), and a BatchNorm buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.norm = nn.BatchNorm1d(6)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def tied() -> nn.Module:
    return _Tied()


class _Flagged(nn.Module):
    """A bool buffer (a mask) and, with ``complex_state``, a complex one."""

    def __init__(self, complex_state: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        self.register_buffer("mask", torch.ones(10, dtype=torch.bool))
        if complex_state:
            self.register_buffer("phase", torch.zeros(2, dtype=torch.complex64))

    def forward(self, x):
        return self.net(x).masked_fill(~self.mask, 0.0)


def flagged(complex_state: bool = False) -> nn.Module:
    return _Flagged(complex_state)


def empty_test():
    train, _ = image_splits(train=64, test=1)
    return train, torch.utils.data.Subset(train, [])


def raising_model() -> nn.Module:
    raise ValueError("no such width")


def mlp_lost_once_in_worker_0(marker: str) -> nn.Module:
    """A small MLP; but the first worker process of rank 0 dies while it builds it (after it
    registered, before it wrote the initial parameters), and leaves ``marker`` to say so."""
    import os
    import sys

    argv = sys.argv[1:]
    if argv[:1] == ["worker"] and "--rank" in argv and argv[argv.index("--rank") + 1] == "0" and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(7)  # (not 3: EXIT_STOPPED, a worker the coordinator told to leave)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
