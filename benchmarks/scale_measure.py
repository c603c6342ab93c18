"""Calibrate the scaling model (``benchmarks/scale_model.py``) on this machine, check it against real
jobs on every topology from 1×1 to S×W, and print its predictions at scale.

    .venv/bin/python benchmarks/scale_measure.py                          # calibrate, check 1..4 × 1..8, predict
    .venv/bin/python benchmarks/scale_measure.py --servers 2 --workers 3  # a quick look: 1..2 × 1..3
    .venv/bin/python benchmarks/scale_measure.py --json scale.json
    .venv/bin/python benchmarks/scale_measure.py --only 2x3 --repeat 3   # CPU per example per role, one topology

Where each figure of :class:`~benchmarks.scale_model.Costs` comes from (all measured in this run):

* ``compute_s`` of a model: forward+backward of one batch in this process, ``torch.set_num_threads(1)``,
  the median of ``--compute-steps`` steps after warm-up (no optimizer step: the servers apply it).
* ``apply_s_per_param``: SGD with momentum (``buf.mul_(m).add_(g); p.add_(buf, alpha=-lr)``) over a
  1M-float tensor in this process, per parameter.
* ``latency_s``: half a round trip of a 64-byte message between two processes over an ipc socket
  (raw pyzmq PAIR sockets).
* The request costs, from the reference job itself (``examples/mnist.yaml`` through the local
  launcher, ipc sockets and shared memory as by default). Each job runs twice, capped at
  ``--steps-short`` and at ``--steps-long`` steps in all; a role's CPU per step is its threads' CPU
  in the steady-state window of the longer run (``benchmarks/scale_probe.py``, on by default) over
  the steps the measured rate puts in it (:func:`cpu_per_step`); with ``--no-probe``, the
  difference of the two runs' CPU (``cpu_s`` in summary.json) over the difference in steps, where
  each process's start-up CPU does not quite cancel (±30 % at a point). The calibration jobs
  (``--calibrate-on``; default every server count of the check with 3 workers, the reference job's,
  and with 6: 1×3 … S×3 and 1×6 … S×6, loaded as most of the check is) and C = 1 × 1 with a
  1024-wide hidden layer (814k parameters instead of 102k). Each job is one equation per role:
  worker CPU per step = forward+backward + ``worker_step_s`` + requests · ``worker_msg_s`` + 2 ·
  bytes · ``worker_byte_s``, server CPU per step = requests · ``server_msg_s`` + 2 · bytes ·
  ``server_byte_s`` + the update rule; the costs are their least-squares solution, none below zero
  (:func:`solve_request_costs`). Many jobs across 1–S requests per step, not three that solve it
  exactly: on a machine this noisy three equations gave a worker CPU per request of −59 µs in one
  run and +144 µs in the next (RESULTS.md §30). ``worker_step_s`` of the reference model is used
  for the other dense models too.
* The CTR model (``examples/ctr.yaml``'s Wide & Deep): job D = 1 × 1 on generated Criteo data. Its
  forward+backward is the single-process hashed-table model of ``benchmarks/ctr.py``; the rows per
  step are the servers' pulled and pushed keys over the steps; what is left of D's server CPU after
  the request, byte and dense update costs is ``server_row_s``, and of its worker CPU,
  ``worker_step_s``.

The check then runs the reference job on every topology (servers 1..S × workers 1..W) the same way
(two step caps), and prints measured examples/s (the longer run's extra examples over its extra
training time, so that start-up skew cancels) against four predictions for the ``--cores`` of this
machine: the least bound; ``Topology(queueing=True)``'s closed network with the cores as C servers;
the cores as the host's run queue (``shared_cores=True``) with the coordinator's and launcher's
load calibrated in the calibration jobs; and the same with the load of other processes measured while that
topology ran (``Topology.other_load``). With ``--probe`` (default) every job's threads are sampled
from /proc (``benchmarks/scale_probe.py``): the run-queue wait per step measured is printed beside
the predicted one, and CPU per example per role. The calibration jobs are checked too (the same
measurements, not run again; marked † in the table, and the count of the others given apart): their
CPU per example is fitted, their examples/s predicted.

    .venv/bin/python benchmarks/scale_measure.py --check-servers 1 --json s1.json     # calibrate, check 1 × 1..8
    .venv/bin/python benchmarks/scale_measure.py --check-servers 2 --calibration-from s1.json --json s2.json
    .venv/bin/python benchmarks/scale_measure.py --topologies 2x2,1x4 --calibration-from s1.json --json again.json
    .venv/bin/python benchmarks/scale_measure.py --from-json s1.json --from-json s2.json  # one table of both
    .venv/bin/python benchmarks/scale_measure.py --from-json s.json --refit  # the costs fitted again from its check rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import zmq  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from benchmarks.scale_model import Costs, Topology, Workload, at_scale, predict, step_bytes  # noqa: E402
from benchmarks.scale_probe import load_of, role_cpu_s  # noqa: E402
from downpour.config import load_job  # noqa: E402
from downpour.launch import LocalLauncher  # noqa: E402
from downpour.models import mlp  # noqa: E402

MNIST_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
CTR_JOB = os.path.join(_ROOT, "examples", "ctr.yaml")
BIG_HIDDEN = 1024  # job C's hidden width: 814k parameters, 8x the reference model's bytes
DENSE_100M_HIDDEN = [9600, 9600]  # 784 -> 9600 -> 9600 -> 10: 99.8M parameters
QUIET = ["checkpoint.enabled=false", "epochs=3"]  # epochs: enough data that the step cap ends every run


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through LocalLauncher's clean-up


# --------------------------------------------------------------------------- in-process costs
def compute_step_s(model: torch.nn.Module, x: torch.Tensor | tuple, y: torch.Tensor, loss: str, steps: int) -> float:
    """Median seconds of forward+backward of one batch, on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            out = model(*x) if isinstance(x, tuple) else model(x)
            (F.cross_entropy(out, y) if loss == "ce" else F.binary_cross_entropy_with_logits(out, y)).backward()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return statistics.median(times)


def mlp_compute_s(hidden: list[int], batch: int, steps: int) -> tuple[float, int]:
    model = mlp(hidden=hidden)
    x, y = torch.rand(batch, 28, 28), torch.randint(0, 10, (batch,))
    return compute_step_s(model, x, y, "ce", steps), sum(p.numel() for p in model.parameters())


def apply_s_per_param(n: int = 1 << 20, repeats: int = 50) -> float:
    p, g, buf = torch.zeros(n), torch.full((n,), 1e-3), torch.zeros(n)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.mul_(0.9).add_(g)
            p.add_(buf, alpha=-0.01)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return statistics.median(times) / n


def _echo(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(address)
    try:
        while True:
            msg = sock.recv()
            if msg == b"stop":
                break
            sock.send(msg)
    finally:
        sock.close(linger=0)
        ctx.term()


def ipc_latency_s(round_trips: int = 2000) -> float:
    """Half the median round trip of 64 bytes between two processes over an ipc socket."""
    import multiprocessing as mp

    folder = tempfile.mkdtemp(prefix="scale-ipc-")
    address = f"ipc://{folder}/echo"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.bind(address)
    proc = mp.get_context("spawn").Process(target=_echo, args=(address,), daemon=True)
    proc.start()
    try:
        payload = bytes(64)
        times = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            sock.send(payload)
            sock.recv()
            times.append(time.perf_counter() - t0)
        sock.send(b"stop")
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        sock.close(linger=0)
        ctx.term()
        os.rmdir(folder) if not os.listdir(folder) else None
    return statistics.median(times[100:]) / 2


# --------------------------------------------------------------------------- job runs
def run_job(path: str, overrides: list[str]) -> dict[str, Any]:
    job = load_job(path, overrides)
    with tempfile.TemporaryDirectory(prefix="scale-") as run_dir:
        s = LocalLauncher(job, run_dir).run().summary
    if s.get("status") != "ok":
        raise RuntimeError(f"{path} {overrides}: {s.get('status')}: {s.get('error')}")
    return totals(s)


def totals(s: dict[str, Any]) -> dict[str, Any]:
    """What :func:`measure` takes from a job's summary.json."""
    servers = s["servers"].values()
    return {
        "examples": s["examples"],
        "steps": s["steps"],
        "examples_per_s": s["examples_per_s"],
        "train_s": s["train_s"],
        "worker_cpu_s": sum(w["cpu_s"] for w in s["workers"].values()),
        "server_cpu_s": sum(v["cpu_s"] for v in servers),
        # a PUSHPULL counts as a push and a pull; a SPARSE request (both tables, push and pull) as one request
        "requests": sum((v["pushes"] + v["pulls"]) / 2 + (v.get("sparse") or {}).get("requests", 0) for v in servers),
        "rows": sum((v.get("sparse") or {}).get("keys_pushed", 0) + (v.get("sparse") or {}).get("keys_pulled", 0) for v in servers),
    }


def measure(
    path: str, servers: int, workers: int, total_short: int, total_long: int, extra: list[str] = (), runner: Any = run_job
) -> dict[str, Any]:
    """Per-role CPU per step and examples/s of the extra steps of the longer of two runs (two step caps).
    ``runner(path, overrides)`` runs one job and returns :func:`totals` of it (default: the local launcher)."""
    cl = [f"cluster.num_servers={servers}", f"cluster.num_workers={workers}", *QUIET, *extra]
    short = runner(path, [*cl, f"steps={max(1, total_short // workers)}"])
    long = runner(path, [*cl, f"steps={max(2, total_long // workers)}"])
    d = {k: long[k] - short[k] for k in ("examples", "steps", "worker_cpu_s", "server_cpu_s", "requests", "rows", "train_s")}
    if d["steps"] <= 0:
        raise RuntimeError(f"{servers}x{workers}: the longer run took no more steps than the shorter one")
    return {
        "servers": servers,
        "workers": workers,
        # the rate of the extra steps: start-up skew between the workers cancels as the CPU's start-up does
        "examples_per_s": d["examples"] / d["train_s"],
        "batch": d["examples"] / d["steps"],
        "worker_cpu_per_step_s": d["worker_cpu_s"] / d["steps"],
        "server_cpu_per_step_s": d["server_cpu_s"] / d["steps"],
        "requests_per_step": d["requests"] / d["steps"],
        "rows_per_step": d["rows"] / d["steps"] / 2,
        "short": short,
        "long": long,
    }


def cpu_per_step(m: dict[str, Any], role: str) -> float:
    """A role's (``worker`` or ``server``) CPU per step of :func:`measure`'s result ``m``: from the
    /proc sampler's steady-state window of the longer run when it has one (every thread of the role,
    over the steps the measured rate puts in the window), else the difference of the two runs'
    totals, which carries each process's start-up CPU (imports, connections: ±0.1–0.3 s a process,
    against ~2 s of training CPU in all) and so reads ±30 % at a point (RESULTS.md §31)."""
    probe = (m.get("long") or {}).get("probe")
    if probe and probe.get("window_s", 0) > 0 and m.get("examples_per_s"):
        steps = probe["window_s"] * m["examples_per_s"] / m["batch"]
        return role_cpu_s(probe, role) / steps
    return m[f"{role}_cpu_per_step_s"]


# --------------------------------------------------------------------------- calibration
def calibration_topologies(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``--calibrate-on`` (``SxW,...``), or every server count of the check with 3 and with 6 workers
    (3: the reference job's; 6, twice as many: loaded, as the check mostly is; fewer when the check
    has fewer)."""
    if args.calibrate_on:
        tops = [parse_topology(t) for t in args.calibrate_on.split(",")]
        if len({s for s, _ in tops}) < 2:
            raise SystemExit(f"--calibrate-on {args.calibrate_on}: the per-request costs need at least two server counts")
        return tops
    servers = sorted({s for s, _ in check_topologies(args)}) or [1, 2]
    if len(servers) < 2:  # a per-request cost needs two request counts
        servers = sorted({*servers, 2 if servers[0] == 1 else 1})
    return [(s, w) for w in sorted({min(3, args.workers), min(6, args.workers)}) for s in servers]


def parse_topology(text: str) -> tuple[int, int]:
    try:
        s, w = (int(v) for v in text.strip().lower().split("x"))
    except ValueError:
        raise SystemExit(f"not a topology: {text!r} (SERVERSxWORKERS, e.g. 2x3)") from None
    if s < 1 or w < 1:
        raise SystemExit(f"a topology needs at least one server and one worker: {text!r}")
    return s, w


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    log("calibrating: in-process compute and update rule, ipc latency ...")
    ref_c, ref_p = mlp_compute_s([128], 32, args.compute_steps)
    big_c, big_p = mlp_compute_s([BIG_HIDDEN], 32, args.compute_steps)
    apply = apply_s_per_param()
    lat = ipc_latency_s()
    log(
        f"  reference MLP {ref_p:,} params: {ref_c * 1e3:.3f} ms/step; {BIG_HIDDEN}-wide {big_p:,}: {big_c * 1e3:.3f} ms; "
        f"apply {apply * 1e9:.2f} ns/param; ipc latency {lat * 1e6:.1f} us"
    )
    tops = calibration_topologies(args)
    log(f"calibrating: the reference job on {', '.join(f'{s}x{w}' for s, w in tops)}; C (1x1, wide) ...")
    jobs = {f"{s}x{w}": measure(MNIST_JOB, s, w, args.steps_short, args.steps_long, runner=args.runner) for s, w in tops}
    c = measure(MNIST_JOB, 1, 1, args.steps_short, args.steps_long, [f"model.args.hidden=[{BIG_HIDDEN}]"], runner=args.runner)
    out = {
        "compute": {"reference": ref_c, "wide": big_c},
        "params": {"reference": ref_p, "wide": big_p},
        "apply_s_per_param": apply,
        "latency_s": lat,
        "jobs": {**jobs, "C": c},
    }
    out.update(fit_calibration(out, list(jobs.values())))
    c100_c, c100_p = mlp_compute_s(DENSE_100M_HIDDEN, 32, 3)
    out["compute"]["dense100m"] = c100_c
    dense100 = Workload(f"dense MLP 784-{'-'.join(map(str, DENSE_100M_HIDDEN))}-10 (batch 32)", c100_p, 32, c100_c,
                        out["workloads"]["reference"]["worker_step_s"])
    out["workloads"]["dense100m"] = asdict(dense100)
    log(f"  100M model {c100_p:,} params: {c100_c * 1e3:.1f} ms/step")
    loads = [load_of(j["long"].get("probe")) for j in jobs.values()]
    if loads and all(loads):
        # The coordinator's and the launcher's CPU while a job trains (heartbeats, ticks, status polls, the
        # /proc sampler): a rate per second, not per step; the calibration jobs' mean. The check adds it to
        # the other processes' load measured with each topology: Topology.other_load.
        out["background_cores"] = statistics.mean(x["background"] for x in loads)
        log(f"  coordinator and launcher: {out['background_cores']:.3f} cores while a job trains; other processes "
            f"during the calibration jobs: {max(x['outside'] for x in loads):.2f} cores at most")
    if args.ctr:
        ctr, out["jobs"]["D"] = calibrate_ctr(args, Costs(**out["costs"]))
        out["workloads"]["ctr"] = asdict(ctr)
    return out


def fit_calibration(cal: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The costs and the reference workload fitted to ``points`` (measurements of the reference job) and
    ``cal``'s job C, with ``cal``'s in-process figures: the ``costs``, ``workloads`` and ``fitted`` of a
    calibration."""
    params = cal.get("params") or {}  # (a calibration saved before it recorded them: count them)
    ref_p = params["reference"] if "reference" in params else mlp_params([128])
    big_p = params["wide"] if "wide" in params else mlp_params([BIG_HIDDEN])
    ref_c, big_c = cal["compute"]["reference"], cal["compute"]["wide"]
    apply = cal.get("apply_s_per_param", (cal.get("costs") or {}).get("apply_s_per_param"))
    lat = cal.get("latency_s", (cal.get("costs") or {}).get("latency_s"))
    costs, worker_step = solve_request_costs(points, cal["jobs"]["C"], ref_p, big_p, ref_c, big_c, apply, lat)
    ref = Workload("reference MLP (784-128-10, batch 32)", ref_p, 32, ref_c, worker_step)
    log(f"  fitted to {len(points)} + 1 jobs: worker {worker_step * 1e6:.1f} µs/step + {costs.worker_msg_s * 1e6:.1f} µs/request + "
        f"{costs.worker_byte_s * 1e9:.3f} ns/byte; server {costs.server_msg_s * 1e6:.1f} µs/request + "
        f"{costs.server_byte_s * 1e9:.3f} ns/byte")
    works = {**cal.get("workloads", {}), "reference": asdict(ref)}
    if "dense100m" in works:  # the reference model's other worker CPU per step, as calibrate() gives it
        works["dense100m"] = {**works["dense100m"], "worker_step_s": worker_step}
    if "ctr" in works and "D" in cal["jobs"]:  # what job D leaves after these costs
        works["ctr"] = asdict(ctr_residuals(Workload(**works["ctr"]), cal["jobs"]["D"], costs))
    return {"costs": asdict(costs), "workloads": works, "fitted": sorted(f"{m['servers']}x{m['workers']}" for m in points)}


def mlp_params(hidden: list[int]) -> int:
    return sum(p.numel() for p in mlp(hidden=hidden).parameters())


def nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The least-squares solution of ``a x ≈ y`` with every ``x ≥ 0``: the best unconstrained solution
    over each subset of the columns whose solution is non-negative (the optimum is one of them; a
    handful of columns here, so all 2^n subsets)."""
    n = a.shape[1]
    best, best_x = math.inf, np.zeros(n)
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        x = np.zeros(n)
        x[cols] = sol
        r = float(np.sum((a @ x - y) ** 2))
        if r < best:
            best, best_x = r, x
    return best_x


def solve_request_costs(
    points: list[dict], wide: dict, ref_p: int, big_p: int, ref_c: float, big_c: float, apply: float, lat: float
) -> tuple[Costs, float]:
    """The per-request and per-byte costs, and the worker's other CPU per step of the reference model:
    the non-negative least-squares fit of every job's worker and server CPU per step (:func:`measure`'s
    figures) — ``points`` of the reference model at any topologies (two request counts at least), and
    ``wide``, one of the 1024-wide model (the per-byte costs)."""
    if len({round(m["requests_per_step"], 3) for m in points}) < 2:
        raise ValueError("the per-request costs need jobs of at least two request counts (servers)")
    jobs = [(m, 4 * ref_p, ref_c, ref_p) for m in points] + [(wide, 4 * big_p, big_c, big_p)]
    wk = np.array([[1.0, m["requests_per_step"], 2 * nbytes] for m, nbytes, _, _ in jobs])
    wy = np.array([cpu_per_step(m, "worker") - compute for m, _, compute, _ in jobs])
    worker_step, worker_msg, worker_byte = nonnegative_lstsq(wk, wy)
    sk = np.array([[m["requests_per_step"], 2 * nbytes] for m, nbytes, _, _ in jobs])
    sy = np.array([cpu_per_step(m, "server") - apply * params for m, _, _, params in jobs])
    server_msg, server_byte = nonnegative_lstsq(sk, sy)
    costs = Costs(
        worker_msg_s=float(worker_msg),
        worker_byte_s=float(worker_byte),
        server_msg_s=float(server_msg),
        server_byte_s=float(server_byte),
        apply_s_per_param=apply,
        latency_s=lat,
    )
    return costs, float(worker_step)


def calibrate_ctr(args: argparse.Namespace, costs: Costs) -> tuple[Workload, dict[str, Any]]:
    from benchmarks.ctr import HashedWideDeep
    from downpour.data.criteo import load_criteo_dataset
    from downpour.data.criteo_gen import CriteoSpec, generate

    data = os.path.join(args.data, f"criteo-{args.ctr_rows}-0")
    if not os.path.exists(os.path.join(data, "criteo.json")):
        generate(CriteoSpec(rows=args.ctr_rows, seed=0), data, overwrite=True)
    job = load_job(CTR_JOB, [f"data.path={data}"])
    margs = job.model.args
    ds = load_criteo_dataset(data)
    (dense, ids), y = ds.train.take(np.arange(job.training.batch_size))
    model = HashedWideDeep(20, **margs)
    compute = compute_step_s(model, (dense, ids), y, "bce", args.compute_steps)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embedding", "wide.")))
    log("calibrating: job D (CTR, 1x1) ...")
    d = measure(CTR_JOB, 1, 1, args.ctr_steps // 4, args.ctr_steps, [f"data.path={data}"], runner=args.runner)
    rows, req = d["rows_per_step"], d["requests_per_step"]  # table rows: an ID counts once per table
    row_bytes = round(4 * (int(margs.get("dim", 16)) + 1) / 2 + 8)  # the mean of an embedding and a wide row, and the ID
    log(f"  CTR dense {params:,} params, {rows:,.0f} rows/step, {req:.1f} requests/step: forward+backward {compute * 1e3:.2f} ms")
    w = Workload(
        f"CTR Wide & Deep (dim {margs.get('dim')}, batch {job.training.batch_size})",
        params,
        job.training.batch_size,
        compute,
        sparse_rows=rows,
        row_bytes=row_bytes,
        requests_per_server=req,
    )
    w = ctr_residuals(w, d, costs)
    return w, d


def ctr_residuals(w: Workload, d: dict[str, Any], costs: Costs) -> Workload:
    """``w`` with what job D's CPU per step leaves after ``costs``' request, byte and update-rule costs:
    ``server_row_s`` (per row) and ``worker_step_s``."""
    nbytes = step_bytes(w)
    req, rows = w.requests_per_server, w.sparse_rows
    server_row = (
        cpu_per_step(d, "server") - req * costs.server_msg_s - 2 * nbytes * costs.server_byte_s - w.params * costs.apply_s_per_param
    ) / rows
    worker_step = cpu_per_step(d, "worker") - w.compute_s - req * costs.worker_msg_s - 2 * nbytes * costs.worker_byte_s
    return replace(w, server_row_s=server_row, worker_step_s=worker_step)


# --------------------------------------------------------------------------- check and predictions
def check_topologies(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``--topologies``, or servers 1..``--servers`` (or ``--check-servers``) × workers 1..``--workers``."""
    if args.topologies:
        return [parse_topology(t) for t in args.topologies.split(",")]
    servers = [int(v) for v in args.check_servers.split(",")] if args.check_servers else range(1, args.servers + 1)
    return [(s, w) for s in servers for w in range(1, args.workers + 1)]


def check(
    args: argparse.Namespace, costs: Costs, ref: Workload, background: float, measured: dict[str, dict] | None = None,
    fitted: list[str] = (),
) -> list[dict[str, Any]]:
    """Measure (or take from ``measured``, keyed ``SxW``: the calibration's jobs) every topology of the
    check, and predict it; ``fitted``: the topologies the costs were fitted to (marked in the rows)."""
    rows = []
    for s, w in check_topologies(args):
        key = f"{s}x{w}"
        m = (measured or {}).get(key) or measure(MNIST_JOB, s, w, args.steps_short, args.steps_long, runner=args.runner)
        load = load_of(m["long"].get("probe"))
        p = _predicted(costs, ref, s, w, args.cores, background, load.get("outside", 0.0))
        rows.append({"servers": s, "workers": w, "measured": m, "predicted": p, "load": load,
                     "loadavg": m["long"].get("loadavg"), "fitted": key in fitted})
        log(f"  {s}x{w}: {m['examples_per_s']:,.0f} examples/s measured, {p['examples_per_s']:,.0f} least bound, "
            f"{p['run_queue_examples_per_s']:,.0f} run queue, {p['loaded_examples_per_s']:,.0f} with {p['other_load']:.2f} "
            f"cores taken by others; load average {m['long'].get('loadavg')}")
    return rows


def _predicted(
    costs: Costs, ref: Workload, servers: int, workers: int, cores: float, background: float = 0.0, outside: float = 0.0
) -> dict[str, Any]:
    """The least bound and the queueing rate with every core to the job (the model before the run queue),
    and the run-queue model (``Topology(queueing=True, shared_cores=True)``) with ``background`` cores
    taken by the coordinator and the launcher (calibrated), and with ``outside`` more, taken by other
    processes while this topology ran (measured beside it)."""
    other_load = background + outside
    p = predict(costs, ref, Topology(servers, workers, cores=cores))
    q = predict(costs, ref, Topology(servers, workers, cores=cores, queueing=True))
    rq = predict(costs, ref, Topology(servers, workers, cores=cores, queueing=True, shared_cores=True, other_load=background))
    rql = predict(costs, ref, Topology(servers, workers, cores=cores, queueing=True, shared_cores=True, other_load=other_load))
    per_example = p.cpu_per_example_s(ref.batch)
    return {
        "examples_per_s": p.examples_per_s,
        "queueing_examples_per_s": q.examples_per_s,  # the closed queueing network (mean value analysis)
        "other_load": other_load,
        "run_queue_examples_per_s": rq.examples_per_s,  # the cores as the run queue, the coordinator's and launcher's load
        "run_queue_wait_s": rq.stations["cpu"]["wait_s"],
        "loaded_examples_per_s": rql.examples_per_s,  # ... and other processes' load measured beside the job
        "loaded_wait_s": rql.stations["cpu"]["wait_s"],
        "bottleneck": p.bottleneck,
        "loaded_bottleneck": rql.bottleneck,
        "bounds": p.bounds,
        "worker_cpu_per_example_s": per_example["worker"],
        "server_cpu_per_example_s": per_example["server"],
    }


def _pct(measured: float, predicted: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%"


PREDICTIONS = {  # the check's predictions of examples/s: key in _predicted's result, what it is
    "examples_per_s": "least bound",
    "queueing_examples_per_s": "queueing, cores as C servers",
    "run_queue_examples_per_s": "run queue",
    "loaded_examples_per_s": "run queue, the cores others left",
}


def within(rows: list[dict[str, Any]], key: str, tolerance: float = 0.25) -> int:
    """How many rows' ``key`` prediction is within ``tolerance`` of the measured examples/s."""
    return sum(abs(r["predicted"][key] / r["measured"]["examples_per_s"] - 1) <= tolerance for r in rows if key in r["predicted"])


def run_queue_wait_s(m: dict[str, Any]) -> float:
    """The workers' and servers' threads' run-queue wait per step in the long run's steady window."""
    probe = m["long"]["probe"]
    wait = sum(a["wait"] for g, a in probe["groups"].items() if g in ("worker.main", "worker.zmq", "worker.other",
                                                                       "server.main", "server.zmq", "server.other"))
    return wait / (probe["window_s"] * m["examples_per_s"] / m["batch"])


def check_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| S×W | examples/s measured | least bound | error | queueing, cores as C servers | error | run queue | error | "
        "cores others took (load avg) | run queue, cores others left | error | run-queue wait µs/step measured / predicted | "
        "all CPU µs/example measured / predicted | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        mw, ms = (cpu_per_step(m, role) / m["batch"] * 1e6 for role in ("worker", "server"))
        pw, ps = p["worker_cpu_per_example_s"] * 1e6, p["server_cpu_per_example_s"] * 1e6
        x = m["examples_per_s"]
        cells = []
        for key in ("examples_per_s", "queueing_examples_per_s", "run_queue_examples_per_s", None, "loaded_examples_per_s"):
            if key is None:
                avg = r.get("loadavg") or [math.nan]
                cells.append(f"{p.get('other_load', math.nan):.2f} ({avg[0]:.1f})")
            else:
                v = p.get(key, math.nan)
                cells.append(f"{v:,.0f} | {_pct(x, v)}")
        waited = (run_queue_wait_s(m) if (m.get("long") or {}).get("probe") else math.nan) * 1e6
        lines.append(
            f"| {r['servers']}×{r['workers']}{'†' if r.get('fitted') else ''} | {x:,.0f} | {' | '.join(cells)} | "
            f"{waited:,.0f} / {p.get('loaded_wait_s', math.nan) * 1e6:,.0f} | "
            f"{mw + ms:.1f} / {pw + ps:.1f} | {_pct(mw + ms, pw + ps)} |"
        )
    counts = ", ".join(f"{what}: {within(rows, key)}" for key, what in PREDICTIONS.items())
    lines.append(f"\nexamples/s within 25 % of the measured, of {len(rows)}: {counts}")
    others = [r for r in rows if not r.get("fitted")]
    if len(others) < len(rows):
        counts = ", ".join(f"{what}: {within(others, key)}" for key, what in PREDICTIONS.items())
        worst = max(abs(r["predicted"]["loaded_examples_per_s"] / r["measured"]["examples_per_s"] - 1) for r in others) if others else 0
        lines.append(f"† the costs were fitted to these topologies' CPU per step. Of the {len(others)} others: {counts}; "
                     f"the worst miss of the run queue with the cores others left {100 * worst:.0f} %")
    return "\n".join(lines)


def scale_table(costs: Costs, workloads: list[Workload], servers: int, workers: int, gbits: list[float], latency_s: float) -> str:
    lines = [
        "| model | params | network | examples/s | bottleneck | steps/s each bound allows (all workers) |",
        "|---|---:|---|---:|---|---|",
    ]
    for work in workloads:
        for g in gbits:
            p = predict(at_scale(costs, g, latency_s), work, Topology(servers, workers))
            bounds = ", ".join(f"{k} {v:,.0f}" for k, v in p.bounds.items())
            lines.append(f"| {work.name} | {work.params:,} | {g:g} Gbit/s | {p.examples_per_s:,.0f} | {p.bottleneck} | {bounds} |")
    return "\n".join(lines)


def only(args: argparse.Namespace) -> int:
    """``--only SxW``: the reference job on one topology, as the check measures it, ``--repeat`` times."""
    servers, workers = (int(v) for v in args.only.split("x"))
    rows = []
    for _ in range(args.repeat):
        m = measure(os.path.join(_ROOT, "examples", "mnist.yaml"), servers, workers, args.steps_short, args.steps_long,
                    runner=args.runner)
        w, s = (1e6 * m[k] / m["batch"] for k in ("worker_cpu_per_step_s", "server_cpu_per_step_s"))
        rows.append({"examples_per_s": m["examples_per_s"], "worker_us": w, "server_us": s, "all_us": w + s})
        print(f"{servers}x{workers}: {m['examples_per_s']:,.0f} examples/s, CPU per example: workers {w:.1f} µs, "
              f"servers {s:.1f} µs, all {w + s:.1f} µs", flush=True)
    if len(rows) > 1:
        mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        print(f"mean of {len(rows)}: {mean['examples_per_s']:,.0f} examples/s, workers {mean['worker_us']:.1f} µs, "
              f"servers {mean['server_us']:.1f} µs, all {mean['all_us']:.1f} µs per example")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"only": args.only, "runs": rows, "environment": environment()}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=4, help="check topologies 1..SERVERS servers (default 4)")
    ap.add_argument("--workers", type=int, default=8, help="... × 1..WORKERS workers (default 8)")
    ap.add_argument("--cores", type=float, default=float(os.cpu_count() or 1), help="cores of this machine (default: all)")
    ap.add_argument("--steps-short", type=int, default=200, help="steps (all workers) of the shorter run (default 200)")
    ap.add_argument("--steps-long", type=int, default=1600, help="steps (all workers) of the longer run (default 1600)")
    ap.add_argument("--compute-steps", type=int, default=200, help="forward+backward steps timed in process (default 200)")
    ap.add_argument("--ctr", action=argparse.BooleanOptionalAction, default=True, help="calibrate the CTR model too (default on)")
    ap.add_argument("--ctr-rows", type=int, default=300_000, help="rows of the generated Criteo data for job D")
    ap.add_argument("--ctr-steps", type=int, default=400, help="steps of job D's longer run (the shorter: a quarter)")
    ap.add_argument("--data", default=os.path.join(_ROOT, "data"), help="folder for generated data")
    ap.add_argument("--at-scale", default="20x100", help="SxW of the predictions at scale (default 20x100)")
    ap.add_argument("--gbits", default="10,25", help="link speeds of the predictions at scale, Gbit/s (default 10,25)")
    ap.add_argument("--net-latency-us", type=float, default=50.0, help="one-way network latency at scale, µs (default 50: assumed)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="calibrate and predict only")
    ap.add_argument("--check-servers", metavar="LIST", help="check only these server counts, e.g. 3,4 (default 1..SERVERS)")
    ap.add_argument("--topologies", metavar="SxW,...", help="check only these topologies (e.g. to repeat noisy points)")
    ap.add_argument("--calibrate-on", metavar="SxW,...", help="the reference job's topologies the request costs are "
                    "fitted to (default: each server count of the check with 1 and with 3 workers)")
    ap.add_argument("--calibration-from", metavar="PATH", help="take the calibration from an earlier --json and measure "
                    "the check only (to split the check over several runs)")
    ap.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="sample every thread of the job from /proc while it trains (benchmarks/scale_probe.py): the "
                    "cores other processes take, the coordinator's and launcher's share (default on)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a job override for every job run, e.g. cluster.cpu_policy=normal (repeatable)")
    ap.add_argument("--json", help="write everything here")
    ap.add_argument(
        "--from-json",
        metavar="PATH",
        action="append",
        help="measure nothing: take the calibration and the check's measurements from "
        "an earlier --json, and print the tables again (with --cost, what other costs would predict); "
        "several: the first one's calibration, every one's check rows",
    )
    ap.add_argument("--refit", action="store_true", help="with --from-json: fit the costs again, to the saved check "
                    "rows of the --calibrate-on topologies and the saved job C (e.g. a JSON of an older calibration)")
    ap.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="replace one of the calibrated costs (a Costs field) before predicting, e.g. server_msg_s=150e-6",
    )
    ap.add_argument("--only", metavar="SxW", help="measure only this topology (no calibration, no model): examples/s and "
                    "CPU per example per role, --repeat times (to compare two commits run it on each, back to back)")
    ap.add_argument("--repeat", type=int, default=1, help="with --only: how many times (default 1)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    args.runner = run_job
    if args.probe:
        from benchmarks.scale_probe import probe_runner

        args.runner = probe_runner(period_s=0.2, trim=0.15)
    if args.overrides:
        base, extra = args.runner, list(args.overrides)
        args.runner = lambda path, overrides: base(path, [*overrides, *extra])
    if args.only:
        return only(args)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    saved = None
    if args.from_json:
        saved = {"check": []}
        for path in args.from_json:
            with open(path) as f:
                one = json.load(f)
            saved.setdefault("calibration", one["calibration"])
            saved["check"] += one["check"]
        cal = saved["calibration"]
    elif args.calibration_from:
        with open(args.calibration_from) as f:
            cal = json.load(f)["calibration"]
    else:
        cal = calibrate(args)
    if args.refit:
        if saved is None:
            ap.error("--refit refits saved measurements: give --from-json")
        by_topology = {f"{r['servers']}x{r['workers']}": r for r in saved["check"]}
        wanted = [f"{s}x{w}" for s, w in calibration_topologies(args)]
        missing = [t for t in wanted if t not in by_topology]
        if missing:
            ap.error(f"--refit: the saved check has no {', '.join(missing)} (see --calibrate-on)")
        cal = {**cal, **fit_calibration(cal, [by_topology[t]["measured"] for t in wanted])}
        loads = [by_topology[t].get("load") for t in wanted]
        if loads and all(loads):
            cal["background_cores"] = statistics.mean(x["background"] for x in loads)
    for item in args.cost:
        name, _, value = item.partition("=")
        if name not in cal["costs"]:
            ap.error(f"--cost: unknown cost {name!r}; known: {', '.join(cal['costs'])}")
        cal["costs"][name] = float(value)
    costs = Costs(**cal["costs"])
    works = {k: Workload(**v) for k, v in cal["workloads"].items()}
    print(
        "costs:",
        ", ".join(
            f"{k} {v * 1e9:.2f} ns" if "byte" in k or "param" in k else f"{k} {v * 1e6:.1f} µs"
            for k, v in cal["costs"].items()
            if v is not None
        ),
    )
    for w in works.values():
        print(
            f"workload {w.name}: {w.params:,} params, forward+backward {w.compute_s * 1e3:.3f} ms, other worker CPU "
            f"{w.worker_step_s * 1e3:.3f} ms/step"
            + (f", {w.sparse_rows:,.0f} rows/step at {w.server_row_s * 1e9:.0f} ns each on the servers" if w.sparse_rows else "")
        )
    background = cal.get("background_cores", 0.0)
    if saved is not None:
        fitted = set(cal.get("fitted", []))
        rows = [{**r, "fitted": f"{r['servers']}x{r['workers']}" in fitted,
                 "predicted": _predicted(costs, works["reference"], r["servers"], r["workers"], args.cores, background,
                                         (r.get("load") or {}).get("outside", 0.0))} for r in saved["check"]]
    else:
        own = None if args.calibration_from else cal["jobs"]  # this run's calibration jobs are check rows, not run again
        rows = check(args, costs, works["reference"], background, own, cal.get("fitted", [])) if args.check else []
    if rows:
        print(f"\ncheck on this machine ({args.cores:g} cores), reference job, async:\n")
        print(check_table(rows))
    s, w = (int(v) for v in args.at_scale.split("x"))
    gbits = [float(g) for g in args.gbits.split(",")]
    print(f"\npredicted at {s} servers × {w} workers, one host per process, {args.net_latency_us:g} µs one-way latency:\n")
    print(scale_table(costs, list(works.values()), s, w, gbits, args.net_latency_us * 1e-6))
    total = time.perf_counter() - t0
    print(f"\n{total:.0f}s in all; {environment()['cpu_model']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "calibration": cal, "check": rows, "total_s": total}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
