"""The Ray launcher: on a real multi-node Ray cluster started on this machine (ray.cluster_utils),
nodes told apart by custom resources. The nodes' address is 127.0.0.2, a loopback address Ray takes
as it is (it replaces 127.0.0.1 in a cluster address by the machine's own IP), so Ray and the job
bind loopback only."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from downpour.config import parse_job
from downpour.errors import ConfigError, JobFailed
from downpour.launch import launcher_names, make_launcher
from tests.cluster import query_status
from tests.conftest import tiny_job

QUIET = {"dashboard": False, "metrics": False}
NODE_IP = "127.0.0.2"


def test_an_unknown_launcher_names_the_known_ones(tiny_data):
    job = parse_job(tiny_job(tiny_data))
    with pytest.raises(ConfigError, match="launcher 'slurm' is unknown; launchers: local, ray"):
        make_launcher(job, "/tmp/x", "slurm")
    with pytest.raises(ConfigError, match="--address names a Ray cluster"):
        make_launcher(job, "/tmp/x", "local", address="auto")
    assert launcher_names() == ["local", "ray"]


def test_the_job_file_chooses_the_launcher_and_its_placement(tiny_data):
    job = parse_job({**tiny_job(tiny_data), "launcher": "ray",
                     "ray": {"placement_strategy": "SPREAD", "worker": {"num_cpus": 2, "resources": {"trainer": 1}}}})
    assert job.launcher == "ray" and job.ray.placement_strategy == "SPREAD" and job.ray.worker.resources == {"trainer": 1}
    with pytest.raises(ConfigError, match="placement_strategy"):
        parse_job({**tiny_job(tiny_data), "ray": {"placement_strategy": "RANDOM"}})


def test_missing_resources_are_named_with_what_is_asked_and_what_exists():
    ray_cluster = pytest.importorskip("downpour.launch.ray_cluster")
    bundles = [{"CPU": 1.0, "ps": 1.0}] * 2 + [{"CPU": 1.0, "GPU": 1.0}] * 3
    missing = ray_cluster.missing_resources(bundles, {"CPU": 4.0, "ps": 2.0}, "STRICT_SPREAD", 3)
    assert missing == ["CPU: the job asks for 5, the cluster has 4", "GPU: the job asks for 3, the cluster has 0",
                       "nodes: STRICT_SPREAD puts each of the 5 servers and workers on its own node, the cluster has 3"]
    assert ray_cluster.missing_resources(bundles[:2], {"CPU": 4.0, "ps": 2.0}, "PACK", 1) == []
    # the coordinator's share (it runs outside the placement group) counts too, not as a node of its own
    assert ray_cluster.missing_resources(bundles[:2] * 2, {"CPU": 4.0, "ps": 4.0}, "STRICT_SPREAD", 4, {"CPU": 0.5}) == [
        "CPU: the job asks for 4.5, the cluster has 4"]


def test_ray_jobs_use_unix_sockets_only_where_every_ray_node_is_this_machine(tiny_data, monkeypatch, tmp_path):
    ray_cluster = pytest.importorskip("downpour.launch.ray_cluster")
    ray = ray_cluster.ray
    nodes = []
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def one_machine(transport: str, address: str | None, *ips: str) -> bool:
        nodes[:] = [{"Alive": True, "NodeManagerAddress": ip} for ip in ips] + [{"Alive": False, "NodeManagerAddress": "10.9.9.9"}]
        job = parse_job({**tiny_job(tiny_data), "cluster": {"num_servers": 1, "num_workers": 1, "transport": transport}})
        launcher = ray_cluster.RayLauncher(job, str(tmp_path / "run"), address=address)
        launcher.started_ray = True
        return launcher._one_machine()

    assert one_machine("auto", None, "10.0.0.1", "10.0.0.1")  # a Ray of its own, all here (dead nodes do not count)
    assert not one_machine("auto", None, "10.0.0.1", "10.0.0.2")  # a node elsewhere
    assert not one_machine("auto", "auto", "10.0.0.1")  # someone's cluster: nodes may join later, elsewhere
    assert not one_machine("tcp", None, "10.0.0.1")
    assert one_machine("ipc", "auto", "10.0.0.1")  # asked for, and possible
    with pytest.raises(JobFailed, match=r"ipc needs every process on this machine \(10.0.0.1\).*nodes at 10.0.0.2, 10.0.0.3"):
        one_machine("ipc", "auto", "10.0.0.1", "10.0.0.3", "10.0.0.2")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert not one_machine("auto", None, "10.0.0.1")


# -- on a real Ray cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_nodes():
    """A head node (the driver's, where the coordinator runs) and two more: one offering the
    resource "ps", one "trainer". Small: 2 cores are shared by everything."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'downpour[ray]')")
    from ray.cluster_utils import Cluster

    small = {"node_ip_address": NODE_IP, "object_store_memory": 80 * 2**20, "include_dashboard": False}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": 1, "resources": {"head": 1}})
    try:
        ps = cluster.add_node(**small, num_cpus=2, resources={"ps": 2})
        trainer = cluster.add_node(**small, num_cpus=3, resources={"trainer": 3})
        ray.init(address=cluster.address, _node_ip_address=NODE_IP, log_to_driver=False)
        cluster.wait_for_nodes()
        started_s = time.monotonic() - t0
        yield {"head": cluster.head_node.node_id, "ps": ps.node_id, "trainer": trainer.node_id, "started_s": started_s,
               "cluster": cluster, "small": small}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _ray_job(tiny_data, **sections) -> dict:
    job = tiny_job(tiny_data, monitor=QUIET, **sections)
    job["launcher"] = "ray"
    job["ray"] = {"placement_strategy": "PACK", "server": {"num_cpus": 0.5, "resources": {"ps": 1}},
                  "worker": {"num_cpus": 1, "resources": {"trainer": 1}}, "start_timeout_s": 60}
    return job


@pytest.mark.slow
def test_a_job_on_ray_places_servers_and_workers_on_the_nodes_that_offer_their_resources(tmp_path, tiny_data, ray_nodes):
    job = parse_job(_ray_job(tiny_data, training={"epochs": 2}))
    result = make_launcher(job, str(tmp_path / "run")).run()
    s = result.summary
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    where = {name: p["node_id"] for name, p in placement["processes"].items()}
    assert where == {"coordinator": ray_nodes["head"], "server-0": ray_nodes["ps"], "server-1": ray_nodes["ps"],
                     "worker-0": ray_nodes["trainer"], "worker-1": ray_nodes["trainer"]}
    for name in where:  # the same run folder as a local job
        assert (tmp_path / "run" / "logs" / f"{name}.log").stat().st_size > 0
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "summary.json").exists()
    assert (tmp_path / "run" / "coordinator.addr").read_text().startswith(f"tcp://{NODE_IP}:")  # each listens on its node's address
    _assert_private_folders_removed(placement["processes"], at_least=4)


def _assert_private_folders_removed(placement: dict, at_least: int) -> None:
    """Each Ray-run process's private folder on its node (its key files, its job file) is gone once
    the job ended: key files are secrets, and a folder per process piles up in /tmp."""
    folders = set()
    for p in placement.values():
        for i, arg in enumerate(p["args"][:-1]):
            if arg in ("--keys", "--job") and "downpour-ray-" in p["args"][i + 1]:
                path = p["args"][i + 1]
                folders.add(path[: path.index("downpour-ray-")] + path[path.index("downpour-ray-"):].split(os.sep)[0])
    assert len(folders) >= at_least, placement
    assert not [f for f in folders if os.path.exists(f)]


@pytest.mark.slow
def test_a_job_on_ray_nodes_of_one_machine_can_talk_over_unix_sockets_and_shared_memory(tmp_path, tiny_data, ray_nodes):
    job = parse_job(_ray_job(tiny_data, training={"epochs": 2}, cluster={"transport": "ipc"}))
    s = make_launcher(job, str(tmp_path / "run")).run().summary
    assert s["status"] == "ok" and s["test_accuracy"] > 0.8
    assert (tmp_path / "run" / "coordinator.addr").read_text().startswith("ipc://")
    assert not (tmp_path / "run" / "keys").exists()  # unix sockets in a 0700 folder need no keys
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())["processes"]
    assert {p["node_id"] for n, p in placement.items() if n.startswith("worker")} == {ray_nodes["trainer"]}
    assert {p["node_id"] for n, p in placement.items() if n.startswith("server")} == {ray_nodes["ps"]}
    assert all(w["shm_requests"] > 0 for w in s["workers"].values())  # values went through shared memory


@pytest.mark.slow
def test_on_ray_a_killed_worker_and_a_killed_server_are_replaced_and_every_shard_is_trained_once(tmp_path, tiny_data, ray_nodes):
    epochs = 30
    spec = _ray_job(tiny_data, training={"epochs": epochs},
                    checkpoint={"enabled": True, "every_steps": 20, "every_s": None, "keep": 2},
                    cluster={"num_workers": 2, "heartbeat_timeout_s": 3.0})
    spec["data"]["shard_size"] = 200
    launcher, thread, out = _start_in_thread(spec, str(tmp_path / "run"))
    try:
        status = _first_checkpoint(str(tmp_path / "run"))
        pids = {n["name"]: n["pid"] for n in status["nodes"]}
        os.kill(pids["worker-1"], signal.SIGKILL)
        os.kill(pids["server-1"], signal.SIGKILL)
        thread.join(timeout=300)
    finally:
        if thread.is_alive():
            launcher.stop_all()
            thread.join(timeout=30)
    result = out["result"]
    assert not isinstance(result, BaseException), result
    s = result.summary
    assert s["status"] == "ok"
    assert {f["node"] for f in s["failures"]} == {"worker-1", "server-1"}
    shards = s["data_shards"]
    assert shards["unfinished"] == 0 and shards["completed_per_epoch"] == {str(e): shards["num_shards"] for e in range(epochs)}
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())["processes"]
    assert placement["server-1.2"]["node_id"] == ray_nodes["ps"] and placement["worker-1.2"]["node_id"] == ray_nodes["trainer"]
    _assert_private_folders_removed(placement, at_least=6)  # the killed ones' and their replacements'


def _start_in_thread(spec: dict, run_dir: str):
    """The job on Ray, run by a thread; returns the launcher, the thread and where its result goes."""
    launcher = make_launcher(parse_job(spec), run_dir)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=_catch(launcher.run)), daemon=True)
    thread.start()
    return launcher, thread, out


def _first_checkpoint(run_dir: str) -> dict:
    """The job's status once it committed a checkpoint (at most 180 s)."""
    deadline = time.monotonic() + 180
    status = None
    while time.monotonic() < deadline and not (status and (status.get("checkpoints") or {}).get("count")):
        time.sleep(0.5)
        status = query_status(run_dir)
    assert status, "the job never committed a checkpoint"
    return status


def _catch(fn):
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001 - handed to the test's thread
        return err


@pytest.mark.slow
def test_a_cluster_without_the_resources_the_job_asks_for_fails_at_once_naming_them(tmp_path, tiny_data, ray_nodes):
    spec = _ray_job(tiny_data)
    spec["ray"]["worker"] = {"num_cpus": 1, "resources": {"gpu_box": 1}}
    started = time.monotonic()
    with pytest.raises(JobFailed, match=r"lacks the job's resources: gpu_box: the job asks for 2, the cluster has 0"):
        make_launcher(parse_job(spec), str(tmp_path / "run")).run()
    spec["ray"]["worker"] = {"num_cpus": 1, "resources": {"trainer": 1}}
    spec["ray"]["placement_strategy"] = "STRICT_SPREAD"
    with pytest.raises(JobFailed, match=r"STRICT_SPREAD puts each of the 4 servers and workers on its own node, the cluster has 3"):
        make_launcher(parse_job(spec), str(tmp_path / "run2")).run()
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_an_insecure_job_on_ray_hands_each_worker_the_job_file_itself_not_a_path_on_the_drivers_machine(tmp_path, tiny_data,
                                                                                                          ray_nodes):
    """--insecure across Ray nodes: no keys anywhere, and each worker's trusted job file (the only
    factories it may import) is written on its own node, so a node without the driver's disk runs it."""
    job = parse_job(_ray_job(tiny_data))
    run_dir = tmp_path / "run"
    result = make_launcher(job, str(run_dir), insecure=True).run()
    assert result.summary["status"] == "ok" and result.summary["test_accuracy"] > 0.7
    assert not (run_dir / "keys").exists()
    placement = json.loads((run_dir / "placement.json").read_text())["processes"]
    for name in ("worker-0", "worker-1"):
        p = placement[name]
        assert p["node_id"] == ray_nodes["trainer"] and "--insecure" in p["args"] and "--keys" not in p["args"]
        shipped = p["args"][p["args"].index("--job") + 1]
        assert not shipped.startswith(str(run_dir)) and "downpour-ray-" in shipped, p["args"]
    assert "--keys" not in placement["server-0"]["args"]
    _assert_private_folders_removed(placement, at_least=2)  # the workers' job files


@pytest.mark.slow
@pytest.mark.parametrize("role,room", [("worker", True), ("worker", False), ("server", True)],
                         ids=["worker-room-elsewhere", "worker-no-room", "server-room-elsewhere"])
def test_on_ray_a_lost_node_s_process_is_replaced_where_there_is_room_and_the_job_goes_on_either_way(tmp_path, tiny_data,
                                                                                                      ray_nodes, role, room):
    """A whole Ray node goes (its raylet and every process on it), not one process. Ray moves the
    placement group's bundle that was there to a node with room, and the worker's (server's)
    replacement starts in it (a server's loads the latest checkpoint); with no room anywhere, the
    replacement is given up after ray.start_timeout_s and the other worker trains the lost one's
    data. Either way every shard is trained once and the job succeeds."""
    cluster, small = ray_nodes["cluster"], ray_nodes["small"]
    first = cluster.add_node(**small, num_cpus=1, resources={"roam": 1})
    second = cluster.add_node(**small, num_cpus=1, resources={"roam": 1})
    spare = None
    cluster.wait_for_nodes()
    epochs = 30
    spec = _ray_job(tiny_data, training={"epochs": epochs},
                    checkpoint={"enabled": True, "every_steps": 20, "every_s": None, "keep": 2},
                    cluster={"num_workers": 2, "heartbeat_timeout_s": 3.0})
    spec["ray"][role] = {"num_cpus": 1 if role == "worker" else 0.5, "resources": {"roam": 1}}
    spec["ray"]["start_timeout_s"] = 20
    spec["data"]["shard_size"] = 200
    launcher, thread, out = _start_in_thread(spec, str(tmp_path / "run"))
    try:
        _first_checkpoint(str(tmp_path / "run"))
        placement = json.loads((tmp_path / "run" / "placement.json").read_text())["processes"]
        lost = next(name for name in (f"{role}-0", f"{role}-1") if placement[name]["node_id"] == second.node_id)
        if room:
            spare = cluster.add_node(**small, num_cpus=1, resources={"roam": 1})
            cluster.wait_for_nodes()
        cluster.remove_node(second)  # the node's raylet and every process on it
        thread.join(timeout=300)
    finally:
        if thread.is_alive():
            launcher.stop_all()
            thread.join(timeout=30)
        for node in (first, spare):
            if node is not None:
                cluster.remove_node(node)
    result = out["result"]
    assert not isinstance(result, BaseException), result
    s = result.summary
    assert s["status"] == "ok", s["error"]
    assert {f["node"] for f in s["failures"]} == {lost}
    shards = s["data_shards"]
    assert shards["unfinished"] == 0 and shards["completed_per_epoch"] == {str(e): shards["num_shards"] for e in range(epochs)}
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())["processes"]
    if room:
        assert placement[f"{lost}.2"]["node_id"] == spare.node_id
    else:
        assert f"{lost}.2" not in placement and s["workers_trained"] == 2


def test_a_ray_address_where_nothing_answers_or_that_ray_rewrites_to_a_dead_one_is_refused_at_once(monkeypatch):
    """ray.init retries such an address for minutes; a loopback one Ray rewrites as this machine's
    own address, where a cluster started on 127.0.0.1 does not listen."""
    import socket

    services = pytest.importorskip("ray._private.services")
    from downpour.launch.ray_cluster import check_ray_address

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        monkeypatch.setattr(services, "resolve_ip_for_localhost", lambda host: "127.0.0.3")  # (nothing there)
        with pytest.raises(JobFailed, match=r"listens on 127\.0\.0\.1 only, but Ray connects .* 127\.0\.0\.3.*127\.0\.0\.2"):
            check_ray_address(f"127.0.0.1:{port}")
        monkeypatch.setattr(services, "resolve_ip_for_localhost", lambda host: host)
        check_ray_address(f"127.0.0.1:{port}")  # what Ray will use answers
        for fine in ("auto", None, "ray://127.0.0.1:1"):
            check_ray_address(fine)  # (not a HOST:PORT this checks)
    finally:
        listener.close()
    with pytest.raises(JobFailed, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}: nothing answers there"):
        check_ray_address(f"127.0.0.1:{port}")
