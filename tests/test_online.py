"""Online learning end to end: events through a real redis-server into `downpour train`,
each applied exactly once (counted from the model's state), offsets in the checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from downpour.stream import open_source
from tests.cluster import QUIET, run_train
from tests.conftest import FAST_CLUSTER
from tests.online_factories import counts_in, serial_rows, write_serial_events
from tests.redis_server import needs_redis, redis_server  # noqa: F401

pytestmark = [needs_redis, pytest.mark.slow]


def stream_job(url: str, **over) -> dict:
    job = {
        "name": "online",
        "model": {"factory": "tests.online_factories:counting_ctr", "args": {"num_dense": 13, "num_fields": 26, "dim": 4,
                                                                               "hidden": [16]}},
        "data": {"name": "stream", "url": url},
        "optimizer": {"name": "adagrad", "lr": 0.01},
        "sparse": {"optimizer": {"name": "adagrad", "lr": 0.05},
                   "tables": {"count": {"optimizer": {"name": "sgd", "lr": 1.0}, "init_scale": 0.0}}},
        "training": {"consistency": "async", "loss": "binary_cross_entropy", "epochs": 1, "batch_size": 128, "seed": 0},
        "cluster": {"num_servers": 2, "num_workers": 2, **FAST_CLUSTER},
        "checkpoint": {"every_s": 1},
        "monitor": QUIET,
    }
    job.update(over)
    return job


def test_a_bounded_stream_is_trained_once_per_event_with_offsets_in_every_manifest(tmp_path, redis_server):  # noqa: F811
    url = redis_server.url + "?stream=clicks&partitions=2"
    src = open_source(url)
    src.create()
    lines = serial_rows(6000)
    bad = write_serial_events(src, lines, bad_every=500)
    for p in range(2):
        src.append(p, {"eos": "1"})
    summary = run_train(tmp_path, stream_job(url), timeout_s=180)
    run = tmp_path / "run"
    serials, counts = counts_in(str(run / "checkpoints"))
    assert len(serials) == len(lines) and set(serials.tolist()) == set(range(len(lines)))
    assert np.all(counts == 1.0), np.unique(counts, return_counts=True)
    online = summary["online"]
    assert online["events"] == len(lines) and online["malformed"] == bad
    assert 0.6 < online["prequential_auc"] < 1.0
    # every manifest holds each partition's offset; the last one is where each partition ended
    names = sorted(os.listdir(run / "checkpoints"))
    last = json.loads((run / "checkpoints" / names[-1] / "manifest.json").read_text())["job"]["stream"]
    ends = {str(p): src.client.xrevrange(src.key(p), count=1)[0][0] for p in range(2)}
    from downpour.stream.redis_source import unpack_id

    assert {p: unpack_id(o) for p, o in last.items()} == ends
    # acknowledged only what a checkpoint made durable: here, everything
    assert all(src.client.xpending(src.key(p), "downpour")["pending"] == 0 for p in range(2))
