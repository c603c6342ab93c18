"""Jobs that span hosts, the hosts being Linux network namespaces joined by a bridge (tests/netns.py).

Each process sees only its namespace's interfaces, so ``--host 0.0.0.0`` listens only there and a
wrongly advertised address fails the way it would between machines. Needs root: skipped, saying
why, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.conftest import tiny_job
from tests.netns import Hosts, unavailable

pytestmark = pytest.mark.slow
PY = sys.executable
QUIET = {"dashboard": False, "metrics": False}
_why = unavailable()
needs_netns = pytest.mark.skipif(_why is not None, reason=f"SKIPPED LOUDLY: no network namespaces: {_why}")


class Nodes:
    """Processes started in namespaces, logging into one file each; all killed at the end."""

    def __init__(self, hosts: Hosts, folder, env: dict | None = None) -> None:
        self.hosts, self.folder = hosts, folder
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, host: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.folder, f"{name}.log"), "wb")
        p = self.hosts.popen(host, [PY, "-m", "downpour", *args], stdout=log, stderr=subprocess.STDOUT,
                             env={**self.env, **(env or {})}, cwd=os.getcwd())
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        with open(os.path.join(self.folder, f"{name}.log"), errors="replace") as f:
            return f.read()

    def wait(self, names: list[str], timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for n in names:
            try:
                codes[n] = self.procs[n].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[n] = None
        return codes

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-1500:]}" for n in self.procs)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


@pytest.fixture
def hosts():
    h = Hosts()
    yield h
    h.close()


def _job_file(tmp_path, job: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _every_shard_once(summary: dict, epochs: int) -> None:
    shards = summary["data_shards"]
    assert shards["unfinished"] == 0
    assert shards["completed_per_epoch"] == {str(e): shards["num_shards"] for e in range(epochs)}


@needs_netns
def test_the_readme_recipe_runs_on_two_hosts_as_written(tmp_path, tiny_data, hosts):
    """Coordinator and 2 servers on host A (servers with --host 0.0.0.0), 3 workers on host B, CURVE keys."""
    a, _ = hosts.add("a"), hosts.add("b")
    job = _job_file(tmp_path, tiny_job(tiny_data, training={"epochs": 2}, monitor=QUIET, cluster={"num_servers": 2, "num_workers": 3}))
    keys, run_dir = str(tmp_path / "keys"), str(tmp_path / "run")
    assert subprocess.run([PY, "-m", "downpour", "keys", keys], capture_output=True, timeout=60).returncode == 0
    nodes = Nodes(hosts, tmp_path)
    try:
        nodes.start("coordinator", "a", "coordinator", job, "--bind", "tcp://0.0.0.0:7070", "--run-dir", run_dir, "--keys", keys)
        for r in range(2):
            nodes.start(f"server-{r}", "a", "server", "--coordinator", f"{a}:7070", "--host", "0.0.0.0", "--keys", keys)
        for r in range(3):
            nodes.start(f"worker-{r}", "b", "worker", "--coordinator", f"{a}:7070", "--keys", keys)
        codes = nodes.wait(list(nodes.procs), 240)
    finally:
        nodes.close()
    assert set(codes.values()) == {0}, nodes.tails()
    s = _summary(run_dir)
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8
    _every_shard_once(s, 2)
    assert open(os.path.join(run_dir, "coordinator.addr")).read().strip() == f"tcp://{a}:7070"  # never 0.0.0.0
    assert f"tcp://{a}:" in nodes.log("server-0") and "0.0.0.0" not in nodes.log("worker-0")
    assert os.path.exists(os.path.join(run_dir, "model.pt"))


@needs_netns
def test_a_server_listening_on_loopback_with_a_remote_coordinator_stops_at_start_naming_the_fix(tmp_path, tiny_data, hosts):
    a, _ = hosts.add("a"), hosts.add("b")
    nodes = Nodes(hosts, tmp_path)
    try:
        started = time.monotonic()
        nodes.start("server", "b", "server", "--coordinator", f"{a}:7070", "--host", "127.0.0.1", "--insecure")
        nodes.start("adv", "b", "server", "--coordinator", f"{a}:7070", "--host", "0.0.0.0", "--advertise", "0.0.0.0", "--insecure")
        codes = nodes.wait(["server", "adv"], 60)
        assert time.monotonic() - started < 60
    finally:
        nodes.close()
    assert codes["server"] not in (0, None) and "loopback" in nodes.log("server") and "--host 0.0.0.0" in nodes.log("server")
    assert codes["adv"] == 2 and "cannot advertise '0.0.0.0'" in nodes.log("adv")


@needs_netns
def test_a_local_checkpoint_folder_refuses_a_server_on_another_host(tmp_path, tiny_data, hosts):
    a, _ = hosts.add("a"), hosts.add("b")
    job = _job_file(tmp_path, tiny_job(tiny_data, monitor=QUIET, cluster={"num_servers": 1, "num_workers": 1}))
    nodes = Nodes(hosts, tmp_path)
    try:
        nodes.start("coordinator", "a", "coordinator", job, "--bind", f"tcp://{a}:7070", "--run-dir", str(tmp_path / "run"), "--insecure")
        nodes.start("server", "b", "server", "--coordinator", f"{a}:7070", "--host", "0.0.0.0", "--insecure")
        codes = nodes.wait(["server", "coordinator"], 90)
    finally:
        nodes.close()
    assert codes["server"] not in (0, None), nodes.tails()
    assert "a folder on the coordinator's host" in nodes.log("server") and "s3://" in nodes.log("server")
    # No server of that host could ever join: the job fails at once, saying why (not at its start timeout).
    assert codes["coordinator"] not in (0, None), nodes.tails()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "a server registered from another host" in summary["error"]


def _moto(hosts: Hosts, host: str, folder) -> tuple[subprocess.Popen, str]:
    address = hosts.addresses[host]
    log = open(os.path.join(folder, "moto.log"), "wb")
    proc = hosts.popen(host, [PY, "-m", "moto.server", "-H", address, "-p", "5000"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    endpoint = f"http://{address}:5000"
    deadline = time.monotonic() + 60
    while True:
        probe = subprocess.run(["ip", "netns", "exec", hosts.names[host], PY, "-c",
                                f"import urllib.request; urllib.request.urlopen({endpoint!r}, timeout=2).read()"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return proc, endpoint
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("moto server did not start")
        time.sleep(0.5)


@needs_netns
def test_failures_across_hosts_a_late_worker_and_a_server_replaced_from_s3(tmp_path, tiny_data, hosts):
    """Coordinator and server-0 on A, server-1 and two workers on B, a third worker joins late from C;
    server-1 is killed once a checkpoint is on S3 and a replacement on B loads its shard from there."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    a, _, _ = hosts.add("a"), hosts.add("b"), hosts.add("c")
    moto, endpoint = _moto(hosts, "a", tmp_path)
    s3_env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = f"downpour-{uuid.uuid4().hex[:8]}"
    mk = subprocess.run(["ip", "netns", "exec", hosts.names["a"], PY, "-c",
                         f"import s3fs; s3fs.S3FileSystem(endpoint_url={endpoint!r}).mkdir({bucket!r})"],
                        capture_output=True, text=True, timeout=60, env={**os.environ, **s3_env})
    assert mk.returncode == 0, mk.stderr
    epochs = 30
    spec = tiny_job(tiny_data, training={"epochs": epochs}, monitor=QUIET,
                    checkpoint={"url": f"s3://{bucket}/ckpt", "every_steps": 20, "every_s": None, "keep": 2},
                    cluster={"num_servers": 2, "num_workers": 2, "max_workers": 3, "heartbeat_timeout_s": 3.0,
                             "server_replace_timeout_s": 60.0})
    spec["data"]["shard_size"] = 200
    job = _job_file(tmp_path, spec)
    run_dir = str(tmp_path / "run")
    nodes = Nodes(hosts, tmp_path, env=s3_env)
    coord = f"{a}:7070"
    try:
        nodes.start("coordinator", "a", "coordinator", job, "--bind", "tcp://0.0.0.0:7070", "--run-dir", run_dir, "--insecure")
        nodes.start("server-0", "a", "server", "--coordinator", coord, "--host", "0.0.0.0", "--rank", "0", "--insecure")
        nodes.start("server-1", "b", "server", "--coordinator", coord, "--host", "0.0.0.0", "--rank", "1", "--port", "7100",
                    "--insecure")
        for r in range(2):
            nodes.start(f"worker-{r}", "b", "worker", "--coordinator", coord, "--insecure")
        status = _wait_status(hosts, run_dir, lambda st: (st.get("checkpoints") or {}).get("count"), 150)
        nodes.start("worker-late", "c", "worker", "--coordinator", coord, "--insecure")
        nodes.procs["server-1"].kill()
        nodes.procs["server-1"].wait(timeout=10)
        nodes.start("server-1.2", "b", "server", "--coordinator", coord, "--host", "0.0.0.0", "--rank", "1", "--port", "7101",
                    "--insecure")
        codes = nodes.wait(["coordinator", "server-0", "server-1.2", "worker-0", "worker-1", "worker-late"], 300)
    finally:
        nodes.close()
        moto.kill()
        moto.wait(timeout=10)
    assert status is not None
    assert codes["coordinator"] == 0, nodes.tails()
    s = _summary(run_dir)
    assert s["status"] == "ok", s.get("error")
    [failure] = s["failures"]
    assert failure["node"] == "server-1" and failure["restored_from"] is not None and failure["replaced_by"].startswith("server-1")
    assert any(w.startswith("worker-2") and v["steps"] > 0 for w, v in s["workers"].items()), s["workers"].keys()  # the late one
    _every_shard_once(s, epochs)
    assert s["test_accuracy"] > 0.5


def _wait_status(hosts: Hosts, run_dir: str, ok, timeout_s: float) -> dict | None:
    """Poll the coordinator's STATUS (from host a's namespace) until ``ok(status)``."""
    script = ("import json,sys; from tests.cluster import query_status; "
              f"print(json.dumps(query_status({run_dir!r})))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", hosts.names["a"], PY, "-c", script], capture_output=True, text=True, timeout=60,
                             cwd=os.getcwd())
        try:
            st = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            st = None
        if st and st.get("phase") == "training" and ok(st):
            return st
        time.sleep(1.0)
    raise AssertionError(f"the job in {run_dir} never reached the awaited state")


@needs_netns
def test_five_processes_started_from_tf_config_alone_form_the_job(tmp_path, tiny_data, hosts):
    """The TF1 ClusterSpec (2 ps, 3 workers; worker 0 is the chief and runs the coordinator) as TF_CONFIG."""
    a = hosts.add("a")  # one host: 0.0.0.0 binds only its namespace
    job = _job_file(tmp_path, tiny_job(tiny_data, monitor=QUIET, cluster={"num_servers": 1, "num_workers": 1}))
    cluster = {"ps": [f"{a}:2222", f"{a}:2223"], "worker": [f"{a}:2224", f"{a}:2225", f"{a}:2226"]}
    run_dir = str(tmp_path / "run")
    nodes = Nodes(hosts, tmp_path, env={"DOWNPOUR_JOB": job, "DOWNPOUR_RUN_DIR": run_dir, "DOWNPOUR_INSECURE": "1"})
    try:
        for kind, entries in cluster.items():
            for i in range(len(entries)):
                tf = json.dumps({"cluster": cluster, "task": {"type": kind, "index": i}})
                nodes.start(f"{kind}-{i}", "a", "node", env={"TF_CONFIG": tf})
        codes = nodes.wait(list(nodes.procs), 240)
    finally:
        nodes.close()
    assert set(codes.values()) == {0}, nodes.tails()
    s = _summary(run_dir)
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8
    assert sorted(s["workers"]) == ["worker-0", "worker-1", "worker-2"] and sorted(s["servers"]) == ["server-0", "server-1"]
    assert f"tcp://{a}:2223" in nodes.log("ps-1")


def _own_key_folder(keys: str, rank: int, into) -> str:
    """What worker ``rank``'s machine is given: the public files and its own secret only."""
    into.mkdir(mode=0o700)
    for f in os.listdir(keys):
        if f.endswith(".key") or f == f"worker-{rank}.key_secret":
            (into / f).write_bytes(open(os.path.join(keys, f), "rb").read())
            os.chmod(into / f, 0o600)
    return str(into)


@needs_netns
def test_per_worker_keys_across_hosts_a_second_holder_of_a_key_is_refused(tmp_path, tiny_data, hosts):
    """`downpour keys --workers 2`: each worker on host B holds only its own key (no --rank); a process
    on host C holding worker-0's key is refused while worker-0 is registered, and the job trains."""
    a, _, _ = hosts.add("a"), hosts.add("b"), hosts.add("c")
    job = _job_file(tmp_path, tiny_job(tiny_data, monitor=QUIET, cluster={"num_servers": 1, "num_workers": 2}))
    keys, run_dir = str(tmp_path / "keys"), str(tmp_path / "run")
    assert subprocess.run([PY, "-m", "downpour", "keys", keys, "--workers", "2"], capture_output=True, timeout=60).returncode == 0
    own = [_own_key_folder(keys, r, tmp_path / f"worker-{r}-keys") for r in range(2)]
    nodes = Nodes(hosts, tmp_path)
    try:
        nodes.start("coordinator", "a", "coordinator", job, "--bind", "tcp://0.0.0.0:7070", "--run-dir", run_dir, "--keys", keys)
        nodes.start("server-0", "a", "server", "--coordinator", f"{a}:7070", "--host", "0.0.0.0", "--keys", keys)
        nodes.start("worker-0", "b", "worker", "--coordinator", f"{a}:7070", "--keys", own[0])
        deadline = time.monotonic() + 120
        while "worker-0 registered" not in nodes.log("coordinator") and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes.start("intruder", "c", "worker", "--coordinator", f"{a}:7070", "--keys", own[0])
        intruder = nodes.wait(["intruder"], 90)["intruder"]
        nodes.start("worker-1", "b", "worker", "--coordinator", f"{a}:7070", "--keys", own[1])
        codes = nodes.wait(["coordinator", "server-0", "worker-0", "worker-1"], 240)
    finally:
        nodes.close()
    assert intruder not in (0, None) and "worker-0 is registered on another connection" in nodes.log("intruder"), nodes.tails()
    assert set(codes.values()) == {0}, nodes.tails()
    s = _summary(run_dir)
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8 and sorted(s["workers"]) == ["worker-0", "worker-1"]
    assert s["coordinator_refused"].get("forbidden", 0) >= 1
