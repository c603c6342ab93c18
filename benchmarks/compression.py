"""Bytes on the wire, speed and accuracy of the reference job under each codec and consistency mode.

Every configuration runs the reference job (examples/mnist.yaml: Fashion-MNIST, MLP,
2 servers, 3 workers, async, seed 0) for ``--epochs`` (3) epochs through
:class:`downpour.launch.LocalLauncher`, with checkpoints off; configurations
are interleaved run by run so that each sees the same machine load. The table
gives, from each run's ``summary.json``: push and pull bytes per training step (one
batch of one worker; headers included; a local-SGD push covers H steps), the push and
pull compression ratios against ``none`` in the same invocation, examples/s, test
accuracy, and its change against ``none``.

The straggler rows (``*-straggler``) slow worker 0 to half speed
(``training.slowdown: {rank: 0, factor: 2}``) and compare sync, async and ssp(3); the
``*-jitter`` rows slow each step of every worker 4x with probability 1/4 (transient
stragglers, the case SSP is made for).

``--link`` adds the slow-link experiment: ``none`` and the best codec found
(``topk 0.1% + DGC`` with int8 pulls) over a simulated 100 Mbit/s link per worker
(``cluster.link_mbit_s``), worker 0 evaluating the test set every 3 shards; it
reports the seconds of training until test accuracy first reached 0.83.

    .venv/bin/python benchmarks/compression.py                     # everything, 1 run each
    .venv/bin/python benchmarks/compression.py --runs 2 --link --json comp.json
    .venv/bin/python benchmarks/compression.py --configs none,topk-1%-ef --epochs 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402

DEFAULT_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
EF = ["compression.push.error_feedback=true"]
STRAGGLER = ["training.slowdown.rank=0", "training.slowdown.factor=2"]
# Transient stragglers: each step of every worker is 4x slower with probability 1/4.
JITTER = ["training.slowdown.rank=null", "training.slowdown.factor=4", "training.slowdown.probability=0.25"]
CONFIGS: dict[str, list[str]] = {  # name -> --set overrides
    "none": [],
    "fp16": ["compression.push.codec=fp16"],
    "topk-1%-ef": ["compression.push.codec=topk", "compression.push.ratio=0.01", *EF],
    "topk-1%-no-ef": ["compression.push.codec=topk", "compression.push.ratio=0.01"],
    "topk-0.1%-dgc": ["compression.push.codec=topk", "compression.push.ratio=0.001", "compression.push.dgc.momentum=0.9",
                      "compression.push.dgc.warmup_steps=20", "optimizer.momentum=0"],
    "topk-1%-dgc": ["compression.push.codec=topk", "compression.push.ratio=0.01", "compression.push.dgc.momentum=0.9",
                    "optimizer.momentum=0"],
    "randomk-1%-ef": ["compression.push.codec=randomk", "compression.push.ratio=0.01", *EF],
    "qsgd-8bit": ["compression.push.codec=qsgd", "compression.push.bits=8"],
    "onebit-ef": ["compression.push.codec=onebit", *EF, "compression.push.min_numel=1000"],
    "powersgd-r2-ef": ["compression.push.codec=powersgd", "compression.push.rank=2", *EF],
    "int8-pull": ["compression.pull=int8"],
    "local-sgd-h4": ["training.local_steps=4"],
    "local-sgd-h4-sync": ["training.local_steps=4", "training.consistency=sync"],
    "sync-straggler": ["training.consistency=sync", *STRAGGLER],
    "async-straggler": [*STRAGGLER],
    "ssp3-straggler": ["training.consistency=ssp", "training.staleness_bound=3", *STRAGGLER],
    "sync-jitter": ["training.consistency=sync", *JITTER],
    "async-jitter": [*JITTER],
    "ssp3-jitter": ["training.consistency=ssp", "training.staleness_bound=3", *JITTER],
}
LINK = {  # the slow-link experiment: name -> overrides (on top of LINK_COMMON)
    "link-none": [],
    "link-topk-0.1%-dgc+int8-pull": ["compression.push.codec=topk", "compression.push.ratio=0.001",
                                     "compression.push.dgc.momentum=0.9", "compression.push.dgc.warmup_steps=20",
                                     "optimizer.momentum=0", "compression.pull=int8"],
}
LINK_COMMON = ["cluster.link_mbit_s=100", "monitor.eval_every_shards=3"]
TARGET_ACCURACY = 0.83


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through LocalLauncher's clean-up


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(job_path: str, overrides: list[str], run_dir: str) -> dict[str, Any]:
    job = load_job(job_path, overrides)
    s = LocalLauncher(job, run_dir).run().summary
    wire = s.get("wire") or {}
    curve = s.get("accuracy_curve") or []
    reached = next((t for t, _, acc in curve if acc >= TARGET_ACCURACY), None)
    return {
        "status": s.get("status"), "error": s.get("error"),
        "examples_per_s": s.get("examples_per_s"), "train_s": s.get("train_s"),
        "test_accuracy": s.get("test_accuracy"),
        "push_per_push": (wire.get("push") or {}).get("per_push"), "pull_per_push": (wire.get("pull") or {}).get("per_push"),
        "wire": wire, "accuracy_curve": curve, "seconds_to_target": reached,
        "ssp_max_lead": max((v.get("ssp_max_lead", 0) for v in (s.get("servers") or {}).values()), default=None),
        "overrides": overrides,
    }


def mean(values: list[Any]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def spread(values: list[Any], spec: str) -> str:
    values = [float(v) for v in values if v is not None]
    if not values:
        return "n/a"
    text = format(statistics.fmean(values), spec)
    if len(values) > 1 and format(min(values), spec) != format(max(values), spec):
        text += f" [{format(min(values), spec)}–{format(max(values), spec)}]"
    return text


def _per_step(r: dict[str, Any], direction: str) -> float | None:
    return ((r.get("wire") or {}).get(direction) or {}).get("per_step")


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Bytes per training step (one batch of one worker): a local-SGD or accumulated push covers several."""
    base = runs.get("none", [])
    base_push = mean([_per_step(r, "push") for r in base])
    base_pull = mean([_per_step(r, "pull") for r in base])
    base_acc = mean([r["test_accuracy"] for r in base])
    lines = ["| config | push B/step | pull B/step | push ratio | pull ratio | examples/s | test accuracy | Δ accuracy (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        push, pull = mean([_per_step(r, "push") for r in rs]), mean([_per_step(r, "pull") for r in rs])
        acc = mean([r["test_accuracy"] for r in rs])
        ratio = f"{base_push / push:.1f}×" if base_push and push else "n/a"
        pull_ratio = f"{base_pull / pull:.1f}×" if base_pull and pull else "n/a"
        delta = f"{100 * (acc - base_acc):+.2f}" if acc is not None and base_acc is not None else "n/a"
        lines.append(f"| {name} | {spread([_per_step(r, 'push') for r in rs], ',.0f')} "
                     f"| {spread([_per_step(r, 'pull') for r in rs], ',.0f')} | {ratio} | {pull_ratio} "
                     f"| {spread([r['examples_per_s'] for r in rs], ',.0f')} | {spread([r['test_accuracy'] for r in rs], '.4f')} "
                     f"| {delta} |")
    return "\n".join(lines)


def link_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"| config (100 Mbit/s link) | push B/push | pull B/push | s of training to {TARGET_ACCURACY} | final accuracy |",
             "|---|---|---|---|---|"]
    for name, rs in runs.items():
        lines.append(f"| {name} | {spread([r['push_per_push'] for r in rs], ',.0f')} | {spread([r['pull_per_push'] for r in rs], ',.0f')} "
                     f"| {spread([r['seconds_to_target'] for r in rs], '.1f')} | {spread([r['test_accuracy'] for r in rs], '.4f')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--link", action="store_true", help="also run the slow-link time-to-accuracy experiment")
    ap.add_argument("--link-epochs", type=int, default=2)
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--from-json", help="print the tables of an earlier --json instead of running")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        env, runs = saved["environment"], saved["runs"]
        print(f"{env['time']}, {env['cpus']} CPUs, torch {env['torch']}, {saved['epochs']} epochs\n")
        print(table({n: rs for n, rs in runs.items() if n in CONFIGS and rs}))
        link_runs = {n: rs for n, rs in runs.items() if n in LINK and rs}
        if link_runs:
            print()
            print(link_table(link_runs))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    env = environment()
    common = [f"training.epochs={args.epochs}", "checkpoint.enabled=false"]
    plan = [(n, CONFIGS[n] + common) for n in names]
    if args.link:
        plan += [(n, o + LINK_COMMON + [f"training.epochs={args.link_epochs}", "checkpoint.enabled=false"]) for n, o in LINK.items()]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n, _ in plan}
    tmp = tempfile.mkdtemp(prefix="downpour-bench-compression-")
    try:
        for i in range(args.runs):
            for name, overrides in plan:
                t0 = time.perf_counter()
                r = run(args.job, overrides, os.path.join(tmp, f"{name}-{i}"))
                runs[name].append(r)
                log(f"run {i + 1}/{args.runs} {name}: {r['status']} acc {r['test_accuracy']} "
                    f"{r['examples_per_s'] or 0:,.0f} ex/s push {r['push_per_push'] or 0:,.0f} B/push "
                    f"pull {r['pull_per_push'] or 0:,.0f} B/push to-{TARGET_ACCURACY} {r['seconds_to_target']} "
                    f"lead {r['ssp_max_lead']} ({time.perf_counter() - t0:.0f}s)")
    except KeyboardInterrupt:
        log("interrupted: reporting the runs so far")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    main_runs = {n: rs for n, rs in runs.items() if n in CONFIGS and rs}
    link_runs = {n: rs for n, rs in runs.items() if n in LINK and rs}
    print(f"{env['time']}, {env['cpus']} CPUs, torch {env['torch']}, {args.epochs} epochs, {args.runs} run(s) each\n")
    print(table(main_runs))
    if link_runs:
        print()
        print(link_table(link_runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "epochs": args.epochs, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
