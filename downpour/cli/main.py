"""``downpour``: train a job locally, or start one role of a job by hand.

    downpour train JOB.yaml [--run-dir DIR] [--data DIR] [--set key=value ...] [--resume RUN_DIR|URL]
                            [--launcher local|ray [--address auto|HOST:PORT]]
    downpour coordinator JOB.yaml [--bind tcp://HOST:PORT | --port P] [--advertise HOST] [--run-dir DIR] [--recover]
    downpour server --coordinator HOST:PORT [--host HOST] [--port P] [--advertise HOST] [--rank N]
    downpour worker --coordinator HOST:PORT [--advertise HOST] [--rank N]
    downpour node                           (everything from DOWNPOUR_* variables or TF_CONFIG: cli/node.py)
    downpour status RUN_DIR | HOST:PORT [--json]
    downpour keys DIR                       (then --keys DIR on every hand-started node)
    downpour datagen criteo --out DIR [--rows N] [--seed S] [--test-fraction F] [--files K]
    downpour scheduler | submit JOB.yaml | jobs | cancel ID | logs ID    (many jobs: see cli/scheduler.py)

Hand-started nodes may take their settings from the environment instead, in
the spirit of ps-lite's DMLC_* variables: DOWNPOUR_ROLE (for ``downpour node``),
DOWNPOUR_COORDINATOR, DOWNPOUR_RANK, DOWNPOUR_HOST, DOWNPOUR_PORT, DOWNPOUR_ADVERTISE, DOWNPOUR_JOB,
DOWNPOUR_BIND, DOWNPOUR_RUN_DIR, DOWNPOUR_RECOVER=1, DOWNPOUR_METRICS_HOST, DOWNPOUR_KEYS,
DOWNPOUR_INSECURE=1, or TF_CONFIG. cli/ is the only place that reads them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from typing import Any

from downpour.cli.common import check_advertise, coordinator_url, env_int, node_security, port_number
from downpour.cli.datagen import add_datagen_parser
from downpour.cli.scheduler import add_scheduler_parsers
from downpour.cli.serve import add_serve_parser
from downpour.cli.status import cmd_status
from downpour.errors import ConfigError, DownpourError, JobEnded, JobFailed
from downpour.processes import TermSignal

log = logging.getLogger("downpour")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def _load(args) -> Any:
    from downpour.config import load_job

    overrides = list(args.set or [])
    if getattr(args, "data", None):
        overrides.append(f"data.path={args.data}")
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume_from={args.resume}")
    return load_job(args.job, overrides)


# -- train ------------------------------------------------------------------
def cmd_train(args) -> int:
    from downpour.api import advisories, check_data, check_run_dir, default_run_dir
    from downpour.launch import make_launcher

    job = _load(args)
    check_data(job)  # missing data: one line saying how to get it, nothing started
    for advice in advisories(job):
        print(f"downpour: WARNING: {advice}", file=sys.stderr, flush=True)
    run_dir = args.run_dir or default_run_dir(job.name)
    check_run_dir(job, run_dir)
    _warn_partitions_left_unread(job)
    if args.insecure:
        print("downpour: WARNING: --insecure: the job's processes talk without authentication or encryption.",
              file=sys.stderr, flush=True)
    device = job.training.device
    if (args.launcher or job.launcher) == "local" and any(d != "cpu" for d in ([device] if isinstance(device, str) else device)):
        import torch

        if not torch.cuda.is_available():
            print(f"downpour: WARNING: training.device {device} asked for, but no GPU is visible here: the workers "
                  "compute on the CPU.", file=sys.stderr, flush=True)
    launcher = make_launcher(job, run_dir, args.launcher, insecure=args.insecure, address=args.address)

    def graceful(name: str) -> None:
        """The first Ctrl-C or SIGTERM stops the job without losing work: workers leave after their
        current step, a final checkpoint is committed, every process stops. The second stops at once
        (a SIGTERM within processes.REPEAT_S of the first is the same stop, sent by two routes)."""
        signal.signal(signal.SIGINT, _at_once)
        print(f"\ndownpour: {name}: stopping gracefully (final checkpoint, then every process "
              "stops). Ctrl-C again stops at once.", file=sys.stderr, flush=True)
        launcher.request_stop()

    term = TermSignal(lambda: graceful("SIGTERM"), again=lambda: _at_once(signal.SIGTERM, None)).install()

    def interrupted(signum: int, frame: Any) -> None:
        term.at = time.monotonic()  # (a SIGTERM from now on stops at once, once it is not a repeat)
        graceful("SIGINT")

    signal.signal(signal.SIGINT, interrupted)  # also where started with SIGINT ignored
    print(f"downpour: {job.name}: {job.cluster.num_servers} servers, {job.cluster.num_workers} workers, "
          f"{job.training.consistency}; run folder {run_dir}", flush=True)
    try:
        result = _run_with_progress(launcher, job, quiet=args.quiet)
    except KeyboardInterrupt:
        print("downpour: interrupted; every process of the job was stopped", file=sys.stderr)
        return 130
    s = result.summary
    if s.get("status") == "stopped":
        last = (s.get("checkpoints") or {}).get("last")
        if s.get("stopped") and not last and not s.get("examples"):  # before training began
            print(f"downpour: stopped before training began; nothing to continue from: start the job again in a new "
                  f"run folder (or remove {shlex.quote(result.run_dir)})")
        elif s.get("stopped"):  # ended at once: a server was lost during the stop
            print(f"downpour: stopped after {s['examples']} examples in {s['steps']} steps; {s['stopped']}"
                  + (f" (--resume {shlex.quote(result.run_dir)})" if last else ""))
        else:
            _warn_checkpoints(s, result.run_dir)
            print(f"downpour: stopped gracefully after {s['examples']} examples in {s['steps']} steps; "
                  + (f"checkpoint {last} committed: continue with --resume {shlex.quote(result.run_dir)}" if last else
                     "no checkpoint was committed, so there is nothing to continue from (checkpoint.enabled: false?)"))
        print(f"summary: {os.path.join(result.run_dir, 'summary.json')}")
        return 0
    online = s.get("online")
    if online:  # a stream: no test split; its events were scored before they were trained on
        auc, ll = online.get("prequential_auc"), online.get("prequential_logloss")
        print(f"stream: {online['events']} events trained, {online['malformed']} malformed skipped; prequential AUC "
              f"{_fmt4(auc)}, log loss {_fmt4(ll)}")
    else:  # (n/a: no test split, or a loss with no accuracy)
        print(f"test accuracy: {_fmt4(s['test_accuracy'])}   test loss: {_fmt4(s['test_loss'])}"
              + "".join(f"   {k}: {_fmt4(v)}" for k, v in (s.get("test_metrics") or {}).items()))
        for why in (s.get("test_loss_undefined"), s.get("test_logloss_undefined")):
            if why:
                print(f"downpour: {why}", file=sys.stderr)
        for k, why in (s.get("test_metric_errors") or {}).items():
            print(f"downpour: training.metrics.{k} failed: {why}", file=sys.stderr)
    if s.get("test_auc") is None and s.get("test_auc_undefined"):
        print(f"test AUC: n/a ({s['test_auc_undefined']})   test log loss: {_fmt4(s.get('test_logloss'))}")
    if s.get("test_auc") is not None:
        best = s.get("optimum_auc")
        print(f"test AUC: {s['test_auc']:.4f}" + (f"   (optimum {best:.4f}: gap {best - s['test_auc']:.4f})" if best is not None else "")
              + f"   test log loss: {_fmt4(s.get('test_logloss'))}"
              + (f" (optimum {s['optimum_logloss']:.4f})" if s.get("optimum_logloss") is not None else ""))
    print(f"{s['examples']} examples in {s['steps']} steps, {s['train_s']:.1f}s training "
          f"({s['examples_per_s']:.0f} examples/s), {s['wall_s']:.1f}s wall; "
          f"staleness mean {s['staleness']['mean']:.2f} max {s['staleness']['max']}")
    _warn_checkpoints(s, result.run_dir)
    print(f"summary: {os.path.join(result.run_dir, 'summary.json')}")
    return 0


def _warn_checkpoints(s: dict, run_dir: str) -> None:
    """Say on the console when the job's checkpoints did not all land: none committed, or the final
    one (end of training, a graceful stop) abandoned, so a --resume would start further back."""
    ck = s.get("checkpoints") or {}
    log_path = os.path.join(run_dir, "logs", "coordinator.log")
    if ck.get("enabled") and ck.get("abandoned") and not ck.get("count"):
        print(f"downpour: WARNING: no checkpoint was committed ({ck['abandoned']} abandoned, at {ck.get('url')}): this job "
              f"cannot be resumed; the coordinator's log says why ({log_path})", file=sys.stderr)
    elif ck.get("final_abandoned"):
        print(f"downpour: WARNING: the final checkpoint was not written ({ck['final_abandoned']}): a --resume of this run "
              f"continues from {ck.get('last')} (step {ck.get('last_step')}) and trains again what came after it; "
              f"the coordinator's log says more ({log_path})", file=sys.stderr)


def _warn_partitions_left_unread(job) -> None:
    """A stream with more partitions than workers: a worker holds one partition at a time, so the
    others are read only as workers finish theirs (an unbounded stream's never)."""
    if job.data.name != "stream" or not job.data.url:
        return
    from downpour.stream.api import StreamSpec

    partitions = StreamSpec.parse(job.data.url, dict(job.data.args or {})).partitions
    workers = job.cluster.num_workers
    if partitions > workers:
        print(f"downpour: WARNING: the stream has {partitions} partitions and the job {workers} worker(s): a worker holds one "
              f"partition at a time, so {partitions - workers} wait until a worker's partition ends (an unbounded one "
              "never does); give the job at least as many workers as partitions", file=sys.stderr, flush=True)


def _fmt4(value: float | None) -> str:  # (the console's n/a; status.py's _num writes "-")
    return "n/a" if value is None else f"{value:.4f}"


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _at_once(signum: int, frame: Any) -> None:
    """Stop now: every process of the job is stopped (bounded waits); further signals are ignored
    meanwhile, so that the clean-up itself is not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _run_with_progress(launcher, job, quiet: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet or not sys.stdout.isatty():
        last = [0.0]

        def plain(status: dict) -> None:  # a line every 5 s where no terminal is attached
            if quiet or time.monotonic() - last[0] < 5.0 or status.get("phase") != "training":
                return
            last[0] = time.monotonic()
            loss, planned = status.get("loss"), status.get("planned_examples")
            print(f"  {status['examples']}{'' if planned is None else f'/{planned}'} examples, step {status['steps']}, "
                  f"{status['examples_per_s']:.0f} ex/s, loss {'-' if loss is None else round(loss, 4)}", flush=True)

        return launcher.run(plain)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]} ex"),
               TextColumn("step {task.fields[step]}"), TextColumn("{task.fields[rate]:>7.0f} ex/s"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("starting", total=1, step=0, rate=0.0, loss="-", count="0")

        def update(status: dict) -> None:
            loss, planned = status.get("loss"), status.get("planned_examples")  # (None: a stream, until stopped)
            progress.update(task, description=status["phase"], total=None if planned is None else max(1, planned),
                            completed=status["examples"], step=status["steps"], rate=status["examples_per_s"],
                            loss="-" if loss is None else f"{loss:.4f}",
                            count=f"{status['examples']:>7}" + ("" if planned is None else f"/{planned}"))

        result = launcher.run(update)
        s = result.summary  # the final figures, not the last heartbeat's
        progress.update(task, description="finished", total=max(1, s["examples"]), completed=s["examples"], step=s["steps"],
                        count=f"{s['examples']:>7}/{s['examples']}",
                        rate=s["examples_per_s"], loss="-" if s.get("test_loss") is None else f"test {s['test_loss']:.4f}")
        return result


# -- single roles -----------------------------------------------------------
def cmd_coordinator(args) -> int:
    from downpour.coordinator.service import Coordinator
    from downpour.processes import apply_cpu_policy
    from downpour.transport import new_context

    job = _load(args)
    apply_cpu_policy(job.cluster.cpu_policy)
    bind = args.bind or os.environ.get("DOWNPOUR_BIND") or f"tcp://127.0.0.1:{args.port or 7070}"
    if "://" not in bind:
        bind = f"tcp://{bind}"
    check_advertise(args, "coordinator", None)
    if args.run_dir and not args.recover:  # (a folder to recover from is there, or the refusal says so)
        os.makedirs(args.run_dir, mode=0o700, exist_ok=True)
    security = node_security(args, "coordinator", bind)
    ctx = new_context()
    made: dict[str, Any] = {"coord": None, "asked": False}

    def graceful() -> None:  # the first SIGTERM: stop without losing work; a second (not a repeat): at once
        print("coordinator: SIGTERM: stopping gracefully (final checkpoint); a second SIGTERM stops at once",
              file=sys.stderr, flush=True)
        if made["coord"] is not None:
            made["coord"].request_stop()
        else:
            made["asked"] = True  # (before the coordinator was made: it is asked once made)

    # Before the coordinator is made: it writes coordinator.addr, and a launcher stopping the job sends
    # SIGTERM as soon as that file is there. (A service manager signalling every process of the job
    # and the launcher passing the stop on both reach it: the repeat is the same stop.)
    TermSignal(graceful).install()
    coord = Coordinator(ctx, job, bind, args.run_dir, security, recover=args.recover, lost_at=args.lost_at, advertise=args.advertise)
    print(f"coordinator listening on {coord.address}", file=sys.stderr, flush=True)
    made["coord"] = coord
    if made["asked"]:
        coord.request_stop()
    try:
        return coord.serve()
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.destroy(linger=0)


def cmd_server(args) -> int:
    from downpour.server.service import run_server
    from downpour.transport import new_context

    check_advertise(args, "server", coordinator_url(args.coordinator))
    ctx = new_context()
    try:
        return run_server(ctx, coordinator_url(args.coordinator), host=args.host, rank=args.rank, ipc_dir=args.ipc_dir,
                          metrics_host=args.metrics_host, security=node_security(args, "server", coordinator_url(args.coordinator)),
                          advertise=args.advertise, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C, or its launcher stopping every process at once
        return 130
    finally:
        ctx.destroy(linger=0)


def cmd_worker(args) -> int:
    from downpour.config import load_job
    from downpour.transport import new_context
    from downpour.worker.service import job_factories, run_worker

    # SIGTERM as Ctrl-C: a worker stopped while it trains leaves the job cleanly (its shards go back).
    signal.signal(signal.SIGTERM, _terminate)
    check_advertise(args, "worker", coordinator_url(args.coordinator))
    ctx = new_context()
    try:
        local = os.environ.get("LOCAL_RANK", "")  # the worker's place on its machine (torchrun's name): its GPU
        security = node_security(args, "worker", coordinator_url(args.coordinator))
        # --insecure: whoever answers on the coordinator's address sends the job; the worker imports
        # only built-in names, or the factories a job file on its own command line names.
        trusted = job_factories(load_job(args.job)) if args.insecure and getattr(args, "job", None) else set()
        rank = args.rank if args.rank is not None or security is None else security.rank  # its own key's rank
        return run_worker(ctx, coordinator_url(args.coordinator), rank=rank, metrics_host=args.metrics_host,
                          security=security, trusted_factories=trusted if args.insecure else None, advertise=args.advertise,
                          local_rank=int(local) if local.isdigit() else None)
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.destroy(linger=0)


def cmd_keys(args) -> int:
    from downpour.transport import create_job_keys

    if os.path.exists(args.folder) and os.listdir(args.folder):
        raise ConfigError(f"{args.folder} is not empty; give a new folder for the job's keys")
    create_job_keys(args.folder, args.workers)
    own = f"worker-0 .. worker-{args.workers - 1}" if args.workers else "worker (shared by every worker)"
    print(f"keys for the job's roles (coordinator, server, {own}, client) are in {args.folder} (0700). Give each\n"
          f"node the public *.key files and its own *.key_secret, and start it with --keys FOLDER.")
    return 0


def cmd_node(args) -> int:
    """One role from DOWNPOUR_* variables or TF_CONFIG alone (see cli/node.py)."""
    import subprocess

    from downpour.cli.node import node_settings

    s = node_settings(os.environ)
    args.job, args.bind, args.run_dir, args.recover, args.set = s.job, s.bind, s.run_dir, s.recover, list(s.overrides)
    args.coordinator, args.rank, args.host, args.port, args.advertise = s.coordinator, s.rank, s.host, s.port, s.advertise
    args.metrics_host, args.keys, args.insecure = s.metrics_host, s.keys, s.insecure
    if s.run_dir and s.role == "coordinator":
        os.makedirs(s.run_dir, exist_ok=True)
    if not s.also_coordinator:
        return {"coordinator": cmd_coordinator, "server": cmd_server, "worker": cmd_worker}[s.role](args)
    # TF1 style (no chief in TF_CONFIG): worker 0 runs the coordinator beside itself, which ends with it.
    cmd = [sys.executable, "-m", "downpour", "coordinator", s.job, "--bind", s.bind]
    for o in s.overrides:
        cmd += ["--set", o]
    cmd += [*(["--advertise", s.advertise] if s.advertise else []), *(["--run-dir", s.run_dir] if s.run_dir else []),
            *(["--recover"] if s.recover else []), *(["--insecure"] if s.insecure else ["--keys", s.keys] if s.keys else [])]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    coordinator = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        code = cmd_worker(args)
        coordinator.wait(timeout=120.0)
        return code or (coordinator.returncode or 0)
    finally:
        if coordinator.poll() is None:
            coordinator.terminate()
            coordinator.wait(timeout=10.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="downpour", description="Downpour parameter-server training")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    sub = p.add_subparsers(dest="command", required=True)

    env = os.environ.get
    t = sub.add_parser("train", help="run a whole job on this machine (coordinator, servers, workers)")
    t.add_argument("job", help="job file (YAML)")
    t.add_argument("--run-dir", help="run folder (default: runs/NAME-TIMESTAMP)")
    t.add_argument("--data", help="the job's data: a folder or fsspec URL, read by the job's data source (sets data.path)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a job field, e.g. --set epochs=3 (null: an optional field off, any other back to its default)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument("--insecure", action="store_true",
                   help="no authentication or encryption between the job's processes (default: ipc sockets in a "
                        "folder only you can open; over tcp or Ray, CURVE with keys in RUN_DIR/keys)")
    t.add_argument("--launcher", help="what starts the processes: local (this machine) or ray (default: the job's launcher)")
    t.add_argument("--address", help="with --launcher ray: the Ray cluster, auto or HOST:PORT (default: the job's ray.address)")
    t.add_argument("--resume", metavar="RUN_DIR_OR_URL",
                   help="continue from the latest checkpoint of that run (same step, data position, optimizer state)")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("coordinator", help="start the coordinator of a hand-started job")
    c.add_argument("job", nargs="?" if env("DOWNPOUR_JOB") else None, default=env("DOWNPOUR_JOB"))
    c.add_argument("--bind", help="address to listen on, e.g. tcp://0.0.0.0:7070 (default 127.0.0.1:7070)")
    c.add_argument("--port", type=port_number, default=env_int("DOWNPOUR_PORT"), help="port of the default bind, 127.0.0.1:PORT")
    c.add_argument("--advertise", default=env("DOWNPOUR_ADVERTISE"),
                   help="host name or address the other hosts reach this coordinator at (default: from --bind)")
    c.add_argument("--run-dir")
    c.add_argument("--data")
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.add_argument("--resume", metavar="RUN_DIR_OR_URL", help="continue from the latest checkpoint there")
    c.add_argument("--recover", action="store_true",
                   help="take over the running job a crashed coordinator saved in --run-dir (bind its address again)")
    c.add_argument("--lost-at", type=float, help=argparse.SUPPRESS)  # when the launcher found it dead (time.time())
    c.add_argument("--keys", default=env("DOWNPOUR_KEYS"), help="the job's key folder (downpour keys DIR)")
    c.add_argument("--insecure", action="store_true", help="plain sockets: no authentication, no encryption")
    c.set_defaults(fn=cmd_coordinator)

    for role, fn in (("server", cmd_server), ("worker", cmd_worker)):
        r = sub.add_parser(role, help=f"start one {role} of a job")
        r.add_argument("--coordinator", default=env("DOWNPOUR_COORDINATOR"), help="coordinator HOST:PORT")
        r.add_argument("--rank", type=int, default=env_int("DOWNPOUR_RANK"), help="preferred rank")
        r.add_argument("--metrics-host", default=env("DOWNPOUR_METRICS_HOST"),
                       help="interface for this node's /metrics (default: the job's monitor.http_host)")
        r.add_argument("--keys", default=env("DOWNPOUR_KEYS"), help="the job's key folder (downpour keys DIR)")
        r.add_argument("--insecure", action="store_true", help="plain sockets: no authentication, no encryption")
        r.add_argument("--advertise", default=env("DOWNPOUR_ADVERTISE"),
                       help="host name or address peers reach this node at (default: with --host 0.0.0.0, the address of "
                            "the interface that routes to the coordinator)")
        if role == "worker":
            r.add_argument("--job", default=None, help="with --insecure: a local job file; the worker imports only "
                           "the model/data factories it names (else only built-in names)")
        if role == "server":
            r.add_argument("--host", default=env("DOWNPOUR_HOST", "127.0.0.1"), help="interface to listen on")
            r.add_argument("--port", type=port_number, default=env_int("DOWNPOUR_PORT"), help="fixed port (default: a free one)")
            r.add_argument("--ipc-dir", help="folder for ipc sockets (when the coordinator is ipc://)")
        r.set_defaults(fn=fn)

    n = sub.add_parser("node", help="start the role named by DOWNPOUR_ROLE (or TF_CONFIG), configured from the environment")
    n.set_defaults(fn=cmd_node, data=None, resume=None, lost_at=None, ipc_dir=None)

    s = sub.add_parser("status", help="show a running or finished job")
    s.add_argument("target", help="run folder or coordinator HOST:PORT")
    s.add_argument("--json", action="store_true", help="print the raw status (or summary.json) as JSON")
    s.add_argument("--keys", default=None, help="the job's key folder (default: RUN_DIR/keys, or DOWNPOUR_KEYS)")
    s.add_argument("--insecure", action="store_true", help="the job runs without keys")

    k = sub.add_parser("keys", help="make a job's keys (CURVE key pairs per role) for hand-started nodes")
    k.add_argument("folder")
    k.add_argument("--workers", type=int, default=0, metavar="N",
                   help="one key per worker rank (worker-0 .. worker-N-1), each bound to its rank, instead of one "
                        "worker key shared by every worker")
    k.set_defaults(fn=cmd_keys)
    s.set_defaults(fn=cmd_status)

    add_datagen_parser(sub)
    add_scheduler_parsers(sub)
    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if os.getcwd() not in sys.path and "" not in sys.path:
        # A job's import paths (mypkg.models:make_cnn) resolve from the current folder, as in the job's
        # processes (python -m downpour ...); after what is installed, which a local file never shadows.
        sys.path.append(os.getcwd())
    try:
        parser = build_parser()  # (its defaults read DOWNPOUR_* variables)
    except DownpourError as err:
        print(f"downpour: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.fn(args) or 0)
    except JobFailed as err:
        print(f"downpour: job failed: {err}", file=sys.stderr)
        return 1
    except JobEnded as err:  # (a coordinator asked to recover a job that is over: the exit its end had)
        print(f"downpour: {err}", file=sys.stderr)
        return err.code
    except DownpourError as err:
        print(f"downpour: {err}", file=sys.stderr)
        return 2
