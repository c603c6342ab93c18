"""Exports for serving and `downpour serve`: snapshot then deltas, exact float32 values,
delta sizes, refused corrupt versions, /predict while versions land."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from downpour.config import parse_job
from downpour.errors import DataError
from downpour.models import build_model
from downpour.nn import sparse_tables
from downpour.serving.export import Exporter, version_dir
from downpour.serving.model import Follower
from downpour.serving.precision import decode, encode, row_bytes

MODEL = {"name": "wide_deep", "args": {"num_dense": 13, "num_fields": 26, "dim": 8, "hidden": [16]}}


def fake_state(seed: int, n_rows: int = 3000, base=None, touch: int = 0, name: str = "ckpt-1", model_cfg=None):
    """A checkpoint's model as the exporter reads it: random dense values and table rows; with
    ``base``, a copy of it with ``touch`` rows of each table (and one dense slice) changed."""
    job = parse_job({"model": model_cfg or MODEL, "training": {"seed": 3}})
    model = build_model(job.model, 3)
    rng = np.random.default_rng(seed)
    tables = {t: d for t, d in sparse_tables(model)}
    if base is None:
        dense = {n: rng.normal(size=p.numel()).astype(np.float32) for n, p in model.named_parameters()}
        tabs = {}
        for t, d in tables.items():
            keys = np.sort(rng.choice(1 << 40, n_rows, replace=False)).astype(np.int64)
            tabs[t] = (keys, rng.normal(size=(n_rows, d)).astype(np.float32))
    else:
        dense = {n: v.copy() for n, v in base.dense.items()}
        first = next(iter(dense))
        dense[first][:3] += 1.0
        tabs = {}
        for t, (k, v) in base.tables.items():
            v = v.copy()
            v[rng.choice(len(k), touch, replace=False)] += 0.5
            tabs[t] = (k.copy(), v)
    layout = SimpleNamespace(tables=[SimpleNamespace(name=t, dim=d) for t, d in tables.items()])
    manifest = SimpleNamespace(name=name, job={"time": time.time(), "stream": {"0": (int(time.time() * 1000) << 16)}})
    return SimpleNamespace(job=job, layout=layout, dense=dense, tables=tabs, manifest=manifest)




def test_row_codecs_roundtrip_exactly_for_float32_and_closely_otherwise():
    rows = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    assert np.array_equal(decode(encode(rows, "float32"), "float32", 16, "t"), rows)
    assert np.abs(decode(encode(rows, "float16"), "float16", 16, "t") - rows).max() < 2e-3
    assert np.abs(decode(encode(rows, "int8"), "int8", 16, "t") - rows).max() <= np.abs(rows).max() / 127
    with pytest.raises(DataError, match="expected float16"):
        decode(encode(rows, "float32"), "float16", 16, "t")


def test_a_delta_holds_only_the_changed_rows_and_serving_follows_it_exactly(tmp_path):
    url = str(tmp_path / "export")
    ex = Exporter(url, "float32", full_every=10, slice_size=64)
    s1 = fake_state(1)
    assert ex.export(s1) == 1
    f = Follower(url)
    assert f.poll() and f.state.version == 1 and f.state.manifest["kind"] == "snapshot"
    touch = 1500
    s2 = fake_state(2, base=s1, touch=touch, name="ckpt-2")
    assert ex.export(s2) == 2
    manifest = json.loads((tmp_path / "export" / version_dir(2) / "manifest.json").read_text())
    assert manifest["kind"] == "delta" and manifest["parent"] == 1
    dims = {t.name: t.dim for t in s2.layout.tables}
    touched_bytes = sum(touch * row_bytes(d, "float32") for d in dims.values()) + row_bytes(64, "float32")
    assert ex.last_bytes <= 1.1 * touched_bytes, (ex.last_bytes, touched_bytes)
    assert f.poll() and f.state.version == 2
    for name, flat in s2.dense.items():
        assert np.array_equal(f.state.dense[name], flat)
    for name, (k, v) in s2.tables.items():
        assert np.array_equal(f.state.tables[name][0], k) and np.array_equal(f.state.tables[name][1], v)
    # a second follower (another serving process) reaches the same version from scratch
    g = Follower(url)
    g.poll()
    assert g.state.version == 2 and all(np.array_equal(g.state.dense[n], s2.dense[n]) for n in s2.dense)


def test_an_export_knows_the_checkpoint_its_newest_version_came_from_so_exporting_again_adds_nothing(tmp_path):
    from downpour.serving.export import exported_through

    url = str(tmp_path / "export")
    assert exported_through(url) is None
    ex = Exporter(url, "float32", full_every=10, slice_size=64)
    s1 = fake_state(1)
    ex.export(s1)
    ex.export(fake_state(2, base=s1, touch=10, name="ckpt-000000000020"))
    assert exported_through(url) == "ckpt-000000000020"
    (tmp_path / "export" / version_dir(2) / "manifest.json").write_text("{not json")
    assert exported_through(url) is None  # unreadable: everything is exported again, nothing skipped wrongly


def test_an_export_of_a_model_that_does_not_answer_criteo_instances_is_refused_with_why(tmp_path, caplog):
    url = str(tmp_path / "export")
    Exporter(url, "float32", full_every=10, slice_size=64).export(
        fake_state(1, model_cfg={"name": "mlp", "args": {"input_shape": [784], "hidden": [8], "num_classes": 10}}))
    f = Follower(url)
    assert not f.poll() and f.state is None and f.refused == 1  # /healthz stays 503: nothing fails per request
    assert "its model (mlp) does not answer a Criteo instance" in caplog.text


def test_exporting_from_a_folder_with_no_checkpoint_is_an_error_not_zero_versions(tmp_path, capsys):
    from downpour.cli.serve import cmd_export

    args = SimpleNamespace(url=str(tmp_path / "out"), precision="float32", full_every=20)
    assert cmd_export(SimpleNamespace(checkpoints=str(tmp_path / "nope"), **vars(args))) == 2
    assert "(no such folder): no committed checkpoint to export" in capsys.readouterr().out
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cmd_export(SimpleNamespace(checkpoints=str(tmp_path / "run"), **vars(args))) == 2
    assert "checkpoints: no committed checkpoint to export" in capsys.readouterr().out


def test_a_corrupt_or_partial_delta_is_refused_and_serving_stays_on_the_last_good_version(tmp_path):
    url = str(tmp_path / "export")
    ex = Exporter(url, "float16", full_every=2, slice_size=64)
    s1 = fake_state(1, n_rows=200)
    ex.export(s1)
    f = Follower(url)
    f.poll()
    s2 = fake_state(2, base=s1, touch=20, name="ckpt-2")
    ex.export(s2)
    path = tmp_path / "export" / version_dir(2) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not f.poll() and f.state.version == 1 and f.refused == 1
    # a version still being written (no manifest yet) is not taken, nor is anything after it yet
    os.makedirs(tmp_path / "export" / version_dir(9))
    s3 = fake_state(3, base=s2, touch=20, name="ckpt-3")
    ex.export(s3)  # version 3: the next snapshot (full_every 2)
    assert f.poll() and f.state.version == 3 and f.state.manifest["kind"] == "snapshot"
    for name, (_k, v) in s3.tables.items():
        assert np.array_equal(f.state.tables[name][1], v.astype(np.float16).astype(np.float32))


@pytest.fixture
def served(tmp_path):
    """`downpour serve`'s app on a free port in this process: (base URL, exporter, service)."""
    import socket

    import uvicorn

    from downpour.serving.app import Service, make_app

    url = str(tmp_path / "export")
    ex = Exporter(url, "float32", full_every=50, slice_size=64)
    ex.export(fake_state(1, n_rows=500))
    follower = Follower(url, poll_s=0.05)
    follower.poll()
    follower.start()
    service = Service(follower)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", ex, service
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        follower.stop()


def _post(base: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/predict", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _instances(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{**{f"I{j}": int(rng.integers(0, 50)) for j in range(1, 14)},
             **{f"C{j}": format(int(rng.integers(0, 1 << 32)), "x") for j in range(1, 27)}} for _ in range(n)]


def test_predict_answers_with_the_exported_values_and_refuses_bad_requests(served):
    base, ex, service = served
    code, out = _post(base, {"instances": _instances(4)})
    assert code == 200 and out["version"] == 1 and len(out["predictions"]) == 4
    # the same rows as Criteo TSV (no label) give the same answers
    rows = ["\t".join([str(i[f"I{j}"]) for j in range(1, 14)] + [i[f"C{j}"] for j in range(1, 27)]) for i in _instances(4)]
    assert _post(base, {"rows": rows})[1]["predictions"] == out["predictions"]
    # equal to a model holding exactly the exported values
    state = service.follower.state
    from downpour.stream.api import RawEvent
    from downpour.stream.events import parse_events

    b = parse_events([RawEvent(i + 1, {"json": json.dumps({"label": 0, **x})}) for i, x in enumerate(_instances(4))], "t", 0)
    with torch.no_grad():
        ref = torch.sigmoid(state.model(b.dense, b.ids).reshape(-1)).double().tolist()
    assert ref == out["predictions"]
    bad = [({"instances": [{"C1": 12}]}, 422, "instances[0]: C1 is 12"), ({"instances": []}, 400, "non-empty"),
           ({"rows": ["1\t2"]}, 422, "rows[0]: 2 tab-separated fields, expected 39"), ([1, 2], 400, "JSON object"),
           ({"instances": [{"I1": "x"}]}, 422, "I1")]
    for body, code, words in bad:
        got = _post(base, body)
        assert got[0] == code and words in got[1]["error"], got
    with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
        assert json.loads(r.read())["version"] == 1
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "downpour_serve_version 1.0" in text and 'status="422"' in text and "downpour_serve_latency_seconds_bucket" in text
    assert "downpour_serve_freshness_seconds" in text


def _post_raw(base: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_body_nested_too_deep_or_too_large_is_refused_with_a_4xx_and_counted(served, monkeypatch):
    """Before: a RecursionError answered 500 (not counted), and any size of body was read and parsed."""
    import downpour.serving.app as app

    base, _, _ = served
    code, out = _post_raw(base, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert code == 400 and "not JSON" in out["error"]
    monkeypatch.setattr(app, "MAX_BODY_BYTES", 1000)  # (read when each request is answered)
    code, out = _post_raw(base, json.dumps({"instances": _instances(40)}).encode())
    assert code == 413 and "larger than 1000 bytes" in out["error"]
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'status="400"' in text and 'status="413"' in text


def test_health_is_answered_while_predictions_are_computed(served, monkeypatch):
    """/predict runs off the event loop: a slow model does not hold up /healthz (a liveness probe)."""
    base, _, service = served
    real, started, release = service.predict, threading.Event(), threading.Event()

    def held(body):  # a prediction that ends only once /healthz was answered
        started.set()
        release.wait(30)
        return real(body)

    monkeypatch.setattr(service, "predict", held)
    answers = []
    t = threading.Thread(target=lambda: answers.append(_post(base, {"instances": _instances(2)})))
    t.start()
    try:
        assert started.wait(10)
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:  # (before: waited for the prediction, timed out)
            assert r.status == 200
    finally:
        release.set()
        t.join(timeout=30)
    assert answers and answers[0][0] == 200


def test_predict_while_deltas_land_never_sees_the_version_go_back(served):
    base, ex, service = served
    seen, errors = [], []
    stop = threading.Event()

    def drive():
        while not stop.is_set():
            code, out = _post(base, {"instances": _instances(8)})
            if code != 200:
                errors.append(out)
            else:
                seen.append(out["version"])

    t = threading.Thread(target=drive)
    t.start()
    state = ex.prev
    try:
        for i in range(8):
            state = fake_state(10 + i, base=state, touch=50, name=f"ckpt-{i + 2}")
            ex.export(state)
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] < 9) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=20)
    assert not errors and seen and seen == sorted(seen) and seen[-1] == 9 and len(set(seen)) > 2, (errors, seen[-5:])


def test_serve_on_a_port_in_use_says_so_before_claiming_to_serve(tmp_path, capsys):
    """(It printed "serving ... on http://..." and then failed.)"""
    import argparse
    import socket

    from downpour.cli.serve import cmd_serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cmd_serve(argparse.Namespace(url=str(tmp_path / "export"), host="127.0.0.1", port=port, poll_s=0.5))
    out, err = capsys.readouterr()
    assert code == 3 and "serving" not in out and f"cannot listen on 127.0.0.1:{port}" in err
