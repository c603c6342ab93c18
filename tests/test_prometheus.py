"""A real Prometheus scrapes a real job: file_sd on RUN_DIR/prometheus_targets.json and http_sd on the
coordinator's /targets find every node, and the query API sees every worker train and every server serve.

Needs the prometheus binary (apt-get install prometheus; `make test` installs it). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.cluster import running_job
from tests.conftest import tiny_job

PROMETHEUS = shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)

if PROMETHEUS is None:
    pytest.skip(
        "\n\n*** NO PROMETHEUS: the Prometheus integration test is SKIPPED. Run `apt-get install prometheus` "
        "(Debian/Ubuntu; `make test` does it) to run it. ***\n",
        allow_module_level=True,
    )

JOB_NAME = "tiny"
READY_TIMEOUT_S = 10.0  # Prometheus answers /-/ready within a second or two
SCRAPED_TIMEOUT_S = 30.0  # service discovery (1 s), two scrapes (1 s apart) and a 5 s rate window, with room to spare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(targets_file: str, targets_url: str) -> dict:
    """Two scrape jobs over the same nodes, told apart by a `discovery` label (file or http): the job's
    own labels (job, role, rank, node) come from the targets, so without it their series would collide."""

    def scrape(name: str, sd: dict) -> dict:
        return {"job_name": name, "honor_labels": True, **sd,
                "relabel_configs": [{"target_label": "discovery", "replacement": name}]}

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            scrape("file", {"file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}]}),
            scrape("http", {"http_sd_configs": [{"url": targets_url, "refresh_interval": "1s"}]}),
        ],
    }


class Prometheus:
    """A prometheus process on 127.0.0.1 with its own storage; always stopped by ``stop``."""

    def __init__(self, tmp_path, config: dict) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp_path / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = tmp_path / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address={self.url[len('http://'):]}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _get(self, path: str, **params: str):
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._get("/-/ready")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise AssertionError(f"prometheus at {self.url} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def query(self, expr: str) -> dict[str, float]:
        """An instant query's value by the `node` label (`node_name` for coordinator series about a node)."""
        answer = json.loads(self._get("/api/v1/query", query=expr))
        assert answer["status"] == "success", f"{expr}: {answer}"
        return {r["metric"].get("node_name") or r["metric"].get("node", "?"): float(r["value"][1]) for r in answer["data"]["result"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def problems(prom: Prometheus, workers: list[str], servers: list[str]) -> list[str]:
    """What is not (yet) true of the scraped job, one line per node and check; empty when all is well."""
    out = []

    def each(nodes: list[str], what: str, expr: str, positive: bool = True) -> None:
        try:
            got = prom.query(expr)
        except (OSError, urllib.error.URLError) as err:
            out.append(f"{what}: query failed: {err}")
            return
        for node in nodes:
            if node not in got:
                out.append(f"{node}: no {what}")
            elif positive and not got[node] > 0:
                out.append(f"{node}: {what} = {got[node]}, not > 0")

    sel = f'job="{JOB_NAME}", discovery="file"'
    each(workers, "downpour_worker_examples_per_second", f"downpour_worker_examples_per_second{{{sel}}}")
    each(workers, "rate(downpour_worker_examples_total[5s])", f"rate(downpour_worker_examples_total{{{sel}}}[5s])")
    each(servers, "rate(downpour_server_pushes_total[5s])", f"rate(downpour_server_pushes_total{{{sel}}}[5s])")
    each(servers, "downpour_server_staleness_versions_count", f"downpour_server_staleness_versions_count{{{sel}}}", positive=False)
    each(["coordinator"], "up (file_sd)", f'up{{{sel}, role="coordinator"}} == 1')
    # The coordinator's view of every node, scraped from the coordinator itself.
    each(workers + servers, "downpour_coordinator_heartbeat_age_seconds", f"downpour_coordinator_heartbeat_age_seconds{{{sel}}}",
         positive=False)
    # http_sd on the coordinator's /targets finds the same nodes.
    each(["coordinator", *workers, *servers], "up (http_sd)", f'up{{job="{JOB_NAME}", discovery="http"}} == 1')
    return out


def test_prometheus_discovers_and_scrapes_every_node(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"epochs": 1000}, monitor={"sample_interval_s": 0.25})
    with running_job(tmp_path, job) as (proc, run_dir, status):
        workers = sorted(n["name"] for n in status["nodes"] if n["role"] == "worker")
        servers = sorted(n["name"] for n in status["nodes"] if n["role"] == "server")
        assert len(workers) == 2 and len(servers) == 2
        with open(os.path.join(run_dir, "dashboard.url")) as f:
            coordinator_url = f.read().strip()
        targets_file = os.path.join(run_dir, "prometheus_targets.json")
        prom = Prometheus(tmp_path / "prometheus", prometheus_config(targets_file, urllib.parse.urljoin(coordinator_url, "/targets")))
        try:
            prom.wait_ready(READY_TIMEOUT_S)
            deadline = time.monotonic() + SCRAPED_TIMEOUT_S
            missing = ["never queried"]
            while missing and time.monotonic() < deadline:
                assert proc.poll() is None, f"the job ended early (code {proc.returncode})"
                assert prom.proc.poll() is None, f"prometheus exited with code {prom.proc.returncode}:\n{prom.log_tail()}"
                missing = problems(prom, workers, servers)
                if missing:
                    time.sleep(0.5)
            assert not missing, (
                f"after {SCRAPED_TIMEOUT_S:.0f}s Prometheus still lacks:\n  " + "\n  ".join(missing)
                + f"\ntargets file:\n{_read(targets_file)}\nprometheus log:\n{prom.log_tail()}")
        finally:
            prom.stop()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as err:
        return f"({err})"


# -- the Grafana dashboard (docs/grafana-dashboard.json) -------------------------------------------

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "docs", "grafana-dashboard.json")
# Grafana's $__rate_interval is at least four scrape intervals (1 s here) plus one; 5 s as in `problems`.
RATE_INTERVAL = "5s"


def dashboard_queries(path: str = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel, rows' panels included."""
    with open(path) as f:
        board = json.load(f)
    out = []

    def panels(items: list) -> None:
        for p in items:
            panels(p.get("panels") or [])
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))

    panels(board.get("panels") or [])
    return out


def as_query(expr: str, job: str) -> str:
    """A dashboard expression with the dashboard's variables filled in as Grafana would for one job."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$job", job)


def test_the_dashboard_reads_every_expression_it_knows_about():
    """The parser sees every target (a check on the test, not on Prometheus)."""
    queries = dashboard_queries()
    assert len(queries) >= 30 and all("$job" in q for _, q in queries)
    left = [q for _, q in queries if "$" in as_query(q, "x")]
    assert left == [], f"a dashboard variable the test does not fill in: {left}"


def test_every_grafana_dashboard_expression_returns_data_for_a_live_job(tmp_path, tiny_data):
    """Every PromQL expression of docs/grafana-dashboard.json, evaluated by a real Prometheus that
    scrapes a running job, returns at least one series (a panel that would stay empty fails)."""
    queries = dashboard_queries()
    job = tiny_job(tiny_data, training={"epochs": 1000}, monitor={"sample_interval_s": 0.25})
    with running_job(tmp_path, job) as (proc, run_dir, status):
        targets_file = os.path.join(run_dir, "prometheus_targets.json")
        config = prometheus_config(targets_file, "http://127.0.0.1:9/unused")
        config["scrape_configs"] = config["scrape_configs"][:1]  # file_sd only: one series per node
        prom = Prometheus(tmp_path / "prometheus", config)
        try:
            prom.wait_ready(READY_TIMEOUT_S)
            deadline = time.monotonic() + SCRAPED_TIMEOUT_S
            empty = [q for _, q in queries]
            while empty and time.monotonic() < deadline:
                assert proc.poll() is None, f"the job ended early (code {proc.returncode})"
                assert prom.proc.poll() is None, f"prometheus exited with code {prom.proc.returncode}:\n{prom.log_tail()}"
                empty = [q for q in empty if not _returns_data(prom, as_query(q, JOB_NAME))]
                if empty:
                    time.sleep(0.5)
            titles = {q: t for t, q in queries}
            assert not empty, (f"after {SCRAPED_TIMEOUT_S:.0f}s these dashboard panels still get no data:\n  "
                               + "\n  ".join(f"{titles[q]}: {q}" for q in empty) + f"\nprometheus log:\n{prom.log_tail()}")
        finally:
            prom.stop()


def _returns_data(prom: Prometheus, expr: str) -> bool:
    answer = json.loads(prom._get("/api/v1/query", query=expr))
    assert answer["status"] == "success", f"{expr}: {answer}"  # a syntax error fails at once
    return len(answer["data"]["result"]) > 0
