"""``downpour scheduler`` and the verbs that talk to it: submit, jobs, cancel, logs.

    downpour scheduler [--dir DIR] [--host H] [--port P] [--policy las|fifo|priority|drf] [--policy-option K=V ...]
                       [--cpus N] [--gpus N] [--memory-mb N] [--max-restarts N] [--min-run-s S]
    downpour submit JOB.yaml [--priority P] [--queue Q] [--user U] [--set KEY=VALUE ...] [--memory-mb N]
    downpour jobs [--json]          downpour cancel ID          downpour logs ID [--lines N]

The verbs find the scheduler by --scheduler URL, else DOWNPOUR_SCHEDULER, else the URL a scheduler
wrote into DIR/scheduler.url (default DIR: runs/scheduler), else http://127.0.0.1:8765.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import sys
import threading

import yaml

from downpour.config import parse_yaml
from downpour.errors import ConfigError

DEFAULT_DIR = os.path.join("runs", "scheduler")
DEFAULT_URL = "http://127.0.0.1:8765"


def _client(args):
    from downpour.scheduler.client import SchedulerClient

    url = args.scheduler or os.environ.get("DOWNPOUR_SCHEDULER")
    if not url:
        try:
            with open(os.path.join(args.dir or DEFAULT_DIR, "scheduler.url")) as f:
                url = f.read().strip()
        except OSError:
            url = DEFAULT_URL
    return SchedulerClient(url)


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--policy-option: expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def cmd_scheduler(args) -> int:
    import uvicorn

    from downpour.scheduler.http import build_app
    from downpour.scheduler.resources import Resources, machine_resources
    from downpour.scheduler.service import Scheduler, SchedulerSettings

    here = machine_resources(args.gpus)
    node = Resources(cpus=args.cpus if args.cpus is not None else here.cpus, gpus=here.gpus,
                     memory_mb=args.memory_mb if args.memory_mb is not None else here.memory_mb)
    if node.cpus <= 0 or node.memory_mb <= 0 or node.gpus < 0:
        raise ConfigError(f"--cpus/--memory-mb must be > 0 and --gpus >= 0, got {node.as_dict()}")
    root = os.path.abspath(args.dir)
    settings = SchedulerSettings(root=root, nodes={socket.gethostname(): node}, policy=args.policy,
                                 policy_options=dict(_option(o) for o in args.policy_option or []), tick_s=args.tick_s,
                                 min_run_s=args.min_run_s, max_restarts=args.max_restarts, backoff_s=args.backoff_s,
                                 stop_timeout_s=args.stop_timeout_s)
    sched = Scheduler(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise ConfigError(f"--host/--port: cannot listen on {args.host}:{args.port}: {err}") from None
    sock.listen(128)  # connections made as soon as scheduler.url exists wait in the backlog, not refused
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    with open(os.path.join(root, "scheduler.url"), "w") as f:
        f.write(url + "\n")
    stop = threading.Event()
    loop = threading.Thread(target=sched.run, args=(stop,), name="scheduler-loop", daemon=True)
    loop.start()
    print(f"downpour scheduler: {url}  policy {sched.policy.name}, cluster {node.as_dict()}, folder {root} "
          f"({sum(1 for j in sched.jobs.values() if j.phase.holds_resources)} running jobs adopted)", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(sched), log_level="warning", lifespan="off"))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        loop.join(timeout=10)
        sched.store.close()
    print("downpour scheduler: stopped; running jobs keep running and are adopted by the next scheduler on this folder")
    return 0


def cmd_submit(args) -> int:
    try:
        with open(args.job) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"job file {args.job}: {err.strerror}") from None
    raw = parse_yaml(text, args.job) if text.strip() else None
    # A relative data path means one relative to where `submit` runs; the job runs there too.
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("path"), str) \
            and "://" not in raw["data"]["path"]:
        raw["data"]["path"] = os.path.abspath(raw["data"]["path"])
        text = yaml.safe_dump(raw, sort_keys=False)
    job = _client(args).submit(job_yaml=text, user=args.user or getpass.getuser(), queue=args.queue, priority=args.priority,
                               overrides=list(args.set or []), memory_mb=args.memory_mb, cwd=os.getcwd())
    print(f"job {job['id']} ({job['name']}) queued: {job['tasks']} tasks, queue {job['queue']}, user {job['user']}, "
          f"priority {job['priority']}")
    return 0


def cmd_jobs(args) -> int:
    jobs = _client(args).jobs()
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    wide = console.width >= 140  # a narrow terminal gets the columns that matter most (--json has them all)
    table = Table(title="downpour jobs")
    cols = ("ID", "name", "queue/user", "prio", "phase", "pos", "tasks", "wait s", "run s", "attained", "policy rank",
            "preempt", "restarts", "message")
    keep = cols if wide else ("ID", "name", "prio", "phase", "tasks", "run s", "restarts", "message")
    for col in keep:
        table.add_column(col, overflow="fold", ratio=4 if col == "message" else None)
    for j in jobs:
        row = dict(zip(cols, (str(j["id"]), j["name"], f"{j['queue']}/{j['user']}", str(j["priority"]), j["phase"],
                              str(j["position"] or ""), str(j["tasks"]), f"{j['wait_s']:.0f}", f"{j['ran_s']:.0f}",
                              f"{j['attained']:.0f}", j["rank"], str(j["preemptions"]), str(j["restarts"]), j["message"])))
        table.add_row(*(row[c] for c in keep))
    console.print(table)
    return 0


def cmd_cancel(args) -> int:
    job = _client(args).cancel(args.id)
    how = "cancelled" if job["phase"] == "cancelled" else "stopping (it writes a checkpoint first)"
    print(f"job {job['id']}: {how}")
    return 0


def cmd_logs(args) -> int:
    sys.stdout.write(_client(args).logs(args.id, args.lines))
    return 0


def add_scheduler_parsers(sub) -> None:
    def client_flags(p):
        p.add_argument("--scheduler", help="the scheduler's URL (default: DOWNPOUR_SCHEDULER, or DIR/scheduler.url)")
        p.add_argument("--dir", help=f"the scheduler's folder, to find its URL (default {DEFAULT_DIR})")

    s = sub.add_parser("scheduler", help="run the job scheduler (queue, policies, preemption, restarts, HTTP API)")
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"its folder: the job database and each job's runs (default {DEFAULT_DIR})")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765, help="HTTP port (0: any free one; the URL goes to DIR/scheduler.url)")
    s.add_argument("--policy", default="las", help="fifo, priority, drf or las (default las)")
    s.add_argument("--policy-option", action="append", metavar="KEY=VALUE",
                   help="a policy setting, e.g. thresholds=[600,6000], aging_per_s=0.01, weights={gold: 2}, backfill=true")
    s.add_argument("--cpus", type=int, help="CPU slots (default: this machine's cores)")
    s.add_argument("--gpus", type=int, help="GPUs (default: what torch sees)")
    s.add_argument("--memory-mb", type=int, help="memory (default: this machine's)")
    s.add_argument("--tick-s", type=float, default=1.0)
    s.add_argument("--min-run-s", type=float, default=30.0, help="a job runs at least this long before it may be preempted")
    s.add_argument("--max-restarts", type=int, default=3, help="restarts of a failed job (from its last checkpoint)")
    s.add_argument("--backoff-s", type=float, default=5.0, help="wait before the first restart; doubles each time")
    s.add_argument("--stop-timeout-s", type=float, default=300.0, help="how long a stop may take before it is forced")
    s.set_defaults(fn=cmd_scheduler)

    p = sub.add_parser("submit", help="queue a job with the scheduler")
    p.add_argument("job", help="job file (YAML)")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--queue", default="default")
    p.add_argument("--user", help="default: your login name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job field")
    p.add_argument("--memory-mb", type=int, help="memory per task (default: the scheduler's)")
    client_flags(p)
    p.set_defaults(fn=cmd_submit)

    j = sub.add_parser("jobs", help="the scheduler's jobs, queue order first")
    j.add_argument("--json", action="store_true")
    client_flags(j)
    j.set_defaults(fn=cmd_jobs)

    c = sub.add_parser("cancel", help="cancel a job (a running one checkpoints and stops)")
    c.add_argument("id", type=int)
    client_flags(c)
    c.set_defaults(fn=cmd_cancel)

    lg = sub.add_parser("logs", help="the output of a job's current run")
    lg.add_argument("id", type=int)
    lg.add_argument("--lines", type=int, default=100)
    client_flags(lg)
    lg.set_defaults(fn=cmd_logs)
