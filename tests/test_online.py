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
    export = str(tmp_path / "export")
    summary = run_train(tmp_path, stream_job(url, export={"url": export}), timeout_s=180)
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
    # the export's last version holds exactly the final checkpoint's values (float32), and its offsets
    from downpour.serving.export import CheckpointState
    from downpour.serving.model import Follower
    from downpour.storage import CheckpointStore

    store = CheckpointStore(str(run / "checkpoints"))
    final = CheckpointState(store, store.latest())
    served = Follower(export)
    served.poll()
    assert served.state.manifest["checkpoint"] == final.manifest.name and served.state.manifest["stream"] == last
    assert served.state.event_time is not None
    for name, flat in final.dense.items():
        assert np.array_equal(served.state.dense[name], flat)
    for name, (k, v) in final.tables.items():
        assert np.array_equal(served.state.tables[name][0], k) and np.array_equal(served.state.tables[name][1], v)


def _applied(run, src) -> tuple[np.ndarray, dict]:
    """The serials whose update is in the latest checkpoint (count 1; any other count fails), and its offsets."""
    serials, counts = counts_in(str(run / "checkpoints"))
    assert set(np.unique(counts).tolist()) <= {1.0}, np.unique(counts, return_counts=True)
    names = sorted(os.listdir(run / "checkpoints"))
    offsets = json.loads((run / "checkpoints" / names[-1] / "manifest.json").read_text())["job"]["stream"]
    return np.sort(serials), offsets


def test_a_graceful_stop_then_resume_applies_every_event_exactly_once(tmp_path, redis_server):  # noqa: F811
    import signal
    import subprocess

    from tests.cluster import PY, start_job, stop_job, wait_training

    url = redis_server.url + "?stream=clicks&partitions=2"
    src = open_source(url)
    src.create()
    lines = serial_rows(40000)
    write_serial_events(src, lines, 0, 30000)
    job = stream_job(url, cluster={"num_servers": 2, "num_workers": 2, **FAST_CLUSTER})
    proc, run_dir = start_job(tmp_path, job)
    try:
        wait_training(run_dir, timeout_s=120, steps=20)
        proc.send_signal(signal.SIGTERM)  # a graceful stop: final checkpoint at the exact positions
        proc.communicate(timeout=120)
    finally:
        stop_job(proc)
    run = tmp_path / "run"
    first, offsets = _applied(run, src)
    assert 0 < len(first) < 30000
    # exactly the events up to each partition's offset are in the model (row i went to partition i % 2)
    for p in range(2):
        ids = [e[0] for e in src.client.xrange(src.key(p), "-", "+")]
        from downpour.stream.redis_source import unpack_id

        upto = ids.index(unpack_id(offsets[str(p)])) + 1 if offsets[str(p)] else 0
        assert set(first[first % 2 == p].tolist()) == set(range(p, 2 * upto, 2))
    # the rest of the stream (and more), then a resume from the stopped run: every event once
    write_serial_events(src, lines, 30000, 40000)
    for p in range(2):
        src.append(p, {"eos": "1"})
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "job.yaml").write_text((tmp_path / "job.yaml").read_text())
    out = subprocess.run([PY, "-m", "downpour", "train", str(resumed / "job.yaml"), "--run-dir", str(resumed / "run"),
                          "--resume", run_dir, "--quiet"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    serials, _ = _applied(resumed / "run", src)
    assert np.array_equal(serials, np.arange(40000))
