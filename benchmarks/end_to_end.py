"""Examples/s of the reference job through Downpour against single-process PyTorch.

Configurations (all in one invocation, interleaved run by run so that each sees
the same machine load):

* ``single-1t`` / ``single-2t``: one process, plain PyTorch, torch.set_num_threads
  1 / 2. The job's model (``downpour.models.mlp`` with the job's args, initialised
  after ``torch.manual_seed(training.seed)``), the job's batch size, SGD with the
  job's lr and momentum (0.01, 0.9), over the whole training set converted to
  float tensors first and shuffled with a seed. Only the batch loop is timed
  (``model.train()``, ``zero_grad``, ``cross_entropy``, ``backward``, ``step``),
  after a few untimed steps of a throwaway model (thread pool, allocator).
* ``async``: the job as written (examples/mnist.yaml: 2 servers, 3 workers, async),
  run by :class:`downpour.launch.LocalLauncher`, which starts the processes itself.
* ``async-socket``: ``async`` with ``cluster.shared_memory=false``: every value through the ipc
  sockets, none through shared-memory slots (what the slots save).
* ``async-overlap``: the same with ``--set overlap=true``.
* ``sync``: the same with ``--set consistency=sync``.
* ``async-tcp-curve``: ``async`` over tcp on 127.0.0.1 with CURVE (``cluster.transport=tcp``), where
  the default (``auto``) uses ipc sockets in a private folder, which need no keys.
* ``async-tcp-insecure``: tcp without CURVE (``--insecure``): what encryption costs.

A Downpour run reports the coordinator's summary: ``examples_per_s`` and
``train_s`` cover the training loop only (from the first INIT to the last worker
done; process start-up, data loading and evaluation excluded); ``wall_s`` is the
coordinator's whole life. For the single-process runs ``wall_s`` covers loading
and converting the data, the model, the loop and the evaluation.
The ratio column divides by the faster single-process configuration's mean rate.

This is a benchmark, not a test: compare ratios measured in the same run.

    .venv/bin/python benchmarks/end_to_end.py                       # everything, 1 epoch, 1 run each
    .venv/bin/python benchmarks/end_to_end.py --runs 3 --json e2e.json
    .venv/bin/python benchmarks/end_to_end.py --configs single-1t,async --steps 100   # quick check only
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from downpour.config import JobConfig, SGDConfig, load_job  # noqa: E402
from downpour.data import load_idx_dataset  # noqa: E402
from downpour.errors import DownpourError  # noqa: E402
from downpour.launch.local import LocalLauncher  # noqa: E402
from downpour.models import mlp  # noqa: E402

DEFAULT_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
SINGLE = {"single-1t": 1, "single-2t": 2}  # config -> torch threads
DISTRIBUTED = {"async": [], "async-socket": ["cluster.shared_memory=false"], "async-overlap": ["overlap=true"],  # config -> --set overrides
               "sync": ["consistency=sync"],
               "async-tcp-curve": ["cluster.transport=tcp"], "async-tcp-insecure": ["cluster.transport=tcp"]}
INSECURE = {"async-tcp-insecure"}  # configs run without CURVE (downpour train --insecure)
CONFIGS = [*SINGLE, *DISTRIBUTED]
WARMUP_BATCHES = 20  # untimed steps of a throwaway model before a single-process run


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through LocalLauncher's clean-up


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- single process
def run_single(job: JobConfig, threads: int, steps: int | None) -> dict[str, Any]:
    """One process, plain PyTorch. ``steps`` (optional) caps the batches at steps * num_workers,
    the examples a Downpour run capped at ``training.steps`` trains."""
    opt_cfg = job.optimizer
    if not isinstance(opt_cfg, SGDConfig):
        raise SystemExit(f"the single-process baseline implements SGD only; the job uses {opt_cfg.name}")
    if job.model.name != "mlp":
        raise SystemExit(f"the single-process baseline builds downpour.models.mlp; the job's model is {job.model}")
    t = job.training
    wall0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = load_idx_dataset(job.data.path)
        n = len(data.train)
        x, y = data.train.take(np.arange(n))  # the whole set as float32 / int64 tensors, before timing
        warm_up(job, x[: WARMUP_BATCHES * t.batch_size], y[: WARMUP_BATCHES * t.batch_size])
        torch.manual_seed(t.seed)
        model = mlp(**job.model.args)
        opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum, dampening=opt_cfg.dampening,
                              nesterov=opt_cfg.nesterov, weight_decay=opt_cfg.weight_decay)
        gen = torch.Generator().manual_seed(t.seed)
        max_batches = steps * job.cluster.num_workers if steps is not None else None
        batches = examples = 0
        train_s = 0.0
        for _ in range(t.epochs):
            perm = torch.randperm(n, generator=gen)
            xs, ys = x[perm], y[perm]
            t0 = time.perf_counter()
            for b in range(0, n, t.batch_size):
                if max_batches is not None and batches >= max_batches:
                    break
                xb, yb = xs[b : b + t.batch_size], ys[b : b + t.batch_size]
                model.train()
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                batches += 1
                examples += len(yb)
            train_s += time.perf_counter() - t0
        final_loss = float(loss.item()) if batches else None
        accuracy, test_loss = evaluate(model, data.test)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "examples": examples,
        "steps": batches,
        "train_s": train_s,
        "examples_per_s": examples / train_s if train_s > 0 else 0.0,
        "wall_s": time.perf_counter() - wall0,
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "final_batch_loss": final_loss,
        "threads": threads,
    }


def warm_up(job: JobConfig, x: torch.Tensor, y: torch.Tensor) -> None:
    """A few untimed steps of a throwaway model: the thread pool and allocator start outside the timed loop.
    Runs before the seeded model is built, so the real model and its dropout masks are unaffected."""
    model = mlp(**job.model.args)
    opt = torch.optim.SGD(model.parameters(), lr=job.optimizer.lr, momentum=getattr(job.optimizer, "momentum", 0.0))
    model.train()
    for b in range(0, len(y), job.training.batch_size):
        opt.zero_grad()
        F.cross_entropy(model(x[b : b + job.training.batch_size]), y[b : b + job.training.batch_size]).backward()
        opt.step()


def evaluate(model: torch.nn.Module, test: Any, batch_size: int = 1000) -> tuple[float, float]:
    model.eval()
    n = len(test)
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for b in range(0, n, batch_size):
            x, y = test.take(np.arange(b, min(n, b + batch_size)))
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return correct / n, total_loss / n


# --------------------------------------------------------------------------- Downpour
def run_distributed(job_path: str, overrides: list[str], run_dir: str, insecure: bool = False) -> dict[str, Any]:
    job = load_job(job_path, overrides)
    t0 = time.perf_counter()
    result = LocalLauncher(job, run_dir, insecure=insecure).run()
    s = result.summary
    return {
        "examples": s.get("examples"),
        "steps": s.get("steps"),
        "train_s": s.get("train_s"),
        "examples_per_s": s.get("examples_per_s"),
        "wall_s": s.get("wall_s"),
        "launcher_wall_s": time.perf_counter() - t0,
        "test_accuracy": s.get("test_accuracy"),
        "test_loss": s.get("test_loss"),
        "consistency": s.get("consistency"),
        "staleness": s.get("staleness"),
        "overrides": overrides,
        "run_dir": run_dir,
    }


# --------------------------------------------------------------------------- report
def stats(values: list[float]) -> dict[str, float] | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def fmt(st: dict[str, float] | None, spec: str, spread: bool) -> str:
    if st is None:
        return "n/a"
    text = format(st["mean"], spec)
    if spread and st["min"] != st["max"]:
        text += f" [{format(st['min'], spec)}–{format(st['max'], spec)}]"
    return text


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    agg: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        agg[name] = {
            "runs": len(rs),
            "failed": len(rs) - len(ok),
            **{k: stats([r.get(k) for r in ok]) for k in ("examples_per_s", "train_s", "wall_s", "test_accuracy")},
        }
    singles = {k: agg[k]["examples_per_s"]["mean"] for k in SINGLE if k in agg and agg[k]["examples_per_s"]}
    base_name = max(singles, key=singles.get) if singles else None
    for a in agg.values():
        eps = a["examples_per_s"]
        a["ratio_to_single"] = eps["mean"] / singles[base_name] if base_name and eps else None
    return {"baseline": base_name, "configs": agg}


def table(agg: dict[str, Any], spread: bool) -> str:
    base = agg["baseline"]
    lines = [
        f"| config | examples/s | ratio to {base or 'single'} | train_s | wall_s | test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, a in agg["configs"].items():
        ratio = "n/a" if a["ratio_to_single"] is None else f"{a['ratio_to_single']:.2f}"
        failed = f" ({a['failed']}/{a['runs']} failed)" if a["failed"] else ""
        lines.append(
            f"| {name}{failed} | {fmt(a['examples_per_s'], ',.0f', spread)} | {ratio} | {fmt(a['train_s'], '.1f', spread)} | "
            f"{fmt(a['wall_s'], '.1f', spread)} | {fmt(a['test_accuracy'], '.4f', spread)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=DEFAULT_JOB, help="job file (default examples/mnist.yaml)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the job's, 1 for the reference job)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each config, interleaved (default 1); mean [min–max] reported")
    ap.add_argument("--steps", type=int, default=None,
                    help="quick checks only: cap Downpour at STEPS steps per worker (training.steps) and the "
                         "single-process loop at STEPS * num_workers batches")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra job override applied to every config (e.g. data.path=/data/mnist)")
    ap.add_argument("--keep-runs", metavar="DIR", help="keep the Downpour run folders under DIR (default: a temp folder, removed)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    configs = list(dict.fromkeys(c.strip() for c in args.configs.split(",") if c.strip()))
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        ap.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be at least 1")
    common = list(args.overrides)
    if args.epochs is not None:
        common.append(f"epochs={args.epochs}")
    if args.steps is not None:
        common.append(f"steps={args.steps}")
    try:
        job = load_job(args.job, common)  # validates the file and overrides before anything runs
        load_idx_dataset(job.data.path)  # fails fast, naming how to get the data, when it is missing
    except DownpourError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    env = environment()
    root = os.path.abspath(args.keep_runs) if args.keep_runs else tempfile.mkdtemp(prefix="downpour-e2e-")
    os.makedirs(root, exist_ok=True)
    keep = bool(args.keep_runs)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    t_all = time.perf_counter()
    try:
        for i in range(args.runs):
            for name in configs:
                log(f"[run {i + 1}/{args.runs}] {name} ...")
                try:
                    if name in SINGLE:
                        r = run_single(job, SINGLE[name], args.steps)
                    else:
                        run_dir = os.path.join(root, f"{name}-{i + 1}")
                        r = run_distributed(args.job, common + DISTRIBUTED[name], run_dir, insecure=name in INSECURE)
                except DownpourError as err:
                    keep = True  # its logs explain the failure
                    r = {"error": str(err)}
                    log(f"[run {i + 1}/{args.runs}] {name} FAILED: {err}")
                else:
                    log(f"[run {i + 1}/{args.runs}] {name}: {r['examples_per_s']:,.0f} examples/s, train {r['train_s']:.1f}s, "
                        f"wall {r['wall_s']:.1f}s, test accuracy {r['test_accuracy']:.4f}")
                runs[name].append(r)
    except KeyboardInterrupt:
        log("interrupted (every process the launcher started has been stopped)")
        return 130
    finally:
        if keep:
            log(f"run folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t_all

    agg = aggregate(runs)
    epochs = job.training.epochs
    cap = f", capped at {args.steps} steps per worker" if args.steps else ""
    print()
    print(f"{job.name}: {epochs} epoch(s), batch {job.training.batch_size}{cap}; "
          f"{job.cluster.num_servers} servers, {job.cluster.num_workers} workers; {args.runs} run(s) per config"
          + (" (mean [min–max])" if args.runs > 1 else ""))
    print()
    print(table(agg, args.runs > 1))
    print()
    print(f"{env['cpus']} CPUs ({env['cpu_model']}), torch {env['torch']}; {total:.0f}s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "end_to_end", "environment": env, "total_s": total, "job": args.job,
                       "overrides": common, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "summary": agg, "runs": runs}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 1 if any(a["failed"] for a in agg["configs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
