"""Checkpoints on S3: against moto's standalone S3-compatible server, a real process on 127.0.0.1.

fsspec takes the endpoint and credentials from FSSPEC_S3_* and AWS_* variables, which the test
sets for itself and for the processes of the job it starts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

pytest.importorskip("s3fs", reason="s3fs is needed for s3:// checkpoints (pip install s3fs)")
pytest.importorskip("moto.server", reason="moto[server] is needed for the local S3 server")

from downpour.api import resolve_job  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402
from downpour.storage import CheckpointStore, Manifest  # noqa: E402
from tests.conftest import tiny_job  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    import fsspec.config

    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)  # for the job's processes: fsspec reads it at import
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server})  # for this one
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"downpour-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(name)
    return name


def test_a_checkpoint_round_trips_through_s3_and_a_corrupt_one_falls_back(bucket):
    store = CheckpointStore(f"s3://{bucket}/ckpts", keep=2)
    for step in (10, 20):
        name = store.name_for(step)
        entry = store.write_file(name, "data.bin", bytes(range(256)) * step)
        store.commit(Manifest(name, step, {"data.bin": entry}))
    latest = store.latest()
    assert latest.step == 20 and store.read(latest, "data.bin") == bytes(range(256)) * 20
    store.fs.pipe(f"{bucket}/ckpts/{store.name_for(20)}/data.bin", b"\x00" * (256 * 20))  # same size, other bytes
    store.fs.invalidate_cache()
    assert store.latest().step == 10


def test_a_job_checkpoints_to_s3_and_resumes_from_there(bucket, tmp_path, tiny_data):
    url = f"s3://{bucket}/run"
    job = tiny_job(tiny_data, training={"epochs": 2}, checkpoint={"url": url, "every_steps": 50, "every_s": None})
    first = LocalLauncher(resolve_job(job), str(tmp_path / "first")).run().summary
    assert first["checkpoints"]["count"] >= 1 and first["checkpoints"]["url"] == url
    store = CheckpointStore(url)
    last = store.latest()
    assert last.job["final"] and {"job.json", "server-0.safetensors", "server-1.safetensors"} <= set(last.files)
    # Resuming from the final checkpoint of a finished job: nothing is left to train, the parameters are the same.
    more = dict(job, checkpoint={"resume_from": url, "url": f"s3://{bucket}/run2"})
    again = LocalLauncher(resolve_job(more), str(tmp_path / "again")).run().summary
    assert again["examples"] == 0 and again["resumed_from"].startswith(url)
    assert again["test_accuracy"] == pytest.approx(first["test_accuracy"], abs=1e-9)
