"""Jobs across hosts: the Ray launcher against the local one, and the reference job between two
"hosts" (network namespaces) over a shaped link.

``launchers``: the reference job (examples/mnist.yaml) started by

* ``local``: :class:`LocalLauncher` as ``downpour train`` runs it (ipc sockets + shared memory);
* ``local-tcp``: the same over tcp with CURVE, the transport a job across machines needs;
* ``ray``: the Ray launcher with a Ray instance started for each run on this machine (what
  ``--launcher ray`` without an address does), so Ray's start-up is measured every run; every
  Ray node is then this machine, so the job talks over unix sockets and shared memory;
* ``ray-tcp``: the same over tcp with CURVE (what a job on a Ray cluster of several machines uses).

interleaved run by run. Reported: the coordinator's examples/s (training loop only), and for
Ray the seconds from ``ray.init`` to the placement group being ready, and the launcher's wall time.

``two-hosts``: needs root. Host A (a namespace) runs the coordinator and 2 servers
(``--host 0.0.0.0``, CURVE keys, one per worker), host B the 3 workers, joined by a veth pair through a bridge;
each host's outgoing traffic is limited with tc ``tbf`` to the link's rate (this kernel has no
``netem``, so no added delay: a 0.2 ms delay is not applied; a namespace pair's own
round trip is about 0.05 ms). Each configuration is run at each rate: examples/s, seconds of
training until the test accuracy first reaches 83% (worker 0 evaluates every 3 of its shards), and
the final accuracy.

    sudo .venv/bin/python benchmarks/multi_host.py launchers --runs 3 --json launchers.json
    sudo .venv/bin/python benchmarks/multi_host.py two-hosts --rates 1000,100 --epochs 2 --json two.json
    sudo .venv/bin/python benchmarks/multi_host.py two-hosts --rates 100 --configs plain --json slow-plain.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import yaml  # noqa: E402

from benchmarks.common import environment  # noqa: E402
from downpour.config import job_to_dict, load_job  # noqa: E402
from downpour.launch import make_launcher  # noqa: E402

DEFAULT_JOB = os.path.join(_ROOT, "examples", "mnist.yaml")
TARGET = 0.83
LAUNCHERS = {"local": ("local", []), "local-tcp": ("local", ["cluster.transport=tcp"]), "ray": ("ray", []),
             "ray-tcp": ("ray", ["cluster.transport=tcp"])}
COMPRESSION = {
    "plain": [],
    "topk-0.1%-dgc+int8-pull": ["compression.push.codec=topk", "compression.push.ratio=0.001", "compression.push.dgc.momentum=0.9",
                                "compression.push.dgc.warmup_steps=20", "optimizer.momentum=0", "compression.pull=int8"],
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def spread(values: list[float | None], fmt: str) -> str:
    vs = [v for v in values if v is not None]
    if not vs:
        return "n/a"
    if len(vs) == 1:
        return format(vs[0], fmt)
    return f"{format(statistics.mean(vs), fmt)} [{format(min(vs), fmt)}–{format(max(vs), fmt)}]"


# -- launchers ------------------------------------------------------------------------------------
def run_launcher(name: str, job_path: str, overrides: list[str], folder: str) -> dict[str, Any]:
    launcher_name, extra = LAUNCHERS[name]
    job = load_job(job_path, [*overrides, *extra, "monitor.dashboard=false", "checkpoint.enabled=false"])
    run_dir = os.path.join(folder, f"{name}-{time.monotonic_ns()}")
    t0 = time.perf_counter()
    s = make_launcher(job, run_dir, launcher_name).run().summary
    wall = time.perf_counter() - t0
    placement = os.path.join(run_dir, "placement.json")
    start_s = json.load(open(placement)).get("start_s") if os.path.exists(placement) else None
    return {"examples_per_s": s["examples_per_s"], "train_s": s["train_s"], "test_accuracy": s["test_accuracy"],
            "launcher_wall_s": wall, "ray_start_s": start_s}


def launchers(args) -> dict[str, Any]:
    names = args.launchers or list(LAUNCHERS)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="dp-launchers-") as folder:
        for i in range(args.runs):
            for name in names:
                r = run_launcher(name, args.job, args.set or [], folder)
                runs[name].append(r)
                log(f"run {i + 1} {name}: {r['examples_per_s']:,.0f} examples/s, accuracy {r['test_accuracy']:.4f}, "
                    f"wall {r['launcher_wall_s']:.1f}s" + (f", Ray ready in {r['ray_start_s']:.1f}s" if r["ray_start_s"] else ""))
                if args.json:  # what is done so far, should a time limit stop the invocation
                    with open(args.json, "w") as f:
                        json.dump({"environment": environment(), "runs": runs, "partial": True}, f, indent=1)
    base = {n: statistics.mean(r["examples_per_s"] for r in rs) for n, rs in runs.items()}
    lines = ["| launcher | examples/s | vs local | vs local-tcp | test accuracy | launcher wall s | Ray start s |",
             "|---|---|---|---|---|---|---|"]
    for n, rs in runs.items():
        vs = {b: f"{base[n] / base[b]:.2f}×" if b in base else "n/a" for b in ("local", "local-tcp")}
        lines.append(f"| {n} | {spread([r['examples_per_s'] for r in rs], ',.0f')} | {vs['local']} "
                     f"| {vs['local-tcp']} | {spread([r['test_accuracy'] for r in rs], '.4f')} "
                     f"| {spread([r['launcher_wall_s'] for r in rs], '.1f')} | {spread([r['ray_start_s'] for r in rs], '.1f')} |")
    return {"runs": runs, "table": "\n".join(lines)}


# -- two hosts ------------------------------------------------------------------------------------
def run_on_hosts(hosts, job: dict, folder: str, timeout_s: float = 1800, started: list | None = None) -> dict[str, Any]:
    """Run ``job`` with the coordinator and servers on host ``a`` of ``hosts`` and the workers on
    host ``b`` (tcp, CURVE, one key per worker); return its summary.json. Kills what it started.
    ``started``: each process is appended to it as (name, pid) once it starts (``coordinator``,
    ``server-i``, ``worker-r``), e.g. for a :class:`benchmarks.scale_probe.Sampler` to read."""
    path = os.path.join(folder, f"job-{time.monotonic_ns()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    keys, run_dir = os.path.join(folder, f"keys-{time.monotonic_ns()}"), os.path.join(folder, f"run-{time.monotonic_ns()}")
    workers = job["cluster"]["num_workers"]  # one key per worker (each worker its own, bound to its rank)
    subprocess.run([sys.executable, "-m", "downpour", "keys", keys, "--workers", str(workers)], check=True, capture_output=True,
                   timeout=60)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    started = [] if started is None else started
    a = hosts.addresses["a"]
    dp = [sys.executable, "-m", "downpour"]
    logf = open(os.path.join(folder, "nodes.log"), "ab")
    try:
        def start(name: str, host: str, cmd: list[str]) -> None:
            procs.append(hosts.popen(host, cmd, env=env, stdout=logf, stderr=subprocess.STDOUT))
            started.append((name, procs[-1].pid))

        start("coordinator", "a", [*dp, "coordinator", path, "--bind", "tcp://0.0.0.0:7070", "--run-dir", run_dir, "--keys", keys])
        for i in range(job["cluster"]["num_servers"]):
            start(f"server-{i}", "a", [*dp, "server", "--coordinator", f"{a}:7070", "--host", "0.0.0.0", "--keys", keys])
        for r in range(workers):
            start(f"worker-{r}", "b", [*dp, "worker", "--coordinator", f"{a}:7070", "--keys", keys, "--rank", str(r)])
        deadline = time.monotonic() + timeout_s
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        logf.close()
    if any(codes):
        raise RuntimeError(f"a process failed: exit codes {codes}; see {folder}/nodes.log")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def run_two_hosts(job: dict, rate_mbit: float, folder: str) -> dict[str, Any]:
    from tests.netns import Hosts

    with Hosts() as hosts:
        hosts.add("a")
        hosts.add("b")
        hosts.shape("a", rate_mbit)
        hosts.shape("b", rate_mbit)
        s = run_on_hosts(hosts, job, folder)
    curve = s.get("accuracy_curve") or []
    return {"examples_per_s": s["examples_per_s"], "train_s": s["train_s"], "test_accuracy": s["test_accuracy"],
            "seconds_to_target": next((t for t, _, acc in curve if acc >= TARGET), None), "curve": curve}


def two_hosts(args) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    folder = tempfile.mkdtemp(prefix="dp-two-hosts-")
    configs = args.configs.split(",") if args.configs else list(COMPRESSION)
    if unknown := [c for c in configs if c not in COMPRESSION]:
        raise SystemExit(f"unknown --configs {unknown}: choose from {', '.join(COMPRESSION)}")
    for i in range(args.runs):
        for rate in rates:
            for name in configs:
                overrides = COMPRESSION[name]
                job = job_to_dict(load_job(args.job, [*(args.set or []), *overrides, f"epochs={args.epochs}",
                                                      "monitor.eval_every_shards=3", "monitor.dashboard=false",
                                                      "checkpoint.enabled=false"]))
                t0 = time.perf_counter()
                r = run_two_hosts(job, rate, folder)
                runs.setdefault(f"{rate:g} Mbit/s|{name}", []).append(r)
                log(f"run {i + 1} {rate:g} Mbit/s {name}: {r['examples_per_s']:,.0f} examples/s, to {TARGET}: "
                    f"{r['seconds_to_target']} s, final {r['test_accuracy']:.4f} ({time.perf_counter() - t0:.0f}s)")
                if args.json:  # what is done so far, should a time limit stop the invocation
                    with open(args.json, "w") as f:
                        json.dump({"environment": environment(), "runs": runs, "partial": True}, f, indent=1)
    lines = [f"| link | config | examples/s | s of training to {TARGET} | final accuracy |", "|---|---|---|---|---|"]
    for key, rs in runs.items():
        rate, name = key.split("|")
        lines.append(f"| {rate} | {name} | {spread([r['examples_per_s'] for r in rs], ',.0f')} "
                     f"| {spread([r['seconds_to_target'] for r in rs], '.1f')} | {spread([r['test_accuracy'] for r in rs], '.4f')} |")
    return {"runs": runs, "table": "\n".join(lines), "folder": folder}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["launchers", "two-hosts"])
    ap.add_argument("--job", default=DEFAULT_JOB)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job field")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--launchers", nargs="+", choices=list(LAUNCHERS), help="launchers: which (default: all)")
    ap.add_argument("--rates", default="1000,100", help="two-hosts: link rates in Mbit/s")
    ap.add_argument("--epochs", type=int, default=2, help="two-hosts: epochs per run")
    ap.add_argument("--configs", help=f"two-hosts: which of {', '.join(COMPRESSION)} (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    env = environment()
    result = launchers(args) if args.what == "launchers" else two_hosts(args)
    print(result["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
