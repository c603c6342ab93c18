"""Real clusters on 127.0.0.1: a coordinator, servers and workers as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from downpour.api import resolve_job
from downpour.coordinator.shards import ShardLedger, shard_size_for
from downpour.data import load_idx_dataset
from downpour.data.order import example_order
from downpour.launch import LocalLauncher
from downpour.models import build_model
from tests.cluster import alive, start_job, wait_training
from tests.conftest import tiny_job

PY = sys.executable


def run_job(tmp_path, job: dict):
    return LocalLauncher(resolve_job(job), str(tmp_path / "run")).run()


def test_an_async_job_trains_and_writes_its_run_folder(tmp_path, tiny_data):
    result = run_job(tmp_path, tiny_job(tiny_data, training={"epochs": 2}))
    s = result.summary
    assert s["status"] == "ok"
    assert s["examples"] == 2 * 2400
    assert s["num_servers"] == 2 and s["num_workers"] == 2 and s["consistency"] == "async"
    assert s["test_accuracy"] > 0.8  # the tiny classes are easy; chance is 0.1
    assert s["staleness"]["pushes"] == s["steps"] * 2  # each step pushes once to each of the 2 servers
    assert s["data_shards"]["completed_per_epoch"] == {"0": 6, "1": 6}
    for key in ("test_loss", "wall_s", "examples_per_s", "train_s"):
        assert s[key] is not None
    run = tmp_path / "run"
    assert {"config.yaml", "summary.json", "model.pt"} <= set(os.listdir(run))
    assert sorted(os.listdir(run / "logs")) == ["coordinator.log", "server-0.log", "server-1.log", "worker-0.log", "worker-1.log"]
    assert all(code == 0 for code in result.exit_codes.values())
    state = torch.load(run / "model.pt", weights_only=True)
    assert list(state) == ["1.weight", "1.bias", "3.weight", "3.bias"]


def test_a_sync_job_keeps_workers_in_lockstep_with_no_staleness(tmp_path, tiny_data):
    s = run_job(tmp_path, tiny_job(tiny_data, training={"consistency": "sync", "epochs": 2})).summary
    assert s["status"] == "ok" and s["consistency"] == "sync"
    assert s["staleness"]["max"] == 0
    assert s["examples"] == 2 * 2400
    assert s["test_accuracy"] > 0.8
    versions = {srv["version"] for srv in s["servers"].values()}
    assert len(versions) == 1  # both servers applied the same number of averaged rounds
    assert versions.pop() < s["steps"]  # a round averages several workers' pushes


def _reference_params(job_dict: dict, data: str, steps: int) -> torch.Tensor:
    """What torch.optim gives on one process with the same model, data order and seed."""
    job = resolve_job(job_dict)
    t = job.training
    model = build_model(job.model, t.seed)
    opt = torch.optim.SGD(model.parameters(), lr=job.optimizer.lr, momentum=job.optimizer.momentum,
                          nesterov=job.optimizer.nesterov, weight_decay=job.optimizer.weight_decay)
    ds = load_idx_dataset(data)
    ledger = ShardLedger(len(ds.train), shard_size_for(job.data.shard_size, len(ds.train), job.cluster.worker_slots, t.batch_size),
                         t.epochs, t.seed)
    done = 0
    while done < steps:
        shard = ledger.next("w")
        assert shard is not None
        positions = example_order(len(ds.train), t.seed, shard["epoch"])[shard["start"] : shard["stop"]]
        x_all, y_all = ds.train.take(np.random.default_rng([t.seed, shard["epoch"], shard["shard"]]).permutation(positions))
        for b in range(0, len(y_all), t.batch_size):
            if done == steps:
                break
            opt.zero_grad()
            F.cross_entropy(model(x_all[b : b + t.batch_size]), y_all[b : b + t.batch_size]).backward()
            opt.step()
            done += 1
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_one_sync_worker_matches_torch_optim(tmp_path, tiny_data, shared_memory):
    steps = 40
    job = tiny_job(tiny_data, training={"consistency": "sync", "steps": steps},
                   optimizer={"nesterov": True, "weight_decay": 1e-3},
                   cluster={"num_workers": 1, "transport": "ipc", "shared_memory": shared_memory})
    s = run_job(tmp_path, job).summary
    assert s["steps"] == steps
    # The INIT, the first pull and every push+pull (one request per server each) went through
    # shared memory, or none did.
    assert s["workers"]["worker-0"]["shm_requests"] == ((steps + 2) * 2 if shared_memory else 0)
    # 40 steps of 32 cover 3 shards of 400 and part of a fourth, which stays unfinished.
    assert s["data_shards"]["completed_per_epoch"] == {"0": 3} and s["data_shards"]["unfinished"] >= 1
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    want = _reference_params(job, tiny_data, steps)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "downpour", *args], capture_output=True, text=True, timeout=120, **kw)


def test_a_bad_job_file_names_the_field_and_starts_nothing(tmp_path, tiny_data):
    bad = tiny_job(tiny_data, training={"consistency": "eventually"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = _cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "training.consistency" in r.stderr and "'async'" in r.stderr and "'sync'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_says_how_to_get_it_and_starts_nothing(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(str(tmp_path / "nowhere"))))
    r = _cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0]
    assert not (tmp_path / "run").exists()


def _start_long_job(tmp_path, tiny_data, **cluster):
    return start_job(tmp_path, tiny_job(tiny_data, training={"epochs": 1000}, cluster=cluster))


# A killed node stops the job only where the job says so (recovery: tests/test_recovery.py and
# tests/test_coordinator_restart.py).
@pytest.mark.parametrize("victim", ["worker-1", "server-0", "coordinator"])
def test_a_killed_node_stops_the_job_with_a_clear_error(tmp_path, tiny_data, victim):
    proc, run_dir = _start_long_job(tmp_path, tiny_data, on_worker_failure="fail", on_server_failure="fail", coordinator_restarts=0)
    try:
        status = wait_training(run_dir)
        pids = {n["name"]: n["pid"] for n in status["nodes"]}
        found = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "downpour coordinator"], capture_output=True, text=True)
        pids["coordinator"] = int(found.stdout.split()[0])
        os.kill(pids[victim], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert f"{victim} (pid {pids[victim]}) was killed by SIGKILL" in err
    if victim != "coordinator":  # the coordinator's verdict is in the run folder, for downpour status and post-mortems
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        assert summary["status"] == "failed" and summary["failed_node"] == victim and "exited" in summary["error"]
    deadline = time.monotonic() + 10.0  # the launcher stops the rest; their exits may take a moment
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids.values()), "every process of the job is stopped"


def test_a_frozen_worker_is_named_as_the_cause_not_the_workers_the_coordinator_stopped(tmp_path, tiny_data):
    proc, run_dir = _start_long_job(tmp_path, tiny_data, on_worker_failure="fail")
    try:
        status = wait_training(run_dir)
        frozen = next(n["pid"] for n in status["nodes"] if n["name"] == "worker-1")
        os.kill(frozen, signal.SIGSTOP)  # up but silent, like a hung machine
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "job failed: worker-1: no heartbeat" in err, err[-2000:]
    log = open(os.path.join(run_dir, "logs", "coordinator.log")).read()
    assert log.count("coordinator: job failed") == 1, log[-2000:]  # said once, when it failed
    # The launcher kills the hung process at once instead of waiting for it to exit by itself.
    assert f"worker-1 (pid {frozen}) was declared dead by the coordinator but still runs; killing it" in err, err[-2000:]
    assert not alive(frozen)


def test_a_second_ctrl_c_stops_every_process_at_once(tmp_path, tiny_data):
    proc, run_dir = _start_long_job(tmp_path, tiny_data)
    try:
        pids = [n["pid"] for n in wait_training(run_dir)["nodes"]]
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:  # repeated: one arriving before the
            proc.send_signal(signal.SIGINT)                          # first was handled merges with it
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_hand_started_roles_form_one_job(tmp_path, tiny_data):
    """`downpour keys`, then `downpour coordinator|server|worker` by hand with the job's keys, a worker
    configured by environment variables."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(tiny_data, cluster={"num_servers": 1, "num_workers": 2}, training={"steps": 10})))
    run_dir = tmp_path / "run"
    keys = str(tmp_path / "keys")
    assert _cli("keys", keys).returncode == 0
    logs = open(tmp_path / "nodes.log", "w")
    procs = [subprocess.Popen([PY, "-m", "downpour", "coordinator", str(path), "--bind", "tcp://127.0.0.1:*", "--run-dir", str(run_dir),
                               "--keys", keys], stdout=logs, stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "coordinator.addr").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.1)
        url = (run_dir / "coordinator.addr").read_text().strip()
        host_port = url.removeprefix("tcp://")
        procs.append(subprocess.Popen([PY, "-m", "downpour", "server", "--coordinator", host_port, "--keys", keys],
                                      stdout=logs, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([PY, "-m", "downpour", "worker", "--coordinator", host_port, "--keys", keys],
                                      stdout=logs, stderr=subprocess.STDOUT))
        env = dict(os.environ, DOWNPOUR_ROLE="worker", DOWNPOUR_COORDINATOR=host_port, DOWNPOUR_KEYS=keys)
        procs.append(subprocess.Popen([PY, "-m", "downpour", "node"], env=env, stdout=logs, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
        logs.close()
    assert codes == [0, 0, 0, 0], open(tmp_path / "nodes.log").read()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 20


def test_the_python_api_trains_module_level_factories(tmp_path, tiny_data):
    import downpour
    from tests.api_factories import idx_dataset, small_model

    config = tiny_job(tiny_data, training={"steps": 15})
    config["model"] = {"args": {"width": 8}}
    config["data"] = {"args": {"path": tiny_data}, "shard_size": 400}
    result = downpour.train(small_model, idx_dataset, config, run_dir=str(tmp_path / "run"))
    assert result["status"] == "ok" and result["steps"] == 30  # still reads as the summary
    assert result.summary["status"] == "ok" and result.run_dir == str(tmp_path / "run")
    state = torch.load(result.model_path, weights_only=True)
    assert state["1.weight"].shape == (8, 784)
    model = result.load_model()
    assert torch.equal(model[1].weight, state["1.weight"]) and not model.training


def test_a_script_that_calls_train_without_a_main_guard_is_told_to_add_one(tmp_path):
    # The job's processes import the script for its functions, so its top level runs again there.
    script = tmp_path / "noguard.py"
    script.write_text(
        "import torch, downpour\n"
        "from torch.utils.data import TensorDataset\n"
        "def model(): return torch.nn.Linear(4, 2)\n"
        "def data(): return TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))\n"
        f"downpour.train(model, data, {{'cluster': {{'num_servers': 1, 'num_workers': 1}}}}, run_dir={str(tmp_path / 'run')!r})\n")
    done = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert f"imported {script} for the functions it names" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()  # nothing started


def test_a_script_run_from_another_folder_finds_its_sibling_module_and_its_first_ctrl_c_stops_the_job_gracefully(tmp_path):
    """``python path/to/train.py``: the job's processes import a module beside the script as the
    script did (before, the check passed and the job then failed to start), and Ctrl-C stops the
    job as ``downpour train``'s does: a final checkpoint, and a result that says ``stopped``."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "sibmodels.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def net(): return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(4000, 8, generator=g)\n"
        "    return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x[:500], (x[:500, 0] > 0).long())\n")
    run_dir = tmp_path / "run"
    (folder / "train.py").write_text(
        "import downpour\n"
        "from sibmodels import net, data\n"
        "if __name__ == '__main__':\n"
        "    result = downpour.train(net, data, {'training': {'epochs': 500, 'batch_size': 16}, 'monitor': {'metrics': False,\n"
        "                           'tensorboard': False, 'dashboard': False}, 'cluster': {'num_servers': 1, 'num_workers': 2}},\n"
        f"                           run_dir={str(run_dir)!r})\n"
        "    print('STATUS', result['status'], result['checkpoints']['last'], flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # downpour itself (not the project)
    proc = subprocess.Popen([PY, str(folder / "train.py")], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_training(str(run_dir), timeout_s=90, steps=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "stopping the job gracefully" in err
    status = out.split("STATUS ")[1].split()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert status[0] == summary["status"] == "stopped" and status[1] == summary["checkpoints"]["last"] != "None"
    assert 0 < summary["examples"] < 500 * 4000


def test_overlap_ipc_and_the_greedy_partitioner_train_together(tmp_path, tiny_data):
    # A gentler rate: overlap adds a step of staleness, which lr 0.05 with momentum 0.9 does not always survive.
    job = tiny_job(tiny_data, training={"overlap": True, "epochs": 2}, optimizer={"lr": 0.02},
                   cluster={"transport": "ipc", "partitioner": "greedy", "num_servers": 3})
    s = run_job(tmp_path, job).summary
    assert s["status"] == "ok" and s["examples"] == 2 * 2400
    assert s["test_accuracy"] > 0.8
    # With a push+pull in flight during each step, every push is at least one version stale.
    assert s["staleness"]["mean"] >= 1


def test_a_local_job_talks_over_ipc_sockets_only_its_user_can_open(tmp_path, tiny_data):
    """`downpour train`'s default transport: unix sockets in a 0700 folder, which need no keys."""
    seen: list[tuple[str, int]] = []

    def look(status: dict) -> None:  # while the job runs (the folder may be a temporary one)
        address = (tmp_path / "run" / "coordinator.addr").read_text().strip()
        seen.append((address, os.stat(os.path.dirname(address.removeprefix("ipc://"))).st_mode & 0o777))

    launcher = LocalLauncher(resolve_job(tiny_job(tiny_data, training={"steps": 20})), str(tmp_path / "run"))
    summary = launcher.run(look).summary
    assert summary["status"] == "ok"
    assert seen and all(address.startswith("ipc://") and mode == 0o700 for address, mode in seen)
    assert not (tmp_path / "run" / "keys").exists()
    # The values went through shared-memory slots beside the sockets, and no slot outlives the job.
    assert all(w["shm_requests"] > 20 for w in summary["workers"].values())
    folder = os.path.dirname(seen[0][0].removeprefix("ipc://"))
    assert not os.path.exists(folder) or not [f for f in os.listdir(folder) if f.startswith("shm-")]
