"""Online learning: sustained events/s against the offline CTR job, freshness of the served
model, and serving latency (docs/online.md).

    .venv/bin/python benchmarks/online.py                 # all three parts, about 3 minutes on 2 cores
    .venv/bin/python benchmarks/online.py --part serve    # one part: throughput | freshness | serve | drift

* throughput: the same R rows trained once from files (``data.name: criteo``) and once from a
  Redis stream filled beforehand (a backlog, ended by end markers); same model (Wide & Deep,
  dim 16), 2 servers, 2 async workers, batch 512; examples/s over the training loop of each.
  The stream job checkpoints every second (its offsets; ``--checkpoint-s``), the file job not at all.
* freshness: events at RATE/s into the stream, the job exporting after each checkpoint
  (every second); a follower (what ``downpour serve`` runs) polls every 0.1 s and records when
  each version arrived and the newest event time it includes; an event's freshness is the time
  from its timestamp until the first version including it arrived (events spread evenly in time).
* serve: ``downpour serve`` (a process) on that export; /predict with batch 1 and 256: latency
  p50/p99 of sequential requests, and requests/s with 4 client threads.
* drift: a stream whose hidden model changes every D events, trained online with an export
  per checkpoint; each event scored by the newest version not yet including it (the served
  model's prequential score) and by the version frozen after the first phase: AUC of both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.api import resolve_job  # noqa: E402
from downpour.data.criteo_gen import CriteoSpec, generate  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402
from downpour.stream import open_source  # noqa: E402
from downpour.stream.generator import stream_events  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

MODEL = {"name": "wide_deep", "args": {"num_dense": 13, "num_fields": 26, "dim": 16, "hidden": [256, 128]}}


def _job(data: dict, **over) -> dict:
    job = {"name": "online-bench", "model": MODEL, "data": data, "optimizer": {"name": "adagrad", "lr": 0.01},
           "sparse": {"optimizer": {"name": "adagrad", "lr": 0.05}},
           "training": {"consistency": "async", "loss": "binary_cross_entropy", "epochs": 1, "batch_size": 512, "seed": 0},
           "cluster": {"num_servers": 2, "num_workers": 2}, "checkpoint": {"enabled": False},
           "monitor": {"metrics": False, "dashboard": False, "tensorboard": False}}
    job.update(over)
    return job


def throughput(rows: int, tmp: str, checkpoint_s: float = 1.0) -> dict:
    data = os.path.join(tmp, "criteo")
    generate(CriteoSpec(rows=rows + rows // 20, seed=0, test_fraction=(rows // 20) / (rows + rows // 20), files=2), data)
    offline = LocalLauncher(resolve_job(_job({"name": "criteo", "path": data})), os.path.join(tmp, "offline")).run().summary
    redis = RedisServer(tmp).start()
    try:
        url = redis.url + "?stream=clicks&partitions=2"
        src = open_source(url)
        src.create()
        stream_events(src, rows, end_marker=True)
        online = LocalLauncher(resolve_job(_job({"name": "stream", "url": url}, checkpoint={"every_s": checkpoint_s})),
                               os.path.join(tmp, "online")).run().summary
    finally:
        redis.stop()
    return {"rows": rows, "stream_checkpoint_s": checkpoint_s,
            "offline_examples_per_s": offline["examples_per_s"], "offline_train_s": offline["train_s"],
            "stream_events_per_s": online["examples_per_s"], "stream_train_s": online["train_s"],
            "stream_events": online["online"]["events"], "ratio": online["examples_per_s"] / offline["examples_per_s"],
            "prequential_auc": online["online"]["prequential_auc"]}


def freshness(rate: float, seconds: float, tmp: str) -> dict:
    from downpour.serving.model import Follower

    redis = RedisServer(tmp).start()
    export = os.path.join(tmp, "export")
    arrivals: list[tuple[float, float, int]] = []  # (arrived, newest event time, version)
    try:
        url = redis.url + "?stream=clicks&partitions=2"
        src = open_source(url)
        src.create()
        gen = threading.Thread(target=stream_events, args=(src, int(rate * (seconds + 20)), rate), daemon=True)
        gen.start()
        follower = Follower(export, poll_s=0.1)
        stop = threading.Event()

        def follow():
            while not stop.wait(0.1):
                try:
                    if follower.poll() and follower.state.event_time:
                        arrivals.append((time.time(), follower.state.event_time, follower.state.version))
                except Exception:  # noqa: BLE001 - the export folder may not exist yet
                    pass

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        job = _job({"name": "stream", "url": url, "args": {"max_seconds": seconds}},
                   checkpoint={"every_s": 1.0, "keep": 3}, export={"url": export})
        summary = LocalLauncher(resolve_job(job), os.path.join(tmp, "fresh")).run().summary
        time.sleep(1.0)
        stop.set()
        t.join(timeout=5)
    finally:
        redis.stop()
    arr = np.array([a for a, _, _ in arrivals])
    ev = np.array([e for _, e, _ in arrivals])
    if len(arr) < 3:
        return {"error": "fewer than 3 versions arrived", "versions": len(arr)}
    # events spread evenly from the first version's newest event to the last's
    times = np.linspace(ev[0], ev[-1], 20_000)
    first = np.searchsorted(np.maximum.accumulate(ev), times)  # the first version that includes each
    delay = arr[np.minimum(first, len(arr) - 1)] - times
    gaps = np.diff(arr)
    return {"rate": rate, "seconds": seconds, "versions": len(arr), "freshness_p50_s": float(np.percentile(delay, 50)),
            "freshness_p99_s": float(np.percentile(delay, 99)), "version_interval_p50_s": float(np.median(gaps)),
            "events": summary["online"]["events"], "events_per_s": summary["examples_per_s"], "export": export}


def serve(export: str, tmp: str) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "downpour", "serve", export, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("downpour serve did not become healthy")
            time.sleep(0.2)
        rng = np.random.default_rng(0)
        out = {}
        for batch in (1, 256):
            inst = [{**{f"I{j}": int(rng.integers(0, 30)) for j in range(1, 14)},
                     **{f"C{j}": format(int(rng.integers(0, 1 << 32)), "x") for j in range(1, 27)}} for _ in range(batch)]
            body = json.dumps({"instances": inst}).encode()

            def post(body=body):
                req = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()

            lat = []
            for _ in range(200 if batch == 1 else 60):
                t0 = time.perf_counter()
                post()
                lat.append(time.perf_counter() - t0)
            done = [0]
            stop = time.monotonic() + 5.0

            def client(post=post, stop=stop, done=done):
                while time.monotonic() < stop:
                    post()
                    done[0] += 1

            threads = [threading.Thread(target=client) for _ in range(4)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            out[f"batch_{batch}"] = {"p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
                                     "requests_per_s": done[0] / (time.perf_counter() - t0),
                                     "predictions_per_s": batch * done[0] / (time.perf_counter() - t0)}
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drift(events: int, every: int, tmp: str) -> dict:
    """A drifting stream (the hidden model changes every ``every`` events) trained online with an
    export after each checkpoint; then every event is scored by the newest exported version that
    does not include it yet (the served model's prequential score) and by the version frozen at
    the end of the first phase. AUC of both over the events after the first phase."""
    import torch

    from downpour.data.scoring import roc_auc
    from downpour.serving.export import list_versions
    from downpour.serving.model import Follower, _apply
    from downpour.stream.api import RawEvent
    from downpour.stream.events import parse_events
    from downpour.stream.redis_source import pack_id

    redis = RedisServer(tmp).start()
    export = os.path.join(tmp, "export")
    try:
        url = redis.url + "?stream=clicks&partitions=2"
        src = open_source(url)
        src.create()
        stream_events(src, events, 0.0, seed=0, drift_every=every, end_marker=True)
        job = _job({"name": "stream", "url": url}, checkpoint={"every_s": 1.0, "keep": 3},
                   export={"url": export, "full_every": 100000})
        summary = LocalLauncher(resolve_job(job), os.path.join(tmp, "drift")).run().summary
        parts = []  # per partition: offsets, dense, ids, y, global index
        for p in range(2):
            entries = [e for e in src.client.xrange(src.key(p), "-", "+") if "eos" not in e[1]]
            b = parse_events([RawEvent(pack_id(i), f) for i, f in entries], "drift", 0)
            parts.append((b.offsets, b.dense, b.ids, b.y.numpy(), np.arange(len(b.offsets)) * 2 + p))
    finally:
        redis.stop()
    f = Follower(export)
    versions = list_versions(f.fs, f.root)
    scores_online = [np.full(len(pt[0]), np.nan) for pt in parts]
    scores_frozen = [np.full(len(pt[0]), np.nan) for pt in parts]
    state, frozen = None, None
    for i, v in enumerate(versions):
        manifest, data = f._read(v)
        state = _apply(state if manifest["kind"] == "delta" else None, manifest, data, f"v{v}")
        nxt = f._read(versions[i + 1])[0]["stream"] if i + 1 < len(versions) else None
        for p, (offs, dense, ids, _y, _g) in enumerate(parts):
            lo = int(np.searchsorted(offs, _off(manifest["stream"][str(p)]), side="right"))
            hi = len(offs) if nxt is None else int(np.searchsorted(offs, _off(nxt[str(p)]), side="right"))
            if hi > lo:
                with torch.no_grad():
                    scores_online[p][lo:hi] = torch.sigmoid(state.model(dense[lo:hi], ids[lo:hi]).reshape(-1)).numpy()
        included = [int(np.searchsorted(pt[0], _off(manifest["stream"][str(p)]), side="right")) for p, pt in enumerate(parts)]
        if max((int(pt[4][n - 1]) for pt, n in zip(parts, included) if n), default=-1) < every:
            frozen = state  # so far trained on the first phase only: the last such version is the frozen one
    for p, (_o, dense, ids, _y, gidx) in enumerate(parts):
        later = gidx >= every
        with torch.no_grad():
            scores_frozen[p][later] = torch.sigmoid(frozen.model(dense[later], ids[later]).reshape(-1)).numpy()
    y = np.concatenate([pt[3] for pt in parts])
    g = np.concatenate([pt[4] for pt in parts])
    on, fr = np.concatenate(scores_online), np.concatenate(scores_frozen)
    out = {"events": events, "drift_every": every, "versions": len(versions), "frozen_version": frozen.version,
           "trained_events": summary["online"]["events"], "prequential_auc_workers": summary["online"]["prequential_auc"]}
    for k in range(1, events // every):
        sel = (g >= k * every) & (g < (k + 1) * every) & ~np.isnan(on)
        out[f"phase_{k}"] = {"online_auc": roc_auc(y[sel], on[sel]), "frozen_auc": roc_auc(y[sel], fr[sel]), "events": int(sel.sum())}
    sel = (g >= every) & ~np.isnan(on)
    out["after_first_phase"] = {"online_auc": roc_auc(y[sel], on[sel]), "frozen_auc": roc_auc(y[sel], fr[sel]),
                                "margin": roc_auc(y[sel], on[sel]) - roc_auc(y[sel], fr[sel])}
    return out


def _off(value) -> int:
    return (1 << 58) - 1 if value == "end" else int(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "freshness", "serve", "drift"], default="all")
    ap.add_argument("--drift-events", type=int, default=240_000, help="drift: events in all")
    ap.add_argument("--drift-every", type=int, default=80_000, help="drift: the hidden model changes every this many events")
    ap.add_argument("--rows", type=int, default=300_000, help="throughput: rows trained each way")
    ap.add_argument("--checkpoint-s", type=float, default=1.0, help="throughput: the stream job's checkpoint interval")
    ap.add_argument("--rate", type=float, default=2000.0, help="freshness: events per second")
    ap.add_argument("--seconds", type=float, default=30.0, help="freshness: seconds of training")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res: dict = {"environment": environment()}
    with tempfile.TemporaryDirectory(prefix="online-bench-") as tmp:
        if args.part in ("all", "throughput"):
            res["throughput"] = throughput(args.rows, os.path.join(tmp, "t"), args.checkpoint_s)
            print(json.dumps(res["throughput"], indent=1), flush=True)
        if args.part in ("all", "freshness", "serve"):
            os.makedirs(os.path.join(tmp, "f"))
            res["freshness"] = freshness(args.rate, args.seconds, os.path.join(tmp, "f"))
            print(json.dumps(res["freshness"], indent=1), flush=True)
        if args.part in ("all", "serve") and "export" in res.get("freshness", {}):
            res["serve"] = serve(res["freshness"]["export"], tmp)
            print(json.dumps(res["serve"], indent=1), flush=True)
        if args.part in ("all", "drift"):
            os.makedirs(os.path.join(tmp, "d"))
            res["drift"] = drift(args.drift_events, args.drift_every, os.path.join(tmp, "d"))
            print(json.dumps(res["drift"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
