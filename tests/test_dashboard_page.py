"""The live dashboard page (downpour/monitor/static/) rendered in headless Chromium against fixture JSON.

A stdlib HTTP server on 127.0.0.1 serves the static files the way the coordinator does (/ and /static/<file>)
and canned answers for /api/status and /api/history. Needs Chromium (apt-get install chromium).
"""

from __future__ import annotations

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.browser import BrowserError, Element, find_chromium, parse_dom, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "downpour", "monitor", "static")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHARTS = ("chart-throughput", "chart-loss", "chart-server-load", "chart-staleness", "chart-bytes")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

if find_chromium() is None:
    pytest.skip(
        "\n\n*** NO CHROMIUM: the dashboard page tests are SKIPPED. Run `apt-get install chromium` "
        "(or set DOWNPOUR_CHROMIUM to a Chrome/Chromium binary) to run them. ***\n",
        allow_module_level=True,
    )


# ---- fixture data ----


def full_status(**overrides) -> dict:
    def worker(rank, state, steps, eps, loss):
        return {
            "name": f"worker-{rank}", "role": "worker", "rank": rank, "state": state, "host": "node-a", "pid": 200 + rank,
            "heartbeat_age_s": 6.4 if state == "dead" else 0.1, "metrics": f"127.0.0.1:4100{rank}",
            "progress": {"steps": steps, "examples": steps * 32, "loss": loss, "examples_per_s": eps,
                         "bytes_sent": steps * 410_000, "bytes_received": steps * 409_000},
        }  # fmt: skip

    def server(rank, pushes, staleness):
        return {
            "name": f"server-{rank}", "role": "server", "rank": rank, "state": "alive", "host": "node-b", "pid": 100 + rank,
            "heartbeat_age_s": 0.2, "metrics": f"127.0.0.1:4000{rank}",
            "progress": {"pushes": pushes, "pulls": pushes, "bytes_in": pushes * 200_000, "bytes_out": pushes * 200_000,
                         "staleness_mean": staleness, "rejected": 0},
        }  # fmt: skip

    status = {
        "job": "mnist", "phase": "training", "error": None, "consistency": "async", "num_servers": 2, "num_workers": 3,
        "elapsed_s": 42.3, "train_s": 38.1, "examples": 30000, "planned_examples": 60000, "steps": 940,
        "examples_per_s": 3700.5, "loss": 0.61,
        "staleness": {"mean": 1.9, "max": 7, "pushes": 940},
        "bytes": {"sent": 123456789, "received": 123456000},
        "nodes": [
            server(0, 470, 1.9), server(1, 470, 1.8),
            worker(0, "alive", 313, 1250.0, 0.6), worker(1, "dead", 120, None, 1.1), worker(2, "alive", 290, 0.0, 0.7),
        ],
        "alerts": [{"node": "worker-2", "kind": "stalled", "since_s": 12.0, "message": "worker-2 made no progress for 12.0s",
                    "affected": {"shards": ["epoch 0 shard 7"]}}],
        "failures": [{"node": "worker-1", "kind": "dead", "at_s": 30.2, "detected_after_s": 6.0, "reason": "no heartbeat for 6.0s"}],
        "checkpoints": {"count": 2, "last_step": 900, "mean_write_s": 0.12},
    }  # fmt: skip
    status.update(overrides)
    return status


def full_history(points: int = 43) -> dict:
    t = [float(i) for i in range(points)]

    def curve(f, start=0, stop=points):
        return [None if i < start or i >= stop else round(f(i), 4) for i in range(points)]

    series = {}
    for rank, (dead_at, stall_at) in enumerate([(points, points), (30, points), (points, 30)]):
        eps = curve(lambda i, r=rank, stall=stall_at: 0.0 if i >= stall else 1150 + 90 * math.sin(i / 3 + r) + 30 * r, 1, dead_at)
        series[f"worker-{rank}"] = {
            "examples_per_s": eps,
            "loss": curve(lambda i, r=rank: 2.3 * math.exp(-i / 12) + 0.4 + 0.05 * r, 2, dead_at),
            "bytes_sent_per_s": [None if v is None else v / 32 * 410_000 for v in eps],
            "bytes_received_per_s": [None if v is None else v / 32 * 409_000 for v in eps],
        }
    for rank in range(2):
        series[f"server-{rank}"] = {
            "pushes_per_s": curve(lambda i, r=rank: 80 + 8 * math.sin(i / 4 + r) - (25 if i >= 30 else 0), 1),
            "pulls_per_s": curve(lambda i, r=rank: 80 + 8 * math.sin(i / 4 + r), 1),
            "bytes_in_per_s": curve(lambda i: 16e6, 1),
            "bytes_out_per_s": curve(lambda i: 16e6, 1),
            "staleness_mean": curve(lambda i, r=rank: 1.5 + 0.6 * math.sin(i / 5 + r), 2),
        }
    series["job"] = {
        "examples_per_s": curve(lambda i: 3500 + 150 * math.sin(i / 3), 1),
        "loss": curve(lambda i: 2.3 * math.exp(-i / 12) + 0.45, 2),
    }
    return {"t": t, "series": series}


# ---- a local server with the coordinator's routes ----


class Site:
    """Routes: '/' and '/static/<file>' from STATIC; '/api/status' and '/api/history' from `answers`.
    An answer is a dict (served as JSON) or a callable taking the request count for that path."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {"/api/status": {}, "/api/history": {}}
        self.hits: dict[str, int] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                site.hits[path] = site.hits.get(path, 0) + 1
                if path in site.answers:
                    answer = site.answers[path]
                    answer = answer(site.hits[path]) if callable(answer) else answer
                    if answer is None:
                        return self.send(503, b'{"error": "unavailable"}', "application/json")
                    return self.send(200, json.dumps(answer).encode(), "application/json")
                name = "index.html" if path == "/" else path.removeprefix("/static/")
                file = os.path.join(STATIC, name)
                if "/" in name or not os.path.isfile(file):
                    return self.send(404, b"not found", "text/plain")
                with open(file, "rb") as f:
                    self.send(200, f.read(), TYPES.get(os.path.splitext(name)[1], "application/octet-stream"))

            def send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.lock, self.closed = threading.Lock(), False
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="dashboard-site", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving and close the listening socket (so new connections are refused); idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def load(site: Site, status, history, *, screenshot=None, window=(1280, 1000), budget_ms=3500) -> tuple[Element, list[str]]:
    """Serve `status` and `history`, render the page, and return its DOM and console messages."""
    site.answers["/api/status"] = status
    site.answers["/api/history"] = history
    console: list[str] = []
    dom = parse_dom(render(site.url, screenshot=screenshot, window=window, budget_ms=budget_ms, timeout_s=60, console=console))
    return dom, console


def body_of(dom: Element) -> Element:
    return dom.find_all("body")[0]


def assert_no_js_errors(dom: Element, console: list[str]) -> None:
    assert "data-js-errors" not in body_of(dom).attrs, body_of(dom).attrs["data-js-errors"]
    assert not [line for line in console if "Uncaught" in line], console


# ---- tests ----


def test_full_job_renders_everything(site):
    shot = os.path.join(ARTIFACTS, "dashboard-page.png")
    if os.path.exists(shot):
        os.remove(shot)
    dom, console = load(site, full_status(), full_history(), screenshot=shot, window=(1280, 1400))
    assert_no_js_errors(dom, console)
    assert int(body_of(dom).attrs["data-updates"]) > 1, "the page should have polled several times"

    assert dom.by_id("job-name").text == "mnist"
    assert dom.by_id("phase").text == "training"
    assert dom.by_id("progress").attrs["data-fraction"] == "0.5000"
    assert "30,000 / 60,000" in dom.by_id("progress-text").text

    rows = {r.attrs["data-node"]: r for r in dom.by_id("nodes").find_all("tr", data_node=True)}
    expected = {"server-0": "alive", "server-1": "alive", "worker-0": "alive", "worker-1": "dead", "worker-2": "alive"}
    assert {name: r.attrs["data-state"] for name, r in rows.items()} == expected
    assert "1.3 k ex/s" in rows["worker-0"].text and "loss 0.600" in rows["worker-0"].text
    assert "pushes/s" in rows["server-0"].text and "staleness 1.90" in rows["server-0"].text
    assert rows["worker-2"].attrs.get("data-alert") == "stalled"

    for chart in CHARTS:
        canvas = dom.by_id(chart)
        assert int(canvas.attrs.get("data-points", 0)) > 0, f"{chart} drew nothing: {canvas.attrs}"
    assert dom.by_id("chart-throughput").attrs["data-series"] == "3"
    assert dom.by_id("chart-loss").attrs["data-series"] == "4"  # three workers and the job
    assert dom.by_id("chart-server-load").attrs["data-series"] == "2"
    assert dom.by_id("chart-bytes").attrs["data-series"] == "2"

    [alert] = dom.by_id("alerts").find_all("li", data_node="worker-2")
    assert alert.attrs["data-kind"] == "stalled"
    for part in ("worker-2", "stalled", "12.0 s", "made no progress", "epoch 0 shard 7"):
        assert part in alert.text
    [failure] = dom.by_id("failures").find_all("li", data_node="worker-1")
    assert "dead" in failure.text and "no heartbeat for 6.0s" in failure.text
    assert dom.by_id("checkpoints").text == "2 checkpoints · last at step 900 · mean write 0.12 s"
    assert "hidden" in dom.by_id("error-banner").attrs
    assert dom.by_id("connection").attrs["data-connected"] == "true"
    assert os.path.getsize(shot) > 10_000


def test_error_banner(site):
    status = full_status(phase="failed", error="worker-1 died and its shards could not be reassigned")
    dom, console = load(site, status, full_history())
    assert_no_js_errors(dom, console)
    banner = dom.by_id("error-banner")
    assert "hidden" not in banner.attrs
    assert "worker-1 died and its shards could not be reassigned" in banner.text
    assert dom.by_id("phase").attrs["data-phase"] == "failed"


@pytest.mark.parametrize(
    "status, history",
    [
        ({"phase": "registering", "nodes": []}, {}),
        ({"phase": "registering", "nodes": []}, {"t": [], "series": {}}),
        (
            {"job": None, "phase": None, "error": None, "nodes": [{"name": "worker-0"}, {}, None], "alerts": None,
             "failures": [{}], "staleness": None, "bytes": None, "checkpoints": None, "planned_examples": 0},
            {"t": [0, 1, None], "series": {"worker-0": {"examples_per_s": [None, None, None], "loss": None}, "job": None}},
        ),
    ],
    ids=["minimal", "empty-history", "nulls-everywhere"],
)  # fmt: skip
def test_missing_fields_do_not_break_the_page(site, status, history):
    dom, console = load(site, status, history, budget_ms=2500)
    assert_no_js_errors(dom, console)
    assert int(body_of(dom).attrs["data-updates"]) > 1
    assert dom.by_id("checkpoints").text == "no checkpoints"
    for chart in CHARTS:
        assert dom.by_id(chart).attrs.get("data-points") == "0"


@pytest.mark.parametrize("how", ["503", "refused"])
def test_disconnect_keeps_last_data(site, how):
    """The coordinator answers twice, then is gone: 503 (a proxy in front of a dead job) or the port closed."""

    def status(n):
        if n <= 2:
            return full_status()
        if how == "refused":
            threading.Thread(target=site.close, daemon=True).start()
        return None

    dom, console = load(site, status, full_history())
    assert_no_js_errors(dom, console)
    assert body_of(dom).attrs["data-updates"] == "2"
    if how == "refused":
        assert site.closed and site.hits["/api/status"] >= 3
    connection = dom.by_id("connection")
    assert connection.attrs["data-connected"] == "false"
    assert connection.text.startswith("disconnected — last update at ")
    assert len(dom.by_id("nodes").find_all("tr", data_node=True)) == 5
    assert int(dom.by_id("chart-throughput").attrs["data-points"]) > 0


def test_render_reports_failures():
    with pytest.raises(BrowserError, match="did not finish"):
        render("about:blank", budget_ms=60_000, timeout_s=0.05)
