"""Checkpoints in real jobs: a stopped job resumes where it was; a new job warm-starts from another's parameters."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
import yaml
from safetensors import safe_open

from downpour.api import resolve_job
from downpour.launch import LocalLauncher
from tests.cluster import PY, start_job, stop_job
from tests.conftest import tiny_job


def _committed(run_dir: str) -> list[str]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if os.path.exists(os.path.join(folder, n, "manifest.json")))


def _stop_after_a_checkpoint(tmp_path, job: dict) -> str:
    """Start the job, stop it at once once a mid-run checkpoint is complete (not the one at step 0)."""
    proc, run_dir = start_job(tmp_path, job)
    try:
        deadline = time.monotonic() + 120
        while not [n for n in _committed(run_dir) if not n.startswith("ckpt-000000000000-")]:
            assert proc.poll() is None, f"the job ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 120s"
            time.sleep(0.05)
    finally:
        stop_job(proc)
    assert not os.path.exists(os.path.join(run_dir, "summary.json")), "stopped before the end"
    return run_dir


def _resume(tmp_path, job: dict, source: str, name: str = "resumed"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / name
    done = subprocess.run([PY, "-m", "downpour", "train", str(path), "--run-dir", str(run_dir), "--quiet", "--resume", source],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def test_a_stopped_sync_job_resumes_to_the_same_parameters(tmp_path, tiny_data):
    """Sync mode is deterministic (no dropout): stop mid-run, resume, and land on the same parameters."""
    job = tiny_job(tiny_data, model={"args": {"hidden": [32], "dropout": 0.0}},
                   training={"consistency": "sync", "epochs": 12}, checkpoint={"every_steps": 60, "every_s": None})
    whole = LocalLauncher(resolve_job(job), str(tmp_path / "whole")).run()
    (tmp_path / "a").mkdir()
    # The run to stop sleeps after each step (sync rounds are deterministic, so its values are the same):
    # at full speed the whole job can end before its first checkpoint is committed and seen.
    slowed = {**job, "training": {**job["training"], "slowdown": {"rank": None, "factor": 8.0}}}
    stopped = _stop_after_a_checkpoint(tmp_path / "a", slowed)
    summary, resumed = _resume(tmp_path, job, stopped)
    state = json.loads(open(os.path.join(stopped, "checkpoints", _committed(stopped)[-1], "job.json")).read())
    assert 0 < state["step"] and state["ledger"]["queue"], "the run was stopped mid-way"
    assert summary["resumed_from"].endswith(_committed(stopped)[-1])
    want = torch.load(os.path.join(whole.run_dir, "model.pt"), weights_only=True)
    got = torch.load(resumed / "model.pt", weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
    # Every shard of every epoch was trained to completion once, across the two runs.
    assert summary["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(12)}
    assert summary["test_accuracy"] == whole.summary["test_accuracy"]


def test_a_stopped_async_job_resumes_and_trains_every_shard_once(tmp_path, tiny_data):
    job = tiny_job(tiny_data, training={"epochs": 40}, checkpoint={"every_s": 0.5})
    (tmp_path / "a").mkdir()
    stopped = _stop_after_a_checkpoint(tmp_path / "a", job)
    summary, resumed = _resume(tmp_path, job, stopped)
    assert summary["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(40)}
    assert summary["data_shards"]["unfinished"] == 0
    assert summary["test_accuracy"] > 0.8
    # The resumed run checkpoints into its own folder, and its last checkpoint is the end of training.
    last = json.loads(open(os.path.join(resumed, "checkpoints", _committed(str(resumed))[-1], "manifest.json")).read())
    assert last["job"]["final"] is True


def test_a_new_job_warm_starts_from_a_checkpoint_and_initialises_new_parameters(tmp_path, tiny_data):
    first = LocalLauncher(resolve_job(tiny_job(tiny_data, training={"epochs": 2})), str(tmp_path / "first")).run()
    # Same model, another learning rate: it starts from the trained parameters.
    warm = {**tiny_job(tiny_data, training={"steps": 1}, optimizer={"lr": 1e-9, "momentum": 0.0}), "init_from": first.run_dir}
    s = LocalLauncher(resolve_job(warm), str(tmp_path / "warm")).run().summary
    assert abs(s["test_accuracy"] - first.summary["test_accuracy"]) < 0.01
    # A wider hidden layer changes shapes: refused, naming the parameters, before any node starts.
    wider = {**tiny_job(tiny_data, model={"args": {"hidden": [48]}}), "init_from": first.run_dir}
    path = tmp_path / "wider.yaml"
    path.write_text(yaml.safe_dump(wider))
    done = subprocess.run([PY, "-m", "downpour", "train", str(path), "--run-dir", str(tmp_path / "wider"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # refused by downpour train itself: no process was started
    assert "changed shape" in done.stderr and "1.weight" in done.stderr, done.stderr
    assert not (tmp_path / "wider").exists()


def _shard_files(folder: str) -> list[dict[str, str]]:
    """Each server's file metadata in a checkpoint folder (version, positions ...)."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("server-") and name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.append(f.metadata())
    return out


@pytest.mark.parametrize("optimizer, training, rule", [
    ({}, {}, "lookahead"),  # auto's choice: each worker's momentum in per-worker buffers on the servers
    ({"scaling": "none"}, {"overlap": True}, "none"),  # the job's momentum as it is, a push always in flight
    ({}, {"consistency": "ssp", "staleness_bound": 2}, "lookahead"),
], ids=["lookahead", "plain-overlap", "ssp"])
def test_a_stopped_async_job_on_two_servers_resumes_to_the_same_parameters(tmp_path, tiny_data, optimizer, training, rule):
    """One async worker is deterministic, and a checkpoint's cut holds the same pushes on every
    server (server/snapshot.py): the resumed job lands where the uninterrupted one does. Before the
    cut, each server copied at its own point of the worker's pushes, a push apart (22 to 453 weights
    ended more than 1e-5 apart from one run to the next). Under ``async_rule: lookahead`` the
    worker's momentum lives in the servers' per-worker buffers, which checkpoints hold (left out,
    2,262 weights ended more than 1e-5 apart). The job is stopped at once (as a second Ctrl-C
    does), so it resumes from a periodic checkpoint, not a graceful stop's final one."""
    job = tiny_job(tiny_data, model={"args": {"hidden": [32], "dropout": 0.0}},
                   optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, **optimizer},
                   training={"consistency": "async", "epochs": 12, **training},
                   cluster={"num_servers": 2, "num_workers": 1}, checkpoint={"every_steps": 60, "every_s": None})
    whole = LocalLauncher(resolve_job(job), str(tmp_path / "whole")).run()
    assert whole.summary["optimizer"]["effective"]["plan"]["async_rule"] == rule
    (tmp_path / "a").mkdir()
    stopped = _stop_after_a_checkpoint(tmp_path / "a", job)
    summary, resumed = _resume(tmp_path, job, stopped)
    assert summary["data_shards"]["completed_per_epoch"] == {str(e): 6 for e in range(12)}
    folder = os.path.join(stopped, "checkpoints", _committed(stopped)[-1])
    state = json.loads(open(os.path.join(folder, "job.json")).read())
    assert 0 < state["step"] and state["ledger"]["queue"], "the run was stopped mid-way"
    # The cut: both servers hold the same pushes, and the worker resumes right after them.
    [s0, s1] = _shard_files(folder)
    assert (s0["version"], s0["positions"]) == (s1["version"], s1["positions"])
    [at] = json.loads(s0["positions"]).values()
    assert state["ledger"]["queue"][0] == at or at[2] == 400  # (a shard pushed to its end is completed)
    want = torch.load(os.path.join(whole.run_dir, "model.pt"), weights_only=True)
    got = torch.load(resumed / "model.pt", weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
