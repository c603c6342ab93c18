"""``downpour serve EXPORT_URL``: predictions over HTTP from the newest export, kept fresh.

Starlette on uvicorn. ``POST /predict`` takes ``{"instances": [{"I1": 3, ..., "C1": "68fd1e64",
...}, ...]}`` (Criteo fields; absent or null = missing) or ``{"rows": ["<39 or 40 tab-separated
fields>", ...]}`` and answers ``{"version": V, "predictions": [p, ...]}`` (click
probabilities). A bad request gets a 4xx whose ``error`` names the instance and field.
``GET /healthz``: 200 once a version is loaded (503 before). ``GET /metrics``: Prometheus
text: the version served, its freshness (seconds since the newest event it includes, or
since its checkpoint), versions applied and refused, request latency, requests by status.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from downpour.errors import DataError
from downpour.serving.model import Follower
from downpour.stream.api import RawEvent
from downpour.stream.events import parse_events

MAX_BATCH = 4096  # instances per request
MAX_BODY_BYTES = 32 << 20  # a request's body: 4096 instances of every field take under 8 MB


class Service:
    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.registry = r = CollectorRegistry()
        self.requests = Counter("downpour_serve_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("downpour_serve_latency_seconds", "Time to answer /predict", registry=r,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
        Gauge("downpour_serve_version", "The export version served", registry=r).set_function(
            lambda: self.follower.state.version if self.follower.state else -1)
        Gauge("downpour_serve_freshness_seconds", "Seconds since the newest event the served version includes "
              "(or since its checkpoint)", registry=r).set_function(self.freshness)
        Gauge("downpour_serve_versions_applied", "Export versions loaded", registry=r).set_function(lambda: self.follower.applied)
        Gauge("downpour_serve_versions_refused", "Export versions refused (corrupt or partial)", registry=r).set_function(
            lambda: self.follower.refused)

    def freshness(self) -> float:
        s = self.follower.state
        if s is None:
            return float("nan")
        at = s.event_time or s.manifest.get("checkpoint_time") or s.manifest.get("exported_at")
        return max(0.0, time.time() - float(at))

    def answer(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """A /predict body's answer (run off the event loop: parsing and the model take a while)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:  # (nested too deep: RecursionError)
            return 400, {"error": f"the body is not JSON: {str(err) or 'nested too deep'}"}
        try:
            return self.predict(body)
        except DataError as err:
            return 422, {"error": str(err)}

    def predict(self, body: Any) -> tuple[int, dict[str, Any]]:
        state = self.follower.state  # one version for the whole request
        if state is None:
            return 503, {"error": "no model version loaded yet"}
        if not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object with 'instances' or 'rows'"}
        if ("instances" in body) == ("rows" in body):
            return 400, {"error": "give exactly one of 'instances' (objects) or 'rows' (Criteo TSV lines)"}
        items = body.get("instances", body.get("rows"))
        if not isinstance(items, list) or not items:
            return 400, {"error": "'instances'/'rows' must be a non-empty list"}
        if len(items) > MAX_BATCH:
            return 413, {"error": f"{len(items)} instances in one request; the limit is {MAX_BATCH}"}
        raws = []
        for i, item in enumerate(items):
            if "instances" in body:
                if not isinstance(item, dict):
                    return 422, {"error": f"instances[{i}] is not an object"}
                raws.append(RawEvent(i + 1, {"json": json.dumps({"label": 0, **item})}))
            else:
                if not isinstance(item, str):
                    return 422, {"error": f"rows[{i}] is not a string"}
                if item.count("\t") not in (38, 39):  # (told apart here: a label is added to the 39 fields of an instance)
                    return 422, {"error": f"rows[{i}]: {item.count(chr(9)) + 1} tab-separated fields, expected 39 (13 integers, "
                                          "26 categories) or 40 (a label first)"}
                raws.append(RawEvent(i + 1, {"tsv": item if item.count("\t") == 39 else "0\t" + item}))
        batch = parse_events(raws, "request", 0)
        if batch.malformed:
            reason = batch.reasons[0].split(": ", 1)[-1] if batch.reasons else "malformed"
            bad = int(batch.reasons[0].split("@", 1)[1].split(":", 1)[0]) - 1 if batch.reasons and "@" in batch.reasons[0] else "?"
            key = "instances" if "instances" in body else "rows"
            return 422, {"error": f"{key}[{bad}]: {reason}"}
        with torch.no_grad():
            out = state.model(batch.dense, batch.ids)
        p = torch.sigmoid(out.reshape(-1)).numpy().astype(np.float64)
        return 200, {"version": state.version, "predictions": p.tolist()}


def make_app(service: Service):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def predict(request: Request):
        t0 = time.perf_counter()
        raw = await _body(request, MAX_BODY_BYTES)
        if raw is None:
            code, out = 413, {"error": f"the body is larger than {MAX_BODY_BYTES} bytes"}
        else:  # in a thread: /healthz and /metrics stay answered while predictions are computed
            code, out = await run_in_threadpool(service.answer, raw)
        service.latency.observe(time.perf_counter() - t0)
        service.requests.labels("predict", str(code)).inc()
        return JSONResponse(out, status_code=code)

    async def healthz(request: Request):
        s = service.follower.state
        code = 200 if s is not None else 503
        service.requests.labels("healthz", str(code)).inc()
        return JSONResponse({"version": s.version if s else None, "freshness_s": service.freshness() if s else None},
                            status_code=code)

    async def metrics(request: Request):
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz),
                             Route("/metrics", metrics)])


async def _body(request: Any, limit: int) -> bytes | None:
    """The request's body, or None once it passes ``limit`` bytes (not read further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def serve(url: str, host: str = "127.0.0.1", port: int = 8080, poll_s: float = 0.5, ready=None) -> None:
    """Follow the export at ``url`` and answer on ``host:port`` until stopped."""
    import uvicorn

    follower = Follower(url, poll_s)
    follower.poll()
    follower.start()
    service = Service(follower)
    config = uvicorn.Config(make_app(service), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:
        ready(server, service)
    try:
        server.run()
    finally:
        follower.stop()
