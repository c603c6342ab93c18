"""Small data, as a new user meets it: 1,400 Fashion-MNIST training images, a CNN Downpour never saw
(through model.factory), 2 sync workers and the default shard size, against single-process PyTorch
with the same model, epochs and global batch (2 x 32 = 64).

    .venv/bin/python benchmarks/small_data.py [--seeds 0 1] [--epochs 10]

Prints one JSON line per run and a table; with the adaptive shard size (default) every epoch is cut
into 4 shards per worker, with --set-shard 2048 (the old default) the whole epoch is one shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment  # noqa: E402
from downpour.data import load_idx_dataset  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"
TRAIN = 1400


def small_cnn() -> nn.Module:
    """A CNN unknown to Downpour: two conv blocks, then a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10))


def _tensors(split, n: int | None = None) -> TensorDataset:
    idx = np.arange(len(split) if n is None else n)
    x, y = split.take(idx)
    return TensorDataset(x.reshape(-1, 1, 28, 28), y)


def small_fashion(train: int = TRAIN, path: str = DATA):
    """The first ``train`` training images and the whole test set, as torch TensorDatasets."""
    ds = load_idx_dataset(path)
    return _tensors(ds.train, train), _tensors(ds.test)


def single_process(seed: int, epochs: int, batch: int, lr: float, momentum: float, path: str = DATA) -> float:
    torch.manual_seed(seed)
    model = small_cnn()
    train, test = small_fashion(path=path)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        return float((model(x).argmax(1) == y).float().mean())


def downpour_run(seed: int, epochs: int, batch: int, lr: float, momentum: float, shard_size: int | None,
                 path: str = DATA) -> dict:
    import downpour

    config = {
        "name": "small-data",
        "data": {"shard_size": shard_size, "args": {"path": path}},
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum},
        "training": {"consistency": "sync", "epochs": epochs, "batch_size": batch, "seed": seed},
        "cluster": {"num_servers": 1, "num_workers": 2},
        "monitor": {"metrics": False, "dashboard": False, "tensorboard": False},
        "checkpoint": {"enabled": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        result = downpour.train("benchmarks.small_data:small_cnn", "benchmarks.small_data:small_fashion", config,
                                run_dir=os.path.join(tmp, "run"))
    s = result.summary
    return {"test_accuracy": s["test_accuracy"], "shards_per_epoch": s["data_shards"]["num_shards"], "train_s": s["train_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--set-shard", type=int, default=None, help="an explicit data.shard_size (default: adaptive)")
    ap.add_argument("--data", default=DATA, help="a Fashion-MNIST IDX folder")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        ref = single_process(seed, args.epochs, 64, args.lr, args.momentum, args.data)
        ours = downpour_run(seed, args.epochs, 32, args.lr, args.momentum, args.set_shard, args.data)
        row = {"seed": seed, "single_process": ref, "downpour": ours["test_accuracy"], "gap_points": 100 * (ref - ours["test_accuracy"]),
               "shard_size": args.set_shard or "adaptive", "shards": ours["shards_per_epoch"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"environment": environment(), "epochs": args.epochs, "lr": args.lr, "momentum": args.momentum}))
    for r in rows:
        print(f"seed {r['seed']}: single-process {r['single_process']:.4f}  downpour {r['downpour']:.4f}  "
              f"gap {r['gap_points']:+.2f} points  (shard_size {r['shard_size']}, {r['shards']} shards/epoch)")


if __name__ == "__main__":
    main()
