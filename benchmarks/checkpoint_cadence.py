"""How far behind an async checkpoint's request its cut lands, and so how often checkpoints come.

Runs the tiny CTR job (2 servers, 2 async workers, 3 epochs of 4,000 examples in batches of 64:
192 steps) with the counting model of tests/ctr_factories.py and ``checkpoint.every_steps``. A
checkpoint is named by the job's step when it was asked for; the model's dense counters say how
many examples its copy holds, so ``steps in the copy - step asked`` is how far past the request
the copy was taken; ``cut`` is the sum of the push numbers the coordinator named (async: the
copy holds each worker's pushes up to its number; the step asked comes from heartbeats, up to
one interval old). Prints one line per checkpoint and a summary per run (JSON).

    python benchmarks/checkpoint_cadence.py --every-steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import re
import statistics
import tempfile

from downpour.api import resolve_job
from downpour.launch import LocalLauncher
from downpour.serving.export import CheckpointState
from downpour.storage import CheckpointStore

BATCH = 64


def job(every_steps: int) -> dict:
    return {
        "name": "cadence",
        "model": {"factory": "tests.ctr_factories:counting_wide_deep",
                  "args": {"num_dense": 3, "num_fields": 4, "dim": 4, "hidden": [16], "dense_count": 1024.0, "count_servers": 2}},
        "data": {"factory": "tests.ctr_factories:tiny_ctr", "shard_size": 500},
        "optimizer": {"name": "sgd", "lr": 2.0 ** -10},
        "sparse": {"optimizer": {"name": "adagrad", "lr": 0.1},
                   "tables": {"count": {"optimizer": {"name": "sgd", "lr": 1.0}, "init_scale": 0.0}}},
        "training": {"consistency": "async", "loss": "binary_cross_entropy", "epochs": 3, "batch_size": BATCH, "seed": 0},
        "cluster": {"num_servers": 2, "num_workers": 2, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 6.0},
        "checkpoint": {"enabled": True, "every_steps": every_steps, "every_s": None, "at_start": False, "keep": 1000},
        "monitor": {"dashboard": False, "tensorboard": False},
    }


def run(every_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = LocalLauncher(resolve_job(job(every_steps)), f"{tmp}/run").run().summary
        store = CheckpointStore(f"{tmp}/run/checkpoints")
        cuts: dict[str, int] = {}  # the last cut named for each checkpoint (the coordinator's log)
        seen: dict[str, int] = {}  # the pushes the servers had seen when asked (a probe), if logged
        for log in glob.glob(f"{tmp}/run/logs/coordinator*.log"):
            with open(log) as f:
                text = f.read()
            for m in re.finditer(r"checkpoint (\S+) at step \d+ \(servers copy after pushes (\{.*?\})\)", text):
                cuts[m.group(1)] = sum(ast.literal_eval(m.group(2)).values())
            for m in re.finditer(r"checkpoint (\S+): the servers have seen pushes (\{.*?\})", text):
                seen[m.group(1)] = sum(ast.literal_eval(m.group(2)).values())
        lags, copies = [], []
        for name in store.names():
            manifest = store.manifest(name)
            if manifest.job.get("final"):
                continue
            state = CheckpointState(store, manifest)
            steps_in = float(state.dense["head"].sum()) / 4 / BATCH  # 4 IDs per example
            lags.append(steps_in - manifest.step)
            copies.append(steps_in)
            print(json.dumps({"checkpoint": name, "step_asked": manifest.step, "seen": seen.get(name), "cut": cuts.get(name),
                              "steps_in_copy": round(steps_in, 1)}))
    return {"status": summary["status"], "steps": summary.get("steps"), "train_s": round(summary.get("train_s") or 0.0, 2),
            "checkpoints": summary["checkpoints"]["count"], "periodic": len(lags),
            "median_lag_steps": round(statistics.median(lags), 1) if lags else None, "max_lag_steps": round(max(lags), 1) if lags else None,
            "median_steps_between_copies": round(statistics.median(b - a for a, b in zip(copies, copies[1:])), 1)
            if len(copies) > 2 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.repeats):
        print(json.dumps(run(args.every_steps)))


if __name__ == "__main__":
    main()
