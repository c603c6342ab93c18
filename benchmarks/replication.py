"""What replicated servers cost and how fast they fail over (cluster.replicas).

``--throughput``: examples/s of the reference job (examples/mnist.yaml on 3 servers, so that
k = 2 is possible) and, with ``--ctr ROWS``, of the CTR job (examples/ctr.yaml on generated data,
3 servers), with k = 0, 1 and 2 backups per rank (``replication: sync``), interleaved: round 1
runs every k once, round 2 again, and so on, so that a change in the machine's load falls on
every k alike. Checkpoints off.

``--failover``: the reference job with one backup per rank; once rank 1's primary reports a
caught-up backup, its process is SIGKILLed. From summary.json: detection (``detected_after_s``:
silence until declared dead), promotion (detection until the promoted server registered),
failover (detection until the first worker request the promoted primary served), and
re-replication (promotion until the rank's new backup caught up), with the bytes of the state
transfer that built it; one run per ``--hidden`` size (the shard grows with the hidden layer).
Every run also checks that no update was lost: each rank's applied pushes against the pushes
the workers made.

``--accuracy N``: N pairs of runs, each an undisturbed one and one whose rank 1 primary is killed
``--kills`` times (the second time the promoted primary, once its new backup caught up), one backup
per rank: the reference job's test accuracy, or with ``--accuracy-job ctr`` the CTR job's test AUC
and logloss; differences in points (x 100), mean ± sd.

    flock /work/.cpu.lock .venv/bin/python benchmarks/replication.py --throughput --rounds 2
    flock /work/.cpu.lock .venv/bin/python benchmarks/replication.py --throughput --ctr 200000 --rounds 2
    flock /work/.cpu.lock .venv/bin/python benchmarks/replication.py --failover --hidden 128,1024,4096
    flock /work/.cpu.lock .venv/bin/python benchmarks/replication.py --accuracy 3 --kills 2 --epochs 2 --accuracy-job ctr
"""

from __future__ import annotations

import argparse
import json
import os
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
from downpour.api import resolve_job  # noqa: E402
from downpour.config import apply_overrides  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402

REFERENCE = os.path.join(_ROOT, "examples", "mnist.yaml")
CTR = os.path.join(_ROOT, "examples", "ctr.yaml")


def _job(path: str, overrides: list[str]):
    import yaml

    with open(path) as f:
        return resolve_job(apply_overrides(yaml.safe_load(f), overrides))


def requests_per_push(job) -> dict[int, int]:
    """Push requests one worker push sends each server rank: its keys go in requests of at most
    ``cluster.max_request_bytes`` in async mode (whole keys; worker/client.py), in one in sync mode."""
    from downpour.coordinator.service import plan_layout

    layout = plan_layout(job)
    limit = job.cluster.max_request_bytes // 4 if job.training.consistency != "sync" else None
    out: dict[int, int] = {}
    for rank in range(job.cluster.num_servers):
        n, size = 0, 0
        for s in layout.server_slices(rank):
            if n == 0 or (limit is not None and size + s.length > limit):
                n, size = n + 1, 0
            size += s.length
        out[rank] = n
    return out


def lost_updates(s: dict[str, Any], job) -> int:
    """Push requests the workers made that some rank's final server did not apply exactly once
    (the sum over ranks of |applied - made|), plus pushes the workers dropped."""
    made = sum(w["pushes"] for w in s["workers"].values())
    dropped = sum(w.get("dropped_pushes", 0) for w in s["workers"].values())
    per = requests_per_push(job)
    return dropped + sum(abs(s["servers"][f"server-{r}"]["pushes"] - made * n) for r, n in per.items())


def throughput(path: str, overrides: list[str], k: int, tmp: str, mode: str = "sync") -> dict[str, Any]:
    job = _job(path, [*overrides, f"cluster.replicas={k}", f"cluster.replication={mode}", "checkpoint.enabled=false"])
    run_dir = tempfile.mkdtemp(dir=tmp)
    s = LocalLauncher(job, run_dir).run().summary
    shutil.rmtree(run_dir, ignore_errors=True)
    rep = [v.get("replication") or {} for v in s["servers"].values()]
    return {"k": k, "replication": mode, "examples_per_s": s["examples_per_s"], "train_s": s["train_s"], "status": s["status"],
            "accuracy": s.get("test_accuracy", s.get("test_auc")), "replicated_mb": sum(r.get("bytes", 0) for r in rep) / 1e6,
            "lost": lost_updates(s, job)}


def _ready(st: dict[str, Any], rank: int) -> dict | None:
    """Rank ``rank``'s primary when it reports a caught-up backup that its keeper reports ready."""
    if st.get("phase") != "training":
        return None
    nodes = st.get("nodes", [])
    primary = next((n for n in nodes if n["role"] == "server" and n["rank"] == rank and n["state"] == "alive"), None)
    if primary is None or not primary["progress"].get("steps", 1):
        return None
    caught = (primary["progress"].get("replication") or {}).get("backups") or []
    for n in nodes:
        entry = (n["progress"].get("backups") or {}).get(str(rank)) if f"{n['name']}/{n['pid']}" in caught else None
        if entry and entry[0] and entry[2] == primary.get("address"):
            return primary
    return None


def failover(hidden: int | None, overrides: list[str], tmp: str, after_s: float, kills: int = 1,
             path: str = REFERENCE) -> dict[str, Any]:
    """One run of ``path`` (hidden layer ``hidden`` wide; None: the job's) with one backup per rank;
    rank 1's primary SIGKILLed ``kills`` times (each once it has a caught-up backup again, the first
    ``after_s`` into training; kills = 0: undisturbed)."""
    width = [f"model.args.hidden=[{hidden}]"] if hidden is not None else []
    job = _job(path, [*overrides, *width, "cluster.replicas=1", "cluster.replication=sync", "checkpoint.enabled=false"])
    run_dir = tempfile.mkdtemp(dir=tmp)
    status: dict[str, Any] = {}
    killed: list[int] = []

    def on_status(st: dict[str, Any]) -> None:
        status.clear()
        status.update(st)

    def killer() -> None:
        started = None
        while len(killed) < kills:
            st = dict(status)
            if st.get("phase") in ("finished", "failed", "stopping", "evaluating"):
                return
            if st.get("phase") == "training" and started is None:
                started = time.monotonic()
            recovering = any(f.get("recovered_after_s") is None or f.get("rereplicated_after_s") is None
                             or f.get("failover_s") is None for f in st.get("failures", []))
            primary = (_ready(st, 1) if started is not None and time.monotonic() - started >= after_s
                       and len(st.get("failures", [])) >= len(killed) and not recovering else None)
            if primary is not None and primary["pid"] not in killed:
                os.kill(primary["pid"], signal.SIGKILL)
                killed.append(primary["pid"])
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    s = LocalLauncher(job, run_dir).run(on_status=on_status).summary
    t.join(5.0)
    shutil.rmtree(run_dir, ignore_errors=True)
    f = next((f for f in s["failures"] if f.get("promoted_to")), {})
    rep = (s["servers"].get("server-1") or {}).get("replication") or {}
    return {"hidden": hidden, "planned": kills, "killed": len(killed),
            "failovers": len([f for f in s["failures"] if f.get("promoted_to")]), "status": s["status"],
            "detected_s": f.get("detected_after_s"),
            "promoted_s": f.get("promoted_after_s"), "failover_s": f.get("failover_s"),
            "rereplicated_s": f.get("rereplicated_after_s"),
            "state_mb": rep.get("transfer_bytes", 0) / max(1, rep.get("transfers", 1)) / 1e6,
            "lost": lost_updates(s, job), "accuracy": s.get("test_accuracy"),
            "auc": s.get("test_auc"), "logloss": s.get("test_logloss")}


def _ctr_data(rows: int) -> str:
    """The CTR job's data: ``rows`` generated rows (seed 0), made once under data/."""
    from downpour.data.criteo_gen import CriteoSpec, generate

    data = os.path.join(_ROOT, "data", f"criteo-{rows}-0")
    if not os.path.exists(os.path.join(data, "criteo.json")):
        generate(CriteoSpec(rows=rows, seed=0), data, overwrite=True)
    return data


def _mean_sd(xs: list[float]) -> str:
    import statistics

    return f"{statistics.mean(xs):+.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def accuracy_pairs(args: argparse.Namespace, tmp: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    """``args.accuracy`` pairs, each an undisturbed run and one whose rank 1 primary is killed
    ``args.kills`` times (one backup per rank, 3 servers): the reference job's test accuracy, or
    with ``--accuracy-job ctr`` the CTR job's test AUC and logloss, in points (x 100)."""
    ctr = args.accuracy_job == "ctr"
    path, hidden = (CTR, None) if ctr else (REFERENCE, 128)
    overrides = [f"training.epochs={args.epochs}", "cluster.num_servers=3", *args.set]
    if ctr:
        overrides.insert(0, f"data.path={_ctr_data(args.ctr or 200_000)}")
    rows = []
    for i in range(args.accuracy):
        for kills in (0, args.kills):
            row = {"job": args.accuracy_job, "pair": i, **failover(hidden, overrides, tmp, args.after, kills, path)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{env['time']}, {env['cpus']} CPUs, torch {env['torch']}, {args.accuracy_job} job, {args.epochs} epochs, "
          f"overrides {args.set}\n")
    metrics = ["auc", "logloss"] if ctr else ["accuracy"]
    print("| pair | " + " | ".join(f"undisturbed {m} | killed {m} | difference (points)" for m in metrics)
          + " | failovers | lost updates |")
    print("|---|" + "---|---|---|" * len(metrics) + "---|---|")
    diffs: dict[str, list[float]] = {m: [] for m in metrics}
    for i in range(args.accuracy):
        calm, hit = (next(x for x in rows if x["pair"] == i and x["planned"] == k) for k in (0, args.kills))
        cells = []
        for m in metrics:
            diffs[m].append(100 * (hit[m] - calm[m]))
            cells.append(f"{calm[m]:.4f} | {hit[m]:.4f} | {diffs[m][-1]:+.2f}")
        print(f"| {i} | " + " | ".join(cells) + f" | {hit['failovers']} of {hit['killed']} kills | {hit['lost']} |")
    for m in metrics:
        print(f"\n{m}: difference {_mean_sd(diffs[m])} points (mean ± sd) over {len(diffs[m])} pairs")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--failover", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ks", default="0,1,2", help="--throughput: backups per rank; 1a: one, replication async")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--ctr", type=int, default=0, help="also the CTR job, on this many generated rows")
    ap.add_argument("--hidden", default="128,1024,4096", help="--failover: hidden layer sizes, one run each")
    ap.add_argument("--after", type=float, default=2.0, help="--failover: seconds of training before the kill")
    ap.add_argument("--accuracy", type=int, default=0, help="N pairs: an undisturbed run, then one whose rank 1 primary "
                    "is killed --kills times (the reference job, one backup per rank)")
    ap.add_argument("--accuracy-job", choices=["reference", "ctr"], default="reference",
                    help="--accuracy: the reference job, or the CTR job (on --ctr ROWS generated rows, 200,000 by default)")
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="more job overrides (key=value)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    env = environment()
    tmp = tempfile.mkdtemp(prefix="downpour-bench-replication-")
    out: dict[str, Any] = {"environment": env}
    try:
        if args.throughput:
            jobs = [("reference", REFERENCE, [f"training.epochs={args.epochs}", "cluster.num_servers=3", *args.set])]
            if args.ctr:
                jobs.append(("ctr", CTR, [f"data.path={_ctr_data(args.ctr)}", f"training.epochs={args.epochs}",
                                          "cluster.num_servers=3", *args.set]))
            rows = []
            for r in range(args.rounds):
                for name, path, overrides in jobs:
                    for k in args.ks.split(","):
                        row = {"job": name, "round": r, "config": k,
                               **throughput(path, overrides, int(k.rstrip("a")), tmp, "async" if k.endswith("a") else "sync")}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            out["throughput"] = rows
            print(f"\n{env['time']}, {env['cpus']} CPUs ({env['cpu_model']}), torch {env['torch']}, {args.rounds} rounds\n")
            print("| job | k (a: replication async) | examples/s per round | mean | vs the first | replicated MB (mean) | lost updates |")
            print("|---|---|---|---|---|---|---|")
            for name, _, _ in jobs:
                base = None
                for k in args.ks.split(","):
                    mine = [x for x in rows if x["job"] == name and x["config"] == k]
                    mean = sum(x["examples_per_s"] for x in mine) / len(mine)
                    base = mean if base is None else base
                    each = ", ".join(f"{x['examples_per_s']:,.0f}" for x in mine)
                    print(f"| {name} | {k} | {each} | {mean:,.0f} "
                          f"| {mean / base:.2f}x | {sum(x['replicated_mb'] for x in mine) / len(mine):,.1f} "
                          f"| {sum(x['lost'] for x in mine)} |")
        if args.failover:
            rows = []
            for h in (int(x) for x in args.hidden.split(",")):
                row = failover(h, [f"training.epochs={args.epochs}", "cluster.num_servers=3", *args.set], tmp, args.after)
                rows.append(row)
                print(json.dumps(row), flush=True)
            out["failover"] = rows
            print(f"\n{env['time']}, {env['cpus']} CPUs, torch {env['torch']}, overrides {args.set}\n")
            print("| hidden | shard state (MB) | detection (s) | promotion (s) | failover (s) | re-replication (s) "
                  "| lost updates | accuracy |")
            print("|---|---|---|---|---|---|---|---|")
            for x in rows:
                print(f"| {x['hidden']} | {x['state_mb']:.2f} | {x['detected_s']} | {x['promoted_s']} | {x['failover_s']} "
                      f"| {x['rereplicated_s']} | {x['lost']} | {x['accuracy']} |")
        if args.accuracy:
            out["accuracy"] = accuracy_pairs(args, tmp, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
