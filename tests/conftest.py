"""Shared fixtures: a small synthetic IDX dataset and fast job settings for real clusters on 127.0.0.1."""

from __future__ import annotations

import gzip
import inspect
import os
import re
import struct
import uuid

import fsspec
import numpy as np
import pytest

# Heartbeats and timeouts short enough that a failure shows within seconds.
FAST_CLUSTER = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 6.0, "request_timeout_s": 10.0, "startup_timeout_s": 90.0}


def write_idx(path: str, array: np.ndarray, gz: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    head = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes, each a bright 7x7 block at its own place plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for c in range(10):
        r, col = (c // 4) * 9, (c % 4) * 7
        x[y == c, r : r + 7, col : col + 7] = 220
    return x, y


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A folder of MNIST-format files: 2,400 training and 400 test images."""
    folder = str(tmp_path_factory.mktemp("idx"))
    xtr, ytr = make_images(2400, 1)
    xte, yte = make_images(400, 2)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte"), xtr)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), ytr)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte"), xte)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte"), yte)
    return folder


def tiny_job(data: str, **sections) -> dict:
    """A small job on the tiny data; keyword arguments update sections (training=..., cluster=...)."""
    job = {
        "name": "tiny",
        "model": {"name": "mlp", "args": {"hidden": [32], "dropout": 0.0}},
        "data": {"name": "idx", "path": data, "shard_size": 400},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "training": {"consistency": "async", "epochs": 1, "batch_size": 32, "seed": 0},
        "cluster": {"num_servers": 2, "num_workers": 2, **FAST_CLUSTER},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


# -- the fast tier -------------------------------------------------------------------------------
# `make test-fast` runs `pytest -m "not slow"`. A test that starts processes (a whole job, a role
# by hand, a tool) is slow: it is marked so explicitly, and, as a safety net, any test whose code,
# or the code of the module's helpers it calls (at any depth), starts one is marked too.
_STARTS_PROCESSES = re.compile(r"\b(start_job|running_job|LocalLauncher|subprocess\.|Popen|downpour\.train\(|\.run\(\))")


def _starts_processes(fn, module, seen: set) -> bool:
    if not inspect.isfunction(fn) or fn in seen:
        return False
    seen.add(fn)
    try:
        if _STARTS_PROCESSES.search(inspect.getsource(fn)):
            return True
    except (OSError, TypeError):
        return False
    names = set(fn.__code__.co_names) | {c for k in fn.__code__.co_consts if inspect.iscode(k) for c in k.co_names}
    return any(_starts_processes(getattr(module, n, None), module, seen) for n in names)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        fn = getattr(item, "function", None)
        if item.get_closest_marker("slow") is None and fn is not None and _starts_processes(fn, item.module, set()):
            item.add_marker(pytest.mark.slow)


# -- checkpoint locations (tests/checkpoint_helpers.py) ----------------------------------------


@pytest.fixture
def url():
    """A fresh memory:// location (the memory filesystem is one per process), emptied afterwards."""
    where = f"memory://t-{uuid.uuid4().hex}"
    yield where
    fs, root = fsspec.core.url_to_fs(where)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["memory", "local"])
def location(request, url, tmp_path) -> str:
    """The same tests on a memory:// URL and on a local folder."""
    return url if request.param == "memory" else str(tmp_path / "checkpoints")

