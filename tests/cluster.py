"""Start a whole job as `downpour train` in the background, wait for it, stop it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import yaml

from downpour.protocol import Message, Op
from downpour.protocol.rpc import RpcClient
from downpour.transport import Security, new_context

PY = sys.executable


def start_job(tmp_path, job: dict) -> tuple[subprocess.Popen, str]:
    """`downpour train` on ``job`` (a job mapping), in the background; returns (process, run folder)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen([PY, "-m", "downpour", "train", str(path), "--run-dir", run_dir, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, run_dir


def query_status(run_dir: str, timeout_s: float = 2.0) -> dict | None:
    """The coordinator's STATUS, or None when it does not answer."""
    addr = os.path.join(run_dir, "coordinator.addr")
    if not os.path.exists(addr):
        return None
    keys = os.path.join(run_dir, "keys")
    security = Security.load(keys, "client") if os.path.isdir(keys) else None
    ctx = new_context()
    rpc = RpcClient(ctx, "test-status", request_timeout_s=timeout_s, security=security)
    try:
        rpc.connect("coordinator", open(addr).read().strip(), role="coordinator")
        return rpc.call("coordinator", Message(Op.STATUS)).meta
    except Exception:
        return None
    finally:
        rpc.close()
        if security is not None:
            security.close()
        ctx.term()


def wait_training(run_dir: str, timeout_s: float = 90.0, steps: int = 1) -> dict:
    """Wait until every worker of the job has taken ``steps`` steps; returns the status then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = query_status(run_dir)
        if st and st["phase"] == "training":
            workers = [n for n in st["nodes"] if n["role"] == "worker"]
            if workers and all(n["progress"].get("steps", 0) >= steps for n in workers):
                return st
        time.sleep(0.2)
    raise AssertionError(f"the job in {run_dir} never started training")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited already; only its parent's wait() is missing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def stop_job(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Stop the launcher at once, as a second Ctrl-C does: the first SIGINT asks for a graceful
    stop, one handled after it stops every process. SIGINT is repeated (a signal arriving before
    the previous one was handled would merge with it) until the launcher ends; killed if it does not.
    (Not SIGTERM: one within processes.REPEAT_S of the first is the same stop, so the graceful stop
    would go on.)"""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@contextlib.contextmanager
def running_job(tmp_path, job: dict, steps: int = 1) -> Iterator[tuple[subprocess.Popen, str, dict]]:
    """A job that trains while the block runs: (launcher process, run folder, first status)."""
    proc, run_dir = start_job(tmp_path, job)
    try:
        yield proc, run_dir, wait_training(run_dir, steps=steps)
    finally:
        stop_job(proc)


# Monitoring off: for end-to-end tests that only read summary.json.
QUIET = {"metrics": False, "dashboard": False, "tensorboard": False}


def run_train(tmp_path, job: dict, timeout_s: float = 90.0) -> dict:
    """`downpour train` on ``job`` to its end (bounded); its summary.json."""
    proc, run_dir = start_job(tmp_path, job)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        stop_job(proc)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)
