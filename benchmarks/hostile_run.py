"""Chaos plus hostile input: the reference job trains while a peer holding a worker key streams
malformed and forged messages at the coordinator and every server; compared with the same job
undisturbed, in the same invocation.

    .venv/bin/python benchmarks/hostile_run.py                  # reference job, 1 epoch, tcp + CURVE
    .venv/bin/python benchmarks/hostile_run.py --steps 300 --json hostile.json   # shorter
    .venv/bin/python benchmarks/hostile_run.py --runs 3 --json hostile.json      # mean and spread of 3 pairs

The hostile peer starts once training runs. It uses the job's own worker key (RUN_DIR/keys), sends
structure-aware mutations of valid requests (tests/fuzzing.py) to each server (pushes, pulls,
compressed pushes with bad codec headers, NaN/Inf, wrong types) and to the coordinator (heartbeats,
LEAVE, WORKER_DONE, REPORT error/eval forged for the real workers, malformed progress), as fast as
it can without waiting for answers beyond a window. Reported: both runs' test accuracy and their
difference (target: within 0.5 points), examples/s, messages the peer sent, and the refusals by
reason from ``summary.json`` (coordinator and servers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

import zmq  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.coordinator.service import plan_layout  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402
from downpour.protocol import Message, Op  # noqa: E402
from downpour.transport import Security  # noqa: E402
from tests.fuzzing import COORDINATOR_FIELDS, SERVER_FIELDS, coordinator_template, mutate  # noqa: E402

DEFAULT_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
_SERVING = re.compile(r"(server-\d+): serving \d+ parameters in \d+ keys at (\S+)")


class HostilePeer(threading.Thread):
    """Streams mutated messages with the job's worker key until stopped."""

    def __init__(self, run_dir: str, coordinator: str, job, seed: int) -> None:
        super().__init__(name="hostile", daemon=True)
        self.run_dir, self.coordinator, self.job = run_dir, coordinator, job
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.sent: Counter = Counter()
        self.answers: Counter = Counter()

    def _servers(self) -> dict[str, str]:
        found: dict[str, str] = {}
        logs = os.path.join(self.run_dir, "logs")
        for f in os.listdir(logs):
            with open(os.path.join(logs, f), errors="replace") as fh:
                for m in _SERVING.finditer(fh.read()):
                    found[m.group(1)] = m.group(2)
        return found

    def _server_message(self, keys: list[int], numel: int) -> Message:
        import torch

        kind = self.rng.randrange(4)
        grad = torch.randn(numel) * 1e-3
        if kind == 0:
            return Message(Op.PULL, 0, {"keys": keys})
        if kind == 1:
            return Message(Op.PUSHPULL, 0, {"keys": keys, "version": 0, "weight": 1.0, "delta": True}, [grad])
        if kind == 2:
            return Message(Op.PUSH, 0, {"keys": keys, "version": 0, "weight": 1e39}, [grad])
        return Message(Op.PUSH, 0, {"keys": keys, "version": 0, "enc": [["qsgd", {"b": 8.0, "B": 4}, 2]]}, [grad])

    def run(self) -> None:
        ctx = zmq.Context(io_threads=1)
        security = Security.load(os.path.join(self.run_dir, "keys"), "worker")
        layout = plan_layout(self.job)
        sockets: list[tuple[str, zmq.Socket, Any]] = []
        try:
            deadline = time.monotonic() + 30.0
            servers = self._servers()
            while len(servers) < self.job.cluster.num_servers and time.monotonic() < deadline and not self.halt.is_set():
                time.sleep(0.2)
                servers = self._servers()
            for role, address in [("coordinator", self.coordinator), *[(name, a) for name, a in sorted(servers.items())]]:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 1000)
                security.connect(s, "coordinator" if role == "coordinator" else "server")
                s.connect(address)
                rank = int(role.split("-")[1]) if role != "coordinator" else None
                keys = [sl.key for sl in layout.server_slices(rank)] if rank is not None else None
                numel = layout.server_numel(rank) if rank is not None else 0
                sockets.append((role, s, (keys, numel)))
            req = 0
            while not self.halt.is_set():
                for role, s, (keys, numel) in sockets:
                    req += 1
                    if role == "coordinator":
                        node = self.rng.choice([f"worker-{i}" for i in range(self.job.cluster.num_workers)])
                        frames, op = mutate(self.rng, coordinator_template(self.rng, node), COORDINATOR_FIELDS, req)
                    else:
                        frames, op = mutate(self.rng, self._server_message(keys, numel), SERVER_FIELDS, req)
                    try:
                        s.send_multipart(frames, zmq.NOBLOCK)
                        self.sent[role] += 1
                    except zmq.Again:
                        pass
                    while s.poll(0):
                        reply = s.recv_multipart()
                        self.answers[role] += 1
                        del reply
                time.sleep(0.001)  # a steady stream (about 1,000 messages/s per target), not a flood
        finally:
            for _, s, _ in sockets:
                s.close(linger=0)
            security.close()
            ctx.destroy(linger=0)


def run(job_path: str, overrides: list[str], run_dir: str, hostile: bool, seed: int) -> dict[str, Any]:
    job = load_job(job_path, ["cluster.transport=tcp", *overrides])  # tcp + CURVE: the peer holds a worker key
    launcher = LocalLauncher(job, run_dir)
    peer: list[HostilePeer] = []

    def on_status(status: dict[str, Any]) -> None:
        if hostile and not peer and status.get("phase") == "training" and launcher.address:
            peer.append(HostilePeer(run_dir, launcher.address, job, seed))
            peer[0].start()

    try:
        result = launcher.run(on_status=on_status)
    finally:
        if peer:
            peer[0].halt.set()
            peer[0].join(10.0)
    s = result.summary
    servers = {name: (st or {}).get("rejected", {}) for name, st in (s.get("servers") or {}).items()}
    return {"hostile": hostile, "test_accuracy": s.get("test_accuracy"), "examples_per_s": s.get("examples_per_s"),
            "status": s.get("status"), "failures": len(s.get("failures") or []),
            "coordinator_refused": s.get("coordinator_refused"), "servers_refused": servers,
            "peer_sent": dict(peer[0].sent) if peer else {}, "peer_answers": dict(peer[0].answers) if peer else {}}


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} (sd {sd:.4f}, {min(values):.4f}-{max(values):.4f}, n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--steps", type=int, default=None, help="cap training.steps (default: the job's epochs)")
    ap.add_argument("--seed", type=int, default=0, help="the hostile peer's first seed (run i uses seed + i)")
    ap.add_argument("--runs", type=int, default=1, help="pairs of runs (undisturbed, hostile), interleaved")
    ap.add_argument("--json", help="written after every run (a stopped invocation keeps the runs it finished)")
    args = ap.parse_args()
    overrides = [f"training.steps={args.steps}"] if args.steps else []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for hostile in (False, True):
                name = f"{'hostile' if hostile else 'calm'}-{i}"
                r = run(args.job, overrides, os.path.join(tmp, name), hostile, args.seed + i)
                r["pair"] = i
                results.append(r)
                print(json.dumps(r, sort_keys=True), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"environment": environment(), "args": vars(args), "results": results}, f, indent=2)
    calm = [r["test_accuracy"] for r in results if not r["hostile"] and r["test_accuracy"] is not None]
    bad = [r["test_accuracy"] for r in results if r["hostile"] and r["test_accuracy"] is not None]
    if calm and bad:
        diff = 100 * (statistics.fmean(bad) - statistics.fmean(calm))
        print(f"test accuracy undisturbed {_spread(calm)}; under hostile input {_spread(bad)}: "
              f"{diff:+.2f} points between the means (target: within 0.5)")
        rates = [(r["hostile"], r["examples_per_s"]) for r in results if r["examples_per_s"]]
        print(f"examples/s undisturbed {statistics.fmean(x for h, x in rates if not h):.0f}, "
              f"hostile {statistics.fmean(x for h, x in rates if h):.0f}")


if __name__ == "__main__":
    main()
