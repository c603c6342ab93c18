"""What a killed worker costs the reference job: detection, recovery, accuracy, repeats.

Each run trains the reference job (examples/mnist.yaml, ``--epochs`` epochs, checkpoints
off) through :class:`downpour.launch.LocalLauncher` and SIGKILLs worker-1 ``--after`` seconds
after it began training (then, with ``--every S``, a random live worker every S seconds);
an undisturbed run of the same job comes first. From each run's ``summary.json``:
for every failure, the seconds until it was declared dead (``detected_after_s``) and until
another worker took up the first shard it gave back (``recovered_after_s``), whether a
replacement joined, shards put back, and whether every shard of every epoch was completed
exactly once; plus examples/s and test accuracy against the undisturbed run.

    .venv/bin/python benchmarks/recovery.py                          # 1 kill, default timeout (5 s)
    .venv/bin/python benchmarks/recovery.py --every 4 --epochs 8     # a kill every 4 s
    .venv/bin/python benchmarks/recovery.py --set cluster.heartbeat_timeout_s=2
    .venv/bin/python benchmarks/recovery.py --server                 # kill server-1 once instead
    .venv/bin/python benchmarks/recovery.py --chaos --epochs 4       # workers, a server and the coordinator

With ``--server`` both runs take checkpoints every ``--checkpoint-every`` seconds (a replacement
server loads the latest one); the killed server's ``recovered_after_s`` is the time from
detection until its replacement serves, and the updates it applied since that checkpoint are lost.

``--chaos`` (a chaos test on the reference job): from ``--after`` seconds on, every
``--every`` seconds (default 3) one kill, in the order worker, server-1, worker, coordinator,
then a random worker each time until the job ends; checkpoints as with ``--server``. The
coordinator's ``detected_after_s`` runs from its last saved state to the launcher noticing the
death, its ``recovered_after_s`` from then until the new coordinator answered a node (and
``reconnected_after_s``, in the summary, until every live node was heard from again).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402

DEFAULT_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")


def _live_workers(launcher: LocalLauncher) -> list:
    return [p for p in launcher.procs if p.name.startswith("worker-") and p.popen.poll() is None]


def _training(launcher: LocalLauncher) -> bool:
    """worker-1 has begun training (its log says so)."""
    for p in launcher.procs:
        if p.name == "worker-1":
            try:
                with open(p.log_path, errors="replace") as f:
                    return "training on" in f.read()
            except OSError:
                return False
    return False


def _kill(p, kills: list) -> None:
    p.popen.send_signal(signal.SIGKILL)
    kills.append((time.monotonic(), p.name))


def chaos(launcher: LocalLauncher, every_s: float, kills: list, stop: threading.Event, rng: random.Random,
          phase: dict) -> None:
    """Worker, server-1, worker, coordinator, then workers: one kill every ``every_s``, while the
    job trains (``phase``: the coordinator's, as the launcher's status polls see it)."""
    plan = ["worker", "server", "worker", "coordinator"]
    while phase.get("phase") == "training":
        kind = plan.pop(0) if plan else "worker"
        if kind == "coordinator":
            _kill(launcher.coordinator, kills)
        elif kind == "server":
            _kill(next(p for p in launcher.procs if p.name.startswith("server-1") and p.popen.poll() is None), kills)
        else:
            live = _live_workers(launcher)
            if len(live) > 1:
                _kill(rng.choice(live), kills)
        if stop.wait(every_s):
            return


def killer(launcher: LocalLauncher, after_s: float, every_s: float | None, kills: list, stop: threading.Event,
           server: bool = False, chaotic: bool = False, phase: dict | None = None) -> None:
    """SIGKILL worker-1 (or server-1) ``after_s`` after worker-1 began training (then a random live
    worker every ``every_s``)."""
    rng = random.Random(0)
    while not _training(launcher):
        if stop.wait(0.1):
            return
    if stop.wait(after_s):
        return
    if chaotic:
        return chaos(launcher, every_s or 3.0, kills, stop, rng, phase if phase is not None else {})
    if server:
        p = next(p for p in launcher.procs if p.name == "server-1")
        p.popen.send_signal(signal.SIGKILL)
        kills.append((time.monotonic(), p.name))
        return
    while True:
        live = _live_workers(launcher)
        victims = [p for p in live if p.name == "worker-1"] or live
        if len(live) > 1 and victims:
            p = victims[0] if not kills else rng.choice(live)
            p.popen.send_signal(signal.SIGKILL)
            kills.append((time.monotonic(), p.name))
        if every_s is None or stop.wait(every_s):
            return


def run(job_path: str, overrides: list[str], run_dir: str, after_s: float | None, every_s: float | None,
        server: bool = False, chaotic: bool = False) -> dict[str, Any]:
    job = load_job(job_path, overrides)
    launcher = LocalLauncher(job, run_dir)
    kills: list = []
    stop = threading.Event()
    thread = None
    phase: dict = {}
    if after_s is not None:
        thread = threading.Thread(target=killer, args=(launcher, after_s, every_s, kills, stop, server, chaotic, phase), daemon=True)
        thread.start()
    try:
        s = launcher.run(on_status=lambda st: phase.update(phase=st.get("phase"))).summary
    finally:
        stop.set()
        if thread is not None:
            thread.join(5.0)
    shards = s.get("data_shards") or {}
    once = shards.get("unfinished") == 0 and all(n == shards.get("num_shards")
                                                 for n in (shards.get("completed_per_epoch") or {}).values())
    return {"status": s.get("status"), "test_accuracy": s.get("test_accuracy"), "examples_per_s": s.get("examples_per_s"),
            "train_s": s.get("train_s"), "kills": [name for _, name in kills], "failures": s.get("failures") or [],
            "requeued": shards.get("requeued"), "every_shard_once": once}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--after", type=float, default=3.0, help="seconds of worker-1's training before the first kill")
    ap.add_argument("--every", type=float, default=None, help="then kill a random worker every this many seconds")
    ap.add_argument("--server", action="store_true", help="kill server-1 once (after --after seconds) instead of workers")
    ap.add_argument("--chaos", action="store_true", help="kill workers, server-1 and the coordinator (see above)")
    ap.add_argument("--checkpoint-every", type=float, default=2.0, help="with --server/--chaos: seconds between checkpoints")
    ap.add_argument("--set", action="append", default=[], help="more job overrides (key=value)")
    args = ap.parse_args()
    env = environment()
    ckpt = args.server or args.chaos
    checkpoints = [f"checkpoint.every_s={args.checkpoint_every}"] if ckpt else ["checkpoint.enabled=false"]
    overrides = [f"training.epochs={args.epochs}", *checkpoints, "cluster.worker_restarts=100", *args.set]
    tmp = tempfile.mkdtemp(prefix="downpour-bench-recovery-")
    try:
        base = run(args.job, overrides, os.path.join(tmp, "undisturbed"), None, None)
        hit = run(args.job, overrides, os.path.join(tmp, "killed"), args.after, args.every, args.server, args.chaos)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{env['time']}, {env['cpus']} CPUs, torch {env['torch']}, {args.epochs} epochs, overrides {args.set}\n")
    print("| run | status | test accuracy | examples/s | kills | shards put back | every shard once |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("undisturbed", base), ("killed", hit)):
        print(f"| {name} | {r['status']} | {r['test_accuracy']:.4f} | {r['examples_per_s']:,.0f} | {len(r['kills'])} "
              f"| {r['requeued']} | {r['every_shard_once']} |")
    print("\n| failure | detected after (s) | recovered after (s) | shards put back | replaced by | restored from (version at failure) |")
    print("|---|---|---|---|---|---|")
    for f in hit["failures"]:
        print(f"| {f['node']} ({f['kind']}) | {f['detected_after_s']} | {f['recovered_after_s']} | {len(f.get('requeued') or [])} "
              f"| {f.get('replaced_by')} | {f.get('restored_from', '-')} ({f.get('version_at_failure', '-')}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
